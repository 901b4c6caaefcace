"""The controller's records (``shared.records``) are a fast path of the pydantic contract, never a
second contract: they accept nothing the models reject, and what they accept has the models' values.

The records are derived from the models at import, so nothing here compares them field by field:
the payloads below do. ``agree`` is the rule, checked on every payload: if the records accept, the
models accept and the record equals the model's; and ``TelemetryDecoder`` (records, then models for
what the records refuse) gives the models' outcome, the same rejection reason included. The last
tests hold the derivation to refusing, at import, whatever of a model it cannot translate.
"""

from __future__ import annotations

import gc
import math
import re
from typing import Annotated, Any

import annotated_types
import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from shared.codec import DecodeError, Decoder, RejectReason, encode, telemetry_decoder
from shared.models import (
    SCHEMA_MAJOR,
    ContactorState,
    LinkCounters,
    LinkStatus,
    ProtectionFlags,
    RackCommState,
    RackMeasurements,
    RackTelemetry,
    UnitLink,
)
from shared.records import (
    FlagsRecord,
    TelemetryDecoder,
    TelemetryRecord,
    derive_records,
    record_of,
)
from tests.contract.samples import msgpack_values, telemetry

_FAST = msgspec.msgpack.Decoder(TelemetryRecord)


def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = msgpack.unpackb(encode(telemetry()), raw=False)
    return raw


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def agree(payload: bytes) -> TelemetryRecord | None:
    """Check the rule on one payload; the record when the records' fast path accepted it."""
    try:
        fast: TelemetryRecord | None = _FAST.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        fast = None
    if fast is not None and fast.schema_version[0] != SCHEMA_MAJOR:
        fast = None
    authority = telemetry_decoder()
    model: RackTelemetry | None
    try:
        model = authority.decode(payload)
    except DecodeError as exc:
        model, reason = None, exc.reason
    if fast is not None:
        assert model is not None, f"records accepted what the models reject: {fast}"
        assert fast == record_of(model)
    decoder = TelemetryDecoder()
    if model is None:
        with pytest.raises(DecodeError) as info:
            decoder.decode(payload)
        assert info.value.reason is reason
        assert decoder.rejected == authority.rejected
        assert decoder.accepted == 0
    else:
        assert decoder.decode(payload) == record_of(model)
        assert decoder.accepted == 1
        assert decoder.fast_accepted == (1 if fast is not None else 0)
    return fast


def test_the_sample_payload_takes_the_fast_path() -> None:
    assert agree(encode(telemetry())) is not None


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("measurements", "soc_pct"), "64.5"),  # a numeric string is not a number
        (("measurements", "charge_current_limit_a"), "9999"),
        (("measurements", "charge_current_limit_a"), True),  # nor a bool
        (("measurements", "alarms", "cell_over_voltage"), 0),  # nor a number a bool
        (("rack_id",), b"rack-01"),  # nor bytes text
        (("seq",), 7.0),  # nor a float an integer
    ],
)
def test_no_path_coerces_a_wire_type(path: tuple[str, ...], value: object) -> None:
    raw = _raw()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    decoder = TelemetryDecoder()
    with pytest.raises(DecodeError) as caught:
        decoder.decode(_pack(raw))
    assert caught.value.reason is RejectReason.INVALID
    assert path[-1] in str(caught.value)
    assert decoder.accepted == 0 and decoder.rejected[RejectReason.INVALID] == 1


def _numeric_bounds(model: type[BaseModel]) -> list[tuple[str, Any, Any]]:
    bounds: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        ge = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
        le = next((m.le for m in info.metadata if isinstance(m, annotated_types.Le)), None)
        if ge is not None or le is not None:
            bounds.append((name, ge, le))
    return bounds


def _probes(ge: float | None, le: float | None) -> list[object]:
    values: list[object] = [math.nan, math.inf, -math.inf, True, None, "1"]
    for bound in (ge, le):
        if bound is not None:
            values += [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf),
                       bound - 1, bound + 1, int(bound)]
    return values


@pytest.mark.parametrize(("name", "ge", "le"), _numeric_bounds(RackMeasurements))
def test_every_measurement_bound_is_the_models(name: str, ge: float | None, le: float | None) -> None:
    for value in _probes(ge, le):
        raw = _raw()
        raw["measurements"][name] = value
        agree(_pack(raw))


