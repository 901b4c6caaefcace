"""Whatever registers a device holds, the decoders answer with measurements or a typed error.

Property tests over arbitrary register contents for every stage that reads device data: the flat
and SunSpec decoders, SunSpec discovery (marker, model chain) and its resolution into a plan, and
the merge of several units into one rack. None of them may raise anything but a
:class:`rack_agent.errors.PollError` (in practice ``InvalidDataError`` and its ``DeviceLayoutError``),
since anything else would end the agent's poll loop.
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rack_agent.errors import DeviceLayoutError, InvalidDataError, ModbusExceptionError, ProfileError
from rack_agent.merge import merge_units
from rack_agent.profiles import flat_plan, load_profile
from rack_agent.profiles.plan import RegisterImage, RegisterPlan, decode_measurements
from rack_agent.profiles.spec import FlatProfile, SunSpecProfile, Table
from rack_agent.profiles.sunspec import ILLEGAL_DATA_ADDRESS, MAX_MODELS, discover, sunspec_plan
from shared.models import (
    CAPACITY_MAX_AH,
    CURRENT_ABS_MAX_A,
    PROTECTION_FLAG_NAMES,
    ContactorState,
    ProtectionFlags,
    RackMeasurements,
)
from sim.battery import BatteryModel
from sim.registers import SUNSPEC_BASE_ADDRESS, Identity, flat_image, sunspec_image

REGISTER = st.integers(min_value=0, max_value=0xFFFF)
# Registers that are often a marker, a sign bit or an extreme, as device faults tend to be.
SPICY_REGISTER = st.one_of(
    REGISTER, st.sampled_from([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 0x7F80, 0xFF80, 0x7FC0])
)

# A flat profile that uses every register type and word order, extreme scales, bits and a contactor
# value on f32 and u32 registers, and locations made of f32 and s32 registers.
HOSTILE_FLAT = """\
kind = "flat"
[profile]
name = "hostile"
[points]
pack_voltage_v = { address = 0, type = "f32" }
current_a = { address = 2, type = "s32", scale = 0.001, word_order = "little" }
soc_pct = { address = 4, type = "u16", scale = 0.01, invalid_raw = [65535] }
soh_pct = { address = 5, type = "s16" }
cell_voltage_max_v = { address = 6, type = "f32", word_order = "little" }
cell_voltage_min_v = { address = 8, type = "u32", scale = 1e-9 }
temperature_max_c = { address = 10, type = "s16", scale = 0.1, offset = -40 }
temperature_min_c = { address = 11, type = "s16", scale = 0.1, offset = -40 }
charge_current_limit_a = { address = 12, type = "f32", scale = -1.0 }
discharge_current_limit_a = { address = 14, type = "u16", scale = 1e300 }
charge_voltage_limit_v = { address = 15, type = "u16" }
discharge_voltage_limit_v = { address = 16, type = "u16" }
capacity_ah = { address = 17, type = "f32", scale = 1e38 }
[locations]
cell_voltage_max_location = { format = "cell {}", registers = [{ address = 19, type = "u32" }] }
cell_voltage_min_location = { format = "{}/{}", registers = [
  { address = 21, type = "f32" }, { address = 23 } ] }
