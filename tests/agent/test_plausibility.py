"""The plausibility rules of one reading, as tables: at, just inside and just outside each bound.

``rack_agent.plausibility`` is pure (a reading's fields in, the contradictions out); the agent-level
behaviour against a real simulated BMS is in ``test_implausible_readings.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from rack_agent.errors import ImplausibleReadingError, InvalidDataError
from rack_agent.plausibility import (
    DEFAULT_RULES,
    PlausibilityRules,
    contradictions,
    pack_voltage_bounds,
    validated_measurements,
)
from shared.agent_config import PlausibilityConfig, UnitConfig

# A plausible 16-cell LFP reading: every rule holds with room to spare.
GOOD: dict[str, Any] = {
    "pack_voltage_v": 52.8,
    "current_a": 0.0,
    "soc_pct": 50.0,
    "soh_pct": 100.0,
    "cell_voltage_max_v": 3.32,
    "cell_voltage_min_v": 3.28,
    "temperature_max_c": 25.0,
    "temperature_min_c": 20.0,
    "charge_current_limit_a": 100.0,
    "discharge_current_limit_a": 100.0,
    "charge_voltage_limit_v": 55.2,
    "discharge_voltage_limit_v": 46.4,
    "capacity_ah": 100.0,
}
SIXTEEN = PlausibilityRules(cells_in_series=16)
STEP = 0.001  # "just" inside or outside: far above float rounding, far below any real signal


def reading(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def test_a_plausible_reading_has_no_contradiction() -> None:
    assert contradictions(GOOD, DEFAULT_RULES) == ()
    assert contradictions(GOOD, SIXTEEN) == ()
    assert validated_measurements(GOOD, SIXTEEN).pack_voltage_v == 52.8


@pytest.mark.parametrize(
    ("cell_min", "problem"),
    [(3.32 - STEP, False), (3.32, False), (3.32 + STEP, True)],
    ids=["inside", "at", "outside"],
)
def test_cell_min_above_cell_max(cell_min: float, problem: bool) -> None:
    found = contradictions(reading(cell_voltage_min_v=cell_min, pack_voltage_v=53.0), SIXTEEN)
    expected = (f"cell_voltage_min_v {cell_min:.3f} V above cell_voltage_max_v 3.320 V",) if problem else ()
    assert found == expected


@pytest.mark.parametrize(
    ("t_min", "problem"), [(24.9, False), (25.0, False), (25.1, True)], ids=["inside", "at", "outside"]
)
def test_temperature_min_above_max(t_min: float, problem: bool) -> None:
    found = contradictions(reading(temperature_min_c=t_min), SIXTEEN)
    assert found == (("temperature_min_c 25.1 °C above temperature_max_c 25.0 °C",) if problem else ())


@pytest.mark.parametrize(
    ("cvl", "problem"), [(46.4 + 0.01, False), (46.4, True), (46.4 - 0.01, True)],
    ids=["inside", "at", "outside"],
)
def test_charge_voltage_limit_must_be_above_discharge_limit(cvl: float, problem: bool) -> None:
    found = contradictions(reading(charge_voltage_limit_v=cvl), SIXTEEN)
    message = f"charge_voltage_limit_v {cvl:.2f} V not above discharge_voltage_limit_v 46.40 V"
    assert found == ((message,) if problem else ())


def test_pack_bounds_follow_cells_tolerance_and_margin() -> None:
    # 16 × 3.28 V × 0.95 − 2 V and 16 × 3.32 V × 1.05 + 2 V
    low, high = pack_voltage_bounds(3.28, 3.32, SIXTEEN)
    assert low == pytest.approx(47.856)
    assert high == pytest.approx(57.776)
    wider = PlausibilityRules(cells_in_series=16, pack_tolerance_pct=10.0, pack_margin_v=5.0)
    assert pack_voltage_bounds(3.28, 3.32, wider) == (pytest.approx(42.232), pytest.approx(63.432))
    # Without cells_in_series a pack holds at least one cell, and nothing bounds it from above.
    assert pack_voltage_bounds(3.28, 3.32, DEFAULT_RULES) == (pytest.approx(1.116), None)
    # A cell the reading does not carry bounds nothing.
    assert pack_voltage_bounds(None, None, SIXTEEN) == (None, None)


@pytest.mark.parametrize(("offset", "problem"), [(STEP, False), (0.0, False), (-STEP, True)],
                         ids=["inside", "at", "outside"])
def test_pack_below_cells_in_series_at_the_lowest_cell(offset: float, problem: bool) -> None:
    low, _ = pack_voltage_bounds(3.28, 3.32, SIXTEEN)
    assert low is not None
    found = contradictions(reading(pack_voltage_v=low + offset), SIXTEEN)
    assert bool(found) is problem
    if problem:
        assert "below 16 cells at cell_voltage_min_v 3.280 V (at least 47.86 V)" in found[0]


@pytest.mark.parametrize(("offset", "problem"), [(-STEP, False), (0.0, False), (STEP, True)],
                         ids=["inside", "at", "outside"])
def test_pack_above_cells_in_series_at_the_highest_cell(offset: float, problem: bool) -> None:
    _, high = pack_voltage_bounds(3.28, 3.32, SIXTEEN)
    assert high is not None
    found = contradictions(reading(pack_voltage_v=high + offset), SIXTEEN)
    assert bool(found) is problem
    if problem:
        assert "above 16 cells at cell_voltage_max_v 3.320 V (at most 57.78 V)" in found[0]


def test_pack_at_zero_next_to_charged_cells_is_refused_without_cells_in_series() -> None:
    # The reported case: 0 V pack, cells at 3.3 V, no cells_in_series configured.
    found = contradictions(reading(pack_voltage_v=0.0), DEFAULT_RULES)
    assert found == (
        "pack_voltage_v 0.00 V below 1 cell (cells_in_series not configured) at cell_voltage_min_v "
        "3.280 V (at least 1.12 V)",
    )
    # Without cells_in_series there is no upper bound from the cells.
    assert contradictions(reading(pack_voltage_v=500.0), DEFAULT_RULES) == ()


@pytest.mark.parametrize(
    ("pack", "problem"),
    [(48.0, None), (44.0, None), (44.0 - STEP, "below the rack's minimum 44.00 V"),
     (56.0, None), (56.0 + STEP, "above the rack's maximum 56.00 V")],
    ids=["inside", "at-min", "below-min", "at-max", "above-max"],
)
def test_pack_outside_the_racks_nominal_range(pack: float, problem: str | None) -> None:
    rules = PlausibilityRules(pack_voltage_min_v=44.0, pack_voltage_max_v=56.0)
    found = contradictions(reading(pack_voltage_v=pack), rules)
    assert found == (() if problem is None else (f"pack_voltage_v {pack:.2f} V {problem}",))


def test_absent_fields_are_not_checked() -> None:
    # A reading that carries none of a rule's fields (or not a finite number there) skips that rule.
    sparse = {"pack_voltage_v": 0.0, "charge_voltage_limit_v": 40.0, "temperature_min_c": float("nan"),
              "temperature_max_c": 10.0}
    assert contradictions(sparse, SIXTEEN) == ()
    assert contradictions({}, PlausibilityRules(cells_in_series=16, pack_voltage_min_v=40.0)) == ()


def test_every_contradiction_is_reported() -> None:
    found = contradictions(
        reading(pack_voltage_v=0.0, temperature_min_c=30.0, discharge_voltage_limit_v=60.0), SIXTEEN
    )
    fields = [f.split(" ", 1)[0] for f in found]
    assert fields == ["temperature_min_c", "charge_voltage_limit_v", "pack_voltage_v"]


def test_validated_measurements_raise_the_typed_error_with_the_reason() -> None:
    with pytest.raises(ImplausibleReadingError, match=r"cell_voltage_min_v 3\.400 V above") as caught:
        validated_measurements(reading(cell_voltage_min_v=3.4), SIXTEEN)
    assert isinstance(caught.value, InvalidDataError)
    assert caught.value.link_failure is False
    # A field outside the contract's own bounds is an implausible reading too (SOC 150 %).
    with pytest.raises(ImplausibleReadingError, match=r"soc_pct: Input should be less than or equal to 100"):
        validated_measurements(reading(soc_pct=150.0), SIXTEEN)


def test_rules_come_from_the_unit_and_the_agent_config() -> None:
    unit = UnitConfig(name="bms", link="lan", cells_in_series=15)
    config = PlausibilityConfig(pack_tolerance_pct=2.0, pack_margin_v=1.0, pack_voltage_min_v=40.0,
                                pack_voltage_max_v=60.0)
    assert PlausibilityRules.for_unit(unit, config) == PlausibilityRules(15, 2.0, 1.0, 40.0, 60.0)
    unconfigured = UnitConfig(name="bms", link="lan")
    assert PlausibilityRules.for_unit(unconfigured, PlausibilityConfig()) == DEFAULT_RULES
    with pytest.raises(ValueError, match="pack_voltage_min_v"):
        PlausibilityConfig(pack_voltage_min_v=60.0, pack_voltage_max_v=40.0)
