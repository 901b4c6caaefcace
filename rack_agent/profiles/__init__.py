"""BMS register-map profiles: files that describe a BMS, and their resolution into read plans."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rack_agent.errors import ProfileError
from rack_agent.profiles.plan import (
    BitPoint,
    ContactorPoint,
    LocationPoint,
    NumericPoint,
    RegisterPlan,
    RegRef,
    with_blocks,
)
from rack_agent.profiles.pylontech import PylontechProfile
from rack_agent.profiles.spec import (
    Constant,
    FlatBit,
    FlatContactor,
    FlatNumeric,
    FlatProfile,
    FlatReduce,
    FlatRegister,
    Profile,
    SunSpecProfile,
    bit_mask,
)
from shared.config import format_validation_error, load_toml

_PROFILE_ADAPTER: TypeAdapter[FlatProfile | SunSpecProfile | PylontechProfile] = TypeAdapter(Profile)


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with bmslink."""
    folder = resources.files("rack_agent") / "profiles"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def profile_path(name_or_path: str) -> Path:
    """A shipped profile by name, or a file path."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        candidate = resources.files("rack_agent") / "profiles" / f"{name_or_path}.toml"
        if candidate.is_file():
            return Path(str(candidate))
        raise ProfileError(name_or_path, [f"no shipped profile of that name; shipped: {shipped_profiles()}"])
    return Path(name_or_path)


def load_profile(name_or_path: str) -> FlatProfile | SunSpecProfile | PylontechProfile:
    """Load and validate a profile; any defect raises :class:`ProfileError` naming the key."""
    path = profile_path(name_or_path)
    try:
        data = load_toml(path)
    except Exception as exc:  # ConfigError from the TOML loader, re-typed for profiles
        raise ProfileError(str(path), [str(exc).splitlines()[-1].strip(" -")]) from exc
    data = _with_base(data, path, ())
    try:
        profile = _PROFILE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ProfileError(str(path), format_validation_error(exc)) from exc
    if isinstance(profile, SunSpecProfile):
        # Points the SunSpec models do not have are the file's mistake, known before any device
        # answers: refuse them here so that discovery only ever judges the device.
        from rack_agent.profiles.sunspec import check_profile  # noqa: PLC0415 - loads pysunspec2

        problems = check_profile(profile)
        if problems:
            raise ProfileError(str(path), problems)
    return profile


# A profile that extends another extends at most this many levels (a chain is a mistake past that).
MAX_EXTENDS_DEPTH = 4


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it: tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _with_base(data: dict[str, Any], path: Path, chain: tuple[str, ...]) -> dict[str, Any]:
    """A profile's table with its ``extends`` resolved: the named profile, with this file's keys over it.

    ``extends`` names a shipped profile or a path (relative paths are taken from this file's folder).
    A variant differs from its base by a few keys, e.g. the current scale of a larger board.
    """
    base_name = data.get("extends")
    if base_name is None:
        return data
    if not isinstance(base_name, str) or not base_name:
        raise ProfileError(str(path), ["extends: must be a profile name or a path to a TOML file"])
    written = base_name
    is_path = "/" in base_name or base_name.endswith(".toml")
    if is_path and not Path(base_name).is_absolute():
        base_name = str(path.parent / base_name)
    base_path = profile_path(base_name)
    where = [*chain, str(path.resolve())]
    if str(base_path.resolve()) in where or len(where) > MAX_EXTENDS_DEPTH:
        chain_text = " -> ".join([*where, str(base_path)])
        raise ProfileError(str(path), [f"extends: a chain that does not end: {chain_text}"])
    try:
        base = load_toml(base_path)
    except Exception as exc:  # ConfigError from the TOML loader, re-typed for profiles
        reason = str(exc).splitlines()[-1].strip(" -")
        raise ProfileError(str(path), [f"extends {written!r}: {reason}"]) from exc
    changes = {k: v for k, v in data.items() if k != "extends"}
    return _merged(_with_base(base, base_path, tuple(where)), changes)


def _ref(reg: FlatRegister, stride: int) -> RegRef:
    return RegRef(reg.table, reg.address, reg.type, reg.word_order, frozenset(reg.invalid_raw), stride,
                  reg.byte)


def _bit_ref(reg: FlatBit | FlatContactor, stride: int) -> tuple[RegRef, int | None]:
    """The ref a flag or contactor reads, and the mask of its bits (None: compared by value)."""
    mask = None if reg.bit is None else bit_mask(reg.bit)
    if reg.table.holds_bits:
        # Coils address + 0 .. address + highest bit, read as one number (the first coil is bit 0).
        width = 1 if mask is None else mask.bit_length()
        return RegRef(reg.table, reg.address, reg.type, bits=width), mask
    return _ref(reg, stride), mask


def _flag(bit: FlatBit, stride: int) -> BitPoint:
    ref, mask = _bit_ref(bit, stride)
    assert mask is not None  # a flag always names its bits
    return BitPoint(ref, mask)


def _numeric(spec: FlatNumeric | FlatReduce | Constant, stride: int) -> NumericPoint:
    if isinstance(spec, Constant):
        return NumericPoint(None, const=spec.const)
    if isinstance(spec, FlatReduce):
        step = spec.type.words * stride
        members = tuple(
            RegRef(spec.table, spec.address + i * step, spec.type, spec.word_order, stride=stride)
            for i in range(spec.count)
        )
        return NumericPoint(None, scale=spec.scale, offset=spec.offset, reduce=spec.reduce, members=members,
                            skip_raw=frozenset(spec.skip_raw))
    return NumericPoint(_ref(spec, stride), scale=spec.scale, offset=spec.offset)


def flat_plan(profile: FlatProfile) -> RegisterPlan:
    """The read plan of a flat profile (addresses are all in the file)."""
    stride = 2 if profile.register_addressing == "byte" else 1
    numeric = {name: _numeric(spec, stride) for name, spec in profile.points.items()}
    locations = {
        name: LocationPoint(loc.format, tuple(_ref(r, stride) for r in loc.registers))
        for name, loc in profile.locations.items()
    }
    alarms = {name: _flag(b, stride) for name, b in profile.alarms.items()}
    warnings = {name: _flag(b, stride) for name, b in profile.warnings.items()}
    contactor = None
    if profile.contactor is not None:
        c = profile.contactor
        contactor = ContactorPoint(*_bit_ref(c, stride), frozenset(c.closed_values))
    return with_blocks(RegisterPlan(profile.profile.name, numeric, locations, alarms, warnings, contactor))


__all__ = [
    "FlatProfile",
    "ProfileError",
    "RegisterPlan",
    "SunSpecProfile",
    "flat_plan",
    "load_profile",
    "profile_path",
    "shipped_profiles",
]
