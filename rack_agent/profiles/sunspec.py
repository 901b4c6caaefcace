"""SunSpec discovery and resolution of a sunspec profile into a register plan.

Discovery (SunSpec Information Model spec, as implemented by pysunspec2's scan):
read 2 registers at each base address (40000, 0, 50000 by default) until one
holds ``SunS``; the model chain follows as [ID, L, body(L)] headers and ends at
ID 0xFFFF. Model definitions (point offsets, types, scale-factor names) come
from pysunspec2's shipped JSON; we only use it for the definitions, because
its client is blocking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from rack_agent.errors import DeviceLayoutError, InvalidDataError, ModbusExceptionError, ProfileError
from rack_agent.profiles.plan import (
    BitPoint,
    ContactorPoint,
    LocationPoint,
    NumericPoint,
    RegisterPlan,
    RegRef,
    with_blocks,
)
from rack_agent.profiles.spec import (
    Constant,
    RegisterType,
    SunSpecProfile,
    SunSpecRegister,
    Table,
)

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = 0xFFFF
MAX_MODELS = 64  # a real device has a handful; more means we are walking garbage
HEADER_REGISTERS = 2  # [ID, L] before each model's body; L counts the body only
REGISTER_SPACE = 0x10000  # Modbus addresses 0..65535
ILLEGAL_DATA_ADDRESS = 0x02  # Modbus exception code: no register at that address

# SunSpec type -> (our register type, not-implemented marker(s))
_TYPES: dict[str, tuple[RegisterType, frozenset[int]]] = {
    "uint16": (RegisterType.U16, frozenset({0xFFFF})),
    "enum16": (RegisterType.U16, frozenset({0xFFFF})),
    "bitfield16": (RegisterType.U16, frozenset({0xFFFF})),
    "int16": (RegisterType.S16, frozenset({-0x8000})),
    "sunssf": (RegisterType.S16, frozenset({-0x8000})),
    "uint32": (RegisterType.U32, frozenset({0xFFFFFFFF})),
    "enum32": (RegisterType.U32, frozenset({0xFFFFFFFF})),
    "bitfield32": (RegisterType.U32, frozenset({0xFFFFFFFF})),
    "int32": (RegisterType.S32, frozenset({-0x80000000})),
    "acc16": (RegisterType.U16, frozenset()),
    "acc32": (RegisterType.U32, frozenset()),
    "float32": (RegisterType.F32, frozenset()),
}

ReadHolding = Callable[[int, int], Awaitable[list[int]]]


@dataclass(frozen=True, slots=True)
class PointDef:
    offset: int
    sunspec_type: str
    size: int
    sf: str | None


@cache
def model_points(model_id: int) -> dict[str, PointDef]:
    """Fixed-part points of a SunSpec model, by name, with offsets from the model's ID register."""
    from sunspec2 import device  # noqa: PLC0415 - heavy import, only needed for sunspec profiles

    try:
        definition: dict[str, Any] = device.get_model_def(model_id)
    except Exception as exc:
        raise ProfileError(f"sunspec model {model_id}", [f"no definition available: {exc}"]) from exc
    points: dict[str, PointDef] = {}
    offset = 0
    for point in definition["group"]["points"]:
        size = int(point.get("size", 1))
        points[point["name"]] = PointDef(offset, point["type"], size, point.get("sf"))
        offset += size
    return points


@dataclass(frozen=True, slots=True)
class SunSpecLayout:
    """Where each model instance starts: (model id, instance index) -> address of its ID register."""

    base_address: int
    models: dict[tuple[int, int], int]
    lengths: dict[tuple[int, int], int]


def _models_found(models: dict[tuple[int, int], int]) -> list[str]:
    return [f"{m}#{i}" if i else f"{m}" for m, i in models]


async def _read_base(read: ReadHolding, candidate: int) -> list[int] | None:
    """The first registers at a candidate base, or None where the device has nothing to show."""
    try:
        return await read(candidate, 2)
    except InvalidDataError:
        return None
    except ModbusExceptionError as exc:
        # A device answers "illegal data address" where it maps no registers: try the next base,
        # as pysunspec2's scan does. Any other exception (busy, device failure) is the device's
        # state, not its layout, and is reported as what it is.
        if exc.code == ILLEGAL_DATA_ADDRESS:
            return None
        raise


async def discover(read: ReadHolding, base_addresses: tuple[int, ...]) -> SunSpecLayout:
    """Find the SunS marker and walk the model chain.

    A layout that cannot be used (no marker, a chain without an end marker, a chain that runs off
    the device's registers) raises :class:`DeviceLayoutError`; read errors propagate unchanged.
    """
    base: int | None = None
    for candidate in base_addresses:
        regs = await _read_base(read, candidate)
        if regs is not None and tuple(regs[:2]) == SUNS_MARKER:
            base = candidate
            break
    if base is None:
        raise DeviceLayoutError(f"no SunS marker at any of {list(base_addresses)}")
    models: dict[tuple[int, int], int] = {}
    lengths: dict[tuple[int, int], int] = {}
    addr = base + 2
    for _ in range(MAX_MODELS + 1):
        if addr + HEADER_REGISTERS > REGISTER_SPACE:
            raise DeviceLayoutError(
                f"SunSpec model chain from {base} runs past register {REGISTER_SPACE - 1} "
                f"without an end marker (models {_models_found(models)})"
            )
        try:
            model_id, length = await read(addr, HEADER_REGISTERS)
        except ModbusExceptionError as exc:
            if exc.code != ILLEGAL_DATA_ADDRESS:
                raise
            raise DeviceLayoutError(
                f"SunSpec model chain from {base} runs off the device's registers at {addr} "
                f"without an end marker (models {_models_found(models)})"
            ) from exc
        if model_id == END_MODEL_ID:
            return SunSpecLayout(base, models, lengths)
        if model_id == 0:
            # No SunSpec model has id 0: this is blank memory after a chain that lost its end marker.
            raise DeviceLayoutError(
                f"SunSpec model chain from {base} has model id 0 at {addr} "
                f"(no end marker after models {_models_found(models)})"
            )
        if len(models) == MAX_MODELS:
            break
        instance = sum(1 for (mid, _i) in models if mid == model_id)
        models[(model_id, instance)] = addr
        lengths[(model_id, instance)] = length
        addr += HEADER_REGISTERS + length
    raise DeviceLayoutError(
        f"SunSpec model chain from {base} has no end marker within {MAX_MODELS} models"
    )