@pytest.mark.parametrize(("name", "ge", "le"), _numeric_bounds(RackTelemetry) + _numeric_bounds(UnitLink))
def test_every_top_level_and_unit_bound_is_the_models(name: str, ge: float | None, le: float | None) -> None:
    for value in _probes(ge, le):
        raw = _raw()
        if name in raw:
            raw[name] = value
        else:
            raw["units"][0][name] = value
        agree(_pack(raw))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("schema_version"),
        lambda d: d.update(schema_version=[2, 0]),
        lambda d: d.update(schema_version=[1, 0, 0]),
        lambda d: d.update(schema_version=[True, 0]),
        lambda d: d.update(schema_version=[1, 9]),
        lambda d: d.update(rack_id="rack-01\n"),
        lambda d: d.update(rack_id="-rack"),
        lambda d: d.update(rack_id="r" * 65),
        lambda d: d.update(surprise=1),
        lambda d: d["measurements"].update(surprise=1),
        lambda d: d["measurements"]["alarms"].update(surprise=True),
        lambda d: d["units"][0]["counters"].update(surprise=1),
        lambda d: d.update(units=[]),
        lambda d: d.update(units=d["units"] * 65),
        lambda d: d.update(measurements=None),
        lambda d: d.update(comm_state="comm_lost"),
        lambda d: d.update(comm_state="comm_lost", measurements=None),
        lambda d: d["measurements"].update(cell_voltage_min_v=3.5),
        lambda d: d["measurements"].update(temperature_min_c=30.0),
        lambda d: d["measurements"].update(contactor="ajar"),
        lambda d: d["measurements"].pop("contactor"),
        lambda d: d["measurements"].pop("alarms"),
        lambda d: d["measurements"].pop("soc_pct"),
        lambda d: d["measurements"].update(cell_voltage_max_location="x" * 65),
        lambda d: d["units"][0].update(status="asleep"),
        lambda d: d["units"][0].update(last_exception_code=256),
    ],
)
def test_structural_defects_get_the_models_verdict(mutate: Any) -> None:
    raw = _raw()
    mutate(raw)
    agree(_pack(raw))


def test_non_map_garbage_and_oversize_get_the_models_verdict() -> None:
    for payload in (_pack([1, 2]), b"\xc1\x00", b"", _pack(_raw()) + b"\x00"):
        agree(payload)
    decoder = TelemetryDecoder(max_payload_bytes=256)
    with pytest.raises(DecodeError) as info:
        decoder.decode(encode(telemetry()))
    assert info.value.reason is RejectReason.OVERSIZED
    assert Decoder(RackTelemetry, 256).max_payload_bytes == decoder.max_payload_bytes


_tree = msgpack_values(text=70, binary=8, width=3, leaves=10)  # text past the 64-character bounds
_PLACES = ["top", "measurements", "alarms", "unit", "counters"]


