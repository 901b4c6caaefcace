"""The profile file format: a BMS register map written as data.

A profile maps registers to telemetry fields. Two kinds:

* ``flat``: every point names its register table, address, type, scale.
* ``sunspec``: every point names a SunSpec model id and point name; addresses
  and scale factors are found at run time by discovery (``SunS`` marker, model chain).

A user adds a new BMS make by writing one of these files, not Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.config import Frozen

Address = Annotated[int, Field(ge=0, le=65535)]

NUMERIC_FIELDS: tuple[str, ...] = (
    "pack_voltage_v",
    "current_a",
    "soc_pct",
    "soh_pct",
    "cell_voltage_max_v",
    "cell_voltage_min_v",
    "temperature_max_c",
    "temperature_min_c",
    "charge_current_limit_a",
    "discharge_current_limit_a",
    "charge_voltage_limit_v",
    "discharge_voltage_limit_v",
    "capacity_ah",
)
# capacity_ah may instead come from the unit's config.
REQUIRED_NUMERIC_FIELDS: tuple[str, ...] = tuple(f for f in NUMERIC_FIELDS if f != "capacity_ah")
LOCATION_FIELDS: tuple[str, ...] = (
    "cell_voltage_max_location",
    "cell_voltage_min_location",
    "temperature_max_location",
    "temperature_min_location",
)


class RegisterType(StrEnum):
    U16 = "u16"
    S16 = "s16"
    U32 = "u32"
    S32 = "s32"
    F32 = "f32"

    @property
    def words(self) -> int:
        return 1 if self in (RegisterType.U16, RegisterType.S16) else 2


class Table(StrEnum):
    HOLDING = "holding"
    INPUT = "input"


class FlatRegister(Frozen):
    table: Table = Table.HOLDING
    address: Address
    type: RegisterType = RegisterType.U16
    word_order: Literal["big", "little"] = "big"
    # Raw values meaning "not available" (e.g. 0xFFFF); reading one is invalid data.
    invalid_raw: tuple[int, ...] = ()


class SunSpecRegister(Frozen):
    model: Annotated[int, Field(ge=1, le=65534)]
    point: Annotated[str, Field(min_length=1)]
    # Which instance of the model when a device carries several (804 per string).
    instance: Annotated[int, Field(ge=0, le=63)] = 0


class FlatNumeric(FlatRegister):
    scale: float = 1.0
    offset: float = 0.0


class SunSpecNumeric(SunSpecRegister):
    # Applied after the SunSpec scale factor (e.g. to turn kelvin into celsius use offset).
    scale: float = 1.0
    offset: float = 0.0


class Constant(Frozen):
    const: float


class FlatLocation(Frozen):
    format: str
    registers: Annotated[tuple[FlatRegister, ...], Field(min_length=1, max_length=4)]


class SunSpecLocation(Frozen):
    format: str
    registers: Annotated[tuple[SunSpecRegister, ...], Field(min_length=1, max_length=4)]


class FlatBit(FlatRegister):
    bit: Annotated[int, Field(ge=0, le=31)]


class SunSpecBit(SunSpecRegister):
    bit: Annotated[int, Field(ge=0, le=31)]


class FlatContactor(FlatRegister):
    # Either a bit that is set when closed, or the raw values that mean closed.
    bit: Annotated[int, Field(ge=0, le=31)] | None = None
    closed_values: tuple[int, ...] = ()


class SunSpecContactor(SunSpecRegister):
    bit: Annotated[int, Field(ge=0, le=31)] | None = None
    closed_values: tuple[int, ...] = ()


class ProfileHeader(Frozen):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str = ""


def _check_common(
    points: Mapping[str, object],
    locations: Mapping[str, object],
    alarms: Mapping[str, object],
    warnings: Mapping[str, object],
    contactor: object,
) -> None:
    from shared.models import PROTECTION_FLAG_NAMES  # noqa: PLC0415 - keeps the import graph flat

    unknown = sorted(set(points) - set(NUMERIC_FIELDS))
    if unknown:
        raise ValueError(f"unknown point field(s) {unknown}; known: {list(NUMERIC_FIELDS)}")
    missing = sorted(set(REQUIRED_NUMERIC_FIELDS) - set(points))
    if missing:
        raise ValueError(f"missing required point(s) {missing}")
    unknown = sorted(set(locations) - set(LOCATION_FIELDS))
    if unknown:
        raise ValueError(f"unknown location field(s) {unknown}; known: {list(LOCATION_FIELDS)}")
    for section, flags in (("alarms", alarms), ("warnings", warnings)):
        unknown = sorted(set(flags) - set(PROTECTION_FLAG_NAMES))
        if unknown:
            raise ValueError(f"unknown {section} flag(s) {unknown}; known: {list(PROTECTION_FLAG_NAMES)}")
    for where, spec in locations.items():
        fmt = getattr(spec, "format", "")
        regs = getattr(spec, "registers", ())
        if fmt.count("{}") != len(regs):
            raise ValueError(f"locations.{where}: format {fmt!r} needs one '{{}}' per register ({len(regs)})")
        try:
            fmt.format(*([0] * len(regs)))  # registers are shown as integers
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"locations.{where}: format {fmt!r} cannot show integers: {exc}") from exc
    if contactor is not None:
        bit = getattr(contactor, "bit", None)
        closed = getattr(contactor, "closed_values", ())
        if (bit is None) == (not closed):
            raise ValueError("contactor: give exactly one of 'bit' or 'closed_values'")


class FlatProfile(Frozen):
    kind: Literal["flat"]
    profile: ProfileHeader
    points: dict[str, FlatNumeric | Constant]
    locations: dict[str, FlatLocation] = Field(default_factory=dict)
    alarms: dict[str, FlatBit] = Field(default_factory=dict)
    warnings: dict[str, FlatBit] = Field(default_factory=dict)
    contactor: FlatContactor | None = None

    @model_validator(mode="after")
    def _complete(self) -> FlatProfile:
        _check_common(self.points, self.locations, self.alarms, self.warnings, self.contactor)
        return self


class SunSpecProfile(Frozen):
    kind: Literal["sunspec"]
    profile: ProfileHeader
    base_addresses: tuple[Address, ...] = (40000, 0, 50000)
    points: dict[str, SunSpecNumeric | Constant]
    locations: dict[str, SunSpecLocation] = Field(default_factory=dict)
    alarms: dict[str, SunSpecBit] = Field(default_factory=dict)
    warnings: dict[str, SunSpecBit] = Field(default_factory=dict)
    contactor: SunSpecContactor | None = None

    @model_validator(mode="after")
    def _complete(self) -> SunSpecProfile:
        _check_common(self.points, self.locations, self.alarms, self.warnings, self.contactor)
        return self


Profile = Annotated[FlatProfile | SunSpecProfile, Field(discriminator="kind")]