def _resolve(reg: SunSpecRegister, layout: SunSpecLayout, where: str) -> tuple[RegRef, PointDef]:
    """Where a profile point lies on this device; :class:`DeviceLayoutError` if it does not."""
    key = (reg.model, reg.instance)
    pdef = _point_def(reg, where)
    if key not in layout.models:
        raise DeviceLayoutError(
            f"{where}: model {reg.model} instance {reg.instance} not on the device "
            f"(models {_models_found(layout.models)})"
        )
    needed = pdef.offset + pdef.size - HEADER_REGISTERS
    if needed > layout.lengths[key]:
        raise DeviceLayoutError(
            f"{where}: model {reg.model} on the device is shorter than the profile needs "
            f"(L={layout.lengths[key]}; point {reg.point} needs L>={needed})"
        )
    rtype, invalid = _TYPES[pdef.sunspec_type]
    return RegRef(Table.HOLDING, layout.models[key] + pdef.offset, rtype, "big", invalid), pdef


def _point_def(reg: SunSpecRegister, where: str) -> PointDef:
    """The definition of a profile point; :class:`ProfileError` for a point the model lacks."""
    points = model_points(reg.model)
    if reg.point not in points:
        raise ProfileError(where, [f"model {reg.model} has no fixed point {reg.point!r}"])
    pdef = points[reg.point]
    if pdef.sunspec_type not in _TYPES:
        raise ProfileError(where, [f"point {reg.point} has unsupported type {pdef.sunspec_type}"])
    return pdef


def check_profile(profile: SunSpecProfile) -> list[str]:
    """Problems of a sunspec profile that no device can fix (unknown models, points, types).

    Run when the profile is loaded, so that such a mistake stops the agent at start-up with the key
    that is wrong; what remains for discovery is what the device itself says.
    """
    problems: list[str] = []
    registers: list[tuple[str, SunSpecRegister]] = []
    for name, spec in profile.points.items():
        if isinstance(spec, Constant):
            continue
        registers.append((f"points.{name}", spec))
    for name, loc in profile.locations.items():
        registers.extend((f"locations.{name}", r) for r in loc.registers)
    registers.extend((f"alarms.{n}", b) for n, b in profile.alarms.items())
    registers.extend((f"warnings.{n}", b) for n, b in profile.warnings.items())
    if profile.contactor is not None:
        registers.append(("contactor", profile.contactor))
    for where, reg in registers:
        try:
            pdef = _point_def(reg, where)
            if pdef.sf is not None and where.startswith("points."):
                _point_def(SunSpecRegister(model=reg.model, point=pdef.sf, instance=reg.instance),
                           f"{where} scale factor")
        except ProfileError as exc:
            problems.extend(f"{exc.source}: {p}" for p in exc.problems)
    return problems


def sunspec_plan(profile: SunSpecProfile, layout: SunSpecLayout) -> RegisterPlan:
    """Resolve a sunspec profile against a discovered device layout."""
    numeric: dict[str, NumericPoint] = {}
    for name, spec in profile.points.items():
        if isinstance(spec, Constant):
            numeric[name] = NumericPoint(None, const=spec.const)
            continue
        ref, pdef = _resolve(spec, layout, f"points.{name}")
        sf_ref = None
        if pdef.sf is not None:
            sf_ref, _ = _resolve(SunSpecRegister(model=spec.model, point=pdef.sf, instance=spec.instance),
                                 layout, f"points.{name} scale factor")
        numeric[name] = NumericPoint(ref, scale=spec.scale, offset=spec.offset, sf_ref=sf_ref)
    locations = {
        name: LocationPoint(
            loc.format, tuple(_resolve(r, layout, f"locations.{name}")[0] for r in loc.registers)
        )
        for name, loc in profile.locations.items()
    }
    alarms = {
        n: BitPoint(_resolve(b, layout, f"alarms.{n}")[0], 1 << b.bit) for n, b in profile.alarms.items()
    }
    warnings = {
        n: BitPoint(_resolve(b, layout, f"warnings.{n}")[0], 1 << b.bit) for n, b in profile.warnings.items()
    }
    contactor = None
    if profile.contactor is not None:
        c = profile.contactor
        mask = None if c.bit is None else 1 << c.bit
        contactor = ContactorPoint(_resolve(c, layout, "contactor")[0], mask, frozenset(c.closed_values))
    return with_blocks(
        RegisterPlan(profile.profile.name, numeric, locations, alarms, warnings, contactor)
    )
