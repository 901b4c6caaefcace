"""The battery model as tables, plus hypothesis properties over arbitrary load histories."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.models import ContactorState
from sim.battery import (
    CHARGE_CELL_V_FACTOR,
    CHARGE_TEMPERATURE_FACTOR,
    BatteryModel,
    SimRackConfig,
    interpolate,
    lfp_ocv_v,
)
from sim.faults import FaultState


@pytest.mark.parametrize(
    ("x", "expected"),
    [(-5.0, 0.0), (0.0, 0.0), (1.0, 0.125), (10.0, 1.0), (25.0, 1.0), (42.5, 0.75), (55.0, 0.0), (80.0, 0.0)],
)
def test_interpolate_charge_temperature_table(x: float, expected: float) -> None:
    assert interpolate(CHARGE_TEMPERATURE_FACTOR, x) == pytest.approx(expected)


@pytest.mark.parametrize(("soc", "volts"), [(0.0, 2.50), (50.0, 3.30), (75.0, 3.325), (100.0, 3.45)])
def test_lfp_ocv(soc: float, volts: float) -> None:
    assert lfp_ocv_v(soc) == pytest.approx(volts)


@pytest.mark.parametrize(
    ("amps", "seconds", "soc_after"),
    [
        (28.0, 3600.0, 60.0),  # 0.1 C for one hour = 10 % of 280 Ah
        (-28.0, 3600.0, 40.0),
        (-140.0, 1800.0, 25.0),
        (0.0, 3600.0, 50.0),
    ],
)
def test_soc_integrates_current(amps: float, seconds: float, soc_after: float) -> None:
    model = BatteryModel()
    model.set_current(amps)
    for _ in range(10):
        model.step(seconds / 10)
    assert model.snapshot().soc_pct == pytest.approx(soc_after)


@pytest.mark.parametrize(
    ("ambient_c", "ccl", "dcl", "alarms", "warnings"),
    [
        (25.0, 140.0, 140.0, (), ()),
        (7.5, 105.0, 105.0, (), ()),  # both tables at 0.75 between 5 and 10 °C
        (0.0, 0.0, 35.0, (), ("charge_under_temperature",)),
        (-5.0, 0.0, 17.5, ("charge_under_temperature",), ("charge_under_temperature",)),
        (-15.0, 0.0, 0.0, ("charge_under_temperature",),
         ("charge_under_temperature", "discharge_under_temperature")),
        (-25.0, 0.0, 0.0, ("charge_under_temperature", "discharge_under_temperature"),
         ("charge_under_temperature", "discharge_under_temperature")),
    ],
)
def test_temperature_derating_and_flags(
    ambient_c: float, ccl: float, dcl: float, alarms: tuple[str, ...], warnings: tuple[str, ...]
) -> None:
    m = BatteryModel(SimRackConfig(ambient_c=ambient_c)).measurements()
    assert m.charge_current_limit_a == pytest.approx(ccl)
    assert m.discharge_current_limit_a == pytest.approx(dcl)
    assert m.alarms.raised() == alarms
    assert m.warnings.raised() == warnings


@pytest.mark.parametrize(
    ("soc", "ccl", "dcl"),
    [
        (50.0, 140.0, 140.0),
        # Highest rest cell = OCV + spread/2 = 3.38 + 0.005 V: 0.7 on the charge cell-voltage table.
        (98.0, 140.0 * interpolate(CHARGE_CELL_V_FACTOR, 3.385), 140.0),
        (100.0, 0.0, 140.0),  # full: no charge whatever the tables say
        # Empty: no discharge, and the lowest cell (2.495 V) is an under-voltage alarm, which blocks
        # discharge only: the rack must still accept the charge that recovers it.
        (0.0, 140.0, 0.0),
    ],
)
def test_state_of_charge_derating(soc: float, ccl: float, dcl: float) -> None:
    m = BatteryModel(SimRackConfig(initial_soc_pct=soc)).measurements()
    assert m.charge_current_limit_a == pytest.approx(ccl)
    assert m.discharge_current_limit_a == pytest.approx(dcl)
    assert m.alarms.cell_under_voltage is (soc == 0.0)


def test_voltage_limits_and_pack_voltage() -> None:
    model = BatteryModel(SimRackConfig(cells_in_series=16, cell_spread_mv=10.0))
    snap = model.snapshot()
    m = snap.measurements()
    assert m.charge_voltage_limit_v == pytest.approx(16 * 3.45)
    assert m.discharge_voltage_limit_v == pytest.approx(16 * 2.9)
    assert m.pack_voltage_v == pytest.approx(sum(snap.cell_voltages_v))
    # The per-cell offsets span exactly the configured spread.
    assert (m.cell_voltage_max_v - m.cell_voltage_min_v) * 1000 == pytest.approx(10.0)
    assert m.cell_voltage_max_location == f"cell {snap.cell_max_index}"
    assert m.temperature_max_location.startswith("string 1 module ")
    assert m.contactor is ContactorState.CLOSED


def test_current_is_clamped_to_the_bms_limits_and_adds_ir_drop() -> None:
    model = BatteryModel()
    rest = model.measurements().cell_voltage_max_v
    model.set_current(500.0)
    assert model.measurements().current_a == 140.0
    assert model.measurements().cell_voltage_max_v == pytest.approx(rest + 140.0 * 0.0003)
    model.set_current(-500.0)
    assert model.measurements().current_a == -140.0
    assert model.requested_current_a == -500.0


def test_contactor_open_zeroes_limits_and_current() -> None:
    faults = FaultState()
    model = BatteryModel(faults=faults)
    model.set_current(-50.0)
    faults.open_contactor()
    model.step(1.0)
    m = model.measurements()
    assert m.contactor is ContactorState.OPEN
    assert (m.charge_current_limit_a, m.discharge_current_limit_a, m.current_a) == (0.0, 0.0, 0.0)
    faults.close_contactor()
    model.step(1.0)
    assert model.measurements().current_a == -50.0


@pytest.mark.parametrize(
    ("flag", "ccl_zero", "dcl_zero"),
    [
        ("internal_fault", True, True),
        ("cell_over_voltage", True, False),
        ("discharge_over_current", False, True),
    ],
)
def test_injected_alarm_blocks_its_direction(flag: str, ccl_zero: bool, dcl_zero: bool) -> None:
    faults = FaultState()
    model = BatteryModel(faults=faults)
    faults.raise_alarm(flag)
    m = model.measurements()
    assert m.alarms.raised() == (flag,)
    assert (m.charge_current_limit_a == 0.0, m.discharge_current_limit_a == 0.0) == (ccl_zero, dcl_zero)


def test_injected_warning_is_reported_without_derating() -> None:
    faults = FaultState()
    model = BatteryModel(faults=faults)
    faults.raise_warning("insulation_fault")
    m = model.measurements()
    assert m.warnings.raised() == ("insulation_fault",)
    assert m.charge_current_limit_a == 140.0


@pytest.mark.parametrize(("imbalance_mv", "warned", "alarmed"), [(0.0, False, False), (45.0, True, False),
                                                                  (200.0, True, True)])
def test_imbalance_widens_spread(imbalance_mv: float, warned: bool, alarmed: bool) -> None:
    faults = FaultState()
    model = BatteryModel(SimRackConfig(cell_spread_mv=10.0), faults)
    faults.set_imbalance(imbalance_mv)
    model.step(0.1)
    m = model.measurements()
    assert (m.cell_voltage_max_v - m.cell_voltage_min_v) * 1000 == pytest.approx(10.0 + imbalance_mv)
    assert m.warnings.cell_imbalance is warned
    assert m.alarms.cell_imbalance is alarmed


@pytest.mark.parametrize(
    ("seconds", "warned", "alarmed"),
    [(40, False, False), (52, True, False), (62, True, True)],
)
def test_over_temperature_ramp(seconds: int, warned: bool, alarmed: bool) -> None:
    faults = FaultState()
    model = BatteryModel(faults=faults)
    model.set_current(-100.0)
    faults.set_over_temperature(0.5)
    for _ in range(seconds):
        model.step(1.0)
    m = model.measurements()
    assert m.temperature_max_c == pytest.approx(25.0 + 0.5 * seconds, abs=0.5)
    assert m.temperature_max_location == "string 1 module 4"  # the ramp heats the last module
    assert m.warnings.charge_over_temperature is warned
    assert m.alarms.discharge_over_temperature is alarmed
    if alarmed:
        assert (m.charge_current_limit_a, m.discharge_current_limit_a, m.current_a) == (0.0, 0.0, 0.0)


def test_temperature_alarm_latches_until_release() -> None:
    faults = FaultState()
    model = BatteryModel(SimRackConfig(thermal_mass_j_per_k=4000.0, cooling_w_per_k=40.0), faults)
    faults.set_over_temperature(1.0)
    for _ in range(40):
        model.step(1.0)
    assert model.measurements().alarms.charge_over_temperature
    faults.set_over_temperature(0.0)
    history = []
    for _ in range(800):  # τ = mass / cooling per module ≈ 100 s
        model.step(1.0)
        m = model.measurements()
        history.append((m.temperature_max_c, m.alarms.charge_over_temperature))
    # Between 55 and 50 °C on the way down the alarm holds; it clears only under 50 °C.
    assert all(alarm for t, alarm in history if t > 50.0)
    assert not history[-1][1]
    assert history[-1][0] == pytest.approx(25.0, abs=0.5)


def test_same_seed_same_rack_other_seed_other_cells() -> None:
    a = BatteryModel(SimRackConfig(seed=3)).snapshot()
    b = BatteryModel(SimRackConfig(seed=3)).snapshot()
    c = BatteryModel(SimRackConfig(seed=4)).snapshot()
    assert a == b
    assert a.cell_voltages_v != c.cell_voltages_v


def test_partial_last_module() -> None:
    snap = BatteryModel(SimRackConfig(cells_in_series=15, cells_per_module=4)).snapshot()
    assert snap.modules == 4
    assert snap.module_of_cell(15) == 4


def test_bad_inputs_are_refused() -> None:
    model = BatteryModel()
    with pytest.raises(ValueError, match="finite"):
        model.set_current(float("nan"))
    with pytest.raises(ValueError, match="dt_s"):
        model.step(-1.0)


configs = st.builds(
    SimRackConfig,
    cells_in_series=st.integers(1, 64),
    cells_per_module=st.integers(1, 16),
    capacity_ah=st.floats(5.0, 1000.0),
    initial_soc_pct=st.floats(0.0, 100.0),
    ambient_c=st.floats(-30.0, 60.0),
    cell_spread_mv=st.floats(0.0, 300.0),
    cell_resistance_ohm=st.floats(0.0, 0.01),
    seed=st.integers(0, 1000),
)
steps = st.lists(st.tuples(st.floats(-1000.0, 1000.0), st.floats(0.0, 7200.0)), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(config=configs, history=steps, ramp=st.floats(0.0, 2.0))
def test_any_history_keeps_the_contract(config: SimRackConfig, history: list[tuple[float, float]],
                                        ramp: float) -> None:
    faults = FaultState()
    model = BatteryModel(config, faults)
    faults.set_over_temperature(ramp)
    for amps, dt in history:
        model.set_current(amps)
        before = model.snapshot()
        # The current that will flow over the step is within the limits the BMS states now.
        assert -before.discharge_current_limit_a <= before.current_a <= before.charge_current_limit_a
        model.step(dt)
        m = model.measurements()  # validates every bound of the wire contract
        assert 0.0 <= m.soc_pct <= 100.0
        assert m.charge_current_limit_a >= 0.0
        assert m.discharge_current_limit_a >= 0.0
        assert m.temperature_min_c <= m.temperature_max_c


@settings(max_examples=40, deadline=None)
@given(amps=st.floats(10.0, 140.0), dt=st.floats(10.0, 3600.0))
def test_temperature_rises_with_current_and_returns_to_ambient(amps: float, dt: float) -> None:
    model = BatteryModel(SimRackConfig(ambient_c=25.0))
    model.set_current(-amps)
    model.step(dt)
    hot = model.snapshot()
    assert min(hot.module_temperatures_c) > 25.0
    more = BatteryModel(SimRackConfig(ambient_c=25.0))
    more.set_current(-min(amps * 1.5, 140.0))
    more.step(dt)
    assert more.snapshot().temperature_max_c >= hot.temperature_max_c
    model.set_current(0.0)
    model.step(1e7)
    assert model.snapshot().temperature_max_c == pytest.approx(25.0, abs=1e-6)
