"""Register images of the simulated BMS: the flat vendor map and the SunSpec 1/802/803 chain.

Pure functions of a :class:`sim.battery.BatterySnapshot`. The flat map is written through the
agent's own plan (``acme_flat`` profile + :func:`encode_numeric`), and the SunSpec image from
pysunspec2's model definitions, so the simulator and the agent share one definition of each.
Both maps live on the same Modbus device: flat at holding 0..20, SunSpec from 40000.

A simulated unit of a named make (:data:`MAKES`: seplos_v3, jk_pb, pace, byd_hvs) serves instead
the register image of that make's shipped profile, written the same way through the agent's own
plan (:func:`make_image`): holding, input, coils and byte-addressed maps alike. Each make's
:class:`MakeSpec` says what battery stands behind it (cells, sensors, ratings) and how it is
reached (serial speed, TCP framing), as the real make is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from rack_agent.profiles import flat_plan, load_profile
from rack_agent.profiles.plan import NumericPoint, RegisterPlan, RegRef, encode_numeric, encode_raw
from rack_agent.profiles.spec import FlatProfile, RegisterType, SunSpecProfile, Table
from rack_agent.profiles.sunspec import SUNS_MARKER, model_points
from sim.battery import IDLE_CURRENT_A, MAX_CELL_V, NOMINAL_CELL_V, BatterySnapshot, SimRackConfig
from sim.faults import SunSpecLayout

FLAT_PROFILE = "acme_flat"
SUNSPEC_PROFILE = "sunspec"
FLAT_BASE_ADDRESS = 0
SUNSPEC_BASE_ADDRESS = 40000
END_MODEL_ID = 0xFFFF
STRING_GROUP_REGISTERS = 32  # model 803 repeating "string" group

# SunSpec scale factors (value = raw × 10^sf). Voltage/power/energy pick the finest one that fits.
CELL_V_SF = -3
A_SF = -1
AMAX_SF = -1
SOC_SF = -1
DOD_SF = -1
SOH_SF = 0
MOD_TMP_SF = -1
AHRTG_SF = 0

# SunSpec 802: State (1.3 table) and ChaSt values.
STATE_DISCONNECTED = 1
STATE_CONNECTED = 3
CHAST_OFF, CHAST_EMPTY, CHAST_DISCHARGING, CHAST_CHARGING, CHAST_FULL, CHAST_HOLDING = 1, 2, 3, 4, 5, 6
TYP_LITHIUM_ION = 4
STR_ST_ENABLED = 1 << 0
STR_ST_CONTACTOR = 1 << 1

# Flags sunspec.toml leaves out (SunSpec has one "volt" bit, not cell vs pack): map them onto the
# nearest 802 Evt1 bit so the condition is still visible to a SunSpec reader.
EXTRA_ALARM_BITS = {"pack_over_voltage": 9, "pack_under_voltage": 11, "cell_imbalance": 25}
EXTRA_WARNING_BITS = {"pack_over_voltage": 10, "pack_under_voltage": 12, "insulation_fault": 26}

# SunSpec type -> (register type, not-implemented marker as a raw value)
_TYPES: dict[str, tuple[RegisterType, int]] = {
    "uint16": (RegisterType.U16, 0xFFFF),
    "enum16": (RegisterType.U16, 0xFFFF),
    "bitfield16": (RegisterType.U16, 0xFFFF),
    "acc16": (RegisterType.U16, 0),
    "int16": (RegisterType.S16, -0x8000),
    "sunssf": (RegisterType.S16, -0x8000),
    "uint32": (RegisterType.U32, 0xFFFFFFFF),
    "enum32": (RegisterType.U32, 0xFFFFFFFF),
    "bitfield32": (RegisterType.U32, 0xFFFFFFFF),
    "acc32": (RegisterType.U32, 0),
    "int32": (RegisterType.S32, -0x80000000),
    "pad": (RegisterType.U16, 0),
}


@dataclass(frozen=True, slots=True)
class Identity:
    """SunSpec common model (1) contents."""

    manufacturer: str = "bmslink"
    model: str = "sim-rack"
    version: str = "0.1.0"
    serial_number: str = "SIM-0001"
    device_address: int = 1


# -- flat map -------------------------------------------------------------------------------------
@cache
def flat_register_plan() -> RegisterPlan:
    profile = load_profile(FLAT_PROFILE)
    assert isinstance(profile, FlatProfile)
    return flat_plan(profile)


def _type_bounds(rtype: RegisterType) -> tuple[int, int]:
    bits = 16 * rtype.words
    if rtype in (RegisterType.S16, RegisterType.S32):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _encode_saturated(point: NumericPoint, value: float) -> list[int]:
    """``encode_numeric``, but a value the register cannot hold reads as the nearest one it can.

    A real device's fixed-point register saturates or wraps; saturating keeps the value plausible
    (e.g. a 700 V rack in the flat map's 0.01 V u16 shows 655.35 V).
    """
    try:
        return encode_numeric(point, value)
    except ValueError:
        assert point.ref is not None
        low, high = (0, 0xFF) if point.ref.byte else _type_bounds(point.ref.type)
        raw = round((value - point.offset) / point.scale)
        return encode_raw(point.ref, min(max(raw, low), high))


def _lowest_bit(mask: int) -> int:
    """The lowest set bit of a mask: the one bit a simulator raises for "any of these"."""
    return mask & -mask


def _put(image: list[int], base: int, ref: RegRef, words: list[int]) -> None:
    start = ref.address - base
    image[start:start + len(words)] = words


def flat_image(snap: BatterySnapshot) -> list[int]:
    """Holding registers from :data:`FLAT_BASE_ADDRESS`, laid out by the ``acme_flat`` profile."""
    plan = flat_register_plan()
    values = snap.measurements().model_dump()
    size = max(a for ref in plan.refs() for a in ref.addresses) + 1 - FLAT_BASE_ADDRESS
    image = [0] * size
    for name, point in plan.numeric.items():
        if point.ref is not None:
            _put(image, FLAT_BASE_ADDRESS, point.ref, _encode_saturated(point, float(values[name])))
    # The map's location formats are "cell {}" and "sensor {}": a cell number, a module's sensor number.
    location_indices = {
        "cell_voltage_max_location": (snap.cell_max_index,),
        "cell_voltage_min_location": (snap.cell_min_index,),
        "temperature_max_location": (snap.temperature_max_module,),
        "temperature_min_location": (snap.temperature_min_module,),
    }
    for name, loc in plan.locations.items():
        for ref, index in zip(loc.refs, location_indices[name], strict=True):
            _put(image, FLAT_BASE_ADDRESS, ref, encode_raw(ref, index))
    for flags, points in ((snap.alarms, plan.alarms), (snap.warnings, plan.warnings)):
        for name, bit in points.items():
            if getattr(flags, name):
                image[bit.ref.address - FLAT_BASE_ADDRESS] |= _lowest_bit(bit.mask)
    if plan.contactor is not None and plan.contactor.mask is not None and snap.contactor_closed:
        image[plan.contactor.ref.address - FLAT_BASE_ADDRESS] |= _lowest_bit(plan.contactor.mask)
    return image


# -- SunSpec --------------------------------------------------------------------------------------
@cache
def evt1_bits() -> tuple[dict[str, int], dict[str, int]]:
    """(alarm bits, warning bits) of 802 Evt1 by flag name: sunspec.toml plus :data:`EXTRA_ALARM_BITS`."""
    profile = load_profile(SUNSPEC_PROFILE)
    assert isinstance(profile, SunSpecProfile)
    alarms = {n: b.bit for n, b in profile.alarms.items() if (b.model, b.point) == (802, "Evt1")}
    warnings = {n: b.bit for n, b in profile.warnings.items() if (b.model, b.point) == (802, "Evt1")}
    return {**EXTRA_ALARM_BITS, **alarms}, {**EXTRA_WARNING_BITS, **warnings}


@cache
def _group_points(model_id: int) -> dict[str, tuple[int, str, int]]:
    """Points of a model's first repeating group: name -> (offset in group, type, size)."""
    from sunspec2 import device  # noqa: PLC0415 - heavy import, as in rack_agent.profiles.sunspec

    definition: dict[str, Any] = device.get_model_def(model_id)
    points: dict[str, tuple[int, str, int]] = {}
    offset = 0
    for point in definition["group"]["groups"][0]["points"]:
        size = int(point.get("size", 1))
        points[point["name"]] = (offset, point["type"], size)
        offset += size
    return points


def fixed_length(model_id: int) -> int:
    """L of a model's fixed part (registers after the ID and L header)."""
    return max(p.offset + p.size for p in model_points(model_id).values()) - 2


def fit_sf(max_value: float, finest: int, register: RegisterType = RegisterType.U16) -> int:
    """The finest scale factor ≥ ``finest`` at which ``max_value`` fits the register."""
    _, high = _type_bounds(register)
    sf = finest
    while abs(max_value) / 10.0**sf > high and sf < 10:
        sf += 1
    return sf


def _not_implemented(stype: str, size: int) -> list[int]:
    if stype in _TYPES:
        rtype, marker = _TYPES[stype]
        return encode_raw(RegRef(Table.HOLDING, 0, rtype), marker)
    return [0] * size  # string and anything textual: NULs mean "not implemented"


@cache
def _blank_model(model_id: int, groups: int) -> tuple[int, ...]:
    """A model's registers (ID, L, body) with every point at its "not implemented" value."""
    fixed = fixed_length(model_id) + 2
    length = fixed - 2 + groups * STRING_GROUP_REGISTERS
    regs = [0] * (length + 2)
    for name, pdef in model_points(model_id).items():
        if name not in ("ID", "L"):
            regs[pdef.offset:pdef.offset + pdef.size] = _not_implemented(pdef.sunspec_type, pdef.size)
    for g in range(groups):
        for offset, stype, size in _group_points(model_id).values():
            start = fixed + g * STRING_GROUP_REGISTERS + offset
            regs[start:start + size] = _not_implemented(stype, size)
    regs[0], regs[1] = model_id, length
    return tuple(regs)


class _ModelWriter:
    """Registers of one model (header included), every point first set to "not implemented"."""

    def __init__(self, model_id: int, groups: int = 0) -> None:
        self.model_id = model_id
        self.fixed = fixed_length(model_id) + 2
        self.regs = list(_blank_model(model_id, groups))

    def _where(self, name: str, group: int | None) -> tuple[int, str, int]:
        if group is None:
            pdef = model_points(self.model_id)[name]
            return pdef.offset, pdef.sunspec_type, pdef.size
        offset, stype, size = _group_points(self.model_id)[name]
        return self.fixed + group * STRING_GROUP_REGISTERS + offset, stype, size

    def raw(self, name: str, raw: int, group: int | None = None) -> None:
        offset, stype, _ = self._where(name, group)
        rtype = _TYPES[stype][0]
        low, high = _type_bounds(rtype)
        ref = RegRef(Table.HOLDING, 0, rtype)
        self.regs[offset:offset + rtype.words] = encode_raw(ref, min(max(raw, low), high))

    def scaled(self, name: str, value: float, sf: int, group: int | None = None) -> None:
        self.raw(name, round(value / 10.0**sf), group)

    def text(self, name: str, value: str) -> None:
        offset, _, size = self._where(name, None)
        data = value.encode("ascii", errors="replace")[: size * 2].ljust(size * 2, b"\0")
        words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, 2 * size, 2)]
        self.regs[offset:offset + size] = words


