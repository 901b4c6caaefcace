"""Inverter CAN frames: one :class:`ConsolidatedState` in, the dialect's full frame set out — and back.

This module is the one place where the consolidated battery becomes wire values. It only *chooses*
values; cantools packs every frame from ``shared/dbc/pylon.dbc`` (dialect ``pylon``),
``shared/dbc/sma.dbc`` (``victron`` and ``sma``) or ``shared/dbc/pylon_hv.dbc`` (``pylon_hv``).
References in comments are to ``inverter-can.md`` (§ numbers) and its sources; the Pylon HV set, its
sources and where they disagree are in ``docs/inverter-dialects.md``.

What the encoder guarantees on every set, whatever the state says (the core should already make all
of it true; the encoder fixes it anyway and counts each fix in :attr:`FrameEncoder.clamped`):

* every value fits its field: the DBC range intersected with the bit width, so cantools never sees a
  value it would wrap or reject (it runs with ``strict=False`` after this clamping);
* CVL is never 0 (§3 pitfall 3: Victron reads 0 V as over-voltage) and DVL < CVL (§5.4);
* CCL and DCL are positive magnitudes (§1 0x351: a negated DCL was read as ~646 A);
* a permission and its limit agree (§5.8): no permission ⇒ limit 0, and a limit that rounds to 0 ⇒
  no permission; in the SMA/Victron sets, which have no enable frame, the limit carries it alone;
* an alarm clears the permission of the direction it protects (:data:`FLAG_BLOCKS`), so a
  protection bit in 0x359 or a raised alarm pair in 0x35A never sits next to a granted current.
  Consequence for the core: an alarm put into ``state.alarms`` stops that direction for the whole
  bank; an excluded rack's alarm belongs elsewhere (its :class:`RackView`) if the bank carries on.

Frames are always 8 bytes, with standard 11-bit IDs in the low-voltage dialects and 29-bit IDs in
``pylon_hv``. Padding (bits no signal covers) is 0x00 for Pylon, Pylon HV and Victron (real-battery
and BYD traces), and 0xFF for SMA, where unused words must read "invalid" 0xFFFF (SMA-TI §5.1).

Pylon HV differs in kind: the inverter asks (0x4200, byte 0 = what) and the battery answers with the
"ensemble information" (:data:`DIALECT_IDS`) or the "system equipment information"
(:meth:`FrameEncoder.equipment_frames`). Its currents carry an offset of -3000 A and the maximum
discharge current is sent *negative* (raw = 30000 - 10 × DCL): a DCL beyond 3000 A, a CCL beyond
3553.5 A or a module voltage beyond 65.535 V cannot be carried and is saturated and counted like
every other value here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from types import MappingProxyType

import can
from cantools.database.can import Message as DbcMessage
from cantools.database.can import Signal as DbcSignal
from cantools.database.errors import DecodeError

from shared.cluster import ConsolidatedState
from shared.controller_config import Dialect, InverterCanConfig
from shared.dbc import load_dbc
from shared.models import PROTECTION_FLAG_NAMES

log = logging.getLogger(__name__)

ID_LIMITS = 0x351
ID_SOC_SOH = 0x355
ID_MEASUREMENTS = 0x356
ID_PROTECTION = 0x359
ID_ALARMS = 0x35A
ID_REQUEST = 0x35C
ID_MANUFACTURER = 0x35E
ID_INFO = 0x35F
ID_MODULE_COUNTS = 0x372
ID_CELL_EXTREMES = 0x373
ID_CAPACITY = 0x379

# Pylon HV (29-bit IDs, docs/inverter-dialects.md). The inverter's request, the "ensemble information"
# answer and the "system equipment information" answer.
ID_HV_REQUEST = 0x4200
ID_HV_TOTAL = 0x4210
ID_HV_LIMITS = 0x4220
ID_HV_CELL_VOLTAGES = 0x4230
ID_HV_CELL_TEMPERATURES = 0x4240
ID_HV_STATUS = 0x4250
ID_HV_MODULE_VOLTAGES = 0x4260
ID_HV_MODULE_TEMPERATURES = 0x4270
ID_HV_FORBIDDEN = 0x4280
ID_HV_FAULT_EXTENSION = 0x4290
ID_HV_VERSION = 0x7310
ID_HV_MODULES = 0x7320
ID_HV_NAME_1 = 0x7330
ID_HV_NAME_2 = 0x7340
HV_EQUIPMENT_IDS: tuple[int, ...] = (ID_HV_VERSION, ID_HV_MODULES, ID_HV_NAME_1, ID_HV_NAME_2)

# Send order: limits first (a real Pylontech burst starts with 0x351; §5.13 wants a stable order). Pylon
# HV answers in its ID order, as every emulator and the real SC0500 traces do.
DIALECT_IDS: Mapping[Dialect, tuple[int, ...]] = MappingProxyType({
    Dialect.PYLON: (ID_LIMITS, ID_SOC_SOH, ID_MEASUREMENTS, ID_PROTECTION, ID_REQUEST, ID_MANUFACTURER),
    Dialect.SMA: (ID_LIMITS, ID_SOC_SOH, ID_MEASUREMENTS, ID_ALARMS, ID_MANUFACTURER, ID_INFO),
    Dialect.VICTRON: (
        ID_LIMITS, ID_SOC_SOH, ID_MEASUREMENTS, ID_ALARMS, ID_MANUFACTURER, ID_INFO,
        ID_MODULE_COUNTS, ID_CELL_EXTREMES, ID_CAPACITY,
    ),
    Dialect.PYLON_HV: (
        ID_HV_TOTAL, ID_HV_LIMITS, ID_HV_CELL_VOLTAGES, ID_HV_CELL_TEMPERATURES, ID_HV_STATUS,
        ID_HV_MODULE_VOLTAGES, ID_HV_MODULE_TEMPERATURES, ID_HV_FORBIDDEN, ID_HV_FAULT_EXTENSION,
    ),
})
DIALECT_DBC: Mapping[Dialect, str] = MappingProxyType(
    {Dialect.PYLON: "pylon", Dialect.SMA: "sma", Dialect.VICTRON: "sma", Dialect.PYLON_HV: "pylon_hv"}
)
# Unused bits: 1s for SMA (0xFFFF = invalid, SMA-TI §5.1), 0s for Pylon/Victron (real traces, §3 pitfall 7)
# and Pylon HV (every emulator zero-fills).
DIALECT_PADDING: Mapping[Dialect, bool] = MappingProxyType(
    {Dialect.PYLON: False, Dialect.SMA: True, Dialect.VICTRON: False, Dialect.PYLON_HV: False}
)
# The frame that carries the charge/discharge limits: what the foreign-transmitter watch and the
# simulated inverter key on.
DIALECT_LIMITS_ID: Mapping[Dialect, int] = MappingProxyType({
    Dialect.PYLON: ID_LIMITS, Dialect.SMA: ID_LIMITS, Dialect.VICTRON: ID_LIMITS,
    Dialect.PYLON_HV: ID_HV_LIMITS,
})
EXTENDED_ID_DIALECTS: frozenset[Dialect] = frozenset({Dialect.PYLON_HV})
# Dialects whose inverter asks for the set; the others broadcast it unasked.
POLLED_DIALECTS: frozenset[Dialect] = frozenset({Dialect.PYLON_HV})
# Sent by inverters (§1 "Inverter-originated frames"); a BMS transmitting them collides with the inverter.
INVERTER_IDS: frozenset[int] = frozenset({0x300, 0x305, 0x306, 0x307})
FRAME_DLC = 8

CVL_MIN_V = 0.1  # one count of the 0.1 V field: the smallest CVL that is not 0
MODULE_COUNT_MAX = 255  # 0x359 byte 4 is a u8
# Wire temperatures saturate at the plausible range of §5.6/§5.11: an inverter may treat an implausible
# reading as a communication fault (Deye W31 on implausible data), and 100 °C is an alarm either way.
WIRE_TEMPERATURE_MIN_C = -40.0
WIRE_TEMPERATURE_MAX_C = 100.0
PYLON_MARKER_P, PYLON_MARKER_N = 0x50, 0x4E  # 0x359 bytes 5-6, 'P' 'N'
PYLON_NAME_PREFIX = "PYLON"  # Deye recognises the battery only with this prefix (§1 0x35E)
NAME_LENGTH = 8
NAME_PAD = 0x20  # the real Pylontech trace pads "PYLON" with spaces
HV_NAME_LENGTH = 16  # 0x7330 + 0x7340; NUL-padded, as Battery-Emulator and diyBMS send it
HV_FORBIDDEN = 0xAA  # 0x4280: "forbidden"; 0x00 = allowed (every source agrees)
HV_ALLOWED = 0x00
# 0x4250 basic status (bits 0-2): what the battery is doing, from the current (positive = charging).
HV_STATUS_SLEEP, HV_STATUS_CHARGE, HV_STATUS_DISCHARGE, HV_STATUS_IDLE = 0, 1, 2, 3
HV_IDLE_CURRENT_A = 0.5  # within this of zero the bank is idle
_LOCATION_NUMBER = re.compile(r"(\d+)\D*$")


class HvRequest(IntEnum):
    """Byte 0 of the inverter's 0x4200 (Battery-Emulator PYLON-BATTERY.cpp, diyBMS pylonforce)."""

    ENSEMBLE = 0x00  # answer 0x4210..0x4290
    CELL_VOLTAGES = 0x01  # individual cell voltages: not supported, ignored (counted)
    EQUIPMENT = 0x02  # answer 0x7310..0x7340


