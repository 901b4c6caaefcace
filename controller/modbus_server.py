"""Optional read-only Modbus TCP view of the consolidated battery as SunSpec model 802.

For an EMS or inverter that reads Modbus instead of (or besides) the inverter CAN feed. Off by
default (``modbus_server.enabled``); the service builds one :class:`ConsolidatedModbusServer`, calls
:meth:`~ConsolidatedModbusServer.update` from every control cycle and stops it on shutdown.

Register map (holding registers, 0-based PDU addresses; FC3, and FC4 reads the same image)::

    40000  "SunS"
    40002  model 1 (common)   Mn "bmslink", Md "cluster", Vr package version, SN node_id, DA device_id
    40070  model 802 (battery), L = 62: see :func:`battery_model`
    40134  end model 0xFFFF, L = 0

Both model lengths are taken from pysunspec2's definitions (``model_points``), never hard-coded.

Decisions (the issue left them open):

* **Our own small server, not pymodbus's.** pymodbus 3.16's public server API has no per-connection
  idle timeout, no connection cap and no way to learn a peer's address or close one connection
  (``trace_connect`` is told only connected/disconnected); adding them meant subclassing its
  private request handler. This module serves Modbus TCP itself with a small ``asyncio`` protocol:
  MBAP framing, FC3/FC4 reads of the register image, everything else refused by the rules below.
  The rules are a pure function (:func:`answer`); the protocol class only frames, times and writes.
* **Read-only.** Only FC3 and FC4 are implemented. Every other function code of a request
  (1..127: writes FC5/6/15/16/22/23, coil and discrete reads FC1/FC2, diagnostics FC8, device
  identification FC43, report server id FC17, ...) is answered ILLEGAL_FUNCTION (0x01), counted in
  ``writes_refused`` (the write codes) or ``functions_refused`` (the rest). 802's writable control
  points (SocRsvMax/SoCRsvMin, CtrlHb, AlmRst, SetOp, SetInvState) read as "not implemented", since
  nothing written to them would be honoured, and LocRemCtl reads LOCAL (1) for the same reason.
* **Framing** (Modbus Messaging on TCP/IP Implementation Guide V1.0b, MBAP header; Application
  Protocol V1.1b3). A frame is trusted when its protocol id is 0 and its length field is 2..254 (unit
  id plus a PDU of at most 253 bytes); TCP may deliver it in any number of pieces. A frame that
  cannot be trusted closes the connection without an answer, because after it no one knows where
  the next frame starts: a protocol id other than 0, a length outside 2..254, a length at odds with
  the fixed size of an FC3/FC4 request (6), or a function code that is no request (0, or 0x80 and up,
  where an exception's FC | 0x80 would be ambiguous); counted in ``malformed``, logged rate-limited.
  Replies already owed to earlier frames of the same connection are sent first. A trusted request is
  answered, exceptions always with the request's FC | 0x80: a quantity outside 1..125 is
  ILLEGAL_DATA_VALUE (0x03), a range not wholly inside the map ILLEGAL_DATA_ADDRESS (0x02), both in
  ``reads_invalid``; the connection stays open.
* **Before the first update()** every valid read of our unit answers SERVER_DEVICE_BUSY (0x06,
  "retry later"), counted in ``reads_busy``: an image of "not implemented" values would let a reader
  discover a battery with no limits, which some EMS treat as zero limits and others as none.
* **Allow-list.** A TCP connection whose peer address is not in ``allowed_clients`` is closed as
  soon as it is accepted, before any byte is read, and counted in ``refused_clients``; it takes no
  connection slot. IPv4-mapped IPv6 peers (``::ffff:a.b.c.d``, a dual-stack listener) are compared as
  IPv4. **An empty list refuses every client** (fail closed, warned about at start); a malformed
  entry is a ``ValueError`` at construction.
* **Connection cap and idle timeout.** The server shares its event loop and file descriptors with
  the control cycle that feeds the inverter, so no peer may hold them: at most ``max_connections``
  allowed clients are served at once, and one more is closed as soon as it is accepted (counted in
  ``over_limit``, logged rate-limited). A connection that completes no request for
  ``idle_timeout_s`` is closed (``idle_timeouts``): bytes that never make a whole frame, and a peer
  that stops taking its replies, do not count as activity. While a peer leaves its replies unread,
  its requests are not read either (asyncio flow control), so neither buffer grows; one the server
  closed but that still does not read is aborted after another ``idle_timeout_s``.
* **Unit id.** Only ``device_id`` is served. Any other unit id gets GATEWAY_TARGET_NO_RESPONSE (0x0B),
  what a TCP gateway answers for an absent unit, whatever the function (counted in ``foreign_unit``).
* **No staleness timer.** The server runs on the control cycle's event loop: a stalled loop answers
  nothing at all (the reader times out), and ``Hb`` (incremented by every update) stops moving if the
  cycle stops calling update() while the loop runs. The service stops the server when the
  controller stops.

Each request is counted once, under the first rule it breaks (order: :func:`answer`). Counters
(``counters``): ``connections`` (admitted), ``refused_clients``, ``over_limit``, ``idle_timeouts``,
``malformed``, ``reads``, ``reads_busy``, ``reads_invalid``, ``writes_refused``,
``functions_refused``, ``foreign_unit``, ``saturated`` (a value clamped to its register's range, see
:func:`battery_model`), ``updates``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Any, Final

from rack_agent.profiles.sunspec import END_MODEL_ID, SUNS_MARKER, model_points
from shared.cluster import ClusterFlags, ConsolidatedState
from shared.controller_config import ModbusServerConfig
from shared.logthrottle import ThrottledLog
from shared.models import ProtectionFlags

log = logging.getLogger(__name__)

SUNSPEC_BASE_ADDRESS: Final = 40000
COMMON_MODEL_ID: Final = 1
BATTERY_MODEL_ID: Final = 802
MANUFACTURER: Final = "bmslink"
MODEL_NAME: Final = "cluster"

# Fixed scale factors (value = raw × 10^SF). SunSpec lets a device change them at run time, but a
# reader that caches them would then misread; fixed ones cover the ranges bmslink allows except
# where noted (V up to 6553.4 V; A ±3276.7 A, the bank ceiling the aggregation config allows;
# AHRtg up to 65534 Ah). A value beyond its register saturates and is counted (``saturated``).
V_SF: Final = -1
CELL_V_SF: Final = -3
A_SF: Final = -1
AMAX_SF: Final = -1
SOC_SF: Final = -1
SOH_SF: Final = 0
AHRTG_SF: Final = 0
SCALE_FACTORS: Final[Mapping[str, int]] = {
    "AHRtg_SF": AHRTG_SF,
    "SoC_SF": SOC_SF,
    "SoH_SF": SOH_SF,
    "V_SF": V_SF,
    "CellV_SF": CELL_V_SF,
    "A_SF": A_SF,
    "AMax_SF": AMAX_SF,
}

# Below this magnitude the bank is neither charging nor discharging (ChaSt HOLDING); well above the
# 0.1 A resolution of A, so measurement noise does not flip ChaSt every cycle.
IDLE_CURRENT_A: Final = 1.0
# A refused address is logged at WARNING once, then at DEBUG; remembered up to this many addresses
# (a scan from many addresses must not grow memory without bound).
REFUSED_LOG_MEMORY: Final = 256
STOP_DEADLINE_S: Final = 2.0
READ_FUNCTION_CODES: Final = frozenset({3, 4})
WRITE_FUNCTION_CODES: Final = frozenset({5, 6, 15, 16, 22, 23})


class BatteryState(IntEnum):
    """802 ``State`` values used here (SunSpec enum; 1, 2, 5, 6 are never reported)."""

    CONNECTED = 3
    STANDBY = 4
    FAULT = 99


class ChargeStatus(IntEnum):
    """802 ``ChaSt`` values used here (EMPTY, FULL and TESTING are never reported)."""

    OFF = 1
    DISCHARGING = 3
    CHARGING = 4
    HOLDING = 6


class RemoteControl(IntEnum):
    """802 ``LocRemCtl``: LOCAL, because control writes are refused."""

    REMOTE = 0
    LOCAL = 1


TYP_LITHIUM_ION: Final = 4

# bmslink protection flag -> 802 Evt1 symbol. The bit numbers come from pysunspec2's definition.
# SunSpec has one volt and one temperature bit each way, not cell vs pack or charge vs discharge, so
# those pairs share a bit. No imbalance alarm and no ground-fault warning exist: they fall back to
# OTHER_ALARM / OTHER_WARNING. Kept in step with the agent's reading map (profiles/sunspec.toml).
EVT1_ALARMS: Final[Mapping[str, str]] = {
    "cell_over_voltage": "OVER_VOLT_ALARM",
    "cell_under_voltage": "UNDER_VOLT_ALARM",
    "pack_over_voltage": "OVER_VOLT_ALARM",
    "pack_under_voltage": "UNDER_VOLT_ALARM",
    "charge_over_current": "OVER_CHARGE_CURRENT_ALARM",
    "discharge_over_current": "OVER_DISCHARGE_CURRENT_ALARM",
    "charge_over_temperature": "OVER_TEMP_ALARM",
    "charge_under_temperature": "UNDER_TEMP_ALARM",
    "discharge_over_temperature": "OVER_TEMP_ALARM",
    "discharge_under_temperature": "UNDER_TEMP_ALARM",
    "cell_imbalance": "OTHER_ALARM",
    "internal_fault": "OTHER_ALARM",
    "insulation_fault": "GROUND_FAULT",
}
EVT1_WARNINGS: Final[Mapping[str, str]] = {
    "cell_over_voltage": "OVER_VOLT_WARNING",
    "cell_under_voltage": "UNDER_VOLT_WARNING",
    "pack_over_voltage": "OVER_VOLT_WARNING",
    "pack_under_voltage": "UNDER_VOLT_WARNING",
    "charge_over_current": "OVER_CHARGE_CURRENT_WARNING",
    "discharge_over_current": "OVER_DISCHARGE_CURRENT_WARNING",
    "charge_over_temperature": "OVER_TEMP_WARNING",
    "charge_under_temperature": "UNDER_TEMP_WARNING",
    "discharge_over_temperature": "OVER_TEMP_WARNING",
    "discharge_under_temperature": "UNDER_TEMP_WARNING",
    "cell_imbalance": "VOLTAGE_IMBALANCE_WARNING",
    "internal_fault": "OTHER_WARNING",
    "insulation_fault": "OTHER_WARNING",
}
# The controller's own conditions. The alarms also make State FAULT, so a reader that looks only at
# Evt1 still sees an alarm whenever State is FAULT.
EVT1_CLUSTER: Final[Mapping[str, str]] = {
    "not_enough_racks": "OTHER_ALARM",
    "latched_alarm": "OTHER_ALARM",
    "unknown_rack_seen": "CONFIGURATION_WARNING",
    # Another node sends limits frames on the inverter bus: what the inverter follows is in doubt.
    "foreign_transmitter": "OTHER_ALARM",
}
# EvtVnd1 (vendor bits) says which controller condition it is.
EVT_VND1_BITS: Final[Mapping[str, int]] = {
    "not_enough_racks": 0,
    "latched_alarm": 1,
    "unknown_rack_seen": 2,
    "foreign_transmitter": 3,
}

# SunSpec "not implemented" value per type, as registers (sunspec2/mb.py).
_NOT_IMPLEMENTED: Final[Mapping[str, tuple[int, ...]]] = {
    "uint16": (0xFFFF,),
    "enum16": (0xFFFF,),
    "bitfield16": (0xFFFF,),
    "int16": (0x8000,),
    "sunssf": (0x8000,),
    "uint32": (0xFFFF, 0xFFFF),
    "enum32": (0xFFFF, 0xFFFF),
    "bitfield32": (0xFFFF, 0xFFFF),
    "int32": (0x8000, 0x0000),
    "acc16": (0,),
    "acc32": (0, 0),
    "pad": (0,),
}
# Raw values a point can carry short of its "not implemented" marker: (low, high).
_RAW_RANGE: Final[Mapping[str, tuple[int, int]]] = {
    "uint16": (0, 0xFFFE),
    "enum16": (0, 0xFFFE),
    "bitfield16": (0, 0xFFFE),  # all bits set is the marker (never reached: Evt1 uses bits 0..29)
    "int16": (-0x7FFF, 0x7FFF),
    "sunssf": (-10, 10),
    "uint32": (0, 0xFFFFFFFE),
    "enum32": (0, 0xFFFFFFFE),
    "bitfield32": (0, 0xFFFFFFFE),
}


class ModbusServerError(Exception):
    """The Modbus server could not start; ``address`` is the ``host:port`` it tried."""

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        self.detail = detail
        super().__init__(f"cannot serve Modbus TCP on {address}: {detail}")


# -- the register image (pure) --------------------------------------------------------------------
@cache
def _layout(model_id: int) -> Mapping[str, tuple[int, str, int]]:
    """name -> (offset from the model's ID register, SunSpec type, size) of the model's fixed part."""
    return {name: (p.offset, p.sunspec_type, p.size) for name, p in model_points(model_id).items()}


def model_length(model_id: int) -> int:
    """L of a model (registers after its ID and L), from pysunspec2's definition."""
    return max(offset + size for offset, _, size in _layout(model_id).values()) - 2


@cache
def _evt1_symbols() -> Mapping[str, int]:
    from sunspec2 import device  # noqa: PLC0415 - heavy import, as in rack_agent.profiles.sunspec

    point = next(p for p in device.get_model_def(BATTERY_MODEL_ID)["group"]["points"] if p["name"] == "Evt1")
    return {s["name"]: int(s["value"]) for s in point["symbols"]}


@cache
def evt1_bit_masks() -> tuple[Mapping[str, int], Mapping[str, int], Mapping[str, int]]:
    """(alarm, warning, cluster) masks of 802 Evt1 by flag name, resolved from the SunSpec symbols."""
    symbols = _evt1_symbols()

    def masks(table: Mapping[str, str]) -> dict[str, int]:
        return {flag: 1 << symbols[symbol] for flag, symbol in table.items()}

    return masks(EVT1_ALARMS), masks(EVT1_WARNINGS), masks(EVT1_CLUSTER)


class _Writer:
    """Registers of one model (ID and L included), every point first at its "not implemented" value."""

    __slots__ = ("layout", "regs", "saturated")

    def __init__(self, model_id: int, template: Sequence[int]) -> None:
        self.layout = _layout(model_id)
        self.regs = list(template)
        self.saturated: list[str] = []

    def raw(self, name: str, value: int) -> None:
        offset, stype, _ = self.layout[name]
        low, high = _RAW_RANGE[stype]
        if not low <= value <= high:
            self.saturated.append(name)
            value = min(max(value, low), high)
        if stype in ("uint32", "enum32", "bitfield32"):
            self.regs[offset] = value >> 16
            self.regs[offset + 1] = value & 0xFFFF
        else:
            self.regs[offset] = value & 0xFFFF

    def scaled(self, name: str, value: float, sf: int) -> None:
        self.raw(name, round(value * 10.0**-sf))

    def text(self, name: str, value: str) -> None:
        offset, _, size = self.layout[name]
        data = value.encode("ascii", errors="replace")[: 2 * size].ljust(2 * size, b"\0")
        words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, 2 * size, 2)]
        self.regs[offset:offset + size] = words


