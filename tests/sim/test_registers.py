"""The register images, decoded in-process by the agent's own plans (the network path is in test_server)."""

from __future__ import annotations

import pytest

from rack_agent.errors import DeviceLayoutError, ModbusExceptionError
from rack_agent.profiles import load_profile
from rack_agent.profiles.plan import decode_measurements
from rack_agent.profiles.spec import SunSpecProfile, Table
from rack_agent.profiles.sunspec import discover, sunspec_plan
from shared.models import ContactorState, RackMeasurements
from sim.battery import BatteryModel, SimRackConfig
from sim.faults import FaultState, SunSpecLayout
from sim.registers import (
    SHORT_802_LENGTH,
    SUNSPEC_BASE_ADDRESS,
    Identity,
    Scales,
    evt1_bits,
    flat_image,
    flat_register_plan,
    sunspec_image,
    sunspec_length,
)

# Resolution of each field in the coarser of the two maps (flat: 0.01 V, 0.1 A, 0.1 %, 0.1 K with a
# 273.15 offset; SunSpec: SoH in 1 %).
TOLERANCE = {
    "pack_voltage_v": 0.006,
    "current_a": 0.051,
    "soc_pct": 0.051,
    "soh_pct": 0.51,
    "cell_voltage_max_v": 0.0006,
    "cell_voltage_min_v": 0.0006,
    "temperature_max_c": 0.11,
    "temperature_min_c": 0.11,
    "charge_current_limit_a": 0.051,
    "discharge_current_limit_a": 0.051,
    "charge_voltage_limit_v": 0.006,
    "discharge_voltage_limit_v": 0.006,
    "capacity_ah": 0.006,
}


def _states() -> list[tuple[str, BatteryModel]]:
    """A few racks in different situations (the id names the case)."""
    out = []
    plain = BatteryModel()
    plain.set_current(-87.3)
    plain.step(120.0)
    out.append(("discharging", plain))
    charging = BatteryModel(SimRackConfig(initial_soc_pct=97.0, seed=7))
    charging.set_current(60.0)
    charging.step(60.0)
    out.append(("charging-derated", charging))
    faults = FaultState()
    tripped = BatteryModel(faults=faults)
    faults.raise_alarm("internal_fault")
    faults.raise_alarm("cell_over_voltage")
    faults.raise_warning("charge_over_temperature")
    faults.open_contactor()
    tripped.step(1.0)
    out.append(("alarms-open", tripped))
    return out


def _assert_close(decoded: RackMeasurements, truth: RackMeasurements) -> None:
    for name, tol in TOLERANCE.items():
        assert getattr(decoded, name) == pytest.approx(getattr(truth, name), abs=tol), name
    assert decoded.contactor is truth.contactor


@pytest.mark.parametrize(("case", "model"), _states(), ids=lambda v: v if isinstance(v, str) else "")
def test_flat_map_decodes_to_the_model(case: str, model: BatteryModel) -> None:
    snap = model.snapshot()
    image = {(Table.HOLDING, i): v for i, v in enumerate(flat_image(snap))}
    decoded = decode_measurements(flat_register_plan(), image)
    truth = snap.measurements()
    _assert_close(decoded, truth)
    assert decoded.alarms == truth.alarms
    assert decoded.warnings == truth.warnings
    assert decoded.cell_voltage_max_location == truth.cell_voltage_max_location  # "cell N" in both
    assert decoded.temperature_max_location == f"sensor {snap.temperature_max_module}"


@pytest.mark.parametrize(("case", "model"), _states(), ids=lambda v: v if isinstance(v, str) else "")
async def test_sunspec_image_decodes_through_discovery(case: str, model: BatteryModel) -> None:
    snap = model.snapshot()
    words = sunspec_image(snap, model.config, Identity())
    assert len(words) == sunspec_length()

    async def read(address: int, count: int) -> list[int]:
        return words[address - SUNSPEC_BASE_ADDRESS:address - SUNSPEC_BASE_ADDRESS + count]

    layout = await discover(read, (SUNSPEC_BASE_ADDRESS,))
    assert sorted(layout.models) == [(1, 0), (802, 0), (803, 0)]
    assert layout.lengths == {(1, 0): 66, (802, 0): 62, (803, 0): 26 + 32}
    profile = load_profile("sunspec")
    assert isinstance(profile, SunSpecProfile)
    image = {(Table.HOLDING, SUNSPEC_BASE_ADDRESS + i): v for i, v in enumerate(words)}
    decoded = decode_measurements(sunspec_plan(profile, layout), image)
    truth = snap.measurements()
    _assert_close(decoded, truth)
    module = snap.module_of_cell(snap.cell_max_index)
    assert decoded.cell_voltage_max_location == f"string 1 module {module}"
    assert decoded.temperature_max_location == truth.temperature_max_location
    # SunSpec merges directions and some flags; every flag the profile maps must come back.
    alarm_bits, _ = evt1_bits()
    for name in truth.alarms.raised():
        assert name in alarm_bits
    assert set(truth.alarms.raised()) <= set(decoded.alarms.raised())
    assert set(truth.warnings.raised()) <= set(decoded.warnings.raised())


