"""A resolved register plan: which blocks to read, and how to turn registers into telemetry.

Both profile kinds resolve to the same :class:`RegisterPlan`; decoding is one
pure function of (plan, register image). The simulator uses the inverse
(:func:`encode_numeric`) so the two sides share one definition of each type.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rack_agent.errors import InvalidDataError
from rack_agent.plausibility import PlausibilityRules, validated_measurements
from rack_agent.profiles.spec import RegisterType, Table
from shared.models import ContactorState, ProtectionFlags, RackMeasurements

MAX_REGISTERS_PER_READ = 125  # Modbus FC3/FC4 limit (pymodbus raises ValueError above it)
MAX_GAP_REGISTERS = 16  # reading a few unused registers is cheaper than another round trip
MAX_BITS_PER_READ = 2000  # Modbus FC1/FC2 limit (application protocol V1.1b3, 6.1/6.2)
# Unused coils cost an eighth of a byte each; a gap this wide still fits in a few answer bytes.
MAX_GAP_BITS = 64
REGISTER_MAX = 0xFFFF
BYTE_MAX = 0xFF

RegisterImage = Mapping[tuple[Table, int], int]


@dataclass(frozen=True, slots=True)
class RegRef:
    table: Table
    address: int
    type: RegisterType
    word_order: str = "big"
    invalid_raw: frozenset[int] = frozenset()
    # Wire addresses per 16-bit register: 2 for a byte-addressed map (JK PB), else 1.
    stride: int = 1
    # "high"/"low": the value is one byte of the (u16) register.
    byte: str | None = None
    # Coil/discrete refs: how many coils from ``address`` make the value (the first is bit 0).
    bits: int = 0

    @property
    def addresses(self) -> range:
        if self.table.holds_bits:
            return range(self.address, self.address + self.bits)
        return range(self.address, self.address + self.type.words * self.stride, self.stride)


@dataclass(frozen=True, slots=True)
class NumericPoint:
    ref: RegRef | None
    scale: float = 1.0
    offset: float = 0.0
    const: float | None = None
    # A SunSpec scale-factor register: value = raw × 10^sf × scale + offset.
    sf_ref: RegRef | None = None
    # "max"/"min": the value is the extreme of ``members`` (ref is None), ``skip_raw`` left out.
    reduce: str | None = None
    members: tuple[RegRef, ...] = ()
    skip_raw: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class LocationPoint:
    format: str
    refs: tuple[RegRef, ...]


@dataclass(frozen=True, slots=True)
class BitPoint:
    """A flag: raised when any bit of ``mask`` is set in the value of ``ref``."""

    ref: RegRef
    mask: int


@dataclass(frozen=True, slots=True)
class ContactorPoint:
    """Closed when any bit of ``mask`` is set, or (``mask`` None) when the value is in ``closed_values``."""

    ref: RegRef
    mask: int | None
    closed_values: frozenset[int]


@dataclass(frozen=True, slots=True)
class Block:
    """One read: ``count`` registers (or coils) from ``address``, ``stride`` wire addresses apart."""

    table: Table
    address: int
    count: int
    stride: int = 1


@dataclass(frozen=True, slots=True)
class RegisterPlan:
    name: str
    numeric: Mapping[str, NumericPoint]
    locations: Mapping[str, LocationPoint] = field(default_factory=dict)
    alarms: Mapping[str, BitPoint] = field(default_factory=dict)
    warnings: Mapping[str, BitPoint] = field(default_factory=dict)
    contactor: ContactorPoint | None = None
    blocks: tuple[Block, ...] = ()

    def refs(self) -> Iterable[RegRef]:
        for point in self.numeric.values():
            if point.ref is not None:
                yield point.ref
            if point.sf_ref is not None:
                yield point.sf_ref
            yield from point.members
        for loc in self.locations.values():
            yield from loc.refs
        for bit in (*self.alarms.values(), *self.warnings.values()):
            yield bit.ref
        if self.contactor is not None:
            yield self.contactor.ref


def plan_blocks(refs: Iterable[RegRef]) -> tuple[Block, ...]:
    """Group the registers into as few reads as the per-read limits allow (125 registers, 2000 coils)."""
    by_table: dict[tuple[Table, int], set[int]] = {}
    for ref in refs:
        stride = 1 if ref.table.holds_bits else ref.stride
        by_table.setdefault((ref.table, stride), set()).update(ref.addresses)
    blocks: list[Block] = []
    for table, stride in sorted(by_table):
        if table.holds_bits:
            most, widest = MAX_BITS_PER_READ, MAX_GAP_BITS
        else:
            most, widest = MAX_REGISTERS_PER_READ, MAX_GAP_REGISTERS
        addresses = sorted(by_table[(table, stride)])
        start = prev = addresses[0]
        for addr in addresses[1:]:
            if (addr - prev) // stride > widest or (addr - start) // stride + 1 > most:
                blocks.append(Block(table, start, (prev - start) // stride + 1, stride))
                start = addr
            prev = addr
        blocks.append(Block(table, start, (prev - start) // stride + 1, stride))
    return tuple(blocks)


def with_blocks(plan: RegisterPlan) -> RegisterPlan:
    return RegisterPlan(
        name=plan.name,
        numeric=plan.numeric,
        locations=plan.locations,
        alarms=plan.alarms,
        warnings=plan.warnings,
        contactor=plan.contactor,
        blocks=plan_blocks(plan.refs()),
    )


def image_from_blocks(blocks: Iterable[tuple[Block, list[int]]]) -> dict[tuple[Table, int], int]:
    image: dict[tuple[Table, int], int] = {}
    for block, registers in blocks:
        if len(registers) != block.count:
            raise InvalidDataError(
                f"read of {block.count} registers at {block.address} returned {len(registers)}"
            )
        for i, value in enumerate(registers):
            image[(block.table, block.address + i * block.stride)] = value
    return image


def read_raw(ref: RegRef, image: RegisterImage) -> int | float:
    """The raw value of one register reference (an int, or a float for f32)."""
    try:
        words = [image[(ref.table, a)] for a in ref.addresses]
    except KeyError as exc:
        raise InvalidDataError(f"register {ref.table.value}:{exc.args[0][1]} was not read") from exc
    if ref.table.holds_bits:
        return _coils(ref, words)
    for word in words:
        # A register holds 16 bits; anything else is not what a Modbus device can have said.
        if not 0 <= word <= REGISTER_MAX:
            raise InvalidDataError(f"register {ref.table.value}:{ref.address} holds {word!r}, not 16 bits")
    if ref.word_order == "little":
        words.reverse()
    if ref.byte is not None:
        raw: int | float = words[0] >> 8 if ref.byte == "high" else words[0] & BYTE_MAX
    elif ref.type is RegisterType.U16:
        raw = words[0]
    elif ref.type is RegisterType.S16:
        raw = words[0] - 0x10000 if words[0] & 0x8000 else words[0]
    else:
        combined = (words[0] << 16) | words[1]
        if ref.type is RegisterType.U32:
            raw = combined
        elif ref.type is RegisterType.S32:
            raw = combined - 0x1_0000_0000 if combined & 0x8000_0000 else combined
        else:
            raw = struct.unpack(">f", combined.to_bytes(4, "big"))[0]
    if isinstance(raw, int) and raw in ref.invalid_raw:
        raise InvalidDataError(
            f"register {ref.table.value}:{ref.address} holds the not-available marker {raw:#x}"
        )
    return raw


def _coils(ref: RegRef, bits: list[int]) -> int:
    """Consecutive coils as one number, the first coil as bit 0 (how vendors group them in bytes)."""
    value = 0
    for i, bit in enumerate(bits):
        if bit not in (0, 1):
            raise InvalidDataError(f"{ref.table.value} {ref.address + i} holds {bit!r}, not a bit")
        value |= bit << i
    return value


def _integer(ref: RegRef, raw: int | float) -> int:
    """``raw`` as an integer (bits, contactor values, locations): an f32 NaN or infinity is invalid data."""
    if isinstance(raw, int):
        return raw
    if not math.isfinite(raw):
        raise InvalidDataError(f"register {ref.table.value}:{ref.address} holds {raw!r}, not a number")
    return int(raw)


def decode_numeric(name: str, point: NumericPoint, image: RegisterImage) -> float:
    if point.const is not None:
        return point.const
    if point.reduce is not None:
        return _reduced(name, point, image)
    assert point.ref is not None  # guaranteed by construction: const, reduce or ref
    raw = read_raw(point.ref, image)
    value = float(raw)
    if point.sf_ref is not None:
        # sunssf: int16, "not implemented" is 0x8000 (refused by read_raw as the marker); SunSpec
        # allows -10..10, and anything beyond is a device writing garbage where a scale belongs.
        sf = read_raw(point.sf_ref, image)
        if not isinstance(sf, int) or not -10 <= sf <= 10:
            raise InvalidDataError(f"{name}: scale factor {sf!r} out of range -10..10")
        value *= 10.0**sf
    value = value * point.scale + point.offset
    if not math.isfinite(value):
        raise InvalidDataError(f"{name}: not a finite number ({value!r})")
    return value


def _reduced(name: str, point: NumericPoint, image: RegisterImage) -> float:
    """The extreme of a point's member registers, each scaled, ``skip_raw`` values left out."""
    values = [
        raw * point.scale + point.offset
        for raw in (read_raw(ref, image) for ref in point.members)
        if not (isinstance(raw, int) and raw in point.skip_raw)
    ]
    if not values:
        raise InvalidDataError(f"{name}: all {len(point.members)} registers hold a skipped value")
    value = max(values) if point.reduce == "max" else min(values)
    if not math.isfinite(value):
        raise InvalidDataError(f"{name}: not a finite number ({value!r})")
    return float(value)


