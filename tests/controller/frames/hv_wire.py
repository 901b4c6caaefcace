"""A test decoder for the Pylon HV frame set, written from the public descriptions alone (struct and
bit arithmetic, no DBC, nothing imported from ``controller/frames.py``).

The layout it checks against (docs/inverter-dialects.md has the sources): 29-bit IDs, 8 bytes, every
multi-byte field little-endian; currents 0.1 A with an offset of -3000 A (raw 30000 = 0 A), the
maximum discharge current negative; temperatures 0.1 °C with an offset of -100 °C (raw 1000 = 0 °C);
0x4250 byte 0 bits 0-2 status (1 charge, 2 discharge, 3 idle), bit 3 force charge; byte 3 faults
(bit 7 "other"); bytes 4-5 the alarm word, bytes 6-7 the protection word, bit 0 cell under-voltage,
1 cell over-voltage, 2 system under-voltage, 3 system over-voltage, 4/5 charge under/over
temperature, 6/7 discharge under/over temperature, 8/9 charge/discharge over-current; 0x4280 0xAA =
forbidden. :func:`check_hv_set` asserts every field of one encoded answer against the state it came
from; :func:`check_hv_equipment` the equipment answer.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence

import can

from shared.cluster import ConsolidatedState
from tests.controller.frames.wire import by_id, charge_permitted, discharge_permitted

ENSEMBLE = (0x4210, 0x4220, 0x4230, 0x4240, 0x4250, 0x4260, 0x4270, 0x4280, 0x4290)
EQUIPMENT = (0x7310, 0x7320, 0x7330, 0x7340)
CURRENT_ZERO_RAW = 30000  # -3000 A offset in 0.1 A
TEMPERATURE_ZERO_RAW = 1000  # -100 °C offset in 0.1 °C
FORBIDDEN = 0xAA
# Bit of the alarm/protection words (bytes 4-5 / 6-7) per contract flag.
WORD_BIT = {
    "cell_under_voltage": 0, "cell_over_voltage": 1, "pack_under_voltage": 2, "pack_over_voltage": 3,
    "charge_under_temperature": 4, "charge_over_temperature": 5,
    "discharge_under_temperature": 6, "discharge_over_temperature": 7,
    "charge_over_current": 8, "discharge_over_current": 9,
}
FAULT_OTHER_FLAGS = {"internal_fault", "insulation_fault", "cell_imbalance"}  # byte 3 bit 7
CHARGE_BITS = (1, 3, 4, 5, 8)  # protections that must leave charging forbidden
DISCHARGE_BITS = (0, 2, 6, 7, 9)
WIRE_T_MIN_C, WIRE_T_MAX_C = -40.0, 100.0  # the encoder's plausibility bounds (as in the LV set)
IDLE_A = 0.5


def u8(data: bytes, offset: int) -> int:
    return data[offset]


def u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def amps(data: bytes, offset: int) -> float:
    return (u16(data, offset) - CURRENT_ZERO_RAW) / 10


def celsius(data: bytes, offset: int) -> float:
    return (u16(data, offset) - TEMPERATURE_ZERO_RAW) / 10


def clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def number_in(location: str) -> int:
    """The trailing number of the rack's own location ("rack-2: cell 17" -> 17), 0 without one."""
    if ": " not in location:
        return 0
    found = re.findall(r"\d+", location.rsplit(": ", 1)[1])
    return int(found[-1]) if found and int(found[-1]) <= 0xFFFF else 0


def expected_charge_a(state: ConsolidatedState) -> float:
    return clamp(state.charge_current_limit_a, 0, 3553.5) if charge_permitted(state) else 0.0


def expected_discharge_a(state: ConsolidatedState) -> float:
    return clamp(state.discharge_current_limit_a, 0, 3000.0) if discharge_permitted(state) else 0.0


def check_hv_set(messages: Sequence[can.Message], state: ConsolidatedState, *,
                 modules_in_series: int) -> None:
    """Every field of one ensemble answer against ``state`` (assert-based)."""
    assert tuple(m.arbitration_id for m in messages) == ENSEMBLE
    for m in messages:
        assert m.is_extended_id and not m.is_remote_frame and not m.is_fd and not m.is_error_frame, m
        assert m.dlc == 8 and len(m.data) == 8, m
    frames = by_id(messages)
    _check_total(frames[0x4210], state)
    _check_limits(frames[0x4220], state)
    _check_cells(frames[0x4230], state)
    _check_temperatures(frames[0x4240], state)
    assert frames[0x4270] == frames[0x4240]  # the racks' hottest/coldest sensors are module sensors
    _check_status(frames[0x4250], state)
    average_mv = clamp(state.pack_voltage_v / modules_in_series, 0, 65.535) * 1000
    module = frames[0x4260]
    assert abs(u16(module, 0) - average_mv) <= 0.5 + 1e-6 and u16(module, 2) == u16(module, 0)
    assert module[4:] == bytes(4)
    _check_marks(frames[0x4280], frames[0x4220], frames[0x4250], state)
    assert frames[0x4290] == bytes(8)


def _check_total(data: bytes, state: ConsolidatedState) -> None:
    volts, current, temp = u16(data, 0) / 10, amps(data, 2), celsius(data, 4)
    assert abs(volts - clamp(state.pack_voltage_v, 0, 6553.5)) <= 0.05 + 1e-9
    assert abs(current - clamp(state.current_a, -3000, 3553.5)) <= 0.05 + 1e-9
    if abs(state.current_a) >= 0.1:  # positive = charging
        assert math.copysign(1, current) == math.copysign(1, state.current_a)
    assert abs(temp - clamp(state.temperature_avg_c, WIRE_T_MIN_C, WIRE_T_MAX_C)) <= 0.05 + 1e-9
    assert u8(data, 6) == round(state.soc_pct) and u8(data, 7) == round(state.soh_pct)


