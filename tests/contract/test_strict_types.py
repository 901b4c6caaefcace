"""Strict decoding: only the wire types the contract names are accepted, on every path.

Before (issue 10, item 3) the fallback decoder coerced the string "9999" into a CCL of 9999 A, ``true``
into 1 A and bytes into a rack id. Here every field of every message a bmslink process decodes is set
to a value of every other msgpack type, and each must be refused with a reason that names the field,
by the controller's telemetry decoder (fast path and authority) and by the generic decoder alike.

The one widening the contract allows is an integer for a float (both are numbers on the wire; a
producer in another language may pack 40.0 as 40).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.cluster import ConsolidatedState, ControllerStatus, LeaderRecord, RackState, RackView
from shared.codec import DecodeError, Decoder, RejectReason, encode
from shared.records import TelemetryDecoder
from tests.contract.samples import msgpack_values, telemetry

# One representative of each msgpack type.
SAMPLES: dict[str, object] = {
    "nil": None,
    "bool": True,
    "int": 7,
    "float": 7.5,
    "str": "7",
    "bin": b"7",
    "array": [7],
    "map": {"v": 7},
}


def _kind(value: object) -> str:
    for name, sample in SAMPLES.items():
        if type(value) is type(sample):
            return name
    raise AssertionError(f"no msgpack kind for {value!r}")


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every leaf of a decoded payload, with its path (schema_version's two bytes included)."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaves(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _leaves(child, (*path, index))
    else:
        yield path, value


def _with(raw: Any, path: tuple[str | int, ...], value: object) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(raw, dict):
        return {**raw, head: _with(raw[head], rest, value)}
    copy = list(raw)
    copy[head] = _with(raw[head], rest, value)  # type: ignore[index]
    return copy


# Fields the contract lets be nil (``X | None``).
OPTIONAL = frozenset({"measurements", "last_exception_code", "since_active_heard_s"})


def _wrong_values(correct: object, path: tuple[str | int, ...]) -> Iterator[tuple[str, object]]:
    kind = _kind(correct)
    allowed = {kind} | ({"int"} if kind == "float" else set()) | ({"nil"} if path[-1] in OPTIONAL else set())
    for name, sample in SAMPLES.items():
        if name not in allowed:
            yield name, sample


def _sample_state() -> ConsolidatedState:
    return ConsolidatedState(
        site_id="site-a", node_id="ctl-a", timestamp_s=1_790_000_000.0, charge_current_limit_a=80.0,
        discharge_current_limit_a=90.0, charge_voltage_limit_v=55.2, discharge_voltage_limit_v=46.4,
        charge_enabled=True, discharge_enabled=True, ccl_reason="CCL 80 A", roster_size=2, eligible_racks=2,
        racks=(RackView(rack_id="rack-01", state=RackState.OK, eligible=True, share=1.0, reason="ok"),),
        unknown_racks=("rack-99",),
    )


MESSAGES: list[BaseModel] = [
    telemetry(),
    _sample_state(),
    ControllerStatus(site_id="site-a", node_id="ctl-a", node_number=1, role="active", epoch=3,
                     since_active_heard_s=0.5, last_change_reason="started", timestamp_s=1.0),
    LeaderRecord(site_id="site-a", node_id="ctl-a", node_number=1, epoch=3, timestamp_s=1.0),
]


def _decoders(model: BaseModel) -> list[Any]:
    decoders: list[Any] = [Decoder(type(model))]
    if type(model) is type(telemetry()):
        decoders.append(TelemetryDecoder())
    return decoders


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_field_set_to_every_other_msgpack_type_is_refused_with_its_name(message: BaseModel) -> None:
    raw = msgpack.unpackb(encode(message), raw=False)
    leaves = list(_leaves(raw))
    assert len(leaves) > 5
    tried = 0
    for path, correct in leaves:
        if correct is None:
            continue  # an optional field left empty: its type is checked where the sample sets it
        for kind, wrong in _wrong_values(correct, path):
            payload = msgpack.packb(_with(raw, path, wrong), use_bin_type=True)
            for decoder in _decoders(message):
                with pytest.raises(DecodeError) as caught:
                    decoder.decode(payload)
                error = caught.value
                assert error.reason in (RejectReason.INVALID, RejectReason.MALFORMED), (path, kind)
                named = str(path[-1]) if isinstance(path[-1], str) else str(path[-2])
                if path[0] != "schema_version":
                    assert named in error.detail, (path, kind, error.detail)
                tried += 1
    assert tried >= 6 * len([leaf for leaf in leaves if leaf[1] is not None])


def test_an_integer_stands_for_a_float_and_nothing_else_does() -> None:
    raw = msgpack.unpackb(encode(telemetry()), raw=False)
    raw["measurements"]["charge_current_limit_a"] = 140
    record = TelemetryDecoder().decode(msgpack.packb(raw))
    assert record.measurements is not None and record.measurements.charge_current_limit_a == 140.0


FIELD_PATHS = [path for path, value in _leaves(msgpack.unpackb(encode(telemetry()), raw=False))
               if value is not None]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELD_PATHS), msgpack_values(leaves=8))
def test_any_value_of_another_type_in_any_telemetry_field_is_refused(
    path: tuple[str | int, ...], value: object
) -> None:
    raw = msgpack.unpackb(encode(telemetry()), raw=False)
    correct = dict(_leaves(raw))[path]
    if _kind(value) not in dict(_wrong_values(correct, path)):
        return  # same type: bounds decide, tested elsewhere
    payload = msgpack.packb(_with(raw, path, value), use_bin_type=True)
    decoder = TelemetryDecoder()
    with pytest.raises(DecodeError):
        decoder.decode(payload)
    assert decoder.accepted == 0 and sum(decoder.rejected.values()) == 1