class Pair(IntEnum):
    """One two-bit condition of 0x35A (SMA-TI §7.1): bit 2k = raised, bit 2k+1 = cleared."""

    NOT_SUPPORTED = 0
    RAISED = 1
    OK = 2
    INVALID = 3  # never sent: SMA ignores it as "no change"


class Block(Enum):
    """Which permission a raised alarm takes away."""

    CHARGE = "charge"
    DISCHARGE = "discharge"
    BOTH = "both"
    # The wire bit does not say which direction (Pylon "cell over-temperature"): at least one is stopped.
    EITHER = "either"

    def satisfied(self, *, charge_enabled: bool, discharge_enabled: bool) -> bool:
        """Whether permissions in this state respect the alarm."""
        if self is Block.CHARGE:
            return not charge_enabled
        if self is Block.DISCHARGE:
            return not discharge_enabled
        if self is Block.BOTH:
            return not (charge_enabled or discharge_enabled)
        return not (charge_enabled and discharge_enabled)

    @property
    def charge(self) -> bool:
        return self in (Block.CHARGE, Block.BOTH)

    @property
    def discharge(self) -> bool:
        return self in (Block.DISCHARGE, Block.BOTH)


# -- mapping tables: the contract's flags -> wire bits (one place, STYLE §9) --------------------------

# What each alarm (a trip, not a warning) stops. Cluster-level trips (not enough racks, latched alarm)
# stop both directions.
FLAG_BLOCKS: Mapping[str, Block] = MappingProxyType({
    "cell_over_voltage": Block.CHARGE,
    "cell_under_voltage": Block.DISCHARGE,
    "pack_over_voltage": Block.CHARGE,
    "pack_under_voltage": Block.DISCHARGE,
    "charge_over_current": Block.CHARGE,
    "discharge_over_current": Block.DISCHARGE,
    "charge_over_temperature": Block.CHARGE,
    "charge_under_temperature": Block.CHARGE,
    "discharge_over_temperature": Block.DISCHARGE,
    "discharge_under_temperature": Block.DISCHARGE,
    # Pylon has no imbalance bit; it is reported as a system error, which stops both directions.
    "cell_imbalance": Block.BOTH,
    "internal_fault": Block.BOTH,
    "insulation_fault": Block.BOTH,
})
if set(FLAG_BLOCKS) != set(PROTECTION_FLAG_NAMES):  # a new flag in the contract needs a rule here
    raise RuntimeError(f"FLAG_BLOCKS does not cover {sorted(set(PROTECTION_FLAG_NAMES) - set(FLAG_BLOCKS))}")

# 0x359 (Pylon v1.2, §1): signal -> the flags that set it. "System error" (byte 1 b3 per the v1.2 doc,
# not the b7 some emulators use) also carries the cluster trips.
PYLON_ALARM_BITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "ProtCellOverVoltage": ("cell_over_voltage", "pack_over_voltage"),
    "ProtCellUnderVoltage": ("cell_under_voltage", "pack_under_voltage"),
    "ProtOverTemperature": ("charge_over_temperature", "discharge_over_temperature"),
    "ProtUnderTemperature": ("charge_under_temperature", "discharge_under_temperature"),
    "ProtDischargeOverCurrent": ("discharge_over_current",),
    "ProtChargeOverCurrent": ("charge_over_current",),
    "ProtSystemError": ("internal_fault", "insulation_fault", "cell_imbalance"),
})
PYLON_WARNING_BITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "WarnHighVoltage": ("cell_over_voltage", "pack_over_voltage"),
    "WarnLowVoltage": ("cell_under_voltage", "pack_under_voltage"),
    "WarnHighTemperature": ("charge_over_temperature", "discharge_over_temperature"),
    "WarnLowTemperature": ("charge_under_temperature", "discharge_under_temperature"),
    "WarnDischargeHighCurrent": ("discharge_over_current",),
    "WarnChargeHighCurrent": ("charge_over_current",),
    # Byte 3 b3 "internal communication fail" (Sol-Ark: "critical system error"); Pylon has no
    # imbalance warning, so a cell_imbalance warning is not shown on this dialect.
    "WarnInternalCommFail": ("internal_fault", "insulation_fault"),
})
# What a set Pylon protection bit means for the enables, as a decoder without the state can judge it.
PYLON_BIT_BLOCKS: Mapping[str, Block] = MappingProxyType({
    "ProtCellOverVoltage": Block.CHARGE,
    "ProtCellUnderVoltage": Block.DISCHARGE,
    "ProtOverTemperature": Block.EITHER,
    "ProtUnderTemperature": Block.EITHER,
    "ProtDischargeOverCurrent": Block.DISCHARGE,
    "ProtChargeOverCurrent": Block.CHARGE,
    "ProtSystemError": Block.BOTH,
})

