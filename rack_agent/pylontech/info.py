"""The INFO of the Pylontech answers the agent reads, decoded into our types and encoded back (pure).

Layouts (facts from the public sources named in :mod:`rack_agent.pylontech.codec`, checked against
the recorded frames in tests/agent/test_pylontech_codec.py):

* 0x42 analog values, asked with INFO = the pack address; the answer: INFOFLAG, the pack address,
  the cell count and one u16 per cell (mV), the temperature count and one u16 per sensor
  (0.1 K, 2731 = 0 °C; sensor 1 is the BMS board, then the cell groups, then on some packs the
  MOSFETs), current s16 (0.1 A, positive while charging), pack voltage u16 (mV), remaining capacity
  u16 (mAh), the user-defined item count, total capacity u16 (mAh), cycle count u16. With a count of
  4 the capacities follow again as u24 (mAh) and the u16 ones read 0xFFFF: packs above 65 Ah
  (python-pylontech ``get_values_fmt``; Tomcat42 ``decodeAnalogValue`` "CapDetect").
* 0x44 alarm info: INFOFLAG, address, cell count and one state byte per cell, temperature count and
  one state per sensor, the states of charge current, pack voltage and discharge current, then
  status bytes 1 to 5 (zivillian/esp32-pylontech ``AlarmStatus1..3``; status 4 and 5 flag failed
  cells 1–8 and 9–16). A state is 0 normal, 1 below the lower limit, 2 above the upper limit,
  0xF0 another error.
* 0x92 charge/discharge management info: address, CVL u16 (mV), DVL u16 (mV), CCL s16 (0.1 A),
  DCL s16 (0.1 A; packs send it negative), status (0x80 charge enable, 0x40 discharge enable,
  0x20/0x10 charge immediately, 0x08 full charge request).
* 0x51 manufacturer info: device name (10 ASCII bytes, NUL padded), software version (2 bytes),
  manufacturer name (the rest, NUL padded).

Answers may carry bytes after the fields named here (firmware variants append some, e.g. the 33-byte
alarm answer quoted in the pylontech PyPI package's output); they are ignored. An answer shorter
than its fields, or with counts it cannot hold, is :class:`InfoFormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from rack_agent.pylontech.codec import InfoFormatError

KELVIN_OFFSET_DECI = 2731  # 0.1 K of 0 °C, as the protocol rounds it
CAPACITY_U16_MAX_MAH = 0xFFFF
# User-defined item count of the analog answer: 2 = 16-bit capacities only, 4 = 24-bit ones follow.
USER_ITEMS_U16 = 2
USER_ITEMS_U24 = 4
STATE_NORMAL = 0x00
STATE_BELOW = 0x01
STATE_ABOVE = 0x02
STATE_OTHER_ERROR = 0xF0
DEVICE_NAME_BYTES = 10


class ManagementStatus(IntFlag):
    """0x92 status byte."""

    FULL_CHARGE_REQUEST = 0x08
    CHARGE_IMMEDIATELY_2 = 0x10
    CHARGE_IMMEDIATELY_1 = 0x20
    DISCHARGE_ENABLE = 0x40
    CHARGE_ENABLE = 0x80


class ProtectionStatus(IntFlag):
    """0x44 status 1: the protections the pack has tripped."""

    MODULE_OVER_VOLTAGE = 0x01
    CELL_UNDER_VOLTAGE = 0x02
    CHARGE_OVER_CURRENT = 0x04
    DISCHARGE_OVER_CURRENT = 0x10
    DISCHARGE_OVER_TEMPERATURE = 0x20
    CHARGE_OVER_TEMPERATURE = 0x40
    MODULE_UNDER_VOLTAGE = 0x80


class SwitchStatus(IntFlag):
    """0x44 status 2: the pack's switches."""

    PRE_MOSFET = 0x01
    CHARGE_MOSFET = 0x02
    DISCHARGE_MOSFET = 0x04
    USING_BATTERY_POWER = 0x08


NO_PROTECTION = ProtectionStatus(0)
NO_SWITCHES = SwitchStatus(0)


class _Reader:
    """Reads big-endian fields off an INFO, naming the field that is missing."""

    def __init__(self, info: bytes, what: str) -> None:
        self._info = info
        self._at = 0
        self._what = what

    def take(self, size: int, field: str) -> bytes:
        end = self._at + size
        if end > len(self._info):
            raise InfoFormatError(
                f"{self._what} answer ends at byte {len(self._info)}, before {field} "
                f"(bytes {self._at}..{end - 1})"
            )
        chunk = self._info[self._at:end]
        self._at = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def s16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big", signed=True)

    def u24(self, field: str) -> int:
        return int.from_bytes(self.take(3, field), "big")


