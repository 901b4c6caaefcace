"""The reference cycle: the spec of one control cycle, as a pure function.

``step(snapshot, config, now_s, wall_s, memory) -> (ConsolidatedState, memory')`` reads no clock, no
socket and no random source: the same arguments always give the same result. Its whole history is
:class:`~controller.core.memory.CoreMemory`, which the caller hands back next cycle
(``CoreMemory.initial()`` at start). ``now_s`` is the controller's monotonic time, the clock of
``RackInput.received_s``/``invalid_at_s`` and ``Snapshot.clear_commands_s``; ``wall_s`` only becomes
``ConsolidatedState.timestamp_s``.

A cycle is two halves: every roster rack's outcome (``rack_outcome``), then the bank consolidated
from them (``bank``). No cache, no shortcut: the controller runs the incremental engine
(``engine``), and its property tests hold it equal to this, output for output.

Only roster racks count. Ids in ``Snapshot.unknown_racks``, and any non-roster id found in
``Snapshot.racks``, are listed in ``ConsolidatedState.unknown_racks`` and raise
``ClusterFlags.unknown_rack_seen``; they never reach the table.
"""

from __future__ import annotations

from controller.core.bank import BankInputs, consolidate
from controller.core.memory import CoreMemory, RackMemory
from controller.core.rack_outcome import rack_outcome
from controller.core.snapshot import RackInput, Snapshot
from shared.cluster import ConsolidatedState
from shared.controller_config import ControllerConfig


def step(
    snapshot: Snapshot, config: ControllerConfig, now_s: float, wall_s: float, memory: CoreMemory
) -> tuple[ConsolidatedState, CoreMemory]:
    """This cycle's consolidated battery from ``snapshot`` and the previous cycle's ``memory``."""
    outcomes = [
        rack_outcome(
            roster_rack=roster_rack,
            rack_input=snapshot.racks.get(roster_rack.rack_id) or RackInput(roster_rack.rack_id),
            previous=memory.racks.get(roster_rack.rack_id) or RackMemory(),
            config=config,
            clear_command_s=snapshot.clear_commands_s.get(roster_rack.rack_id),
            now_s=now_s,
            in_maintenance=roster_rack.rack_id in snapshot.maintenance,
        )
        for roster_rack in config.roster
    ]
    return consolidate(
        BankInputs.of(outcomes), config=config, memory=memory, now_s=now_s, wall_s=wall_s,
        unknown_racks=unknown_racks(snapshot, config),
    )


def unknown_racks(snapshot: Snapshot, config: ControllerConfig) -> tuple[str, ...]:
    """The ids the cycle reports as heard but not on the roster: the snapshot's own list, then every
    non-roster id it holds an input for (sorted), each once."""
    roster = {roster_rack.rack_id for roster_rack in config.roster}
    strangers = sorted(rack_id for rack_id in snapshot.racks if rack_id not in roster)
    return tuple(dict.fromkeys((*snapshot.unknown_racks, *strangers)))
