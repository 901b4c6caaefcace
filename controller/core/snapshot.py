"""The controller's one consistent view of the rack table for one control cycle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from shared.records import TelemetryRecord


class RackInput(NamedTuple):
    """What the controller knows about one roster rack at the start of a cycle.

    ``telemetry`` is the last payload that passed validation and ``received_s``
    the controller's monotonic time when it arrived. ``invalid_at_s`` is the
    time of the latest rejected payload *after* that (None if the latest
    payload was valid): a rack whose newest word was garbage is ``invalid``.

    A NamedTuple (one is made per received payload, at a third of a frozen dataclass's cost); the
    core tells inputs apart by identity (``Snapshot.changed``, its cache).
    """

    rack_id: str
    telemetry: TelemetryRecord | None = None
    received_s: float | None = None
    invalid_at_s: float | None = None
    invalid_reason: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All roster racks (every roster id is present), plus ids heard that are not on the roster."""

    racks: Mapping[str, RackInput]
    unknown_racks: tuple[str, ...] = ()
    # Monotonic time of the latest accepted "clear latched alarms" command (None: never).
    clear_command_s: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    # Ids whose input may differ from the previous cycle's snapshot; every other rack's input is
    # the very object that cycle saw. None: unknown (the core compares every rack). With it, a
    # cycle looks at these racks (and, if full, at those time may move) instead of the roster.
    changed: frozenset[str] | None = None