def _evt1(snap: BatterySnapshot) -> int:
    alarm_bits, warning_bits = evt1_bits()
    word = 0
    for flags, bits in ((snap.alarms, alarm_bits), (snap.warnings, warning_bits)):
        for name in flags.raised():
            if name in bits:
                word |= 1 << bits[name]
    return word


def _charge_status(snap: BatterySnapshot) -> int:
    if not snap.contactor_closed:
        return CHAST_OFF
    if snap.current_a > IDLE_CURRENT_A:
        return CHAST_CHARGING
    if snap.current_a < -IDLE_CURRENT_A:
        return CHAST_DISCHARGING
    if snap.soc_pct >= 100.0:
        return CHAST_FULL
    if snap.soc_pct <= 0.0:
        return CHAST_EMPTY
    return CHAST_HOLDING


def _common_model(identity: Identity) -> list[int]:
    m = _ModelWriter(1)
    m.text("Mn", identity.manufacturer)
    m.text("Md", identity.model)
    m.text("Vr", identity.version)
    m.text("SN", identity.serial_number)
    m.raw("DA", identity.device_address)
    return m.regs


@dataclass(frozen=True, slots=True)
class Scales:
    """SunSpec scale factors that depend on the rack's size; fixed for the life of the device.

    A scale factor that changed with the reading would be legal SunSpec but needlessly hostile.
    """

    v_sf: int
    wh_sf: int
    wmax_sf: int
    w_sf: int

    @classmethod
    @cache
    def for_rack(cls, config: SimRackConfig) -> Scales:
        nominal_v = config.cells_in_series * NOMINAL_CELL_V
        max_pack_v = config.cells_in_series * MAX_CELL_V
        max_a = max(config.max_charge_a, config.max_discharge_a, 1.0)
        return cls(
            v_sf=fit_sf(max_pack_v, -2),
            wh_sf=fit_sf(config.capacity_ah * nominal_v, 0),
            wmax_sf=fit_sf(max_a * nominal_v, 0),
            w_sf=fit_sf(max_a * max_pack_v, 0, RegisterType.S16),
        )