def _place(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if where == "top":
        return raw
    if where == "measurements":
        return raw["measurements"]  # type: ignore[no-any-return]
    if where == "alarms":
        return raw["measurements"]["alarms"]  # type: ignore[no-any-return]
    if where == "unit":
        return raw["units"][0]  # type: ignore[no-any-return]
    return raw["units"][0]["counters"]  # type: ignore[no-any-return]


_MODEL_AT: dict[str, type[BaseModel]] = {
    "top": RackTelemetry, "measurements": RackMeasurements, "alarms": ProtectionFlags,
    "unit": UnitLink, "counters": LinkCounters,
}
_DEFAULTED = [
    (where, name) for where, model in _MODEL_AT.items()
    for name, info in model.model_fields.items() if not info.is_required()
]


@pytest.mark.parametrize(("where", "name"), _DEFAULTED)
def test_every_field_left_out_gets_the_models_default(where: str, name: str) -> None:
    raw = _raw()
    del _place(raw, where)[name]
    fast = agree(_pack(raw))
    # The models default schema_version for producers building one; the wire must carry it.
    assert (fast is None) == (name == "schema_version")


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_one_field_set_to_anything_gets_the_models_verdict(data: st.DataObject) -> None:
    raw = _raw()
    where = data.draw(st.sampled_from(_PLACES))
    target = _place(raw, where)
    name = data.draw(st.sampled_from([*target.keys(), "extra"]))
    target[name] = data.draw(_tree)
    agree(_pack(raw))


def _within(model: type[BaseModel], name: str) -> st.SearchStrategy[float]:
    (_, ge, le), = [b for b in _numeric_bounds(model) if b[0] == name]
    return st.floats(min_value=ge, max_value=le, allow_nan=False, allow_infinity=False)


@st.composite
def _valid_payloads(draw: st.DrawFn) -> bytes:
    m: dict[str, Any] = {
        name: draw(_within(RackMeasurements, name)) for name, _, _ in _numeric_bounds(RackMeasurements)
    }
    ordered = (("cell_voltage_min_v", "cell_voltage_max_v"), ("temperature_min_c", "temperature_max_c"))
    for low, high in ordered:
        m[low], m[high] = sorted((m[low], m[high]))
    names = list(ProtectionFlags.model_fields)
    m["alarms"] = ProtectionFlags(**dict.fromkeys(draw(st.lists(st.sampled_from(names), max_size=3)), True))
    m["warnings"] = ProtectionFlags(**dict.fromkeys(draw(st.lists(st.sampled_from(names), max_size=3)), True))
    m["contactor"] = draw(st.sampled_from(ContactorState))
    m["cell_voltage_max_location"] = draw(st.text(max_size=64))
    comm = draw(st.sampled_from(RackCommState))
    if comm is RackCommState.COMM_LOST:
        m["charge_current_limit_a"] = m["discharge_current_limit_a"] = 0.0
    units = tuple(
        UnitLink(unit=f"u{i}", status=draw(st.sampled_from(LinkStatus)),
                 consecutive_failures=draw(st.integers(0, 2**63 - 1)),
                 last_exception_code=draw(st.none() | st.integers(0, 255)),
                 counters=LinkCounters(ok=draw(st.integers(0, 2**63 - 1))))
        for i in range(draw(st.integers(1, 4)))
    )
    model = RackTelemetry(
        site_id="site-a", rack_id=draw(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")),
        stream_id=draw(st.from_regex(r"\A[0-9a-f]{8,32}\Z")),
        seq=draw(st.integers(0, 2**63 - 1)), timestamp_s=draw(st.floats(0, 1e300)),
        poll_interval_ms=draw(st.integers(10, 60_000)), comm_state=comm,
        measurements=RackMeasurements(**m) if comm is RackCommState.OK or draw(st.booleans()) else None,
        units=units,
    )
    return encode(model)


@settings(max_examples=300, deadline=None)
@given(_valid_payloads())
def test_every_valid_payload_takes_the_fast_path_with_the_models_values(payload: bytes) -> None:
    assert agree(payload) is not None


def test_records_read_their_flags_as_the_models_do() -> None:
    for names in ((), ("cell_over_voltage",), ("internal_fault", "cell_imbalance", "insulation_fault")):
        model = ProtectionFlags(**dict.fromkeys(names, True))
        record = msgspec.convert(model.model_dump(), FlagsRecord)
        assert record.raised() == model.raised()
        assert record.any() == model.any()


def test_records_stay_out_of_the_cyclic_collector() -> None:
    """Six records per payload at 2000 payloads a second: none of them can be in a reference cycle
    (frozen, holding only scalars and records), so the collector does not track them."""
    record = TelemetryDecoder().decode(encode(telemetry()))
    assert record.measurements is not None
    for item in (record, record.measurements, record.measurements.alarms, record.units[0],
                 record.units[0].counters):
        assert not gc.is_tracked(item), type(item).__name__


# The derivation itself, on small models: what it translates gives the model's verdicts; what it
# cannot translate is refused when the records are built (at import), never dropped.


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Tagged(_Frozen):
    # Rust's `$` (pydantic's engine) matches only at the end; Python's also before a final newline.
    tag: Annotated[str, Strict(), Field(pattern=r"^[a-z]+\$?$")]
    # Bounded below only, finite: the record bounds it above by the largest float.
    reading: Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)] = 1.0
    # Not finite by contract: the record must not add a bound the model does not have.
    spare: float | None = None