def _check_limits(data: bytes, state: ConsolidatedState) -> None:
    cvl, dvl = u16(data, 0) / 10, u16(data, 2) / 10
    charge, discharge = amps(data, 4), amps(data, 6)
    assert cvl > 0 and dvl < cvl
    if state.charge_voltage_limit_v >= 0.1:
        assert abs(cvl - min(state.charge_voltage_limit_v, 6553.5)) <= 0.05 + 1e-9
    else:  # CVL is never 0: the pack voltage is held
        assert cvl >= min(state.pack_voltage_v, 6553.5) - 1e-9
    if state.discharge_voltage_limit_v < cvl - 0.05:
        assert abs(dvl - state.discharge_voltage_limit_v) <= 0.05 + 1e-9
    assert charge >= 0, "the maximum charge current is positive"
    assert discharge <= 0, "the maximum discharge current is sent negative"
    assert abs(charge - expected_charge_a(state)) <= 0.05 + 1e-9
    assert abs(-discharge - expected_discharge_a(state)) <= 0.05 + 1e-9


def _check_cells(data: bytes, state: ConsolidatedState) -> None:
    high = (state.cell_voltage_max_v, state.cell_voltage_max_location)
    low = (state.cell_voltage_min_v, state.cell_voltage_min_location)
    if low[0] > high[0]:
        high, low = low, high
    assert abs(u16(data, 0) - clamp(high[0], 0, 65.535) * 1000) <= 0.5 + 1e-6
    assert abs(u16(data, 2) - clamp(low[0], 0, 65.535) * 1000) <= 0.5 + 1e-6
    assert u16(data, 0) >= u16(data, 2)
    assert (u16(data, 4), u16(data, 6)) == (number_in(high[1]), number_in(low[1]))


def _check_temperatures(data: bytes, state: ConsolidatedState) -> None:
    high = (state.temperature_max_c, state.temperature_max_location)
    low = (state.temperature_min_c, state.temperature_min_location)
    if low[0] > high[0]:
        high, low = low, high
    assert abs(celsius(data, 0) - clamp(high[0], WIRE_T_MIN_C, WIRE_T_MAX_C)) <= 0.05 + 1e-9
    assert abs(celsius(data, 2) - clamp(low[0], WIRE_T_MIN_C, WIRE_T_MAX_C)) <= 0.05 + 1e-9
    assert (u16(data, 4), u16(data, 6)) == (number_in(high[1]), number_in(low[1]))


def _word(flags: Sequence[str]) -> int:
    word = 0
    for name in flags:
        if name in WORD_BIT:
            word |= 1 << WORD_BIT[name]
    return word


def _check_status(data: bytes, state: ConsolidatedState) -> None:
    status = data[0] & 0x07
    if state.current_a > IDLE_A:
        assert status == 1
    elif state.current_a < -IDLE_A:
        assert status == 2
    else:
        assert status == 3
    assert bool(data[0] & 0x08) == (state.force_charge_request and charge_permitted(state))
    assert data[0] & 0xF0 == 0  # balance request never set; bits 5-7 reserved
    assert u16(data, 1) == 0  # cycle period: not provided
    other = bool(FAULT_OTHER_FLAGS & set(state.alarms.raised())) or state.cluster.not_enough_racks
    assert data[3] == (0x80 if other else 0x00)
    assert u16(data, 4) == _word(state.warnings.raised())
    assert u16(data, 6) == _word(state.alarms.raised())


def _check_marks(marks: bytes, limits: bytes, status: bytes, state: ConsolidatedState) -> None:
    assert marks[0] in (0x00, FORBIDDEN) and marks[1] in (0x00, FORBIDDEN) and marks[2:] == bytes(6)
    charge_allowed, discharge_allowed = marks[0] == 0x00, marks[1] == 0x00
    assert charge_allowed == (amps(limits, 4) > 0) == charge_permitted(state)
    assert discharge_allowed == (amps(limits, 6) < 0) == discharge_permitted(state)
    protection = u16(status, 6)
    if any(protection & (1 << bit) for bit in CHARGE_BITS):
        assert not charge_allowed
    if any(protection & (1 << bit) for bit in DISCHARGE_BITS):
        assert not discharge_allowed
    if status[3] & 0x80:
        assert not charge_allowed and not discharge_allowed


def check_hv_equipment(messages: Sequence[can.Message], *, cells: int, modules: int, voltage_level_v: int,
                       capacity_ah: float, name: str, software: tuple[int, int]) -> None:
    """The system equipment answer: 0x7310 versions, 0x7320 geometry, 0x7330/0x7340 the name."""
    assert tuple(m.arbitration_id for m in messages) == EQUIPMENT
    assert all(m.is_extended_id and m.dlc == 8 for m in messages)
    frames = by_id(messages)
    assert frames[0x7310] == bytes([0, 0, 0, 0, software[0], software[1], 0, 0])
    geometry = frames[0x7320]
    assert u16(geometry, 0) == cells and geometry[2] == modules and geometry[3] == cells // modules
    assert u16(geometry, 4) == voltage_level_v
    assert u16(geometry, 6) == min(round(capacity_ah), 0xFFFF)
    text = frames[0x7330] + frames[0x7340]
    assert text == name.encode("ascii")[:16].ljust(16, b"\x00")