@cache
def _blank(model_id: int) -> tuple[int, ...]:
    layout = _layout(model_id)
    regs = [0] * (model_length(model_id) + 2)
    for name, (offset, stype, size) in layout.items():
        if name in ("ID", "L") or stype == "string":
            continue  # strings: NULs are "not implemented"
        if stype not in _NOT_IMPLEMENTED:
            raise ValueError(f"SunSpec model {model_id} point {name} has unsupported type {stype}")
        regs[offset:offset + size] = _NOT_IMPLEMENTED[stype]
    regs[0], regs[1] = model_id, model_length(model_id)
    return tuple(regs)


@cache
def _battery_template() -> tuple[int, ...]:
    """Model 802 with its constant points set: type, control mode, reserved events, scale factors."""
    m = _Writer(BATTERY_MODEL_ID, _blank(BATTERY_MODEL_ID))
    m.raw("Typ", TYP_LITHIUM_ION)
    m.raw("LocRemCtl", RemoteControl.LOCAL)
    m.raw("Evt2", 0)  # reserved by SunSpec
    m.raw("EvtVnd2", 0)
    for name, sf in SCALE_FACTORS.items():
        m.raw(name, sf)
    return tuple(m.regs)


def common_model(device_id: int, serial_number: str) -> list[int]:
    """Model 1 registers (ID and L included)."""
    m = _Writer(COMMON_MODEL_ID, _blank(COMMON_MODEL_ID))
    m.text("Mn", MANUFACTURER)
    m.text("Md", MODEL_NAME)
    m.text("Vr", _package_version())
    m.text("SN", serial_number)
    m.raw("DA", device_id)
    return m.regs