temperature_max_location = { format = "sensor {}", registers = [{ address = 24, type = "s32" }] }
[alarms]
internal_fault = { address = 26, type = "f32", bit = 31 }
insulation_fault = { address = 28, bit = 3 }
[warnings]
cell_imbalance = { address = 29, type = "u32", bit = 20 }
[contactor]
address = 31
type = "f32"
closed_values = [1065353216]
"""


@cache
def _flat_plans(tmp: Path) -> tuple[RegisterPlan, ...]:
    hostile = tmp / "hostile.toml"
    hostile.write_text(HOSTILE_FLAT)
    plans = []
    for source in ("acme_flat", str(hostile)):
        profile = load_profile(source)
        assert isinstance(profile, FlatProfile)
        plans.append(flat_plan(profile))
    return tuple(plans)


def _sunspec_profile() -> SunSpecProfile:
    profile = load_profile("sunspec")
    assert isinstance(profile, SunSpecProfile)
    return profile


@cache
def _standard_words() -> tuple[int, ...]:
    model = BatteryModel()
    return tuple(sunspec_image(model.snapshot(), model.config, Identity()))


def _decode(plan: RegisterPlan, image: RegisterImage) -> RackMeasurements | None:
    try:
        return decode_measurements(plan, image, capacity_ah=100.0)
    except InvalidDataError:
        return None


@pytest.fixture(scope="module")
def flat_plans(tmp_path_factory: pytest.TempPathFactory) -> tuple[RegisterPlan, ...]:
    return _flat_plans(tmp_path_factory.mktemp("profiles"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flat_decoders_return_measurements_or_invalid_data(
    flat_plans: tuple[RegisterPlan, ...], data: st.DataObject
) -> None:
    plan = data.draw(st.sampled_from(flat_plans))
    addresses = sorted({(b.table, b.address + i) for b in plan.blocks for i in range(b.count)})
    if plan.name == "acme_flat" and data.draw(st.booleans()):
        # The simulator's valid map with a few registers changed: gets past the first refusal.
        valid = flat_image(BatteryModel().snapshot())
        image = {a: valid[a[1]] for a in addresses}
        for index, value in data.draw(st.lists(st.tuples(st.integers(0, len(addresses) - 1), SPICY_REGISTER),
                                               max_size=4)):
            image[addresses[index]] = value
    else:
        image = {a: data.draw(SPICY_REGISTER) for a in addresses}
    # Some draws lose a register or two (a block that was not read).
    for index in data.draw(st.sets(st.integers(0, len(addresses) - 1), max_size=2)):
        image.pop(addresses[index], None)
    result = _decode(plan, image)
    assert result is None or isinstance(result, RackMeasurements)


def test_hostile_values_are_refused_not_raised(flat_plans: tuple[RegisterPlan, ...]) -> None:
    _, hostile = flat_plans
    base = {(Table.HOLDING, a): 0 for a in range(33)}
    # An f32 NaN or infinity where a bit, a contactor value or a location number is read (int() of
    # them raises ValueError / OverflowError).
    for address, high_word in ((26, 0x7FC0), (31, 0x7F80)):
        image = {**base, (Table.HOLDING, address): high_word}
        with pytest.raises(InvalidDataError, match="not a number"):
            decode_measurements(hostile, image, capacity_ah=1.0)
    # A location is context, not a limit: one the device cannot give is left blank.
    located = decode_measurements(hostile, {**base, (Table.HOLDING, 21): 0xFF80}, capacity_ah=1.0)
    assert located.cell_voltage_min_location == ""
    # A register beyond 16 bits is not something a device can have said.
    with pytest.raises(InvalidDataError, match="not 16 bits"):
        decode_measurements(hostile, {**base, (Table.HOLDING, 28): 0x1_0000}, capacity_ah=1.0)


class _Device:
    """A register map served from memory; reads outside it answer "illegal data address"."""

    def __init__(self, base: int, words: list[int]) -> None:
        self.base = base
        self.words = words
        self.reads = 0

    async def read(self, address: int, count: int) -> list[int]:
        self.reads += 1
        start = address - self.base
        if start < 0 or start + count > len(self.words):
            raise ModbusExceptionError("illegal address", code=ILLEGAL_DATA_ADDRESS)
        return self.words[start:start + count]

    def image(self) -> dict[tuple[Table, int], int]:
        return {(Table.HOLDING, self.base + i): w for i, w in enumerate(self.words)}


def _discover_and_decode(device: _Device) -> RackMeasurements | None:
    """The agent's path through a device: discovery, plan, decode. None where it was refused."""
    try:
        layout = asyncio.run(discover(device.read, (SUNSPEC_BASE_ADDRESS, 0, 50000)))
        plan = sunspec_plan(_sunspec_profile(), layout)
    except DeviceLayoutError:
        return None
    assert device.reads <= 3 + MAX_MODELS + 1  # bounded, whatever the chain says
    return _decode(plan, device.image())


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(min_value=0, max_value=len(_standard_words()) - 1),
                                SPICY_REGISTER), max_size=8),
       cut=st.integers(min_value=0, max_value=len(_standard_words())))