def _battery_model(snap: BatterySnapshot, config: SimRackConfig, sc: Scales) -> list[int]:
    m = _ModelWriter(802)
    nominal_v = config.cells_in_series * NOMINAL_CELL_V
    v_sf, wh_sf, wmax_sf, w_sf = sc.v_sf, sc.wh_sf, sc.wmax_sf, sc.w_sf
    # Nameplate ratings (SunSpec: AHRtg, WHRtg, WChaRteMax, WDisChaRteMax are nameplate values).
    m.scaled("AHRtg", config.capacity_ah, AHRTG_SF)
    m.scaled("WHRtg", config.capacity_ah * nominal_v, wh_sf)
    m.scaled("WChaRteMax", config.max_charge_a * nominal_v, wmax_sf)
    m.scaled("WDisChaRteMax", config.max_discharge_a * nominal_v, wmax_sf)
    m.scaled("SoCMax", 100.0, SOC_SF)
    m.scaled("SoCMin", 0.0, SOC_SF)
    m.scaled("SoC", snap.soc_pct, SOC_SF)
    m.scaled("DoD", 100.0 - snap.soc_pct, DOD_SF)
    m.scaled("SoH", snap.soh_pct, SOH_SF)
    m.raw("NCyc", 0)
    m.raw("ChaSt", _charge_status(snap))
    m.raw("LocRemCtl", 0)  # REMOTE
    m.raw("Hb", int(snap.elapsed_s) & 0xFFFF)  # "incremented every second"
    m.raw("CtrlHb", 0)
    m.raw("AlmRst", 0)
    m.raw("Typ", TYP_LITHIUM_ION)
    m.raw("State", STATE_CONNECTED if snap.contactor_closed else STATE_DISCONNECTED)
    m.raw("Evt1", _evt1(snap))
    m.raw("Evt2", 0)
    m.raw("EvtVnd1", 0)
    m.raw("EvtVnd2", 0)
    m.scaled("V", snap.pack_voltage_v, v_sf)
    m.scaled("VMax", snap.charge_voltage_limit_v, v_sf)
    m.scaled("VMin", snap.discharge_voltage_limit_v, v_sf)
    m.scaled("CellVMax", snap.cell_voltage_max_v, CELL_V_SF)
    m.raw("CellVMaxStr", snap.string_index)
    m.raw("CellVMaxMod", snap.module_of_cell(snap.cell_max_index))
    m.scaled("CellVMin", snap.cell_voltage_min_v, CELL_V_SF)
    m.raw("CellVMinStr", snap.string_index)
    m.raw("CellVMinMod", snap.module_of_cell(snap.cell_min_index))
    m.scaled("CellVAvg", snap.cell_voltage_avg_v, CELL_V_SF)
    m.scaled("A", snap.current_a, A_SF)
    m.scaled("AChaMax", snap.charge_current_limit_a, AMAX_SF)
    m.scaled("ADisChaMax", snap.discharge_current_limit_a, AMAX_SF)
    m.scaled("W", snap.pack_voltage_v * snap.current_a, w_sf)
    m.raw("ReqInvState", 0)  # NO REQUEST
    m.raw("SetOp", 1 if snap.contactor_closed else 2)  # CONNECT / DISCONNECT
    m.raw("SetInvState", 3)  # INVERTER_STARTED
    for name, sf in (("AHRtg_SF", AHRTG_SF), ("WHRtg_SF", wh_sf), ("WChaDisChaMax_SF", wmax_sf),
                     ("SoC_SF", SOC_SF), ("DoD_SF", DOD_SF), ("SoH_SF", SOH_SF), ("V_SF", v_sf),
                     ("CellV_SF", CELL_V_SF), ("A_SF", A_SF), ("AMax_SF", AMAX_SF), ("W_SF", w_sf)):
        m.raw(name, sf)
    return m.regs