# 0x35A (SMA-TI pp22-29), condition -> the flags that raise it; "General" is any alarm/warning. Alarm
# signals are "Alarm" + name, warnings "Warning" + name. Contactor and short circuit have no source in
# the contract: sent as OK (2), like a BYD LVS ("AA…" when healthy); reserved pairs are 0.
PAIR_SOURCES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "HighVoltage": ("cell_over_voltage", "pack_over_voltage"),
    "LowVoltage": ("cell_under_voltage", "pack_under_voltage"),
    "HighTemperature": ("discharge_over_temperature",),
    "LowTemperature": ("discharge_under_temperature",),
    "HighTemperatureCharge": ("charge_over_temperature",),
    "LowTemperatureCharge": ("charge_under_temperature",),
    "HighDischargeCurrent": ("discharge_over_current",),
    "HighChargeCurrent": ("charge_over_current",),
    "Contactor": (),
    "ShortCircuit": (),
    "BmsInternal": ("internal_fault", "insulation_fault"),
    "CellImbalance": ("cell_imbalance",),
})
PAIR_GENERAL = "General"
PAIR_NAMES: tuple[str, ...] = (PAIR_GENERAL, *PAIR_SOURCES)
# What a raised alarm pair means for the limits, as a decoder without the state can judge it.
PAIR_BLOCKS: Mapping[str, Block] = MappingProxyType({
    "AlarmHighVoltage": Block.CHARGE,
    "AlarmLowVoltage": Block.DISCHARGE,
    "AlarmHighTemperature": Block.EITHER,
    "AlarmLowTemperature": Block.EITHER,
    "AlarmHighTemperatureCharge": Block.CHARGE,
    "AlarmLowTemperatureCharge": Block.CHARGE,
    "AlarmHighDischargeCurrent": Block.DISCHARGE,
    "AlarmHighChargeCurrent": Block.CHARGE,
    "AlarmContactor": Block.BOTH,
    "AlarmShortCircuit": Block.BOTH,
    "AlarmBmsInternal": Block.BOTH,
    "AlarmCellImbalance": Block.BOTH,
})

# 0x4250 (Pylon HV): the protection word (a trip: our alarms) and the alarm word (warning level: our
# warnings) share one bit order; signal -> the flags that set it. The module bits have no source in
# the contract. Internal, insulation and imbalance trips are "other error" in the fault byte; as
# warnings they have no bit and are not shown on this dialect.
HV_PROTECT_BITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "ProtectCellUnderVoltage": ("cell_under_voltage",),
    "ProtectCellOverVoltage": ("cell_over_voltage",),
    "ProtectSystemUnderVoltage": ("pack_under_voltage",),
    "ProtectSystemOverVoltage": ("pack_over_voltage",),
    "ProtectChargeUnderTemperature": ("charge_under_temperature",),
    "ProtectChargeOverTemperature": ("charge_over_temperature",),
    "ProtectDischargeUnderTemperature": ("discharge_under_temperature",),
    "ProtectDischargeOverTemperature": ("discharge_over_temperature",),
    "ProtectChargeOverCurrent": ("charge_over_current",),
    "ProtectDischargeOverCurrent": ("discharge_over_current",),
    "ProtectModuleUnderVoltage": (),
    "ProtectModuleOverVoltage": (),
})
HV_WARN_BITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "WarnCellLowVoltage": ("cell_under_voltage",),
    "WarnCellHighVoltage": ("cell_over_voltage",),
    "WarnSystemLowVoltage": ("pack_under_voltage",),
    "WarnSystemHighVoltage": ("pack_over_voltage",),
    "WarnChargeLowTemperature": ("charge_under_temperature",),
    "WarnChargeHighTemperature": ("charge_over_temperature",),
    "WarnDischargeLowTemperature": ("discharge_under_temperature",),
    "WarnDischargeHighTemperature": ("discharge_over_temperature",),
    "WarnChargeOverCurrent": ("charge_over_current",),
    "WarnDischargeOverCurrent": ("discharge_over_current",),
    "WarnModuleLowVoltage": (),
    "WarnModuleHighVoltage": (),
})
HV_FAULT_BITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "FaultOther": ("internal_fault", "insulation_fault", "cell_imbalance"),
})
_HV_MAPPED = {flag for table in (HV_PROTECT_BITS, HV_FAULT_BITS)
              for flags in table.values() for flag in flags}
_HV_UNMAPPED = set(PROTECTION_FLAG_NAMES) - _HV_MAPPED
if _HV_UNMAPPED:  # every trip must reach the inverter
    raise RuntimeError(f"Pylon HV 0x4250 does not carry {sorted(_HV_UNMAPPED)}")
HV_BIT_BLOCKS: Mapping[str, Block] = MappingProxyType({
    "ProtectCellUnderVoltage": Block.DISCHARGE,
    "ProtectCellOverVoltage": Block.CHARGE,
    "ProtectSystemUnderVoltage": Block.DISCHARGE,
    "ProtectSystemOverVoltage": Block.CHARGE,
    "ProtectChargeUnderTemperature": Block.CHARGE,
    "ProtectChargeOverTemperature": Block.CHARGE,
    "ProtectDischargeUnderTemperature": Block.DISCHARGE,
    "ProtectDischargeOverTemperature": Block.DISCHARGE,
    "ProtectChargeOverCurrent": Block.CHARGE,
    "ProtectDischargeOverCurrent": Block.DISCHARGE,
    "ProtectModuleUnderVoltage": Block.DISCHARGE,
    "ProtectModuleOverVoltage": Block.CHARGE,
    "FaultOther": Block.BOTH,
})
WIRE_ALARM_BLOCKS: Mapping[str, Block] = MappingProxyType(
    {**PYLON_BIT_BLOCKS, **PAIR_BLOCKS, **HV_BIT_BLOCKS}
)


# -- errors ---------------------------------------------------------------------------------------


class FrameError(ValueError):
    """A received frame that the dialect cannot read; ``arbitration_id`` names it."""

    def __init__(self, arbitration_id: int, message: str) -> None:
        super().__init__(f"frame {arbitration_id:#05x}: {message}")
        self.arbitration_id = arbitration_id


class UnknownFrameError(FrameError):
    """The ID is not part of the dialect's frame set."""


class FrameDecodeError(FrameError):
    """cantools could not decode the payload."""


# -- field cache ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    """One signal, reduced to what clamping needs: raw = round((value - offset) / scale)."""

    key: str  # "0x351.ChargeCurrentLimit", for the clamp counter
    scale: float
    offset: float
    raw_min: int
    raw_max: int
    zero_raw: int = 0  # the counts of a physical 0 (Pylon HV currents: 30000)
    # raw = round(value / scale) + zero_raw: the value is rounded on its own grid, not after adding
    # an offset (3000.05 A is not a float; 0.05 A must round like 0.05 A). Pylon HV only: the
    # low-voltage fields keep their bytes.
    from_zero: bool = False

    @classmethod
    def of(cls, frame_id: int, signal: DbcSignal, *, from_zero: bool = False) -> _Field:
        if signal.is_signed:
            lo, hi = -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
        else:
            lo, hi = 0, (1 << signal.length) - 1
        scale, offset = float(signal.scale), float(signal.offset)
        # The DBC range narrows the bit range (SOC 0..100 in a u16); ceil/floor keep it inside.
        if signal.minimum is not None:
            lo = max(lo, math.ceil(round((signal.minimum - offset) / scale, 6)))
        if signal.maximum is not None:
            hi = min(hi, math.floor(round((signal.maximum - offset) / scale, 6)))
        return cls(f"{frame_id:#05x}.{signal.name}", scale, offset, lo, hi, round(-offset / scale), from_zero)


