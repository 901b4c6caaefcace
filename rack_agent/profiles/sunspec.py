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

from rack_agent.errors import InvalidDataError, ProfileError
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


async def discover(read: ReadHolding, base_addresses: tuple[int, ...]) -> SunSpecLayout:
    """Find the SunS marker and walk the model chain. Read errors propagate unchanged."""
    base: int | None = None
    for candidate in base_addresses:
        try:
            regs = await read(candidate, 2)
        except InvalidDataError:
            continue
        if tuple(regs[:2]) == SUNS_MARKER:
            base = candidate
            break
    if base is None:
        raise InvalidDataError(f"no SunS marker at any of {list(base_addresses)}")
    models: dict[tuple[int, int], int] = {}
    lengths: dict[tuple[int, int], int] = {}
    addr = base + 2
    for _ in range(MAX_MODELS):
        model_id, length = await read(addr, 2)
        if model_id == END_MODEL_ID:
            return SunSpecLayout(base, models, lengths)
        instance = sum(1 for (mid, _i) in models if mid == model_id)
        models[(model_id, instance)] = addr
        lengths[(model_id, instance)] = length
        addr += 2 + length
        if addr > 0xFFFF:
            break
    raise InvalidDataError(f"SunSpec model chain from {base} has no end marker within {MAX_MODELS} models")


def _resolve(reg: SunSpecRegister, layout: SunSpecLayout, where: str) -> tuple[RegRef, PointDef]:
    key = (reg.model, reg.instance)
    if key not in layout.models:
        present = sorted(f"{m}#{i}" for m, i in layout.models)
        raise ProfileError(
            where, [f"model {reg.model} instance {reg.instance} not on device (found {present})"]
        )
    points = model_points(reg.model)
    if reg.point not in points:
        raise ProfileError(where, [f"model {reg.model} has no fixed point {reg.point!r}"])
    pdef = points[reg.point]
    if pdef.offset + pdef.size > layout.lengths[key] + 2:
        raise ProfileError(where, [f"point {reg.point} lies beyond the device's model {reg.model} length"])
    if pdef.sunspec_type not in _TYPES:
        raise ProfileError(where, [f"point {reg.point} has unsupported type {pdef.sunspec_type}"])
    rtype, invalid = _TYPES[pdef.sunspec_type]
    return RegRef(Table.HOLDING, layout.models[key] + pdef.offset, rtype, "big", invalid), pdef


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
    alarms = {n: BitPoint(_resolve(b, layout, f"alarms.{n}")[0], b.bit) for n, b in profile.alarms.items()}
    warnings = {
        n: BitPoint(_resolve(b, layout, f"warnings.{n}")[0], b.bit) for n, b in profile.warnings.items()
    }
    contactor = None
    if profile.contactor is not None:
        c = profile.contactor
        contactor = ContactorPoint(_resolve(c, layout, "contactor")[0], c.bit, frozenset(c.closed_values))
    return with_blocks(
        RegisterPlan(profile.profile.name, numeric, locations, alarms, warnings, contactor)
    )