def _bank_model(snap: BatterySnapshot, v_sf: int) -> list[int]:
    m = _ModelWriter(803, groups=1)
    m.raw("NStr", 1)
    m.raw("NStrCon", 1 if snap.contactor_closed else 0)
    m.scaled("ModTmpMax", snap.temperature_max_c, MOD_TMP_SF)
    m.raw("ModTmpMaxStr", snap.string_index)
    m.raw("ModTmpMaxMod", snap.temperature_max_module)
    m.scaled("ModTmpMin", snap.temperature_min_c, MOD_TMP_SF)
    m.raw("ModTmpMinStr", snap.string_index)
    m.raw("ModTmpMinMod", snap.temperature_min_module)
    m.scaled("ModTmpAvg", snap.temperature_avg_c, MOD_TMP_SF)
    for point in ("StrVMax", "StrVMin", "StrVAvg"):
        m.scaled(point, snap.pack_voltage_v, v_sf)
    for point in ("StrAMax", "StrAMin", "StrAAvg"):
        m.scaled(point, snap.current_a, A_SF)
    for point in ("StrVMaxStr", "StrVMinStr", "StrAMaxStr", "StrAMinStr"):
        m.raw(point, snap.string_index)
    m.raw("NCellBal", 0)
    for name, sf in (("CellV_SF", CELL_V_SF), ("ModTmp_SF", MOD_TMP_SF), ("A_SF", A_SF),
                     ("SoH_SF", SOH_SF), ("SoC_SF", SOC_SF), ("V_SF", v_sf)):
        m.raw(name, sf)
    g = 0  # the rack is one string
    m.raw("StrNMod", snap.modules, g)
    m.raw("StrSt", STR_ST_ENABLED | (STR_ST_CONTACTOR if snap.contactor_closed else 0), g)
    m.raw("StrConFail", 0, g)  # NO_FAILURE
    m.scaled("StrSoC", snap.soc_pct, SOC_SF, g)
    m.scaled("StrSoH", snap.soh_pct, SOH_SF, g)
    m.scaled("StrA", snap.current_a, A_SF, g)
    m.scaled("StrCellVMax", snap.cell_voltage_max_v, CELL_V_SF, g)
    m.raw("StrCellVMaxMod", snap.module_of_cell(snap.cell_max_index), g)
    m.scaled("StrCellVMin", snap.cell_voltage_min_v, CELL_V_SF, g)
    m.raw("StrCellVMinMod", snap.module_of_cell(snap.cell_min_index), g)
    m.scaled("StrCellVAvg", snap.cell_voltage_avg_v, CELL_V_SF, g)
    m.scaled("StrModTmpMax", snap.temperature_max_c, MOD_TMP_SF, g)
    m.raw("StrModTmpMaxMod", snap.temperature_max_module, g)
    m.scaled("StrModTmpMin", snap.temperature_min_c, MOD_TMP_SF, g)
    m.raw("StrModTmpMinMod", snap.temperature_min_module, g)
    m.scaled("StrModTmpAvg", snap.temperature_avg_c, MOD_TMP_SF, g)
    m.raw("StrDisRsn", 0, g)  # NONE
    m.raw("StrConSt", 1 if snap.contactor_closed else 0, g)  # contactor 0
    m.raw("StrEvt1", _evt1(snap), g)
    m.raw("StrEvt2", 0, g)
    m.raw("StrEvtVnd1", 0, g)
    m.raw("StrEvtVnd2", 0, g)
    m.raw("StrSetEna", 1, g)  # ENABLE_STRING
    m.raw("StrSetCon", 1 if snap.contactor_closed else 2, g)
    return m.regs