@dataclass(frozen=True, slots=True)
class _Frame:
    frame_id: int
    message: DbcMessage
    fields: Mapping[str, _Field]


@dataclass(frozen=True, slots=True)
class _Decision:
    """What one set is built from besides the state: 0x351 in counts (0.1 V / 0.1 A), the permissions,
    and the raised flag names (looked up once per set)."""

    cvl_raw: int
    ccl_raw: int
    dcl_raw: int
    dvl_raw: int
    charge_enabled: bool
    discharge_enabled: bool
    alarms: frozenset[str]
    warnings: frozenset[str]
    cluster_trip: bool  # not enough racks: a system-level alarm


def _blocks(alarms: Iterable[str], cluster_trip: bool) -> tuple[bool, bool]:
    """(charge blocked, discharge blocked) by the raised alarms and cluster trips."""
    charge = discharge = cluster_trip
    for name in alarms:
        block = FLAG_BLOCKS[name]
        charge = charge or block.charge
        discharge = discharge or block.discharge
    return charge, discharge


def _flag_sets(table: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, frozenset[str]], ...]:
    return tuple((name, frozenset(flags)) for name, flags in table.items())


_PYLON_ALARM_SETS = _flag_sets(PYLON_ALARM_BITS)
_PYLON_WARNING_SETS = _flag_sets(PYLON_WARNING_BITS)
_PAIR_SETS = tuple((f"Alarm{name}", f"Warning{name}", flags) for name, flags in _flag_sets(PAIR_SOURCES))
_HV_PROTECT_SETS = _flag_sets(HV_PROTECT_BITS)
_HV_WARN_SETS = _flag_sets(HV_WARN_BITS)
_HV_FAULT_SETS = _flag_sets(HV_FAULT_BITS)


def manufacturer_bytes(name: str) -> bytes:
    """The 8 bytes of 0x35E: printable ASCII, padded with spaces (§5.9)."""
    text = name.encode("ascii", errors="replace")[:NAME_LENGTH]
    return text.ljust(NAME_LENGTH, bytes([NAME_PAD]))


def hv_name_bytes(name: str) -> bytes:
    """The 16 bytes of 0x7330 + 0x7340: the name, NUL-padded."""
    return name.encode("ascii", errors="replace")[:HV_NAME_LENGTH].ljust(HV_NAME_LENGTH, b"\x00")


def location_number(location: str) -> int:
    """The number the rack's own location ends with ("rack-03: cell 17" -> 17), for the Pylon HV
    "number of the highest cell" fields; 0 (not provided) when the rack gave no location, it has no
    number, or the number does not fit a u16. The rack id before ": " is never read as one."""
    _rack, sep, place = location.rpartition(": ")
    if not sep:
        return 0
    match = _LOCATION_NUMBER.search(place)
    if match is None:
        return 0
    number = int(match.group(1))
    return number if number <= 0xFFFF else 0


def inverter_request(dialect: Dialect, msg: can.Message) -> int | None:
    """Byte 0 of an inverter's request frame in ``dialect`` (:class:`HvRequest` values), or None when
    ``msg`` is not one. Only byte 0 is read: some inverters fill the rest (a clock), which no source
    gives a meaning the battery must act on."""
    if dialect not in POLLED_DIALECTS or msg.arbitration_id != ID_HV_REQUEST or not msg.is_extended_id:
        return None
    if msg.is_remote_frame or msg.is_error_frame or not msg.data:
        return None
    return int(msg.data[0])


def hv_request_frame(kind: int, tail: bytes = b"") -> can.Message:
    """The inverter's 0x4200 asking for ``kind`` (byte 0), packed from the DBC; ``tail`` fills bytes 1-7."""
    message = load_dbc(DIALECT_DBC[Dialect.PYLON_HV]).get_message_by_frame_id(ID_HV_REQUEST)
    data = bytearray(message.encode({"RequestKind": kind}, scaling=False, strict=False))
    data[1:1 + len(tail[:FRAME_DLC - 1])] = tail[:FRAME_DLC - 1]
    return can.Message(arbitration_id=ID_HV_REQUEST, data=bytes(data), is_extended_id=True, dlc=FRAME_DLC)


def _package_version() -> tuple[int, int]:
    """(major, minor) of bmslink, for 0x7310's software version; (0, 0) if it is not installed."""
    try:
        parts = importlib.metadata.version("bmslink").split(".")
        return int(parts[0]), int(parts[1])
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        return 0, 0