@pytest.mark.parametrize(
    "value",
    [{"tag": "ab"}, {"tag": "ab\n"}, {"tag": "ab$"}, {"tag": "ab$\n"}, {"tag": "a$b"},
     {"tag": "ab", "reading": math.inf}, {"tag": "ab", "reading": math.nan}, {"tag": "ab", "reading": 0.0},
     {"tag": "ab", "reading": 5e-324}, {"tag": "ab", "reading": 1.7976931348623157e308},
     {"tag": "ab", "spare": math.inf}, {"tag": "ab", "spare": -math.inf}, {"tag": "ab", "spare": None}],
)
def test_a_derived_record_gives_its_models_verdict(value: dict[str, Any]) -> None:
    record = derive_records(_Tagged, names={_Tagged: "TaggedRecord"})[_Tagged]
    try:
        model: _Tagged | None = _Tagged.model_validate(value)
    except ValueError:
        model = None
    try:
        fast: msgspec.Struct | None = msgspec.msgpack.decode(_pack(value), type=record)
    except msgspec.ValidationError:
        fast = None
    assert (fast is None) == (model is None), value
    if model is not None:
        assert msgspec.structs.asdict(fast) == model.model_dump()  # type: ignore[arg-type]


class _Inner(_Frozen):
    n: int = 0


class _Outer(_Frozen):
    inner: _Inner = _Inner()


class _Checked(_Frozen):
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> _Checked:
        _check_order(self)
        return self


def _check_order(value: Any) -> None:
    if value.low > value.high:
        raise ValueError("low exceeds high")


def test_a_cross_field_check_runs_on_the_record_as_on_the_model() -> None:
    record = derive_records(_Checked, names={_Checked: "CheckedRecord"}, checks={_Checked: _check_order})
    decode = msgspec.msgpack.Decoder(record[_Checked]).decode
    assert msgspec.structs.astuple(decode(_pack({"low": 1, "high": 2}))) == (1, 2)
    with pytest.raises(msgspec.ValidationError, match="low exceeds high"):
        decode(_pack({"low": 3, "high": 2}))


def _model(name: str, annotation: Any, config: ConfigDict | None = None) -> type[BaseModel]:
    """A model of one field ``x``, frozen and refusing extra fields unless ``config`` says otherwise."""
    config = config or ConfigDict(frozen=True, extra="forbid")
    return type(name, (BaseModel,), {"__annotations__": {"x": annotation}, "model_config": config})


class _Validated(_Frozen):
    x: int

    @field_validator("x")
    @classmethod
    def _even(cls, value: int) -> int:
        return value


class _Aliased(_Frozen):
    x: int = Field(alias="y")


class _Factory(_Frozen):
    x: tuple[int, ...] = Field(default_factory=tuple)


@pytest.mark.parametrize(
    ("model", "checks", "why"),
    [
        (_model("Multiple", Annotated[int, annotated_types.MultipleOf(2)]), {}, "MultipleOf"),
        (_model("Listed", list[int]), {}, "list"),
        (_model("Dollar", Annotated[str, Field(pattern=r"^a$|^b$")]), {}, "inside pattern"),
        (_model("Finite", Annotated[int, Field(allow_inf_nan=False)]), {}, "non-float"),
        (_model("Loose", int, ConfigDict(frozen=True, extra="ignore")), {}, "extra='forbid'"),
        (_model("Thawed", int, ConfigDict(extra="forbid")), {}, "frozen"),
        (_Validated, {}, "field validators"),
        (_Aliased, {}, "aliases"),
        (_Factory, {}, "default factories"),
        (_Checked, {}, "model_validator"),  # a cross-field rule the record would not run
        (_Outer, {}, "_Inner: no record name"),
        (_Inner, {_Checked: _check_order}, "not reached"),  # a stale entry
    ],
)
def test_the_derivation_refuses_what_it_cannot_translate(
    model: type[BaseModel], checks: dict[type[BaseModel], Any], why: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(why)):
        derive_records(model, names={model: "Record"}, checks=checks)


def test_a_python_re_model_keeps_its_pattern() -> None:
    config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re")
    model = _model("PythonRe", Annotated[str, Field(pattern=r"^a$")], config)
    record = derive_records(model, names={model: "Record"})[model]
    assert msgspec.msgpack.decode(_pack({"x": "a\n"}), type=record) is not None  # Python's `$`, as the model
    assert model.model_validate({"x": "a\n"}) is not None