@cache
def _package_version() -> str:
    try:
        return importlib.metadata.version("bmslink")
    except importlib.metadata.PackageNotFoundError:
        return ""  # not installed (a source checkout on sys.path): Vr reads "not implemented"


def battery_state(state: ConsolidatedState) -> BatteryState:
    """FAULT while any alarm is raised (rack or cluster), CONNECTED while charge or discharge is
    permitted, STANDBY otherwise."""
    if state.alarm_active:
        return BatteryState.FAULT
    if state.charge_enabled or state.discharge_enabled:
        return BatteryState.CONNECTED
    return BatteryState.STANDBY


def charge_status(state: ConsolidatedState) -> ChargeStatus:
    """ChaSt from the sign of the current (positive = charging), so a reader can check A's sign."""
    if state.current_a > IDLE_CURRENT_A:
        return ChargeStatus.CHARGING
    if state.current_a < -IDLE_CURRENT_A:
        return ChargeStatus.DISCHARGING
    if state.charge_enabled or state.discharge_enabled:
        return ChargeStatus.HOLDING
    return ChargeStatus.OFF


def evt1(alarms: ProtectionFlags, warnings: ProtectionFlags, cluster: ClusterFlags) -> int:
    """The 802 Evt1 word for these flags (see :data:`EVT1_ALARMS`, :data:`EVT1_WARNINGS`).

    A flag added to the models but not to the tables shows as OTHER_ALARM / OTHER_WARNING rather than
    failing the control cycle (the test suite insists the tables are complete).
    """
    alarm_masks, warning_masks, cluster_masks = evt1_bit_masks()
    other_alarm, other_warning = alarm_masks["internal_fault"], warning_masks["internal_fault"]
    word = 0
    for name in alarms.raised():
        word |= alarm_masks.get(name, other_alarm)
    for name in warnings.raised():
        word |= warning_masks.get(name, other_warning)
    for name in cluster.raised():
        word |= cluster_masks.get(name, other_warning)
    return word