def decode_location(name: str, point: LocationPoint, image: RegisterImage) -> str:
    numbers = [_integer(ref, read_raw(ref, image)) for ref in point.refs]
    try:
        # The format was tried with zeros when the profile was loaded; should a value still be
        # refused, that is this reading's problem, not a reason to stop polling.
        text = point.format.format(*numbers)
    except (ValueError, OverflowError, IndexError, KeyError) as exc:
        raise InvalidDataError(f"{name}: {point.format!r} cannot show {numbers}: {exc}") from exc
    return text


def _optional_location(name: str, point: LocationPoint, image: RegisterImage) -> str:
    """The location, or "" when the device does not give it: where the highest cell sits is context
    for an operator, never a reason to lose a reading's limits. SunSpec marks these points optional,
    and devices leave them "not implemented"."""
    try:
        return decode_location(name, point, image)
    except InvalidDataError:
        return ""


def decode_bit(point: BitPoint, image: RegisterImage) -> bool:
    raw = _integer(point.ref, read_raw(point.ref, image))
    return bool(raw & point.mask)


def decode_measurements(
    plan: RegisterPlan,
    image: RegisterImage,
    *,
    capacity_ah: float | None = None,
    invert_current: bool = False,
    rules: PlausibilityRules | None = None,
) -> RackMeasurements:
    """Turn a register image into validated measurements, or raise :class:`InvalidDataError`
    (:class:`ImplausibleReadingError` when the values were read but are impossible alone or, under
    ``rules``, together; without rules only the contract's own bounds apply)."""
    values: dict[str, object] = {
        name: decode_numeric(name, point, image) for name, point in plan.numeric.items()
    }
    if "capacity_ah" not in values:
        if capacity_ah is None:
            raise InvalidDataError("profile has no capacity_ah point and the unit config gives none")
        values["capacity_ah"] = capacity_ah
    if invert_current:
        values["current_a"] = -float(values["current_a"])  # type: ignore[arg-type]
    for name, loc in plan.locations.items():
        values[name] = _optional_location(name, loc, image)
    values["alarms"] = ProtectionFlags(**{name: decode_bit(p, image) for name, p in plan.alarms.items()})
    values["warnings"] = ProtectionFlags(**{name: decode_bit(p, image) for name, p in plan.warnings.items()})
    if plan.contactor is not None:
        c = plan.contactor
        raw = _integer(c.ref, read_raw(c.ref, image))
        closed = bool(raw & c.mask) if c.mask is not None else raw in c.closed_values
        values["contactor"] = ContactorState.CLOSED if closed else ContactorState.OPEN
    return validated_measurements(values, rules)


