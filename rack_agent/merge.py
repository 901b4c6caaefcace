"""Combining the units of one rack into the rack's measurements (pure).

A rack with several BMS units is treated as parallel strings behind one
contactor set, so the rules are the conservative parallel ones: current limits
are N × the smallest (and zero if any unit allows zero), the voltage ceiling is
the lowest ceiling, the floor the highest floor, alarms and warnings are OR-ed,
the contactor is closed only if every unit reports it closed.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.models import (
    CAPACITY_MAX_AH,
    CURRENT_ABS_MAX_A,
    ContactorState,
    ProtectionFlags,
    RackMeasurements,
)


def _within(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _contactor(states: Sequence[ContactorState]) -> ContactorState:
    if all(s is ContactorState.CLOSED for s in states):
        return ContactorState.CLOSED
    if any(s is ContactorState.OPEN for s in states):
        return ContactorState.OPEN
    return ContactorState.UNKNOWN


def merge_units(named: Sequence[tuple[str, RackMeasurements]]) -> RackMeasurements:
    """One rack's measurements from its units' (name, measurements); a single unit passes through."""
    if not named:
        raise ValueError("no unit measurements to merge")
    if len(named) == 1:
        return named[0][1]
    ms = [m for _, m in named]
    n = len(ms)
    capacity = sum(m.capacity_ah for m in ms)
    # Each unit's reading is valid on its own; what is made of several must stay within the contract
    # too, or one rack of many strong strings would end the agent. Sums are clamped to the contract's
    # bounds (limits downwards: never more than the contract allows), and the capacity-weighted SoC
    # to 0..100 % (its rounding can land a hair outside).
    vmax_name, vmax = max(named, key=lambda nm: nm[1].cell_voltage_max_v)
    vmin_name, vmin = min(named, key=lambda nm: nm[1].cell_voltage_min_v)
    tmax_name, tmax = max(named, key=lambda nm: nm[1].temperature_max_c)
    tmin_name, tmin = min(named, key=lambda nm: nm[1].temperature_min_c)
    alarms = ProtectionFlags()
    warnings = ProtectionFlags()
    for m in ms:
        alarms = alarms.union(m.alarms)
        warnings = warnings.union(m.warnings)
    return RackMeasurements(
        pack_voltage_v=sum(m.pack_voltage_v for m in ms) / n,
        current_a=_within(sum(m.current_a for m in ms), -CURRENT_ABS_MAX_A, CURRENT_ABS_MAX_A),
        soc_pct=_within(sum(m.soc_pct * m.capacity_ah for m in ms) / capacity, 0.0, 100.0)
        if capacity > 0 else 0.0,
        soh_pct=min(m.soh_pct for m in ms),
        cell_voltage_max_v=vmax.cell_voltage_max_v,
        cell_voltage_max_location=f"{vmax_name}: {vmax.cell_voltage_max_location}"[:64],
        cell_voltage_min_v=vmin.cell_voltage_min_v,
        cell_voltage_min_location=f"{vmin_name}: {vmin.cell_voltage_min_location}"[:64],
        temperature_max_c=tmax.temperature_max_c,
        temperature_max_location=f"{tmax_name}: {tmax.temperature_max_location}"[:64],
        temperature_min_c=tmin.temperature_min_c,
        temperature_min_location=f"{tmin_name}: {tmin.temperature_min_location}"[:64],
        charge_current_limit_a=min(min(m.charge_current_limit_a for m in ms) * n, CURRENT_ABS_MAX_A),
        discharge_current_limit_a=min(min(m.discharge_current_limit_a for m in ms) * n, CURRENT_ABS_MAX_A),
        charge_voltage_limit_v=min(m.charge_voltage_limit_v for m in ms),
        discharge_voltage_limit_v=max(m.discharge_voltage_limit_v for m in ms),
        alarms=alarms,
        warnings=warnings,
        contactor=_contactor([m.contactor for m in ms]),
        capacity_ah=min(capacity, CAPACITY_MAX_AH),
    )


def without_current_permission(m: RackMeasurements) -> RackMeasurements:
    """The same measurements granting no current (comm-lost contract)."""
    return m.model_copy(update={"charge_current_limit_a": 0.0, "discharge_current_limit_a": 0.0})