class FrameEncoder:
    """Encodes a :class:`ConsolidatedState` into the full frame set of one dialect.

    Stateless apart from counters: the same state always gives byte-identical frames. ``module_count``
    is the 0x359 pack count (Pylon; saturates at 255, the u8 field). ``capacity_ah`` is the installed
    capacity the Pylon HV equipment frame 0x7320 names (the roster's sum). cantools Message objects
    are looked up once and the constant frames (0x35E, the Pylon HV equipment set) are packed once.
    """

    def __init__(self, config: InverterCanConfig, module_count: int, *, capacity_ah: float = 0.0) -> None:
        if module_count < 1:
            raise ValueError(f"module_count must be >= 1 (the 0x359 pack count), got {module_count}")
        self.config = config
        self.dialect = config.dialect
        self.ids: tuple[int, ...] = DIALECT_IDS[self.dialect]
        self.extended = self.dialect in EXTENDED_ID_DIALECTS
        self.polled = self.dialect in POLLED_DIALECTS
        self.limits_id = DIALECT_LIMITS_ID[self.dialect]
        self._padding = DIALECT_PADDING[self.dialect]
        db = load_dbc(DIALECT_DBC[self.dialect])
        self._frames: dict[int, _Frame] = {}
        equipment_ids = HV_EQUIPMENT_IDS if self.dialect is Dialect.PYLON_HV else ()
        for frame_id in (*self.ids, *equipment_ids):
            message = db.get_message_by_frame_id(frame_id)
            fields = {s.name: _Field.of(frame_id, s, from_zero=self.dialect is Dialect.PYLON_HV)
                      for s in message.signals}
            self._frames[frame_id] = _Frame(frame_id, message, MappingProxyType(fields))
        self._clamped = 0
        self._reasons: Counter[str] = Counter()
        self.module_count = min(module_count, MODULE_COUNT_MAX)
        if self.module_count != module_count:
            self._note("0x359.ModuleCount")
        self._check_identity(config)
        builders: dict[int, Callable[[ConsolidatedState, _Decision], dict[str, int]] | None] = {
            ID_LIMITS: self._limits,
            ID_SOC_SOH: self._soc_soh,
            ID_MEASUREMENTS: self._measurements,
            ID_PROTECTION: self._protection,
            ID_ALARMS: self._alarm_pairs,
            ID_REQUEST: self._request,
            ID_MANUFACTURER: None,  # constant: encoded once below
            ID_INFO: self._info,
            ID_MODULE_COUNTS: self._module_counts,
            ID_CELL_EXTREMES: self._cell_extremes,
            ID_CAPACITY: self._capacity,
            ID_HV_TOTAL: self._hv_total,
            ID_HV_LIMITS: self._limits,
            ID_HV_CELL_VOLTAGES: self._hv_cell_voltages,
            ID_HV_CELL_TEMPERATURES: self._hv_cell_temperatures,
            ID_HV_STATUS: self._hv_status,
            ID_HV_MODULE_VOLTAGES: self._hv_module_voltages,
            ID_HV_MODULE_TEMPERATURES: self._hv_module_temperatures,
            ID_HV_FORBIDDEN: self._hv_forbidden,
            ID_HV_FAULT_EXTENSION: self._hv_fault_extension,
        }
        self._name = manufacturer_bytes(config.manufacturer)
        self._constant: dict[int, bytes] = {}
        self._last_packed: dict[int, tuple[tuple[tuple[str, int], ...], bytes]] = {}
        if ID_MANUFACTURER in self._frames:
            name = {f"Name{i}": byte for i, byte in enumerate(self._name)}
            self._constant[ID_MANUFACTURER] = self._pack(self._frames[ID_MANUFACTURER], name)
        self._builders = tuple((self._frames[i], builders[i]) for i in self.ids)
        self._equipment: tuple[tuple[int, bytes], ...] = (
            self._hv_equipment(capacity_ah) if self.dialect is Dialect.PYLON_HV else ()
        )

    # -- public ----------------------------------------------------------------------------------

    @property
    def clamped(self) -> int:
        """How many values the encoder had to change (saturate or fix) since it was made."""
        return self._clamped

    @property
    def clamp_reasons(self) -> dict[str, int]:
        """:attr:`clamped` by field or rule (``"0x351.ChargeCurrentLimit"``, ``"cvl_zero"`` …)."""
        return dict(self._reasons)

    def encode(self, state: ConsolidatedState) -> list[can.Message]:
        """The full set in :attr:`ids` order: the dialect's IDs (29-bit for Pylon HV), DLC 8, dialect
        padding. For Pylon HV this is the "ensemble information" answer."""
        return list(self.frames(state))

    def equipment_frames(self) -> list[can.Message]:
        """The Pylon HV "system equipment information" answer (0x7310, 0x7320, 0x7330, 0x7340): the
        configuration's, so constant; empty in the other dialects."""
        return [can.Message(arbitration_id=frame_id, data=data, is_extended_id=True, dlc=FRAME_DLC)
                for frame_id, data in self._equipment]

    def frames(self, state: ConsolidatedState) -> Iterator[can.Message]:
        """The set of :meth:`encode`, made one frame at a time: a sender puts the limits frame on
        the bus before the rest are encoded. A frame whose field values are those of its last
        encoding reuses those bytes (packing is a pure function of them)."""
        decision = self._decide(state)
        for frame, build in self._builders:
            if build is None:
                data = self._constant[frame.frame_id]
            else:
                raw = build(state, decision)
                key = tuple(raw.items())
                last = self._last_packed.get(frame.frame_id)
                if last is not None and last[0] == key:
                    data = last[1]
                else:
                    data = self._pack(frame, raw)
                    self._last_packed[frame.frame_id] = (key, data)
            yield can.Message(arbitration_id=frame.frame_id, data=data, is_extended_id=self.extended,
                              dlc=FRAME_DLC)

    # -- helpers ---------------------------------------------------------------------------------

    def _check_identity(self, config: InverterCanConfig) -> None:
        name = config.manufacturer.upper()
        if self.dialect is Dialect.PYLON and not name.startswith(PYLON_NAME_PREFIX):
            log.warning("manufacturer %r: Deye-family inverters recognise a Pylon battery only by the "
                        "%r prefix of 0x35E", config.manufacturer, PYLON_NAME_PREFIX)
        if self.dialect is Dialect.VICTRON and name.startswith(PYLON_NAME_PREFIX):
            log.warning("manufacturer %r: Victron applies Pylontech quirks (CVL cap, CCL 0 overridden) to "
                        "a battery that identifies as Pylontech", config.manufacturer)

    def _pack(self, frame: _Frame, raw: dict[str, int]) -> bytes:
        # Raw counts, already clamped to each field: cantools only packs them (no scaling, no checks).
        return frame.message.encode(raw, scaling=False, padding=self._padding, strict=False)

    def _note(self, reason: str) -> None:
        self._clamped += 1
        self._reasons[reason] += 1
        if self._reasons[reason] == 1:
            log.warning("inverter frame encoder fixed %s (first time; counted in clamped)", reason)

    def _raw(self, field: _Field, value: float, *, minimum: float | None = None,
             maximum: float | None = None) -> int:
        """``value`` in field counts, saturated at the physical bounds given and the field's range."""
        if math.isnan(value):
            self._note(field.key)
            value = 0.0
        if minimum is not None and value < minimum:
            self._note(field.key)
            value = minimum
        elif maximum is not None and value > maximum:
            self._note(field.key)
            value = maximum
        if math.isinf(value):
            self._note(field.key)
            return field.raw_max if value > 0 else field.raw_min
        if field.from_zero:
            raw = round(value / field.scale) + field.zero_raw
        else:
            raw = round((value - field.offset) / field.scale)
        if raw < field.raw_min:
            self._note(field.key)
            return field.raw_min
        if raw > field.raw_max:
            self._note(field.key)
            return field.raw_max
        return raw

    def _decide(self, state: ConsolidatedState) -> _Decision:
        f = self._frames[self.limits_id].fields
        cvl_field, dvl_field = f["ChargeVoltageLimit"], f["DischargeVoltageLimit"]
        dvl_raw = self._raw(dvl_field, state.discharge_voltage_limit_v, minimum=0.0)
        cvl = state.charge_voltage_limit_v
        if cvl >= CVL_MIN_V:
            cvl_raw = self._raw(cvl_field, cvl, minimum=CVL_MIN_V)
        else:  # also NaN
            # §3 pitfall 3: never CVL 0. Hold the battery where it is (as diyBMS does), rounded up so
            # that CVL >= the 0x356 voltage (§5.12), and above DVL.
            self._note("cvl_zero")
            pack_v = state.pack_voltage_v if math.isfinite(state.pack_voltage_v) else 0.0
            hold_raw = math.ceil(round(pack_v / cvl_field.scale, 6))
            cvl_raw = min(max(hold_raw, dvl_raw + 1, 1), cvl_field.raw_max)
        if dvl_raw >= cvl_raw:
            # §5.4 DVL < CVL. Lowering DVL is the fix that never raises a charge voltage.
            self._note("dvl_not_below_cvl")
            dvl_raw = cvl_raw - 1
        alarms, warnings = frozenset(state.alarms.raised()), frozenset(state.warnings.raised())
        # A latched alarm already zeroes its own direction in the core (and stays in state.alarms while
        # it does); only a missing quorum stops both directions at the bank level.
        cluster_trip = state.cluster.not_enough_racks
        charge_blocked, discharge_blocked = _blocks(alarms, cluster_trip)
        ccl_field, dcl_field = f["ChargeCurrentLimit"], f["DischargeCurrentLimit"]
        ccl_raw = self._permitted(ccl_field, state.charge_current_limit_a,
                                  state.charge_enabled, charge_blocked, "charge")
        # Pylon HV sends the maximum discharge current negative (a current into the inverter).
        dcl_raw = self._permitted(dcl_field, state.discharge_current_limit_a,
                                  state.discharge_enabled, discharge_blocked, "discharge",
                                  negative=self.dialect is Dialect.PYLON_HV)
        return _Decision(cvl_raw, ccl_raw, dcl_raw, dvl_raw, ccl_raw != ccl_field.zero_raw,
                         dcl_raw != dcl_field.zero_raw, alarms, warnings, cluster_trip)

    def _permitted(self, field: _Field, limit_a: float, enabled: bool, blocked: bool, direction: str, *,
                   negative: bool = False) -> int:
        """The limit in counts: a physical 0 without permission; its magnitude otherwise, sent
        positive, or negative where the dialect says so (a limit that rounds to 0 is a 0)."""
        if not enabled or blocked:
            if limit_a > 0:
                self._note(f"{direction}_limit_without_permission" if not enabled
                           else f"{direction}_limit_despite_alarm")
            return field.zero_raw
        if negative:
            return self._raw(field, -limit_a, maximum=0.0)
        return self._raw(field, limit_a, minimum=0.0)

    # -- one builder per frame; each returns raw signal values --------------------------------------

    def _limits(self, _state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        return {
            "ChargeVoltageLimit": d.cvl_raw,
            "ChargeCurrentLimit": d.ccl_raw,
            "DischargeCurrentLimit": d.dcl_raw,
            "DischargeVoltageLimit": d.dvl_raw,
        }

    def _soc_soh(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_SOC_SOH].fields
        return {
            "StateOfCharge": self._raw(f["StateOfCharge"], state.soc_pct),
            "StateOfHealth": self._raw(f["StateOfHealth"], state.soh_pct),
            # HiResSOC is an SMA/Victron field; Pylon v1.2 leaves bytes 4-7 unused, and Luxpower reads
            # them as cell millivolts (§3 pitfall 6), so the Pylon dialect sends zeros there.
            "StateOfChargeHiRes": 0 if self.dialect is Dialect.PYLON
            else self._raw(f["StateOfChargeHiRes"], state.soc_pct),
        }

    def _measurements(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_MEASUREMENTS].fields
        return {
            "PackVoltage": self._raw(f["PackVoltage"], state.pack_voltage_v),
            "PackCurrent": self._raw(f["PackCurrent"], state.current_a),  # positive = charging (§1 0x356)
            "PackTemperature": self._raw(f["PackTemperature"], state.temperature_avg_c,
                                         minimum=WIRE_TEMPERATURE_MIN_C, maximum=WIRE_TEMPERATURE_MAX_C),
        }

    def _protection(self, _state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        values = {name: int(not flags.isdisjoint(d.alarms)) for name, flags in _PYLON_ALARM_SETS}
        if d.cluster_trip:
            values["ProtSystemError"] = 1
        values.update({name: int(not flags.isdisjoint(d.warnings)) for name, flags in _PYLON_WARNING_SETS})
        values["ModuleCount"] = self.module_count
        values["MarkerP"] = PYLON_MARKER_P
        values["MarkerN"] = PYLON_MARKER_N
        return values

    def _alarm_pairs(self, _state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        raised, ok = int(Pair.RAISED), int(Pair.OK)
        values: dict[str, int] = {
            "AlarmReserved": 0,
            "WarningReserved": 0,
            "AlarmGeneral": raised if d.alarms or d.cluster_trip else ok,
            "WarningGeneral": raised if d.warnings else ok,
        }
        for alarm, warning, flags in _PAIR_SETS:
            values[alarm] = ok if flags.isdisjoint(d.alarms) else raised
            values[warning] = ok if flags.isdisjoint(d.warnings) else raised
        return values

    def _request(self, state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        # An operator's force-charge request, only while charging is enabled: with CCL 0 it would ask
        # the inverter for what the limits forbid. Full-charge and request II are never set.
        return {
            "ChargeEnable": int(d.charge_enabled),
            "DischargeEnable": int(d.discharge_enabled),
            "ForceChargeRequestI": int(state.force_charge_request and d.charge_enabled),
            "ForceChargeRequestII": 0,
            "FullChargeRequest": 0,
        }

    def _info(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        return {"CapacityAh": self._raw(self._frames[ID_INFO].fields["CapacityAh"], state.capacity_ah)}

    def _module_counts(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_MODULE_COUNTS].fields
        # Online + offline = the roster (§5.11); a core that forgot roster_size still gets a sane total.
        total = max(state.roster_size, state.eligible_racks)
        if total != state.roster_size:
            self._note("0x372.roster_size")
        eligible = [rack for rack in state.racks if rack.eligible]
        # A rack blocks a direction when it is in the bank but grants nothing there (rounds to 0.0 A).
        blocking_charge = sum(1 for rack in eligible if rack.charge_current_limit_a < 0.05)
        blocking_discharge = sum(1 for rack in eligible if rack.discharge_current_limit_a < 0.05)
        return {
            "ModulesOnline": self._raw(f["ModulesOnline"], state.eligible_racks),
            "ModulesBlockingCharge": self._raw(f["ModulesBlockingCharge"], blocking_charge),
            "ModulesBlockingDischarge": self._raw(f["ModulesBlockingDischarge"], blocking_discharge),
            "ModulesOffline": self._raw(f["ModulesOffline"], total - state.eligible_racks),
        }

    def _cell_extremes(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_CELL_EXTREMES].fields
        v_min, v_max = state.cell_voltage_min_v, state.cell_voltage_max_v
        if v_min > v_max:
            self._note("0x373.cell_voltage_order")
            v_min, v_max = v_max, v_min
        t_min, t_max = state.temperature_min_c, state.temperature_max_c
        if t_min > t_max:
            self._note("0x373.temperature_order")
            t_min, t_max = t_max, t_min
        bounds = {"minimum": WIRE_TEMPERATURE_MIN_C, "maximum": WIRE_TEMPERATURE_MAX_C}
        return {
            "CellVoltageMin": self._raw(f["CellVoltageMin"], v_min),
            "CellVoltageMax": self._raw(f["CellVoltageMax"], v_max),
            "CellTemperatureMin": self._raw(f["CellTemperatureMin"], t_min, **bounds),
            "CellTemperatureMax": self._raw(f["CellTemperatureMax"], t_max, **bounds),
        }

    def _capacity(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        return {"InstalledCapacity": self._raw(self._frames[ID_CAPACITY].fields["InstalledCapacity"],
                                               state.capacity_ah)}

    # -- Pylon HV ----------------------------------------------------------------------------------

    def _hv_total(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_HV_TOTAL].fields
        return {
            "PackVoltage": self._raw(f["PackVoltage"], state.pack_voltage_v),
            "PackCurrent": self._raw(f["PackCurrent"], state.current_a),  # positive = charging
            "Temperature": self._raw(f["Temperature"], state.temperature_avg_c,
                                     minimum=WIRE_TEMPERATURE_MIN_C, maximum=WIRE_TEMPERATURE_MAX_C),
            "StateOfCharge": self._raw(f["StateOfCharge"], state.soc_pct),
            "StateOfHealth": self._raw(f["StateOfHealth"], state.soh_pct),
        }

    def _hv_cell_voltages(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        f = self._frames[ID_HV_CELL_VOLTAGES].fields
        high, low = (state.cell_voltage_max_v, state.cell_voltage_max_location), \
            (state.cell_voltage_min_v, state.cell_voltage_min_location)
        if low[0] > high[0]:
            self._note("0x4230.cell_voltage_order")
            high, low = low, high
        return {
            "CellVoltageMax": self._raw(f["CellVoltageMax"], high[0]),
            "CellVoltageMin": self._raw(f["CellVoltageMin"], low[0]),
            "CellVoltageMaxNumber": location_number(high[1]),
            "CellVoltageMinNumber": location_number(low[1]),
        }

    def _hv_temperatures(self, frame_id: int, prefix: str, state: ConsolidatedState) -> dict[str, int]:
        f = self._frames[frame_id].fields
        high, low = (state.temperature_max_c, state.temperature_max_location), \
            (state.temperature_min_c, state.temperature_min_location)
        if low[0] > high[0]:
            self._note(f"{frame_id:#05x}.temperature_order")
            high, low = low, high
        bounds = {"minimum": WIRE_TEMPERATURE_MIN_C, "maximum": WIRE_TEMPERATURE_MAX_C}
        return {
            f"{prefix}TemperatureMax": self._raw(f[f"{prefix}TemperatureMax"], high[0], **bounds),
            f"{prefix}TemperatureMin": self._raw(f[f"{prefix}TemperatureMin"], low[0], **bounds),
            f"{prefix}TemperatureMaxNumber": location_number(high[1]),
            f"{prefix}TemperatureMinNumber": location_number(low[1]),
        }

    def _hv_cell_temperatures(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        return self._hv_temperatures(ID_HV_CELL_TEMPERATURES, "Cell", state)

    def _hv_module_temperatures(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        # The racks report their hottest and coldest sensor, which are module sensors; the same pair.
        return self._hv_temperatures(ID_HV_MODULE_TEMPERATURES, "Module", state)

    def _hv_module_voltages(self, state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        # The racks report no module voltages: both fields carry the average module of the pack
        # (pack voltage / modules in series); the numbers say "not provided".
        f = self._frames[ID_HV_MODULE_VOLTAGES].fields
        hv = self.config.pylon_hv
        modules = hv.modules_in_series if hv is not None else 1
        average = self._raw(f["ModuleVoltageMax"], state.pack_voltage_v / modules)
        return {"ModuleVoltageMax": average, "ModuleVoltageMin": average,
                "ModuleVoltageMaxNumber": 0, "ModuleVoltageMinNumber": 0}

    def _hv_status(self, state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        if state.current_a > HV_IDLE_CURRENT_A:
            basic = HV_STATUS_CHARGE
        elif state.current_a < -HV_IDLE_CURRENT_A:
            basic = HV_STATUS_DISCHARGE
        else:
            basic = HV_STATUS_IDLE  # also NaN
        values = {
            "BasicStatus": basic,
            # An operator's force-charge request, only while charging is enabled (as in 0x35C).
            "ForceChargeRequest": int(state.force_charge_request and d.charge_enabled),
            "BalanceChargeRequest": 0,
            "CyclePeriod": 0,
            "FaultVoltageSensor": 0, "FaultTemperatureSensor": 0, "FaultInternalComm": 0,
            "FaultInputOverVoltage": 0, "FaultInputReversal": 0, "FaultRelayCheck": 0,
            "FaultBatteryDamage": 0,
        }
        values.update({name: int(not flags.isdisjoint(d.alarms)) for name, flags in _HV_FAULT_SETS})
        if d.cluster_trip:
            values["FaultOther"] = 1
        values.update({name: int(not flags.isdisjoint(d.alarms)) for name, flags in _HV_PROTECT_SETS})
        values.update({name: int(not flags.isdisjoint(d.warnings)) for name, flags in _HV_WARN_SETS})
        return values

    def _hv_forbidden(self, _state: ConsolidatedState, d: _Decision) -> dict[str, int]:
        return {"ChargeForbiddenMark": HV_ALLOWED if d.charge_enabled else HV_FORBIDDEN,
                "DischargeForbiddenMark": HV_ALLOWED if d.discharge_enabled else HV_FORBIDDEN}

    def _hv_fault_extension(self, _state: ConsolidatedState, _d: _Decision) -> dict[str, int]:
        # Its bits (shutdown circuit, BMIC, internal bus, self test; diyBMS's reading) have no source here.
        return {"FaultExtension": 0}

    def _hv_equipment(self, capacity_ah: float) -> tuple[tuple[int, bytes], ...]:
        hv = self.config.pylon_hv
        if hv is None:  # the config model requires it for this dialect
            raise ValueError('dialect "pylon_hv" needs can.pylon_hv')
        major, minor = _package_version()
        # bmslink has no hardware revision: 0; the software version is bmslink's own.
        version = {"HardwareVersion": 0, "HardwareVersionV": 0, "HardwareVersionR": 0,
                   "SoftwareVersionMajor": min(major, 255), "SoftwareVersionMinor": min(minor, 255),
                   "DevelopmentVersionMajor": 0, "DevelopmentVersionMinor": 0}
        f = self._frames[ID_HV_MODULES].fields
        modules = {
            "CellsInSeries": self._raw(f["CellsInSeries"], hv.cells_in_series),
            "ModulesInSeries": hv.modules_in_series,
            "CellsPerModule": hv.cells_per_module,
            "VoltageLevel": self._raw(f["VoltageLevel"], hv.voltage_level_v),
            "CapacityAh": self._raw(f["CapacityAh"], capacity_ah, minimum=0.0),
        }
        name = hv_name_bytes(self.config.manufacturer)
        first = {f"Name{i}": name[i] for i in range(NAME_LENGTH)}
        second = {f"Name{i}": name[i] for i in range(NAME_LENGTH, HV_NAME_LENGTH)}
        return tuple((frame_id, self._pack(self._frames[frame_id], raw)) for frame_id, raw in (
            (ID_HV_VERSION, version), (ID_HV_MODULES, modules), (ID_HV_NAME_1, first), (ID_HV_NAME_2, second),
        ))


# -- decoding -------------------------------------------------------------------------------------

DecodedFrames = dict[int, dict[str, float]]


class FrameDecoder:
    """Decodes received frames of one dialect with the same DBC the encoder uses.

    Values are physical (V, A, %, °C) unless ``scaling=False``; choice names are never substituted,
    so a 0x35A pair decodes to its number (:class:`Pair`). Short frames decode what they carry.
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.ids: tuple[int, ...] = DIALECT_IDS[dialect]
        self.extended = dialect in EXTENDED_ID_DIALECTS
        db = load_dbc(DIALECT_DBC[dialect])
        known = (*self.ids, *HV_EQUIPMENT_IDS) if dialect is Dialect.PYLON_HV else self.ids
        self._messages = {frame_id: db.get_message_by_frame_id(frame_id) for frame_id in known}
        # Signals of the shared DBC that this dialect leaves unused (zeros on the wire).
        self._unused: dict[int, frozenset[str]] = (
            {ID_SOC_SOH: frozenset({"StateOfChargeHiRes"})} if dialect is Dialect.PYLON else {}
        )

    def knows(self, arbitration_id: int) -> bool:
        return arbitration_id in self._messages

    def decode(self, arbitration_id: int, data: bytes | bytearray, *,
               scaling: bool = True) -> dict[str, float]:
        """Signal values of one frame; raises :class:`UnknownFrameError` or :class:`FrameDecodeError`."""
        message = self._messages.get(arbitration_id)
        if message is None:
            raise UnknownFrameError(arbitration_id, f"not part of the {self.dialect.value} frame set")
        try:
            decoded = message.decode(bytes(data), decode_choices=False, scaling=scaling,
                                     allow_truncated=True, allow_excess=False)
        except (DecodeError, ValueError) as exc:
            raise FrameDecodeError(arbitration_id, f"cannot decode {bytes(data).hex(' ')}: {exc}") from exc
        if not isinstance(decoded, dict):  # only container messages decode to a list; ours are not
            raise FrameDecodeError(arbitration_id, "decoded as a container message")
        unused = self._unused.get(arbitration_id, frozenset())
        values: dict[str, float] = {}
        for name, value in decoded.items():
            if name in unused:
                continue
            if not isinstance(value, int | float):
                raise FrameDecodeError(arbitration_id, f"signal {name} decoded to {value!r}")
            values[name] = value
        return values


def decode_frames(dialect: Dialect, messages: Iterable[can.Message], *,
                  ignore_unknown: bool = False) -> DecodedFrames:
    """The latest decoded values per ID; a frame outside the dialect raises unless ``ignore_unknown``."""
    decoder = FrameDecoder(dialect)
    frames: DecodedFrames = {}
    for message in messages:
        if ignore_unknown and not decoder.knows(message.arbitration_id):
            continue
        frames[message.arbitration_id] = decoder.decode(message.arbitration_id, message.data)
    return frames


@dataclass(frozen=True, slots=True)
class DecodedLimits:
    """What an inverter is allowed to do, read back from the frames.

    ``charge_enabled``/``discharge_enabled`` are the 0x35C bits in the Pylon dialect (False until one
    arrived), the 0x4280 marks in Pylon HV (0x00 = allowed; False until one arrived) and "limit > 0"
    in SMA/Victron, which have no enable frame. ``alarms``/``warnings`` are wire names: Pylon 0x359
    signals (``ProtCellOverVoltage``), raised 0x35A pairs (``AlarmHighVoltage``) or Pylon HV 0x4250
    bits (``ProtectCellOverVoltage``, ``FaultOther``; ``WarnCellHighVoltage``). Limits are magnitudes:
    the Pylon HV discharge limit, negative on the wire, is read back positive.
    """

    charge_voltage_limit_v: float
    charge_current_limit_a: float
    discharge_current_limit_a: float
    discharge_voltage_limit_v: float
    charge_enabled: bool
    discharge_enabled: bool
    alarms: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def unblocked_alarms(self) -> tuple[str, ...]:
        """Raised alarms whose direction is still permitted (§5.8 says: none)."""
        return tuple(
            name for name in self.alarms
            if name in WIRE_ALARM_BLOCKS and not WIRE_ALARM_BLOCKS[name].satisfied(
                charge_enabled=self.charge_enabled, discharge_enabled=self.discharge_enabled)
        )


def decoded_limits(dialect: Dialect, frames: Mapping[int, Mapping[str, float]]) -> DecodedLimits | None:
    """Limits from the latest decoded frames (see :func:`decode_frames`); None before the dialect's
    limits frame (0x351, Pylon HV 0x4220)."""
    if dialect is Dialect.PYLON_HV:
        return _decoded_hv_limits(frames)
    limits = frames.get(ID_LIMITS)
    if limits is None:
        return None
    # A truncated 0x351 decodes only the fields it carries; a missing field reads as 0.
    ccl, dcl = limits.get("ChargeCurrentLimit", 0.0), limits.get("DischargeCurrentLimit", 0.0)
    alarms: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    if dialect is Dialect.PYLON:
        request = frames.get(ID_REQUEST, {})
        charge_enabled = bool(request.get("ChargeEnable", 0))
        discharge_enabled = bool(request.get("DischargeEnable", 0))
        protection = frames.get(ID_PROTECTION, {})
        alarms = tuple(name for name in PYLON_ALARM_BITS if protection.get(name))
        warnings = tuple(name for name in PYLON_WARNING_BITS if protection.get(name))
    else:
        charge_enabled, discharge_enabled = ccl > 0, dcl > 0
        pairs = frames.get(ID_ALARMS, {})
        alarms = tuple(f"Alarm{n}" for n in PAIR_NAMES if pairs.get(f"Alarm{n}") == Pair.RAISED)
        warnings = tuple(f"Warning{n}" for n in PAIR_NAMES if pairs.get(f"Warning{n}") == Pair.RAISED)
    return DecodedLimits(
        charge_voltage_limit_v=limits.get("ChargeVoltageLimit", 0.0),
        charge_current_limit_a=ccl,
        discharge_current_limit_a=dcl,
        discharge_voltage_limit_v=limits.get("DischargeVoltageLimit", 0.0),
        charge_enabled=charge_enabled,
        discharge_enabled=discharge_enabled,
        alarms=alarms,
        warnings=warnings,
    )


def _decoded_hv_limits(frames: Mapping[int, Mapping[str, float]]) -> DecodedLimits | None:
    limits = frames.get(ID_HV_LIMITS)
    if limits is None:
        return None
    marks = frames.get(ID_HV_FORBIDDEN, {})
    status = frames.get(ID_HV_STATUS, {})
    raised = (*HV_PROTECT_BITS, *HV_FAULT_BITS)
    return DecodedLimits(
        charge_voltage_limit_v=limits.get("ChargeVoltageLimit", 0.0),
        charge_current_limit_a=limits.get("ChargeCurrentLimit", 0.0),
        discharge_current_limit_a=-limits.get("DischargeCurrentLimit", 0.0),
        discharge_voltage_limit_v=limits.get("DischargeVoltageLimit", 0.0),
        charge_enabled=marks.get("ChargeForbiddenMark", HV_FORBIDDEN) == HV_ALLOWED,
        discharge_enabled=marks.get("DischargeForbiddenMark", HV_FORBIDDEN) == HV_ALLOWED,
        alarms=tuple(name for name in raised if status.get(name)),
        warnings=tuple(name for name in HV_WARN_BITS if status.get(name)),
    )