def evt_vnd1(cluster: ClusterFlags) -> int:
    """The 802 EvtVnd1 word: which controller condition (:data:`EVT_VND1_BITS`) is raised."""
    return sum(1 << EVT_VND1_BITS[name] for name in cluster.raised() if name in EVT_VND1_BITS)


def _string_index(state: ConsolidatedState, location: str) -> int | None:
    """1-based roster position of the rack a consolidated location names (``"rack-id: where"``).

    Each rack is one string of the bank in SunSpec terms; the module within it is vendor text, so
    CellV*Mod stays "not implemented".
    """
    rack_id = location.split(":", 1)[0].strip()
    if not rack_id:
        return None
    return next((i for i, rack in enumerate(state.racks, 1) if rack.rack_id == rack_id), None)


def battery_model(state: ConsolidatedState, heartbeat: int) -> tuple[list[int], tuple[str, ...]]:
    """Model 802 registers (ID and L included) for ``state``, and the names of saturated points.

    Sign: ``A`` is positive while charging, as everywhere in bmslink (SunSpec leaves the sign to the
    device); ``ChaSt`` says CHARGING/DISCHARGING to confirm it. Points with no source in the
    consolidated state (WHRtg, WChaRteMax, WDisChaRteMax, W, DoD, NCyc, CellVAvg, ...) and their scale
    factors read as "not implemented": W would need a scale factor sized to the site's power.
    """
    m = _Writer(BATTERY_MODEL_ID, _battery_template())
    m.scaled("AHRtg", state.capacity_ah, AHRTG_SF)
    m.scaled("SoC", state.soc_pct, SOC_SF)
    m.scaled("SoH", state.soh_pct, SOH_SF)
    m.raw("ChaSt", charge_status(state))
    m.raw("Hb", heartbeat)
    m.raw("State", battery_state(state))
    m.raw("Evt1", evt1(state.alarms, state.warnings, state.cluster))
    m.raw("EvtVnd1", evt_vnd1(state.cluster))
    m.scaled("V", state.pack_voltage_v, V_SF)
    m.scaled("VMax", state.charge_voltage_limit_v, V_SF)
    m.scaled("VMin", state.discharge_voltage_limit_v, V_SF)
    m.scaled("CellVMax", state.cell_voltage_max_v, CELL_V_SF)
    m.scaled("CellVMin", state.cell_voltage_min_v, CELL_V_SF)
    for point, location in (("CellVMaxStr", state.cell_voltage_max_location),
                            ("CellVMinStr", state.cell_voltage_min_location)):
        index = _string_index(state, location)
        if index is not None:
            m.raw(point, index)
    m.scaled("A", state.current_a, A_SF)
    m.scaled("AChaMax", state.charge_current_limit_a, AMAX_SF)
    m.scaled("ADisChaMax", state.discharge_current_limit_a, AMAX_SF)
    return m.regs, tuple(m.saturated)