def _u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _s16(value: int) -> bytes:
    return value.to_bytes(2, "big", signed=True)


def _check_address(found: int, address: int, what: str) -> None:
    if found != address:
        raise InfoFormatError(f"{what} answer describes pack {found}, pack {address} was asked")


def deci_kelvin_to_c(raw: int) -> float:
    return (raw - KELVIN_OFFSET_DECI) / 10.0


def c_to_deci_kelvin(celsius: float) -> int:
    return round(celsius * 10.0) + KELVIN_OFFSET_DECI


@dataclass(frozen=True, slots=True)
class AnalogValues:
    """One pack's 0x42 answer, in SI units."""

    address: int
    cell_voltages_v: tuple[float, ...]
    temperatures_c: tuple[float, ...]
    current_a: float  # positive while charging
    pack_voltage_v: float
    remaining_ah: float
    total_ah: float
    cycles: int
    info_flag: int = 0


def decode_analog_values(info: bytes, address: int) -> AnalogValues:
    r = _Reader(info, "analog values (0x42)")
    flag = r.u8("INFOFLAG")
    _check_address(r.u8("pack address"), address, "analog values (0x42)")
    cells = tuple(r.u16(f"cell {i + 1} voltage") / 1000.0 for i in range(r.u8("cell count")))
    temperatures = tuple(
        deci_kelvin_to_c(r.u16(f"temperature {i + 1}")) for i in range(r.u8("temperature count"))
    )
    current_a = r.s16("current") / 10.0
    pack_v = r.u16("pack voltage") / 1000.0
    remaining_mah = r.u16("remaining capacity")
    user_items = r.u8("user-defined item count")
    total_mah = r.u16("total capacity")
    cycles = r.u16("cycle count")
    if user_items == USER_ITEMS_U24:
        remaining_mah = r.u24("remaining capacity (24 bit)")
        total_mah = r.u24("total capacity (24 bit)")
    elif user_items != USER_ITEMS_U16:
        raise InfoFormatError(
            f"analog values (0x42): user-defined item count {user_items}, "
            f"known: {USER_ITEMS_U16}, {USER_ITEMS_U24}"
        )
    return AnalogValues(address, cells, temperatures, current_a, pack_v, remaining_mah / 1000.0,
                        total_mah / 1000.0, cycles, flag)


def encode_analog_values(values: AnalogValues) -> bytes:
    """The INFO a pack answers to 0x42; capacities above 65.535 Ah use the 24-bit form."""
    remaining_mah, total_mah = round(values.remaining_ah * 1000.0), round(values.total_ah * 1000.0)
    wide = max(remaining_mah, total_mah) > CAPACITY_U16_MAX_MAH
    out = bytearray(_u8(values.info_flag) + _u8(values.address) + _u8(len(values.cell_voltages_v)))
    for volts in values.cell_voltages_v:
        out += _u16(round(volts * 1000.0))
    out += _u8(len(values.temperatures_c))
    for celsius in values.temperatures_c:
        out += _u16(c_to_deci_kelvin(celsius))
    out += _s16(round(values.current_a * 10.0)) + _u16(round(values.pack_voltage_v * 1000.0))
    out += _u16(CAPACITY_U16_MAX_MAH if wide else remaining_mah)
    out += _u8(USER_ITEMS_U24 if wide else USER_ITEMS_U16)
    out += _u16(CAPACITY_U16_MAX_MAH if wide else total_mah) + _u16(values.cycles)
    if wide:
        out += remaining_mah.to_bytes(3, "big") + total_mah.to_bytes(3, "big")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class AlarmInfo:
    """One pack's 0x44 answer: a state per cell and per sensor, three more states, five statuses."""

    address: int
    cell_states: tuple[int, ...]
    temperature_states: tuple[int, ...]
    charge_current_state: int = STATE_NORMAL
    pack_voltage_state: int = STATE_NORMAL
    discharge_current_state: int = STATE_NORMAL
    protection: ProtectionStatus = NO_PROTECTION
    switches: SwitchStatus = NO_SWITCHES
    status3: int = 0
    failed_cells: int = 0  # status 4 (cells 1–8) and 5 (cells 9–16) as one bit per cell, cell 1 = bit 0
    info_flag: int = 0


