"""The Pylon-family CAN frame set a rack BMS broadcasts, built with cantools from ``shared/dbc/pylon.dbc``.

Pure: a :class:`sim.battery.BatterySnapshot` in, ``(arbitration id, data)`` pairs out, always in the
same order (a real Pylontech stack sends one back-to-back burst in a stable order, inverter-can.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.dbc import load_dbc
from shared.models import ProtectionFlags
from sim.battery import BatterySnapshot

DBC_NAME = "pylon"
FRAME_IDS: tuple[int, ...] = (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E, 0x373, 0x379)
# Bytes 5-6 of 0x359 are ASCII 'P' 'N' (PYLON v1.2); Victron uses them to recognise a Pylontech.
MARKER_P, MARKER_N = 0x50, 0x4E
# One rack is one battery to the inverter: 0x359 byte 4 is the number of packs in parallel.
PACKS_PER_RACK = 1


@dataclass(frozen=True, slots=True)
class Frame:
    arbitration_id: int
    data: bytes


def _any(flags: ProtectionFlags, *names: str) -> int:
    return int(any(getattr(flags, name) for name in names))


def _signals(snap: BatterySnapshot, name: str) -> dict[int, dict[str, float]]:
    a, w = snap.alarms, snap.warnings
    charge_ok = snap.contactor_closed and snap.charge_current_limit_a > 0
    discharge_ok = snap.contactor_closed and snap.discharge_current_limit_a > 0
    text = name.encode("ascii", errors="replace")[:8].ljust(8, b" ")
    return {
        0x351: {
            "ChargeVoltageLimit": round(snap.charge_voltage_limit_v, 1),
            "ChargeCurrentLimit": round(snap.charge_current_limit_a, 1),
            # Sent as a positive magnitude (the DBC comment); the old negative convention is not used.
            "DischargeCurrentLimit": round(snap.discharge_current_limit_a, 1),
            "DischargeVoltageLimit": round(snap.discharge_voltage_limit_v, 1),
        },
        0x355: {
            "StateOfCharge": round(snap.soc_pct),
            "StateOfHealth": round(snap.soh_pct),
            "StateOfChargeHiRes": round(snap.soc_pct, 2),
        },
        0x356: {
            "PackVoltage": round(snap.pack_voltage_v, 2),
            "PackCurrent": round(snap.current_a, 1),  # positive = charging, as the contract
            # Pylon sends one temperature; the hottest module is the one the inverter should care about.
            "PackTemperature": round(snap.temperature_max_c, 1),
        },
        0x359: {
            "ProtCellOverVoltage": _any(a, "cell_over_voltage", "pack_over_voltage"),
            "ProtCellUnderVoltage": _any(a, "cell_under_voltage", "pack_under_voltage"),
            "ProtOverTemperature": _any(a, "charge_over_temperature", "discharge_over_temperature"),
            "ProtUnderTemperature": _any(a, "charge_under_temperature", "discharge_under_temperature"),
            "ProtDischargeOverCurrent": _any(a, "discharge_over_current"),
            "ProtChargeOverCurrent": _any(a, "charge_over_current"),
            "ProtSystemError": _any(a, "internal_fault", "insulation_fault", "cell_imbalance"),
            "WarnHighVoltage": _any(w, "cell_over_voltage", "pack_over_voltage"),
            "WarnLowVoltage": _any(w, "cell_under_voltage", "pack_under_voltage"),
            "WarnHighTemperature": _any(w, "charge_over_temperature", "discharge_over_temperature"),
            "WarnLowTemperature": _any(w, "charge_under_temperature", "discharge_under_temperature"),
            "WarnDischargeHighCurrent": _any(w, "discharge_over_current"),
            "WarnChargeHighCurrent": _any(w, "charge_over_current"),
            "WarnInternalCommFail": _any(w, "internal_fault", "insulation_fault"),
            "ModuleCount": PACKS_PER_RACK,
            "MarkerP": MARKER_P,
            "MarkerN": MARKER_N,
        },
        0x35C: {
            "FullChargeRequest": 0,
            "ForceChargeRequestII": 0,
            "ForceChargeRequestI": 0,
            # Enable bits follow the limits (inverter-can.md test rule: enable = 0 <=> limit = 0).
            "DischargeEnable": int(discharge_ok),
            "ChargeEnable": int(charge_ok),
        },
        0x35E: {f"Name{i}": text[i] for i in range(8)},
        0x373: {
            "CellVoltageMin": round(snap.cell_voltage_min_v, 3),
            "CellVoltageMax": round(snap.cell_voltage_max_v, 3),
            "CellTemperatureMin": round(snap.temperature_min_c),
            "CellTemperatureMax": round(snap.temperature_max_c),
        },
        0x379: {"InstalledCapacity": round(snap.capacity_ah)},
    }


def _encode(frame_id: int, values: dict[str, float]) -> bytes:
    message = load_dbc(DBC_NAME).get_message_by_frame_id(frame_id)
    clamped: dict[str, float] = {}
    for signal in message.signals:
        value = values[signal.name]
        # A value the field cannot carry (e.g. a 400 V rack in 0x356's s16 × 0.01 V) saturates,
        # as a BMS's fixed-point field would, instead of failing the whole burst.
        if signal.minimum is not None:
            value = max(value, signal.minimum)
        if signal.maximum is not None:
            value = min(value, signal.maximum)
        clamped[signal.name] = value
    return bytes(message.encode(clamped, strict=True))


def pylon_frames(snap: BatterySnapshot, *, name: str = "PYLON") -> tuple[Frame, ...]:
    """The eight frames (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E, 0x373, 0x379) for one snapshot."""
    signals = _signals(snap, name)
    return tuple(Frame(frame_id, _encode(frame_id, signals[frame_id])) for frame_id in FRAME_IDS)