def image_length() -> int:
    """Registers from :data:`SUNSPEC_BASE_ADDRESS` to the end model's L, inclusive."""
    return len(SUNS_MARKER) + model_length(COMMON_MODEL_ID) + model_length(BATTERY_MODEL_ID) + 2 * 2 + 2


# -- requests and answers (pure) ------------------------------------------------------------------
# Modbus Messaging on TCP/IP Implementation Guide V1.0b §3.1.3 (MBAP header) and Modbus Application
# Protocol V1.1b3 §4.1 (PDU at most 253 bytes), §6.3/§6.4 (FC3/FC4), §7 (exception responses).
MBAP_HEADER_BYTES: Final = 7  # transaction id (2), protocol id (2), length (2), unit id (1)
MODBUS_PROTOCOL_ID: Final = 0
MBAP_MIN_LENGTH: Final = 2  # the length counts the unit id and the PDU, which has a function code at least
MBAP_MAX_LENGTH: Final = 254  # unit id + the largest PDU (253 bytes)
READ_REQUEST_PDU_BYTES: Final = 5  # function code, starting address, quantity
MAX_READ_REGISTERS: Final = 125  # FC3/FC4 quantity 1..0x007D
EXCEPTION_FLAG: Final = 0x80  # an exception response carries the request's function code | 0x80
_MBAP: Final = struct.Struct(">HHHB")
_READ_REQUEST: Final = struct.Struct(">BHH")