def encode_raw(ref: RegRef, raw: int | float) -> list[int]:
    """Registers holding ``raw`` for ``ref`` (inverse of :func:`read_raw`).

    A byte ref gives its register with the other byte zero (the caller ORs the two fields); a coil
    ref gives one 0/1 per coil."""
    if ref.table.holds_bits:
        value = int(raw)
        if not 0 <= value < 1 << ref.bits:
            raise ValueError(f"{value} does not fit {ref.bits} coils")
        return [(value >> i) & 1 for i in range(ref.bits)]
    if ref.byte is not None:
        value = int(raw)
        if not 0 <= value <= BYTE_MAX:
            raise ValueError(f"{value} does not fit a byte")
        return [value << 8 if ref.byte == "high" else value]
    if ref.type is RegisterType.F32:
        combined = int.from_bytes(struct.pack(">f", float(raw)), "big")
    else:
        value = int(raw)
        bits = 16 * ref.type.words
        lo = -(1 << (bits - 1)) if ref.type in (RegisterType.S16, RegisterType.S32) else 0
        hi = (1 << (bits - 1)) - 1 if lo else (1 << bits) - 1
        if not lo <= value <= hi:
            raise ValueError(f"{value} does not fit {ref.type.value}")
        combined = value & ((1 << bits) - 1)
    if ref.type.words == 1:
        return [combined]
    words = [(combined >> 16) & 0xFFFF, combined & 0xFFFF]
    if ref.word_order == "little":
        words.reverse()
    return words


def encode_numeric(point: NumericPoint, value: float, sf: int = 0) -> list[int]:
    """Registers carrying physical ``value`` for a point (the simulator's write path)."""
    assert point.ref is not None
    raw = (value - point.offset) / point.scale / (10.0**sf)
    return encode_raw(point.ref, raw if point.ref.type is RegisterType.F32 else round(raw))