SHORT_802_LENGTH = 50  # an 802 that ends before its scale factors (offsets 52..63)
VENDOR_MODEL_ID = 64_999  # a vendor model (64000..65534): what NO_END puts where the end marker was


def sunspec_image(
    snap: BatterySnapshot,
    config: SimRackConfig,
    identity: Identity,
    layout: SunSpecLayout = SunSpecLayout.STANDARD,
) -> list[int]:
    """Holding registers from :data:`SUNSPEC_BASE_ADDRESS`: SunS, models 1, 802, 803, end marker.

    ``layout`` serves a broken variant instead (see :class:`sim.faults.SunSpecLayout`), always
    :func:`sunspec_length` registers long (padded with zeros): the server's memory block is sized once.
    """
    scales = Scales.for_rack(config)
    marker = list(SUNS_MARKER) if layout is not SunSpecLayout.NO_MARKER else [0, 0]
    battery = _battery_model(snap, config, scales)
    if layout is SunSpecLayout.SHORT_802:
        battery = [802, SHORT_802_LENGTH, *battery[2:2 + SHORT_802_LENGTH]]
    bank = _bank_model(snap, scales.v_sf) if layout is not SunSpecLayout.NO_803 else []
    end = [END_MODEL_ID, 0] if layout is not SunSpecLayout.NO_END else [VENDOR_MODEL_ID, 0]
    image = [*marker, *_common_model(identity), *battery, *bank, *end]
    return image + [0] * (sunspec_length() - len(image))


