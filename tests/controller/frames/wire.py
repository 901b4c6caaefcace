"""A test decoder for the inverter frame set, written from inverter-can.md alone (struct, no DBC).

It deliberately shares nothing with ``controller/frames.py`` or the DBC files except the frame
catalogue in the reference, so a wrong scale, offset or bit position in a DBC shows up here.
:func:`check_set` asserts §5 checks 1-12 for one encoded set against the state it came from.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

import can

from shared.cluster import ConsolidatedState
from shared.controller_config import Dialect

SETS: dict[Dialect, tuple[int, ...]] = {
    Dialect.PYLON: (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E),
    Dialect.SMA: (0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F),
    Dialect.VICTRON: (0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F, 0x372, 0x373, 0x379),
}
INVERTER_IDS = {0x300, 0x305, 0x306, 0x307}

# Which permission each alarm takes away (Pylon/SMA semantics of the conditions).
CHARGE_BLOCKERS = {
    "cell_over_voltage", "pack_over_voltage", "charge_over_current", "charge_over_temperature",
    "charge_under_temperature", "cell_imbalance", "internal_fault", "insulation_fault",
}
DISCHARGE_BLOCKERS = {
    "cell_under_voltage", "pack_under_voltage", "discharge_over_current", "discharge_over_temperature",
    "discharge_under_temperature", "cell_imbalance", "internal_fault", "insulation_fault",
}
# Pylon 0x359 (§1): flag -> (byte, bit) of the protection; the warning is two bytes further on.
PYLON_BITS: dict[str, tuple[int, int]] = {
    "cell_over_voltage": (0, 1), "pack_over_voltage": (0, 1),
    "cell_under_voltage": (0, 2), "pack_under_voltage": (0, 2),
    "charge_over_temperature": (0, 3), "discharge_over_temperature": (0, 3),
    "charge_under_temperature": (0, 4), "discharge_under_temperature": (0, 4),
    "discharge_over_current": (0, 7),
    "charge_over_current": (1, 0),
    "internal_fault": (1, 3), "insulation_fault": (1, 3),
    "cell_imbalance": (1, 3),  # alarm only: the warning byte has no imbalance bit
}
PYLON_WARNING_UNMAPPED = {"cell_imbalance"}
# SMA/Victron 0x35A (§1 table): flag -> (byte, pair index) of the alarm; the warning is 4 bytes on.
SMA_PAIRS: dict[str, tuple[int, int]] = {
    "cell_over_voltage": (0, 1), "pack_over_voltage": (0, 1),
    "cell_under_voltage": (0, 2), "pack_under_voltage": (0, 2),
    "discharge_over_temperature": (0, 3),
    "discharge_under_temperature": (1, 0),
    "charge_over_temperature": (1, 1),
    "charge_under_temperature": (1, 2),
    "discharge_over_current": (1, 3),
    "charge_over_current": (2, 0),
    "internal_fault": (2, 3), "insulation_fault": (2, 3),
    "cell_imbalance": (3, 0),
}
GENERAL = (0, 0)
RESERVED_PAIRS = {(3, 1), (3, 2), (3, 3)}


def u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def s16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<h", data, offset)[0])


def pair(data: bytes, byte: int, index: int) -> int:
    return (data[byte] >> (2 * index)) & 0b11


def by_id(messages: Iterable[can.Message]) -> dict[int, bytes]:
    return {m.arbitration_id: bytes(m.data) for m in messages}


def charge_permitted(state: ConsolidatedState) -> bool:
    """What the encoder must grant: permission, no blocking alarm, and a limit that survives 0.1 A."""
    trip = state.cluster.not_enough_racks
    blocked = trip or bool(CHARGE_BLOCKERS & set(state.alarms.raised()))
    return state.charge_enabled and not blocked and round(state.charge_current_limit_a * 10) > 0


def discharge_permitted(state: ConsolidatedState) -> bool:
    trip = state.cluster.not_enough_racks
    blocked = trip or bool(DISCHARGE_BLOCKERS & set(state.alarms.raised()))
    return state.discharge_enabled and not blocked and round(state.discharge_current_limit_a * 10) > 0


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def check_set(dialect: Dialect, messages: Sequence[can.Message], state: ConsolidatedState, *,
              module_count: int = 1, manufacturer: str = "PYLON") -> None:
    """§5 checks 1-12 on one encoded set (assert-based; pytest shows the failing line)."""
    ids = [m.arbitration_id for m in messages]
    frames = by_id(messages)
    # 1. frame format and the ID set, in a stable order
    for m in messages:
        assert not m.is_extended_id and m.arbitration_id < 0x800, m
        assert not m.is_remote_frame and not m.is_fd and not m.is_error_frame, m
    assert tuple(ids) == SETS[dialect]
    assert not INVERTER_IDS & set(ids)
    # 2. DLC and padding
    for m in messages:
        assert m.dlc == 8 and len(m.data) == 8, m
    pad = 0xFF if dialect is Dialect.SMA else 0x00
    if dialect is Dialect.PYLON:
        assert frames[0x355][4:] == bytes(4)  # Pylon v1.2: no HiResSOC
        assert frames[0x356][6:] == bytes(2)
    else:
        assert frames[0x355][6:] == bytes([pad, pad])
        assert frames[0x356][6:] == bytes([pad, pad])
        assert frames[0x35F][0:4] == bytes([pad] * 4) and frames[0x35F][6:] == bytes([pad, pad])
    _check_limits(frames[0x351], state)
    _check_soc(dialect, frames[0x355], state)
    _check_measurements(frames[0x356], state)
    if dialect is Dialect.PYLON:
        _check_pylon_flags(frames[0x359], frames[0x35C], frames[0x351], state, module_count)
    else:
        _check_pairs(frames[0x35A], frames[0x351], state)
    _check_name(frames[0x35E], manufacturer, dialect)
    if dialect is not Dialect.PYLON:
        assert u16(frames[0x35F], 4) == min(round(state.capacity_ah), 65535)
    if dialect is Dialect.VICTRON:
        _check_victron(frames, state)
    # 12. CVL >= the 0x356 voltage whenever charging is allowed (rounding to 0.1 V allowed for), for a
    # state that says so itself; a CVL the encoder had to invent holds the pack voltage.
    cvl = u16(frames[0x351], 0) / 10
    volts = s16(frames[0x356], 0) / 100
    if state.charge_voltage_limit_v < 0.1:
        assert cvl >= volts - 1e-9
    elif u16(frames[0x351], 2) > 0 and state.charge_voltage_limit_v >= state.pack_voltage_v:
        assert cvl >= volts - 0.055 - 1e-9  # CVL rounds to 0.1 V, the voltage to 0.01 V


def _check_limits(data: bytes, state: ConsolidatedState) -> None:
    # 3 + 4: little-endian u16/s16 in 0.1 V / 0.1 A
    cvl, ccl, dcl, dvl = u16(data, 0) / 10, s16(data, 2) / 10, s16(data, 4) / 10, u16(data, 6) / 10
    assert cvl > 0
    assert ccl >= 0 and dcl >= 0
    assert dvl < cvl
    if state.charge_voltage_limit_v >= 0.1:
        assert abs(cvl - min(state.charge_voltage_limit_v, 6553.5)) <= 0.05 + 1e-9
    else:
        assert cvl >= min(state.pack_voltage_v, 6553.5) - 1e-9
        assert cvl > min(state.discharge_voltage_limit_v, 6553.4)
    if state.discharge_voltage_limit_v < cvl - 0.05:
        assert abs(dvl - state.discharge_voltage_limit_v) <= 0.05 + 1e-9
    expected_ccl = _clamp(state.charge_current_limit_a, 0, 3276.7) if charge_permitted(state) else 0.0
    expected_dcl = _clamp(state.discharge_current_limit_a, 0, 3276.7) if discharge_permitted(state) else 0.0
    assert abs(ccl - expected_ccl) <= 0.05 + 1e-9
    assert abs(dcl - expected_dcl) <= 0.05 + 1e-9


def _check_soc(dialect: Dialect, data: bytes, state: ConsolidatedState) -> None:
    # 5
    soc, soh = u16(data, 0), u16(data, 2)
    assert 0 <= soc <= 100 and 0 <= soh <= 100
    assert soc == round(state.soc_pct) and soh == round(state.soh_pct)
    if dialect is not Dialect.PYLON:
        hires = u16(data, 4)
        assert 0 <= hires <= 10000
        assert abs(hires / 100 - soc) < 1
        assert abs(hires / 100 - state.soc_pct) <= 0.005 + 1e-9


def _check_measurements(data: bytes, state: ConsolidatedState) -> None:
    # 6: 0.01 V (not 0.1 V), 0.1 A positive = charging, 0.1 °C within -40..100
    volts, amps, temp = s16(data, 0) / 100, s16(data, 2) / 10, s16(data, 4) / 10
    assert abs(volts - min(state.pack_voltage_v, 327.67)) <= 0.005 + 1e-9
    assert abs(amps - _clamp(state.current_a, -3276.8, 3276.7)) <= 0.05 + 1e-9
    if abs(state.current_a) >= 0.1:
        assert math.copysign(1, amps) == math.copysign(1, state.current_a)
    assert -40 <= temp <= 100
    assert abs(temp - _clamp(state.temperature_avg_c, -40, 100)) <= 0.05 + 1e-9


def _check_pylon_flags(prot: bytes, request: bytes, limits: bytes, state: ConsolidatedState,
                       module_count: int) -> None:
    # 7: reserved bits zero, pack count, 'P' 'N', byte 7 = 0, each flag at its spec bit
    assert prot[0] & 0b0110_0001 == 0 and prot[1] & ~0b0000_1001 & 0xFF == 0
    assert prot[2] & 0b0110_0001 == 0 and prot[3] & ~0b0000_1001 & 0xFF == 0
    assert prot[4] == min(module_count, 255) >= 1
    assert prot[5:7] == b"PN"
    assert prot[7] == 0
    expected = bytearray(4)
    for name in state.alarms.raised():
        byte, bit = PYLON_BITS[name]
        expected[byte] |= 1 << bit
    if state.cluster.not_enough_racks:
        expected[1] |= 1 << 3  # system error: byte 1 b3 (v1.2 doc), not b7
    for name in state.warnings.raised():
        if name not in PYLON_WARNING_UNMAPPED:
            byte, bit = PYLON_BITS[name]
            expected[byte + 2] |= 1 << bit
    assert prot[:4] == bytes(expected)
    # 8: 0x35C reserved zero; enable <=> limit; protection => matching enable cleared
    assert request[0] & 0b0000_0111 == 0 and request[1:] == bytes(7)
    charge_enable, discharge_enable = bool(request[0] & 0x80), bool(request[0] & 0x40)
    assert not request[0] & 0x30  # no force-charge request without a source (and they imply charge)
    assert not request[0] & 0x08
    assert charge_enable == (s16(limits, 2) > 0)
    assert discharge_enable == (s16(limits, 4) > 0)
    assert charge_enable == charge_permitted(state)
    assert discharge_enable == discharge_permitted(state)
    if prot[0] & (1 << 1) or prot[1] & (1 << 0):  # over-voltage, charge over-current
        assert not charge_enable
    if prot[0] & (1 << 2) or prot[0] & (1 << 7):  # under-voltage, discharge over-current
        assert not discharge_enable
    if prot[0] & (0b11 << 3):  # over/under temperature: the bit does not say which direction
        assert not (charge_enable and discharge_enable)
    if prot[1] & (1 << 3):  # system error
        assert not charge_enable and not discharge_enable


def _check_pairs(data: bytes, limits: bytes, state: ConsolidatedState) -> None:
    # 10: every pair in {00, 01, 10}; reserved 00; supported pairs 10 healthy / 01 raised at its position
    expected_alarm = dict.fromkeys([GENERAL, *SMA_PAIRS.values(), (2, 1), (2, 2)], 2)
    expected_warning = dict(expected_alarm)
    for name in state.alarms.raised():
        expected_alarm[SMA_PAIRS[name]] = 1
    for name in state.warnings.raised():
        expected_warning[SMA_PAIRS[name]] = 1
    if state.alarms.raised() or state.cluster.not_enough_racks:
        expected_alarm[GENERAL] = 1
    if state.warnings.raised():
        expected_warning[GENERAL] = 1
    for byte in range(4):
        for index in range(4):
            assert pair(data, byte, index) != 0b11
            assert pair(data, byte + 4, index) != 0b11
            want_alarm = 0 if (byte, index) in RESERVED_PAIRS else expected_alarm[(byte, index)]
            want_warning = 0 if (byte, index) in RESERVED_PAIRS else expected_warning[(byte, index)]
            assert pair(data, byte, index) == want_alarm, (byte, index)
            assert pair(data, byte + 4, index) == want_warning, (byte, index)
    # 8 for SMA/Victron: a raised alarm pair => the matching limit is 0
    ccl, dcl = s16(limits, 2), s16(limits, 4)
    if pair(data, 0, 1) == 1 or pair(data, 1, 1) == 1 or pair(data, 1, 2) == 1 or pair(data, 2, 0) == 1:
        assert ccl == 0
    if pair(data, 0, 2) == 1 or pair(data, 1, 3) == 1:
        assert dcl == 0
    if pair(data, 2, 3) == 1 or pair(data, 3, 0) == 1:
        assert ccl == 0 and dcl == 0
    if pair(data, 0, 3) == 1 or pair(data, 1, 0) == 1:
        assert ccl == 0 or dcl == 0
    assert (ccl > 0) == charge_permitted(state)
    assert (dcl > 0) == discharge_permitted(state)


def _check_name(data: bytes, manufacturer: str, dialect: Dialect) -> None:
    # 9: printable ASCII padded with 0x20 or 0x00, starting with the configured brand
    text = data.rstrip(b" \x00")
    assert all(0x20 <= b <= 0x7E for b in text)
    assert all(b in (0x20, 0x00) for b in data[len(text):])
    assert data.startswith(manufacturer.encode("ascii")[:8])
    if dialect is Dialect.PYLON and manufacturer.startswith("PYLON"):
        assert data.startswith(b"PYLON")


def _check_victron(frames: dict[int, bytes], state: ConsolidatedState) -> None:
    # 11: 0x373 mV and K, 0x372 counts, 0x379 Ah
    cells = frames[0x373]
    v_min, v_max, t_min, t_max = (u16(cells, 0), u16(cells, 2), u16(cells, 4), u16(cells, 6))
    assert v_min <= v_max and t_min <= t_max
    assert 233 <= t_min <= 373 and 233 <= t_max <= 373
    lo_v, hi_v = sorted((state.cell_voltage_min_v, state.cell_voltage_max_v))
    assert abs(v_min - lo_v * 1000) <= 0.5 + 1e-6 and abs(v_max - hi_v * 1000) <= 0.5 + 1e-6
    if lo_v >= 2.0 and hi_v <= 4.5:
        assert 2000 <= v_min <= v_max <= 4500
    lo_t, hi_t = sorted((state.temperature_min_c, state.temperature_max_c))
    assert abs(t_min - (_clamp(lo_t, -40, 100) + 273)) <= 0.5 + 1e-9
    assert abs(t_max - (_clamp(hi_t, -40, 100) + 273)) <= 0.5 + 1e-9
    counts = frames[0x372]
    online, blocking_charge, blocking_discharge, offline = (u16(counts, i) for i in (0, 2, 4, 6))
    assert online == state.eligible_racks
    assert online + offline == max(state.roster_size, state.eligible_racks)
    assert blocking_charge <= online and blocking_discharge <= online
    capacity = u16(frames[0x379], 0)
    assert capacity == min(round(state.capacity_ah), 65535)
    assert frames[0x379][2:] == bytes(6)
    if state.capacity_ah >= 1.0:
        assert capacity > 0
