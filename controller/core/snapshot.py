"""The core's input: what the controller knows of each rack (``RackInput``), and the reference
cycle's whole view of the rack table (``Snapshot``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from shared.records import TelemetryRecord


class RackInput(NamedTuple):
    """What the controller knows about one roster rack at the start of a cycle.

    ``telemetry`` is the last payload that passed validation and ``received_s``
    the controller's monotonic time when it arrived. ``invalid_at_s`` is the
    time of the latest rejected payload *after* that (None if the latest
    payload was valid): a rack whose newest word was garbage is ``invalid``.

    A NamedTuple: one is made per received payload, at a third of a frozen dataclass's cost.
    """

    rack_id: str
    telemetry: TelemetryRecord | None = None
    received_s: float | None = None
    invalid_at_s: float | None = None
    invalid_reason: str = ""


def _no_clears() -> Mapping[str, float]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All roster racks (every roster id is present), plus ids heard that are not on the roster."""

    racks: Mapping[str, RackInput]
    unknown_racks: tuple[str, ...] = ()
    # Per rack, the monotonic time of the latest accepted "clear latched alarms" command naming it
    # (a clear of every rack names each); a rack absent here was never cleared.
    clear_commands_s: Mapping[str, float] = field(default_factory=_no_clears)
    # The racks an operator has put in maintenance (controller/core/maintenance.py).
    maintenance: frozenset[str] = frozenset()