def sunspec_length() -> int:
    """Registers in :func:`sunspec_image` (fixed: the layout never changes while serving)."""
    headers = 2 * 3  # ID and L of models 1, 802, 803
    models = fixed_length(1) + fixed_length(802) + fixed_length(803) + STRING_GROUP_REGISTERS + headers
    return len(SUNS_MARKER) + models + 2


# -- named makes ----------------------------------------------------------------------------------
SimImage = dict[tuple[Table, int], int]


@dataclass(frozen=True, slots=True)
class MakeSpec:
    """A make's simulated unit: its shipped profile, the battery behind it and how it is reached."""

    profile: str
    cells_in_series: int
    # Temperature sensors = cells_in_series / cells_per_module (what the map reports per sensor).
    cells_per_module: int
    capacity_ah: float
    max_current_a: float
    baudrate: int  # the make's serial speed (documented default)
    tcp_framer: Literal["socket", "rtu"] = "socket"

    def rack_config(self, **overrides: Any) -> SimRackConfig:
        """The simulated rack of this make (``overrides`` e.g. ``seed``, ``serial_number``)."""
        fields: dict[str, Any] = {
            "cells_in_series": self.cells_in_series, "cells_per_module": self.cells_per_module,
            "capacity_ah": self.capacity_ah, "max_charge_a": self.max_current_a,
            "max_discharge_a": self.max_current_a,
        }
        return SimRackConfig(**{**fields, **overrides})


MAKES: Mapping[str, MakeSpec] = {
    # 16S with 4 cell NTCs (PIB 0x1110..0x1113), 19200 8N1 (XZH V0.1 section 1.1).
    "seplos_v3": MakeSpec("seplos_v3", 16, 4, 280.0, 200.0, 19200),
    "seplos_v3_300a": MakeSpec("seplos_v3_300a", 16, 4, 280.0, 300.0, 19200),
    # 16S, two pack sensors (TempBat1/2), 115200 8N1 (JK RS485 Modbus V1.0).
    "jk_pb": MakeSpec("jk_pb", 16, 8, 280.0, 200.0, 115200),
    # 16 cells, 4 cell temperatures (0031..0034), 9600 8N1 (PACE Modbus V1.3 section 2).
    "pace": MakeSpec("pace", 16, 4, 100.0, 100.0, 9600),
    # HVS 10.2: 4 modules x 32 cells, 25 A; RTU frames over TCP (port 8080 on a real BMU).
    "byd_hvs": MakeSpec("byd_hvs", 128, 32, 50.0, 25.0, 9600, tcp_framer="rtu"),
}


