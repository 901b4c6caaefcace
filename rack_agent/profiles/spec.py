"""The profile file format: a BMS register map written as data.

A profile maps registers to telemetry fields. Two kinds:

* ``flat``: every point names its register table, address, type, scale.

Flat maps of real makes need more than one register per field (see the shipped seplos_v3, jk_pb,
pace and byd_hvs files, whose headers name their sources):

* tables: ``holding`` (FC3), ``input`` (FC4), ``coil`` (FC1) and ``discrete`` (FC2). A flag or
  contactor on a bit table names the first coil of a group as ``address`` and coils from there as
  ``bit`` (coil ``address + bit``), the way vendors list them in bytes of eight (Seplos PIC: "0x1248
  bit 1"). Numbers are never read from bit tables;
* ``bit`` may be a list: the flag is raised (the contactor closed) when any of those bits is set
  (several hard-fault bits make one ``internal_fault``; a MOSFET BMS is connected while either its
  charge or its discharge switch is on);
* ``byte = "high"|"low"``: one byte of a 16-bit register (JK PB keeps SOC in a byte);
* a ``reduce = "max"|"min"`` point: the largest or smallest of ``count`` consecutive registers, for a
  BMS that reports every cell but no extreme; ``skip_raw`` values (an absent cell's 0) are left out;
* ``register_addressing = "byte"``: the map numbers registers by byte offset (JK PB: a 16-bit field
  at 0x1290, the next at 0x1292), so one register read advances the address by 2;
* ``extends = "name"`` (any kind): start from another profile and change only what differs, e.g. a
  board whose current register has another scale (handled by the loader, see ``load_profile``).
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
    COIL = "coil"
    DISCRETE = "discrete"

    @property
    def holds_bits(self) -> bool:
        """Coils and discrete inputs: one bit per address (FC1/FC2), never a number."""
        return self in (Table.COIL, Table.DISCRETE)


BitIndex = Annotated[int, Field(ge=0, le=31)]
# One bit, or several of which any one set counts.
Bits = BitIndex | Annotated[tuple[BitIndex, ...], Field(min_length=1, max_length=32)]


def bit_mask(bits: int | tuple[int, ...]) -> int:
    """The mask of one bit index or of several."""
    return sum(1 << b for b in ({bits} if isinstance(bits, int) else set(bits)))


class FlatRegister(Frozen):
    table: Table = Table.HOLDING
    address: Address
    type: RegisterType = RegisterType.U16
    word_order: Literal["big", "little"] = "big"
    # Raw values meaning "not available" (e.g. 0xFFFF); reading one is invalid data.
    invalid_raw: tuple[int, ...] = ()
    # Only one byte of a u16 register carries the value (the other holds another field).
    byte: Literal["high", "low"] | None = None

    @model_validator(mode="after")
    def _fits_table(self) -> FlatRegister:
        if self.table.holds_bits and (
            self.type is not RegisterType.U16 or self.word_order != "big" or self.invalid_raw or self.byte
        ):
            raise ValueError(f"a {self.table.value} holds single bits: type, word_order, invalid_raw and "
                             "byte do not apply")
        if self.byte is not None and self.type is not RegisterType.U16:
            raise ValueError(f"byte = {self.byte!r} needs type u16 (got {self.type.value})")
        return self


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


class FlatReduce(Frozen):
    """The largest (``max``) or smallest (``min``) of ``count`` consecutive registers of one type:
    for a BMS that reports each cell or sensor but not the extreme. Raw values in ``skip_raw`` (what
    an absent cell reads) are left out; a reading where every register is skipped is invalid data."""

    reduce: Literal["max", "min"]
    table: Literal[Table.HOLDING, Table.INPUT] = Table.HOLDING
    address: Address
    count: Annotated[int, Field(ge=2, le=64)]
    type: RegisterType = RegisterType.U16
    word_order: Literal["big", "little"] = "big"
    skip_raw: tuple[int, ...] = ()
    scale: float = 1.0
    offset: float = 0.0


class FlatBit(FlatRegister):
    bit: Bits


class SunSpecBit(SunSpecRegister):
    bit: Annotated[int, Field(ge=0, le=31)]


class FlatContactor(FlatRegister):
    # Either a bit (or bits, any of which) set when closed, or the raw values that mean closed.
    bit: Bits | None = None
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


def _check_flat(profile: FlatProfile) -> None:
    """What one flat point may not say given its table, its type and the map's addressing."""
    registers: list[tuple[str, FlatRegister | FlatReduce]] = [
        (f"points.{n}", p) for n, p in profile.points.items() if not isinstance(p, Constant)
    ]
    for name, loc in profile.locations.items():
        registers += [(f"locations.{name}", r) for r in loc.registers]
    for where, reg in registers:
        if reg.table.holds_bits:
            raise ValueError(
                f"{where}: a {reg.table.value} holds one bit, not a number; use holding or input"
            )
    bits: list[tuple[str, FlatBit | FlatContactor]] = [
        *((f"alarms.{n}", b) for n, b in profile.alarms.items()),
        *((f"warnings.{n}", b) for n, b in profile.warnings.items()),
    ]
    if profile.contactor is not None:
        bits.append(("contactor", profile.contactor))
    for where, flag in bits:
        registers.append((where, flag))
        if flag.bit is None or flag.table.holds_bits:
            continue
        width = 8 if flag.byte else 16 * flag.type.words
        if bit_mask(flag.bit) >> width:
            raise ValueError(f"{where}: bit {flag.bit} is beyond the {width} bits of the register")
    if profile.register_addressing == "byte":
        odd = sorted({w for w, r in registers if not r.table.holds_bits and r.address % 2})
        if odd:
            raise ValueError(f"register_addressing = 'byte' numbers 16-bit registers by even byte "
                             f"offsets; odd address at {odd}")


class FlatProfile(Frozen):
    kind: Literal["flat"]
    profile: ProfileHeader
    # "byte": the map numbers its registers by byte offset (JK PB), so a read of N registers
    # covers addresses a, a+2, ..., a+2(N-1). Coils are numbered one per bit either way.
    register_addressing: Literal["word", "byte"] = "word"
    points: dict[str, FlatNumeric | FlatReduce | Constant]
    locations: dict[str, FlatLocation] = Field(default_factory=dict)
    alarms: dict[str, FlatBit] = Field(default_factory=dict)
    warnings: dict[str, FlatBit] = Field(default_factory=dict)
    contactor: FlatContactor | None = None

    @model_validator(mode="after")
    def _complete(self) -> FlatProfile:
        _check_common(self.points, self.locations, self.alarms, self.warnings, self.contactor)
        _check_flat(self)
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


# Kinds defined in modules of their own (they build on ProfileHeader above, hence imported here).
from rack_agent.profiles.pylontech import PylontechProfile  # noqa: E402

Profile = Annotated[FlatProfile | SunSpecProfile | PylontechProfile, Field(discriminator="kind")]