def test_sunspec_path_on_a_mutated_map_returns_measurements_or_typed_errors(
    edits: list[tuple[int, int]], cut: int
) -> None:
    # The simulator's valid map, with a few registers changed and possibly cut short: the changes
    # land on markers, model ids, lengths, scale factors and values alike.
    words = list(_standard_words())
    for index, value in edits:
        words[index] = value
    device = _Device(SUNSPEC_BASE_ADDRESS, words[:len(words) - cut] if cut else words)
    result = _discover_and_decode(device)
    assert result is None or isinstance(result, RackMeasurements)


@settings(max_examples=200, deadline=None)
@given(words=st.lists(SPICY_REGISTER, max_size=300), marker=st.booleans())
def test_sunspec_path_on_arbitrary_registers_returns_measurements_or_typed_errors(
    words: list[int], marker: bool
) -> None:
    device = _Device(SUNSPEC_BASE_ADDRESS, [0x5375, 0x6E53, *words] if marker else words)
    result = _discover_and_decode(device)
    assert result is None or isinstance(result, RackMeasurements)


async def test_chain_without_end_marker_is_refused_after_max_models() -> None:
    # SunS, then vendor models with L=0 for ever (well past MAX_MODELS).
    device = _Device(SUNSPEC_BASE_ADDRESS, [0x5375, 0x6E53, *([64_999, 0] * (MAX_MODELS + 10))])
    with pytest.raises(DeviceLayoutError, match=f"no end marker within {MAX_MODELS} models"):
        await discover(device.read, (SUNSPEC_BASE_ADDRESS,))
    assert device.reads == 1 + MAX_MODELS + 1


async def test_chain_into_blank_memory_and_past_the_register_space_is_refused() -> None:
    blank = _Device(SUNSPEC_BASE_ADDRESS, [0x5375, 0x6E53, 1, 0, *([0] * 20)])
    with pytest.raises(DeviceLayoutError, match="model id 0 at 40004"):
        await discover(blank.read, (SUNSPEC_BASE_ADDRESS,))
    far = _Device(SUNSPEC_BASE_ADDRESS, [0x5375, 0x6E53, 1, 0xFFF0])
    with pytest.raises(DeviceLayoutError, match="runs past register 65535"):
        await discover(far.read, (SUNSPEC_BASE_ADDRESS,))


async def test_device_busy_during_discovery_stays_a_modbus_exception() -> None:
    # Only "illegal data address" means "no map here"; a busy device is reported as it is.
    async def busy(address: int, count: int) -> list[int]:
        raise ModbusExceptionError("busy", code=6)

    with pytest.raises(ModbusExceptionError):
        await discover(busy, (SUNSPEC_BASE_ADDRESS, 0))


def test_sunspec_profile_naming_a_point_no_model_has_is_refused_at_load(tmp_path: Path) -> None:
    shipped = Path(__file__).parents[2] / "rack_agent/profiles/sunspec.toml"
    bad = tmp_path / "typo.toml"
    bad.write_text(shipped.read_text().replace('point = "ModTmpMax" }', 'point = "ModTempMax" }'))
    with pytest.raises(ProfileError) as caught:
        load_profile(str(bad))
    assert "points.temperature_max_c: model 803 has no fixed point 'ModTempMax'" in str(caught.value)


def test_location_format_that_cannot_show_integers_is_refused_at_load(tmp_path: Path) -> None:
    shipped = Path(__file__).parents[2] / "rack_agent/profiles/acme_flat.toml"
    bad = tmp_path / "fmt.toml"
    bad.write_text(shipped.read_text().replace('format = "cell {}", registers = [{ address = 5 }]',
                                               'format = "cell {} {x}", registers = [{ address = 5 }]'))
    with pytest.raises(ProfileError, match="cannot show integers"):
        load_profile(str(bad))


