"""Fault arbitration by direction, and alarm latching.

**Direction.** A protection alarm blocks only the direction of current that would make its
condition worse; the rack stays eligible for the other direction (so a full rack with a
cell over-voltage still lets the bank discharge). ``FLAG_DIRECTION`` is the table:

- charge side (zero the **bank** CCL): cell/pack over-voltage, charge over/under-temperature,
  charge over-current;
- discharge side (zero the **bank** DCL): cell/pack under-voltage, discharge
  over/under-temperature, discharge over-current;
- rack (take the rack out, state ``faulted``): internal fault, insulation fault;
- report only: cell imbalance (a balancing matter, not a reason to stop current; it is still
  latched and shown).

A flag missing from the table (a newer contract) is treated as ``rack``: unknown means out.

Why the whole bank and not just the rack's share: parallel racks cannot be steered; as long
as the alarming rack is in parallel, any bank current in that direction reaches it too. A
rack whose contactor is open is out of the current path, but its latch still holds the
direction (the rule is "every alarm latches until acknowledged", and an alarm that made a
BMS open its contactor is exactly the one a person should look at).

**Latching.** Every protection alarm seen in a rack's *reporting* telemetry (current, valid,
BMS link up) latches, per rack and per flag. It is released only when both hold:

1. the rack's telemetry has shown the condition gone (``Latch.cleared_s``: the controller
   time the first such payload arrived), and
2. a clear command arrived at or after that time (``Snapshot.clear_command_s >= cleared_s``).

A clear command given while the condition is still present therefore does not count; a
second one is needed after it has cleared. If the condition comes back before the command,
the latch is active again and ``cleared_s`` is forgotten. A rack that is not reporting can
neither raise nor clear its latches (nothing we hold about it is current), but an already
cleared latch can still be acknowledged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from shared.models import PROTECTION_FLAG_NAMES, ProtectionFlags
from shared.records import FlagsRecord


class Direction(StrEnum):
    CHARGE = "charge"
    DISCHARGE = "discharge"
    RACK = "rack"
    REPORT = "report"


FLAG_DIRECTION: Final[Mapping[str, Direction]] = MappingProxyType(
    {
        "cell_over_voltage": Direction.CHARGE,
        "pack_over_voltage": Direction.CHARGE,
        "charge_over_temperature": Direction.CHARGE,
        "charge_under_temperature": Direction.CHARGE,
        "charge_over_current": Direction.CHARGE,
        "cell_under_voltage": Direction.DISCHARGE,
        "pack_under_voltage": Direction.DISCHARGE,
        "discharge_over_temperature": Direction.DISCHARGE,
        "discharge_under_temperature": Direction.DISCHARGE,
        "discharge_over_current": Direction.DISCHARGE,
        "internal_fault": Direction.RACK,
        "insulation_fault": Direction.RACK,
        "cell_imbalance": Direction.REPORT,
    }
)


def direction_of(flag: str) -> Direction:
    """What ``flag`` blocks; a flag this table does not know takes the rack out."""
    return FLAG_DIRECTION.get(flag, Direction.RACK)


@dataclass(frozen=True, slots=True)
class Latch:
    """One latched alarm of one rack.

    ``raised_s`` is when it was (last) seen raised; ``cleared_s`` when the rack's telemetry
    first showed it gone again (None while it is still present).
    """

    raised_s: float
    cleared_s: float | None = None

    @property
    def active(self) -> bool:
        return self.cleared_s is None


def latch_label(latch: Latch) -> str:
    """``active`` while the condition is present, ``latched`` while it waits for a clear command."""
    return "active" if latch.active else "latched"


NO_LATCHES: Final[Mapping[str, Latch]] = MappingProxyType({})


def update_latches(
    previous: Mapping[str, Latch],
    alarms: FlagsRecord | None,
    observed_s: float,
    clear_command_s: float | None,
) -> Mapping[str, Latch]:
    """The rack's latches after this cycle.

    ``alarms`` is the reporting telemetry's alarm set (None when the rack is not reporting:
    latches then neither rise nor clear) and ``observed_s`` the time that payload arrived.
    """
    if not previous and (alarms is None or not alarms.any()):
        return NO_LATCHES  # the usual case: nothing latched, nothing raised
    raised_now = frozenset(alarms.raised()) if alarms is not None else frozenset()
    result: dict[str, Latch] = {}
    for flag in PROTECTION_FLAG_NAMES:
        latch = previous.get(flag)
        raised = flag in raised_now
        if raised:
            latch = Latch(raised_s=observed_s if latch is None or not latch.active else latch.raised_s)
        elif latch is not None and alarms is not None and latch.active:
            latch = Latch(raised_s=latch.raised_s, cleared_s=observed_s)
        if latch is not None and not latch.active and _acknowledged(latch, clear_command_s):
            latch = None
        if latch is not None:
            result[flag] = latch
    return MappingProxyType(result)


def _acknowledged(latch: Latch, clear_command_s: float | None) -> bool:
    return clear_command_s is not None and latch.cleared_s is not None and clear_command_s >= latch.cleared_s


def latched_flags(flags: Iterable[str]) -> ProtectionFlags:
    """Latched alarm names as flags (for the consolidated alarm set)."""
    return ProtectionFlags(**{flag: True for flag in flags if flag in PROTECTION_FLAG_NAMES})


@dataclass(frozen=True, slots=True)
class Block:
    """A latched alarm that zeroes one direction of the bank."""

    rack_id: str
    flag: str
    active: bool

    @property
    def label(self) -> str:
        return "active" if self.active else "latched"

    def describe(self) -> str:
        return f"{self.rack_id} {self.flag} ({self.label})"


def blocks(
    latches_by_rack: Sequence[tuple[str, Mapping[str, Latch]]], direction: Direction
) -> tuple[Block, ...]:
    """Every latch, over all roster racks in roster order, that blocks ``direction``."""
    return tuple(
        Block(rack_id, flag, latch.active)
        for rack_id, latches in latches_by_rack
        for flag, latch in latches.items()
        if direction_of(flag) is direction
    )