@cache
def make_plan(name: str) -> RegisterPlan:
    """The agent's read plan of a make's shipped profile (what the simulated unit serves)."""
    profile = load_profile(MAKES[name].profile)
    assert isinstance(profile, FlatProfile)
    return flat_plan(profile)


def served_addresses(plan: RegisterPlan) -> dict[Table, set[int]]:
    """The wire addresses a unit serving ``plan`` answers: every address of every block it reads
    (a byte-addressed block covers the byte range its registers span). Anything else is refused."""
    served: dict[Table, set[int]] = {}
    for block in plan.blocks:
        end = block.address + block.count * block.stride
        served.setdefault(block.table, set()).update(range(block.address, end))
    return served


def _merge(image: SimImage, ref: RegRef, words: list[int]) -> None:
    """OR ``words`` into the image at ``ref``: fields sharing a register (two bytes, flag bits) add up."""
    for address, word in zip(ref.addresses, words, strict=True):
        key = (ref.table, address)
        image[key] = image.get(key, 0) | word


def _member_values(name: str, point: NumericPoint, snap: BatterySnapshot) -> list[float | None]:
    """What each register of a reduce point holds: a cell or a sensor each, None past the last one."""
    series = snap.cell_voltages_v if name.startswith("cell_voltage") else snap.module_temperatures_c
    return [series[i] if i < len(series) else None for i in range(len(point.members))]


def _encode_member(point: NumericPoint, ref: RegRef, value: float | None) -> list[int]:
    if value is None:
        # No cell/sensor here: what the BMS shows for one (the profile's skip value), else 0.
        return encode_raw(ref, min(point.skip_raw, default=0))
    single = NumericPoint(ref, scale=point.scale, offset=point.offset)
    return _encode_saturated(single, value)


def make_image(plan: RegisterPlan, snap: BatterySnapshot) -> SimImage:
    """The register image a unit of ``plan``'s make shows for ``snap``: (table, wire address) ->
    16-bit value, or 0/1 for a coil. Constants of the profile are nobody's register and stay out."""
    values = snap.measurements().model_dump()
    image: SimImage = {}
    for name, point in plan.numeric.items():
        if point.reduce is not None:
            for ref, value in zip(point.members, _member_values(name, point, snap), strict=True):
                words = _encode_member(point, ref, value)
                # A max and a min point share their registers: write each register once.
                if all((ref.table, a) not in image for a in ref.addresses):
                    _merge(image, ref, words)
        elif point.ref is not None:
            _merge(image, point.ref, _encode_saturated(point, float(values[name])))
    location_indices = {
        "cell_voltage_max_location": snap.cell_max_index, "cell_voltage_min_location": snap.cell_min_index,
        "temperature_max_location": snap.temperature_max_module,
        "temperature_min_location": snap.temperature_min_module,
    }
    for name, loc in plan.locations.items():
        for ref in loc.refs:
            _merge(image, ref, encode_raw(ref, location_indices[name]))
    for flags, points in ((snap.alarms, plan.alarms), (snap.warnings, plan.warnings)):
        for name in flags.raised():
            if name in points:
                bit = points[name]
                _merge(image, bit.ref, encode_raw(bit.ref, _lowest_bit(bit.mask)))
    contactor = plan.contactor
    if contactor is not None and snap.contactor_closed:
        # Closed: every switch of the mask on (a MOSFET BMS with both FETs on), or the largest of
        # the values that mean closed.
        raw = contactor.mask if contactor.mask is not None else max(contactor.closed_values)
        _merge(image, contactor.ref, encode_raw(contactor.ref, raw))
    # Addresses a read covers but no field uses read as zero, as on the real map's reserved words.
    for table, addresses in served_addresses(plan).items():
        for address in addresses:
            image.setdefault((table, address), 0)
    return image
