"""BMS register-map profiles: files that describe a BMS, and their resolution into read plans."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
from rack_agent.profiles.spec import Constant, FlatProfile, FlatRegister, Profile, SunSpecProfile
from shared.config import format_validation_error, load_toml

_PROFILE_ADAPTER: TypeAdapter[FlatProfile | SunSpecProfile] = TypeAdapter(Profile)


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


def load_profile(name_or_path: str) -> FlatProfile | SunSpecProfile:
    """Load and validate a profile; any defect raises :class:`ProfileError` naming the key."""
    path = profile_path(name_or_path)
    try:
        data = load_toml(path)
    except Exception as exc:  # ConfigError from the TOML loader, re-typed for profiles
        raise ProfileError(str(path), [str(exc).splitlines()[-1].strip(" -")]) from exc
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


def _ref(reg: FlatRegister) -> RegRef:
    return RegRef(reg.table, reg.address, reg.type, reg.word_order, frozenset(reg.invalid_raw))


def flat_plan(profile: FlatProfile) -> RegisterPlan:
    """The read plan of a flat profile (addresses are all in the file)."""
    numeric = {
        name: NumericPoint(None, const=spec.const)
        if isinstance(spec, Constant)
        else NumericPoint(_ref(spec), scale=spec.scale, offset=spec.offset)
        for name, spec in profile.points.items()
    }
    locations = {
        name: LocationPoint(loc.format, tuple(_ref(r) for r in loc.registers))
        for name, loc in profile.locations.items()
    }
    alarms = {name: BitPoint(_ref(b), b.bit) for name, b in profile.alarms.items()}
    warnings = {name: BitPoint(_ref(b), b.bit) for name, b in profile.warnings.items()}
    contactor = None
    if profile.contactor is not None:
        c = profile.contactor
        contactor = ContactorPoint(_ref(c), c.bit, frozenset(c.closed_values))
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