def decode_alarm_info(info: bytes, address: int) -> AlarmInfo:
    r = _Reader(info, "alarm info (0x44)")
    flag = r.u8("INFOFLAG")
    _check_address(r.u8("pack address"), address, "alarm info (0x44)")
    cells = tuple(r.u8(f"cell {i + 1} state") for i in range(r.u8("cell count")))
    temperatures = tuple(r.u8(f"temperature {i + 1} state") for i in range(r.u8("temperature count")))
    charge, pack, discharge = r.u8("charge current state"), r.u8("pack voltage state"), r.u8(
        "discharge current state")
    protection = ProtectionStatus(r.u8("status 1"))
    switches = SwitchStatus(r.u8("status 2"))
    status3 = r.u8("status 3")
    failed = r.u8("status 4") | r.u8("status 5") << 8
    return AlarmInfo(address, cells, temperatures, charge, pack, discharge, protection, switches, status3,
                     failed, flag)


def encode_alarm_info(alarm: AlarmInfo) -> bytes:
    out = bytearray(_u8(alarm.info_flag) + _u8(alarm.address) + _u8(len(alarm.cell_states)))
    out += bytes(alarm.cell_states) + _u8(len(alarm.temperature_states)) + bytes(alarm.temperature_states)
    out += bytes((alarm.charge_current_state, alarm.pack_voltage_state, alarm.discharge_current_state))
    out += bytes((int(alarm.protection), int(alarm.switches), alarm.status3))
    out += bytes((alarm.failed_cells & 0xFF, alarm.failed_cells >> 8 & 0xFF))
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ManagementInfo:
    """One pack's 0x92 answer: what it allows now. Currents as sent (DCL usually negative)."""

    address: int
    charge_voltage_limit_v: float
    discharge_voltage_limit_v: float
    charge_current_limit_a: float
    discharge_current_limit_a: float
    status: ManagementStatus

    @property
    def charge_enabled(self) -> bool:
        return ManagementStatus.CHARGE_ENABLE in self.status

    @property
    def discharge_enabled(self) -> bool:
        return ManagementStatus.DISCHARGE_ENABLE in self.status


def decode_management_info(info: bytes, address: int) -> ManagementInfo:
    r = _Reader(info, "management info (0x92)")
    _check_address(r.u8("pack address"), address, "management info (0x92)")
    cvl = r.u16("charge voltage limit") / 1000.0
    dvl = r.u16("discharge voltage limit") / 1000.0
    ccl = r.s16("charge current limit") / 10.0
    dcl = r.s16("discharge current limit") / 10.0
    return ManagementInfo(address, cvl, dvl, ccl, dcl, ManagementStatus(r.u8("status")))


def encode_management_info(m: ManagementInfo) -> bytes:
    return (
        _u8(m.address) + _u16(round(m.charge_voltage_limit_v * 1000.0))
        + _u16(round(m.discharge_voltage_limit_v * 1000.0)) + _s16(round(m.charge_current_limit_a * 10.0))
        + _s16(round(m.discharge_current_limit_a * 10.0)) + _u8(int(m.status))
    )


@dataclass(frozen=True, slots=True)
class ManufacturerInfo:
    """0x51: what the pack calls itself."""

    device_name: str
    software_version: tuple[int, int]
    manufacturer: str

    def __str__(self) -> str:
        major, minor = self.software_version
        return f"{self.device_name or '?'} software {major}.{minor} by {self.manufacturer or '?'}"


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")


def decode_manufacturer_info(info: bytes) -> ManufacturerInfo:
    r = _Reader(info, "manufacturer info (0x51)")
    name = _text(r.take(DEVICE_NAME_BYTES, "device name"))
    version = r.take(2, "software version")
    return ManufacturerInfo(name, (version[0], version[1]), _text(info[DEVICE_NAME_BYTES + 2:]))


def encode_manufacturer_info(m: ManufacturerInfo, *, manufacturer_bytes: int = 20) -> bytes:
    name = m.device_name.encode("ascii")[:DEVICE_NAME_BYTES].ljust(DEVICE_NAME_BYTES, b"\x00")
    maker = m.manufacturer.encode("ascii")[:manufacturer_bytes].ljust(manufacturer_bytes, b"\x00")
    return name + bytes(m.software_version) + maker