def test_evt1_bits_follow_sunspec_toml() -> None:
    alarms, warnings = evt1_bits()
    assert alarms["charge_over_temperature"] == 1  # OVER_TEMP_ALARM
    assert alarms["cell_over_voltage"] == 9
    assert alarms["pack_over_voltage"] == 9  # no separate pack bit in SunSpec
    assert warnings["cell_imbalance"] == 17  # VOLTAGE_IMBALANCE_WARNING


def test_contactor_shows_in_state_and_string_status() -> None:
    faults = FaultState()
    model = BatteryModel(faults=faults)
    closed = sunspec_image(model.snapshot(), model.config, Identity())
    faults.open_contactor()
    opened = sunspec_image(model.snapshot(), model.config, Identity())
    state_at = 2 + 68 + 22  # SunS, model 1 (2 + 66), 802 offset of State
    assert (closed[state_at], opened[state_at]) == (3, 1)
    str_st_low = 2 + 68 + 64 + 28 + 2  # 803 string group starts at offset 28; StrSt (u32) low word
    assert (closed[str_st_low] & 0b10, opened[str_st_low] & 0b10) == (0b10, 0)


def test_identity_in_common_model() -> None:
    model = BatteryModel()
    words = sunspec_image(model.snapshot(), model.config, Identity(serial_number="RACK-7", device_address=9))
    text = b"".join(w.to_bytes(2, "big") for w in words[4:20]).rstrip(b"\0")
    assert text == b"bmslink"
    sn = b"".join(w.to_bytes(2, "big") for w in words[2 + 50:2 + 66]).rstrip(b"\0")
    assert sn == b"RACK-7"
    assert words[2 + 66] == 9


@pytest.mark.parametrize(("cells", "v_sf"), [(16, -2), (150, -2), (240, -1)])
def test_voltage_scale_factor_fits_the_rack(cells: int, v_sf: int) -> None:
    assert Scales.for_rack(SimRackConfig(cells_in_series=cells)).v_sf == v_sf


def test_flat_map_saturates_instead_of_failing_for_a_big_rack() -> None:
    model = BatteryModel(SimRackConfig(cells_in_series=240, cells_per_module=16))
    snap = model.snapshot()
    image = {(Table.HOLDING, i): v for i, v in enumerate(flat_image(snap))}
    decoded = decode_measurements(flat_register_plan(), image)
    assert snap.pack_voltage_v > 655.35
    assert decoded.pack_voltage_v == pytest.approx(655.35)
    assert decoded.contactor is ContactorState.CLOSED


@pytest.mark.parametrize("layout", list(SunSpecLayout), ids=str)
async def test_every_layout_keeps_the_image_length_and_shows_its_defect(layout: SunSpecLayout) -> None:
    model = BatteryModel()
    words = sunspec_image(model.snapshot(), model.config, Identity(), layout)
    assert len(words) == sunspec_length()  # the server's memory block is sized once

    async def read(address: int, count: int) -> list[int]:
        start = address - SUNSPEC_BASE_ADDRESS
        if start + count > len(words):
            raise ModbusExceptionError("past the map", code=2)
        return words[start:start + count]

    if layout is SunSpecLayout.STANDARD:
        assert sorted((await discover(read, (SUNSPEC_BASE_ADDRESS,))).models) == [(1, 0), (802, 0), (803, 0)]
        return
    if layout is SunSpecLayout.NO_MARKER:
        with pytest.raises(DeviceLayoutError, match="no SunS marker"):
            await discover(read, (SUNSPEC_BASE_ADDRESS,))
        return
    if layout is SunSpecLayout.NO_END:
        with pytest.raises(DeviceLayoutError, match="without an end marker"):
            await discover(read, (SUNSPEC_BASE_ADDRESS,))
        return
    found = await discover(read, (SUNSPEC_BASE_ADDRESS,))
    if layout is SunSpecLayout.SHORT_802:
        assert found.lengths[(802, 0)] == SHORT_802_LENGTH
        assert (803, 0) in found.models
    else:
        assert sorted(found.models) == [(1, 0), (802, 0)]
    profile = load_profile("sunspec")
    assert isinstance(profile, SunSpecProfile)
    with pytest.raises(DeviceLayoutError):
        sunspec_plan(profile, found)