class ExceptionCode(IntEnum):
    """The Modbus exception codes this server answers with."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_BUSY = 0x06
    GATEWAY_TARGET_NO_RESPONSE = 0x0B


@dataclass(frozen=True, slots=True)
class Answer:
    """What to do with one well-framed request: send ``pdu``, or close the connection if it is None.

    ``outcome`` is the counter the request is counted under; ``reason`` says why a frame was
    untrusted (for the log).
    """

    pdu: bytes | None
    outcome: str
    reason: str = ""


def _refuse(function_code: int, code: ExceptionCode, outcome: str) -> Answer:
    return Answer(bytes((function_code | EXCEPTION_FLAG, code)), outcome)


def answer(unit: int, pdu: bytes, *, device_id: int, image: Sequence[int] | None, map_length: int) -> Answer:
    """The answer to the request ``pdu`` (non-empty) for ``unit``, from ``image`` (None: no update yet).

    Each request is counted once, under the first rule it breaks, in this order: a frame whose
    length does not fit its function, or whose function code is no request (0, or ≥ 0x80, where
    FC | 0x80 would be ambiguous), is untrusted (``malformed``: close); another unit,
    GATEWAY_TARGET_NO_RESPONSE (``foreign_unit``); any function but FC3/FC4, ILLEGAL_FUNCTION
    (``writes_refused`` or ``functions_refused``); a quantity outside 1..125, ILLEGAL_DATA_VALUE, and
    a range not wholly inside the map, ILLEGAL_DATA_ADDRESS (``reads_invalid``); no image yet,
    SERVER_DEVICE_BUSY (``reads_busy``); else the registers (``reads``).
    """
    function_code = pdu[0]
    if not 0 < function_code < EXCEPTION_FLAG:
        return Answer(None, "malformed", f"function code 0x{function_code:02X} is not a request")
    if function_code in READ_FUNCTION_CODES and len(pdu) != READ_REQUEST_PDU_BYTES:
        # The MBAP length disagrees with the request FC3/FC4 define: which one lies is unknown, so
        # where the next frame starts is unknown too; answering would answer bytes out of frame.
        return Answer(None, "malformed", f"MBAP length {len(pdu) + 1} for FC{function_code} (must be 6)")
    if unit != device_id:
        return _refuse(function_code, ExceptionCode.GATEWAY_TARGET_NO_RESPONSE, "foreign_unit")
    if function_code not in READ_FUNCTION_CODES:
        outcome = "writes_refused" if function_code in WRITE_FUNCTION_CODES else "functions_refused"
        return _refuse(function_code, ExceptionCode.ILLEGAL_FUNCTION, outcome)
    _, address, count = _READ_REQUEST.unpack(pdu)
    if not 1 <= count <= MAX_READ_REGISTERS:
        return _refuse(function_code, ExceptionCode.ILLEGAL_DATA_VALUE, "reads_invalid")
    first = address - SUNSPEC_BASE_ADDRESS
    if first < 0 or first + count > map_length:
        return _refuse(function_code, ExceptionCode.ILLEGAL_DATA_ADDRESS, "reads_invalid")
    if image is None:
        return _refuse(function_code, ExceptionCode.SERVER_DEVICE_BUSY, "reads_busy")
    return Answer(struct.pack(f">BB{count}H", function_code, 2 * count, *image[first:first + count]), "reads")


# -- the server (I/O shell) -----------------------------------------------------------------------
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _normalise(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_allow_list(entries: tuple[str, ...]) -> frozenset[IPAddress]:
    """The allowed peer addresses; ``ValueError`` naming every entry that is not an IP address."""
    parsed: set[IPAddress] = set()
    bad: list[str] = []
    for entry in entries:
        try:
            parsed.add(_normalise(ipaddress.ip_address(entry.strip())))
        except ValueError:
            bad.append(entry)
    if bad:
        raise ValueError(f"modbus_server.allowed_clients: not IP addresses: {bad}")
    return frozenset(parsed)


class _Connection(asyncio.Protocol):
    """One client: MBAP framing, the idle deadline and back-pressure; the server decides the rest."""

    def __init__(self, server: ConsolidatedModbusServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._peer = "?"
        self._last_request_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writing_paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # create_server makes stream transports
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self._peer = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)
        if not self._server._admit(self, peername):
            transport.close()  # nothing was written and nothing read: the peer sees the close at once
            return
        self._last_request_s = self._now()
        self._arm(self._server.config.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
        self._server._release(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def eof_received(self) -> bool:
        return False  # the peer is done sending: close once the replies already queued are written

    def pause_writing(self) -> None:
        # The peer does not take its replies: stop reading its requests until it does, so neither
        # our write buffer nor the request buffer grows. The idle deadline still runs (only a
        # request processed counts as activity), so a peer that never reads is closed in the end.
        self._writing_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._process()

    # -- ours -------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Close at once, dropping anything not yet written (the server stops)."""
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        """Answer every whole frame in the buffer, in order, until the peer stops taking replies."""
        transport, buffer = self._transport, self._buffer
        if transport is None or transport.is_closing():
            buffer.clear()
            return
        used = 0
        try:
            while not self._writing_paused and len(buffer) - used >= MBAP_HEADER_BYTES:
                transaction_id, protocol_id, length, unit = _MBAP.unpack_from(buffer, used)
                if protocol_id != MODBUS_PROTOCOL_ID:
                    self._untrusted(f"protocol id {protocol_id} (Modbus is 0)")
                    return
                if not MBAP_MIN_LENGTH <= length <= MBAP_MAX_LENGTH:
                    self._untrusted(f"MBAP length {length} (must be {MBAP_MIN_LENGTH}..{MBAP_MAX_LENGTH})")
                    return
                end = used + MBAP_HEADER_BYTES - 1 + length
                if len(buffer) < end:
                    break  # a torn frame: the rest comes in a later segment
                request = bytes(buffer[used + MBAP_HEADER_BYTES:end])
                used = end
                self._last_request_s = self._now()
                reply = self._server._answer(unit, request)
                if reply.pdu is None:
                    self._untrusted(reply.reason)
                    return
                transport.write(_MBAP.pack(transaction_id, MODBUS_PROTOCOL_ID, len(reply.pdu) + 1, unit)
                                + reply.pdu)
        finally:
            del buffer[:used]  # once per segment, not per frame: a pipelined burst stays linear

    def _untrusted(self, reason: str) -> None:
        """Implementation Guide: an MBAP header that cannot be trusted ends the connection."""
        self._server._untrusted(self._peer, reason)
        self._buffer.clear()
        self._close()

    def _close(self) -> None:
        if self._transport is None:
            return
        self._transport.close()  # replies already queued go first ...
        if self._timer is not None:  # ... unless the peer will not take them: abort after the timeout
            self._timer.cancel()
        self._arm(self._server.config.idle_timeout_s)

    def _arm(self, delay_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        if transport.is_closing():  # closed by us, and the peer still has not taken our replies
            transport.abort()
            return
        timeout_s = self._server.config.idle_timeout_s
        idle_s = self._now() - self._last_request_s
        if idle_s < timeout_s:
            self._arm(timeout_s - idle_s)  # one timer per connection, moved on lazily, not per request
            return
        self._server._idle(self._peer, idle_s)
        self._close()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


class ConsolidatedModbusServer:
    """Serves the latest :class:`ConsolidatedState` as SunSpec 1 + 802 over Modbus TCP, read-only.

    ``update()`` is synchronous and cheap (it builds one register image); reads copy from the latest
    image, so every answer comes from one cycle's state. See the module docstring for the map and
    the decisions (read-only, DEVICE_BUSY before the first update, allow-list, connection limits,
    framing, unit id).
    """

    def __init__(self, config: ModbusServerConfig) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self._allowed = parse_allow_list(config.allowed_clients)
        self._image: list[int] | None = None
        self._map_length = image_length()
        self._heartbeat = 0
        self._common: tuple[str, list[int]] | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._warned_peers: set[str] = set()
        self._warned_saturation: set[str] = set()
        self._throttled = ThrottledLog(log)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def heartbeat(self) -> int:
        """The 802 ``Hb`` value of the latest image (0 before the first update)."""
        return self._heartbeat

    @property
    def open_connections(self) -> int:
        """Admitted connections not yet closed (at most ``config.max_connections``)."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen on ``config.host:config.port``; :class:`ModbusServerError` if that fails."""
        if self._server is not None:
            raise RuntimeError("ConsolidatedModbusServer already started")
        address = f"{self.config.host}:{self.config.port}"
        if not self._allowed:
            log.warning("modbus server %s: allowed_clients is empty: every connection is refused", address)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), self.config.host,
                                                    self.config.port)
        except OSError as exc:
            raise ModbusServerError(address, f"{exc} (address in use, or not local to this host?)") from exc
        log.info("modbus server: SunSpec 802 on %s unit %d, read-only, clients %s, at most %d connections, "
                 "idle timeout %.1f s", address, self.config.device_id, sorted(map(str, self._allowed)),
                 self.config.max_connections, self.config.idle_timeout_s)

    def update(self, state: ConsolidatedState) -> None:
        """Publish ``state``: the next read answers from it, and ``Hb`` moves on by one."""
        # 0xFFFF is uint16's "not implemented": the heartbeat wraps from 0xFFFE to 0.
        self._heartbeat = (self._heartbeat + 1) % 0xFFFF
        battery, saturated = battery_model(state, self._heartbeat)
        if saturated:
            self.counters["saturated"] += len(saturated)
            for name in set(saturated) - self._warned_saturation:
                self._warned_saturation.add(name)
                log.warning("modbus server: 802 %s saturates its register (fixed scale factor)", name)
        self._image = [*SUNS_MARKER, *self._common_model(state.node_id), *battery, END_MODEL_ID, 0]
        self.counters["updates"] += 1

    async def stop(self) -> None:
        """Close the listener and every connection; safe to call more than once, or before start()."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self._connections):
            connection.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_DEADLINE_S)
        # Let the transports' connection_lost callbacks run.
        for _ in range(3):
            await asyncio.sleep(0)

    def _common_model(self, serial_number: str) -> list[int]:
        if self._common is None or self._common[0] != serial_number:
            self._common = (serial_number, common_model(self.config.device_id, serial_number))
        return self._common[1]

    # -- what the connections ask of the server ---------------------------------------------------
    def _answer(self, unit: int, request: bytes) -> Answer:
        reply = answer(unit, request, device_id=self.config.device_id, image=self._image,
                       map_length=self._map_length)
        if reply.pdu is not None:  # an untrusted frame is counted where the connection is closed
            self.counters[reply.outcome] += 1
        return reply

    def _admit(self, connection: _Connection, peername: Any) -> bool:
        """Allow-list first (a refused peer takes no slot), then the cap."""
        host = peername[0] if isinstance(peername, tuple) and peername else None
        try:
            peer = _normalise(ipaddress.ip_address(host)) if isinstance(host, str) else None
        except ValueError:
            peer = None
        if peer is None or peer not in self._allowed:
            self._refused(str(peer if peer is not None else peername))
            return False
        if len(self._connections) >= self.config.max_connections:
            self.counters["over_limit"] += 1
            self._throttled.warning("over_limit", "modbus server: closed a connection from %s: "
                                    "modbus_server.max_connections (%d) are open", peer,
                                    self.config.max_connections)
            return False
        self._connections.add(connection)
        self.counters["connections"] += 1
        return True

    def _release(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def _refused(self, shown: str) -> None:
        self.counters["refused_clients"] += 1
        if shown not in self._warned_peers and len(self._warned_peers) < REFUSED_LOG_MEMORY:
            self._warned_peers.add(shown)
            log.warning("modbus server: refused %s (not in modbus_server.allowed_clients)", shown)
        else:
            log.debug("modbus server: refused %s", shown)

    def _untrusted(self, peer: str, reason: str) -> None:
        self.counters["malformed"] += 1
        self._throttled.warning("malformed", "modbus server: closed the connection from %s: %s", peer, reason)

    def _idle(self, peer: str, idle_s: float) -> None:
        self.counters["idle_timeouts"] += 1
        log.debug("modbus server: closed the connection from %s: no request for %.1f s", peer, idle_s)
