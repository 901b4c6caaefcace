"""The wire contract: round trips, and a typed, counted rejection for every class of bad payload."""

from __future__ import annotations

import contextlib
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import DecodeError, Decoder, RejectReason, encode, telemetry_decoder
from shared.models import RackCommState, RackTelemetry
from tests.contract.samples import measurements, msgpack_values, telemetry


def _raw() -> dict[str, object]:
    raw: dict[str, object] = msgpack.unpackb(encode(telemetry()), raw=False)
    return raw


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def test_round_trip_is_identity() -> None:
    original = telemetry()
    decoder = telemetry_decoder()
    assert decoder.decode(encode(original)) == original
    assert decoder.accepted == 1
    assert not decoder.rejected


def test_encoding_is_deterministic() -> None:
    assert encode(telemetry()) == encode(telemetry())


def test_comm_lost_rack_round_trips_with_zero_limits() -> None:
    lost = telemetry(
        comm_state=RackCommState.COMM_LOST,
        measurements=measurements(charge_current_limit_a=0.0, discharge_current_limit_a=0.0),
    )
    assert telemetry_decoder().decode(encode(lost)) == lost


def test_contract_refuses_comm_lost_rack_with_current_permission() -> None:
    with pytest.raises(ValueError, match="comm_lost"):
        telemetry(comm_state=RackCommState.COMM_LOST)


@pytest.mark.parametrize(
    ("mutate", "reason", "fragment"),
    [
        (lambda d: _pack([1, 2, 3]), RejectReason.MALFORMED, "not a map"),
        (lambda d: b"\xc1\x00garbage", RejectReason.MALFORMED, "not msgpack"),
        (lambda d: _pack({**d, "schema_version": [2, 0]}), RejectReason.UNSUPPORTED_VERSION, "major 2"),
        (lambda d: _pack({k: v for k, v in d.items() if k != "schema_version"}), RejectReason.MALFORMED,
         "schema_version"),
        (lambda d: _pack({**d, "rack_id": ""}), RejectReason.INVALID, "rack_id"),
        (lambda d: _pack({**d, "surprise": 1}), RejectReason.INVALID, "surprise"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "pack_voltage_v": 1000.5}}),
         RejectReason.INVALID, "pack_voltage_v"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "temperature_max_c": 126.0}}),
         RejectReason.INVALID, "temperature_max_c"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "temperature_min_c": -41.0}}),
         RejectReason.INVALID, "temperature_min_c"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "charge_current_limit_a": -1.0}}),
         RejectReason.INVALID, "charge_current_limit_a"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "soc_pct": 100.1}}),
         RejectReason.INVALID, "soc_pct"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "soh_pct": -0.1}}),
         RejectReason.INVALID, "soh_pct"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "current_a": math.nan}}),
         RejectReason.INVALID, "current_a"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "pack_voltage_v": math.inf}}),
         RejectReason.INVALID, "pack_voltage_v"),
        (lambda d: _pack({**d, "measurements": {**d["measurements"], "cell_voltage_min_v": 3.5}}),
         RejectReason.INVALID, "exceeds"),
        (lambda d: _pack({**d, "comm_state": "sleepy"}), RejectReason.INVALID, "comm_state"),
    ],
)
def test_each_bad_payload_class_is_rejected_and_counted(mutate, reason, fragment) -> None:  # type: ignore[no-untyped-def]
    decoder = telemetry_decoder()
    with pytest.raises(DecodeError) as info:
        decoder.decode(mutate(_raw()), topic="t/rack/x/telemetry")
    assert info.value.reason is reason
    assert fragment in str(info.value)
    assert "t/rack/x/telemetry" in str(info.value)
    assert decoder.rejected[reason] == 1
    assert decoder.accepted == 0


def test_oversized_payload_rejected_before_parsing() -> None:
    decoder = Decoder(RackTelemetry, max_payload_bytes=1024)
    payload = _pack({**_raw(), "pad": "x" * 2000})
    with pytest.raises(DecodeError) as info:
        decoder.decode(payload)
    assert info.value.reason is RejectReason.OVERSIZED
    assert decoder.rejected[RejectReason.OVERSIZED] == 1


def test_newer_minor_version_is_accepted() -> None:
    payload = _pack({**_raw(), "schema_version": [1, 9]})
    assert telemetry_decoder().decode(payload).schema_version == (1, 9)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_only_raise_decode_error(data: bytes) -> None:
    decoder = telemetry_decoder()
    try:
        decoder.decode(data)
    except DecodeError:
        assert sum(decoder.rejected.values()) == 1


_tree = msgpack_values()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*_raw().keys(), "x"]), _tree, max_size=10))
def test_fuzz_structured_maps_only_raise_decode_error(fields: dict[str, object]) -> None:
    base = _raw()
    base.update(fields)
    with contextlib.suppress(DecodeError):
        telemetry_decoder().decode(_pack(base))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(measurements().model_dump().keys())), _tree)
def test_fuzz_one_measurement_field_only_raises_decode_error(name: str, value: object) -> None:
    base = _raw()
    base["measurements"] = {**base["measurements"], name: value}  # type: ignore[dict-item]
    try:
        decoded = telemetry_decoder().decode(_pack(base))
    except DecodeError:
        return
    assert decoded.measurements is not None