# -- merging units -----------------------------------------------------------------------------


def _bounded(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)


@st.composite
def _measurements(draw: st.DrawFn) -> RackMeasurements:
    cells = sorted(draw(st.lists(_bounded(0.0, 10.0), min_size=2, max_size=2)))
    temps = sorted(draw(st.lists(_bounded(-40.0, 125.0), min_size=2, max_size=2)))
    flags = st.builds(ProtectionFlags, **{name: st.booleans() for name in PROTECTION_FLAG_NAMES})
    return RackMeasurements(
        pack_voltage_v=draw(_bounded(0.0, 1000.0)),
        current_a=draw(_bounded(-CURRENT_ABS_MAX_A, CURRENT_ABS_MAX_A)),
        soc_pct=draw(st.sampled_from([0.0, 100.0]) | _bounded(0.0, 100.0)),
        soh_pct=draw(_bounded(0.0, 100.0)),
        cell_voltage_max_v=cells[1],
        cell_voltage_min_v=cells[0],
        temperature_max_c=temps[1],
        temperature_min_c=temps[0],
        charge_current_limit_a=draw(_bounded(0.0, CURRENT_ABS_MAX_A)),
        discharge_current_limit_a=draw(_bounded(0.0, CURRENT_ABS_MAX_A)),
        charge_voltage_limit_v=draw(_bounded(0.0, 1000.0)),
        discharge_voltage_limit_v=draw(_bounded(0.0, 1000.0)),
        alarms=draw(flags),
        warnings=draw(flags),
        contactor=draw(st.sampled_from(ContactorState)),
        capacity_ah=draw(st.sampled_from([0.1, 0.7, CAPACITY_MAX_AH]) | _bounded(0.0, CAPACITY_MAX_AH)),
        cell_voltage_max_location=draw(st.text(max_size=64)),
    )


@settings(max_examples=300, deadline=None)
@given(units=st.lists(_measurements(), min_size=1, max_size=64))
def test_merging_valid_units_always_gives_valid_rack_measurements(units: list[RackMeasurements]) -> None:
    merged = merge_units([(f"u{i}", m) for i, m in enumerate(units)])
    # Built through the model: had a sum left the contract's bounds, construction would have raised.
    assert merged.charge_current_limit_a <= min(m.charge_current_limit_a for m in units) * len(units)
    assert 0.0 <= merged.soc_pct <= 100.0


def test_merging_many_strong_strings_stays_within_the_contract() -> None:
    unit = _example_unit(charge_current_limit_a=300.0, current_a=250.0, capacity_ah=2000.0, soc_pct=100.0)
    merged = merge_units([(f"u{i}", unit) for i in range(64)])  # 64 x 300 A > 10 kA
    assert merged.charge_current_limit_a == CURRENT_ABS_MAX_A
    assert merged.current_a == CURRENT_ABS_MAX_A
    assert merged.capacity_ah == CAPACITY_MAX_AH
    odd = [("a", _example_unit(capacity_ah=0.7, soc_pct=100.0)),
           ("b", _example_unit(capacity_ah=0.1, soc_pct=100.0))]
    assert merge_units(odd).soc_pct == 100.0  # 80 / 0.7999999999999999 would be 100.00000000000001


def _example_unit(**changes: float) -> RackMeasurements:
    values: dict[str, float] = {
        "pack_voltage_v": 52.0, "current_a": 0.0, "soc_pct": 50.0, "soh_pct": 100.0,
        "cell_voltage_max_v": 3.3, "cell_voltage_min_v": 3.2, "temperature_max_c": 25.0,
        "temperature_min_c": 20.0, "charge_current_limit_a": 100.0, "discharge_current_limit_a": 100.0,
        "charge_voltage_limit_v": 56.0, "discharge_voltage_limit_v": 44.0, "capacity_ah": 100.0,
    }
    values.update(changes)
    return RackMeasurements.model_validate(values)
