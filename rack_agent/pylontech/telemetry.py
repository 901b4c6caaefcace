"""What one pack's answers mean as telemetry (pure): the mapping lives here, once.

* Measurements from 0x42: cell extremes with their cell number, the cell-temperature extremes over
  the sensors the profile names (``sensor N``, 1-based as the answer lists them), current, pack
  voltage, SOC = remaining / total capacity (the protocol carries no SOC of its own), capacity = the
  pack's total capacity, SOH = the profile's assumed value (the protocol carries none).
* Limits from 0x92: CVL, DVL, and CCL/DCL as magnitudes (packs send DCL negative); a direction
  whose enable flag is clear is published as 0 A, whatever current the pack still lists for it.
* From 0x44 (when the profile reads it): status 1 is what the pack's protection has tripped →
  alarms; the per-item limit states (below/above) are the pack's pre-alarm limits → warnings; a
  state "other error", or a BMS-board/MOSFET sensor out of its limits → ``internal_fault`` warning;
  cells flagged failed in status 4/5 → ``internal_fault`` alarm; status 2's charge and discharge
  MOSFETs are the pack's switch: closed when either conducts. Without 0x44 no flags are known and
  the contactor is ``unknown``.

The pack voltage is held to the cells the pack itself reports (``cells_in_series`` of the unit, or
else the number of cells in the answer), through the agent's plausibility rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from rack_agent.errors import DeviceLayoutError, ImplausibleReadingError
from rack_agent.plausibility import PlausibilityRules, validated_measurements
from rack_agent.profiles.pylontech import PackSpec
from rack_agent.pylontech.info import (
    STATE_ABOVE,
    STATE_BELOW,
    STATE_NORMAL,
    AlarmInfo,
    AnalogValues,
    ManagementInfo,
    ProtectionStatus,
    SwitchStatus,
)
from shared.models import ContactorState, ProtectionFlags, RackMeasurements

PROTECTION_ALARMS: Mapping[ProtectionStatus, tuple[str, ...]] = {
    ProtectionStatus.MODULE_OVER_VOLTAGE: ("pack_over_voltage",),
    ProtectionStatus.CELL_UNDER_VOLTAGE: ("cell_under_voltage",),
    ProtectionStatus.CHARGE_OVER_CURRENT: ("charge_over_current",),
    ProtectionStatus.DISCHARGE_OVER_CURRENT: ("discharge_over_current",),
    ProtectionStatus.DISCHARGE_OVER_TEMPERATURE: ("discharge_over_temperature",),
    ProtectionStatus.CHARGE_OVER_TEMPERATURE: ("charge_over_temperature",),
    ProtectionStatus.MODULE_UNDER_VOLTAGE: ("pack_under_voltage",),
}
StateTable = Mapping[int, tuple[str, ...]]
CELL_STATE_WARNINGS: StateTable = {STATE_BELOW: ("cell_under_voltage",), STATE_ABOVE: ("cell_over_voltage",)}
TEMPERATURE_STATE_WARNINGS: StateTable = {
    STATE_BELOW: ("charge_under_temperature", "discharge_under_temperature"),
    STATE_ABOVE: ("charge_over_temperature", "discharge_over_temperature"),
}
CHARGE_CURRENT_STATE_WARNINGS: StateTable = {STATE_ABOVE: ("charge_over_current",)}
DISCHARGE_CURRENT_STATE_WARNINGS: StateTable = {STATE_ABOVE: ("discharge_over_current",)}
PACK_VOLTAGE_STATE_WARNINGS: StateTable = {
    STATE_BELOW: ("pack_under_voltage",), STATE_ABOVE: ("pack_over_voltage",),
}
INTERNAL_FAULT = "internal_fault"


def _argmax(values: tuple[float, ...]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _argmin(values: tuple[float, ...]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _states(states: Iterable[int], table: StateTable) -> set[str]:
    """Flags the states raise; any state outside normal/below/above is another error of the pack."""
    raised: set[str] = set()
    for state in states:
        if state == STATE_NORMAL:
            continue
        raised.update(table.get(state, (INTERNAL_FAULT,)))
    return raised


def alarm_flags(alarm: AlarmInfo, cell_sensors: tuple[int, ...]) -> tuple[ProtectionFlags, ProtectionFlags]:
    """(alarms, warnings) of one 0x44 answer; ``cell_sensors`` are the 1-based cell-temperature sensors."""
    alarms = {name for bit, names in PROTECTION_ALARMS.items() if bit in alarm.protection for name in names}
    if alarm.failed_cells:
        alarms.add(INTERNAL_FAULT)
    cell_temps = [s for i, s in enumerate(alarm.temperature_states, start=1) if i in cell_sensors]
    other_temps = [s for i, s in enumerate(alarm.temperature_states, start=1) if i not in cell_sensors]
    warnings = (
        _states(alarm.cell_states, CELL_STATE_WARNINGS)
        | _states(cell_temps, TEMPERATURE_STATE_WARNINGS)
        | _states(other_temps, {})  # a board or MOSFET sensor out of its limits is the pack's own fault
        | _states((alarm.charge_current_state,), CHARGE_CURRENT_STATE_WARNINGS)
        | _states((alarm.discharge_current_state,), DISCHARGE_CURRENT_STATE_WARNINGS)
        | _states((alarm.pack_voltage_state,), PACK_VOLTAGE_STATE_WARNINGS)
    )
    return ProtectionFlags(**dict.fromkeys(alarms, True)), ProtectionFlags(**dict.fromkeys(warnings, True))


def contactor_state(alarm: AlarmInfo | None) -> ContactorState:
    if alarm is None:
        return ContactorState.UNKNOWN
    conducting = alarm.switches & (SwitchStatus.CHARGE_MOSFET | SwitchStatus.DISCHARGE_MOSFET)
    return ContactorState.CLOSED if conducting else ContactorState.OPEN


def pack_rules(rules: PlausibilityRules, analog: AnalogValues) -> PlausibilityRules:
    """The unit's rules with the pack's own cell count when the unit config gives none; a configured
    count the pack contradicts is refused (the pack, or the config, is wrong)."""
    cells = len(analog.cell_voltages_v)
    if rules.cells_in_series is None:
        return dataclasses.replace(rules, cells_in_series=cells)
    if rules.cells_in_series != cells:
        raise ImplausibleReadingError(
            f"pack {analog.address} reports {cells} cells, "
            f"the unit's cells_in_series is {rules.cells_in_series}"
        )
    return rules


def _cell_temperatures(analog: AnalogValues, pack: PackSpec) -> list[tuple[int, float]]:
    count = len(analog.temperatures_c)
    missing = [s for s in pack.cell_temperature_sensors if s > count]
    if missing:
        raise DeviceLayoutError(
            f"pack {analog.address} reports {count} temperatures; the profile's cell sensors "
            f"{list(pack.cell_temperature_sensors)} include {missing}"
        )
    return [(s, analog.temperatures_c[s - 1]) for s in pack.cell_temperature_sensors]


def pack_measurements(
    analog: AnalogValues,
    alarm: AlarmInfo | None,
    management: ManagementInfo,
    pack: PackSpec,
    *,
    invert_current: bool,
    rules: PlausibilityRules,
) -> RackMeasurements:
    """One pack's reading, checked like every other link's (rack_agent/plausibility.py)."""
    cells = analog.cell_voltages_v
    if not cells or (pack.cells is not None and len(cells) != pack.cells):
        expected = "at least one" if pack.cells is None else str(pack.cells)
        raise DeviceLayoutError(
            f"pack {analog.address} reports {len(cells)} cells, the profile expects {expected}"
        )
    temperatures = _cell_temperatures(analog, pack)
    hottest = max(temperatures, key=lambda item: item[1])
    coldest = min(temperatures, key=lambda item: item[1])
    if analog.total_ah <= 0:
        raise ImplausibleReadingError(
            f"pack {analog.address} reports a total capacity of {analog.total_ah} Ah"
        )
    alarms, warnings = alarm_flags(alarm, pack.cell_temperature_sensors) if alarm else (
        ProtectionFlags(), ProtectionFlags())
    values: dict[str, object] = {
        "pack_voltage_v": analog.pack_voltage_v,
        "current_a": -analog.current_a if invert_current else analog.current_a,
        "soc_pct": 100.0 * analog.remaining_ah / analog.total_ah,
        "soh_pct": pack.assumed_soh_pct,
        "cell_voltage_max_v": cells[_argmax(cells)],
        "cell_voltage_max_location": f"cell {_argmax(cells) + 1}",
        "cell_voltage_min_v": cells[_argmin(cells)],
        "cell_voltage_min_location": f"cell {_argmin(cells) + 1}",
        "temperature_max_c": hottest[1],
        "temperature_max_location": f"sensor {hottest[0]}",
        "temperature_min_c": coldest[1],
        "temperature_min_location": f"sensor {coldest[0]}",
        "charge_current_limit_a": (
            abs(management.charge_current_limit_a) if management.charge_enabled else 0.0
        ),
        "discharge_current_limit_a": (
            abs(management.discharge_current_limit_a) if management.discharge_enabled else 0.0
        ),
        "charge_voltage_limit_v": management.charge_voltage_limit_v,
        "discharge_voltage_limit_v": management.discharge_voltage_limit_v,
        "alarms": alarms,
        "warnings": warnings,
        "contactor": contactor_state(alarm),
        "capacity_ah": analog.total_ah,
    }
    return validated_measurements(values, pack_rules(rules, analog))
