"""One rack's outcome in one cycle: its state, its limits, its line in the consolidated state.

``rack_outcome(roster_rack, rack_input, previous, config, clear_command_s, now_s, in_maintenance)`` is
the first half of the spec's cycle, for one roster rack, in this order:

1. freshness, validity and the BMS link (``classify.read_rack``);
2. the alarm latches (``faults``), observed at the payload's receive time (not observed, and
   suspended, while the rack is in maintenance and known out of the bank: ``maintenance``);
3. the state (``classify.classify``: stale > invalid > comm_lost > faulted > disconnected > ok);
4. admission (``admission``: the re-admission hold, then the share ramp; never while in maintenance);
5. the rack's own derates (``derates``: thermal rate of rise, cell taper) — its limits are the BMS's
   limits times these factors, and that is what enters the bank's policy (its ``member``);
6. the hold of a rack lost from sight while in parallel (``isolation``).

``valid_until_s`` says until when the same outcome stands with the same input, memory, roster rack,
config and clear command: every ``t`` in ``[now_s, valid_until_s]`` gives this very outcome, and so
does the next cycle computed from the memory it returns (every step above is idempotent on its own
output). It is ``now_s`` when time alone moves the outcome (a stale rack's reason states its age, a
rack in its hold or ramp changes share, a held rack counts down to its release); ``received_s +`` the
staleness limit while the rack is fresh (it turns stale after that); infinite otherwise. The
reference (``step``) never reads it; the incremental engine (``engine``) recomputes a rack when it
passes, and its property tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from controller.core.admission import Admission, admit
from controller.core.bounds import amps_down
from controller.core.classify import Reading, classify, read_rack, stale_after_s
from controller.core.derates import Derate, derate_rack
from controller.core.faults import Block, Direction, Latch, blocks, update_latches
from controller.core.isolation import Isolation, isolate, isolation_s
from controller.core.maintenance import NOT_ADMITTED, known_out
from controller.core.memory import RackMemory
from controller.core.policies import Member
from controller.core.policies import member as make_member
from controller.core.provenance import rack_reason
from controller.core.snapshot import RackInput
from shared.cluster import RackState, RackView
from shared.controller_config import ControllerConfig, RosterRack

FOREVER_S = math.inf


class RackOutcome(NamedTuple):
    """One roster rack's outcome of one cycle (a NamedTuple: one is made per changed rack per cycle;
    docs/performance.md, "Per-rack values")."""

    rack_id: str
    reading: Reading
    state: RackState
    state_reason: str
    admission: Admission
    derate: Derate
    member: Member | None  # set when the rack is reporting (current, valid measurements)
    isolation: Isolation
    memory: RackMemory  # what the rack carries to the next cycle
    view: RackView  # its line in ConsolidatedState.racks
    charge_blocks: tuple[Block, ...]  # its latched alarms that stop charging the bank
    discharge_blocks: tuple[Block, ...]
    parallel_member: Member | None  # its member when it is in parallel (state ok)
    held_member: Member | None  # its last member in parallel while it is held (isolation)
    valid_until_s: float  # see the module docstring
    # In maintenance and known out of the bank: its latches are kept but bind nothing (maintenance).
    latches_suspended: bool = False


def rack_outcome(
    *,
    roster_rack: RosterRack,
    rack_input: RackInput,
    previous: RackMemory,
    config: ControllerConfig,
    clear_command_s: float | None,
    now_s: float,
    in_maintenance: bool = False,
) -> RackOutcome:
    """The outcome of ``roster_rack`` at ``now_s``, from its input and the memory of its last cycle
    (``in_maintenance``: an operator has put it in maintenance)."""
    agg = config.aggregation
    reading = read_rack(rack_input, roster_rack, config.site_id, now_s)
    m = reading.measurements
    observed_s = reading.received_s if reading.received_s is not None else now_s
    suspended = known_out(in_maintenance, m)
    latches = update_latches(
        previous.latches, m.alarms if m is not None and not suspended else None, observed_s, clear_command_s
    )
    state, state_reason = classify(reading, latches)
    is_ok = state is RackState.OK
    if in_maintenance:
        admission = NOT_ADMITTED
    else:
        admission = admit(previous.ok_since_s, is_ok, now_s, agg.readmit_hold_s, agg.readmit_ramp_s)
    derate, derate_memory = derate_rack(previous.derate, m, reading.received_s, now_s, agg)
    member = None
    if m is not None and not suspended:
        member = make_member(
            roster_rack.rack_id,
            m,
            roster_rack.capacity_ah,
            share=admission.share,
            charge_limit_a=m.charge_current_limit_a * derate.charge_factor,
            discharge_limit_a=m.discharge_current_limit_a * derate.discharge_factor,
            charge_notes=derate.charge_notes,
            discharge_notes=derate.discharge_notes,
        )
    isolation = isolate(
        roster_rack.rack_id,
        state,
        member if is_ok else None,
        last_in_parallel=previous.in_parallel,
        lost_s=previous.lost_s,
        now_s=now_s,
        isolation_time_s=isolation_s(roster_rack, agg),
    )
    memory = RackMemory(
        ok_since_s=admission.ok_since_s,
        latches=latches,
        derate=derate_memory,
        in_parallel=isolation.last_in_parallel,
        lost_s=isolation.lost_s,
    )
    if latches and not suspended:
        own = ((roster_rack.rack_id, latches),)
        charge_blocks = blocks(own, Direction.CHARGE)
        discharge_blocks = blocks(own, Direction.DISCHARGE)
        report_blocks = blocks(own, Direction.REPORT)
    else:  # the usual case: nothing latched blocks nothing
        charge_blocks = discharge_blocks = report_blocks = ()
    if suspended:
        admission = admission._replace(note=_suspended_note(latches))
    view = _view(roster_rack.rack_id, state=state, state_reason=state_reason, admission=admission,
                 derate=derate, in_parallel=member if is_ok else None, isolation=isolation,
                 charge_blocks=charge_blocks, discharge_blocks=discharge_blocks, report_blocks=report_blocks,
                 maintenance=in_maintenance)
    return RackOutcome(
        roster_rack.rack_id, reading, state, state_reason, admission, derate, member, isolation, memory,
        view, charge_blocks, discharge_blocks, member if is_ok else None, isolation.held,
        _valid_until_s(rack_input, roster_rack, reading=reading, state=state, admission=admission,
                       isolation=isolation, now_s=now_s, in_maintenance=in_maintenance),
        suspended,
    )


def _suspended_note(latches: Mapping[str, Latch]) -> str:
    held = f"; latches kept, suspended while out: {', '.join(sorted(latches))}" if latches else ""
    return f"in maintenance, contactor open: out of the bank, its alarms ignored{held}"


def _valid_until_s(
    rack_input: RackInput,
    roster_rack: RosterRack,
    *,
    reading: Reading,
    state: RackState,
    admission: Admission,
    isolation: Isolation,
    now_s: float,
    in_maintenance: bool,
) -> float:
    """Until when the outcome stands (see the module docstring)."""
    if isolation.held is not None:
        return now_s  # counting down to its release
    a = admission
    fully_admitted = a.eligible and a.share == 1.0 and not a.note and a.ok_since_s is not None
    if state is RackState.OK and not fully_admitted and not in_maintenance:
        return now_s  # in its hold or ramp (in maintenance, its admission does not move)
    telemetry, received_s = rack_input.telemetry, rack_input.received_s
    if telemetry is None or received_s is None:
        return FOREVER_S  # never heard: stale with no age to state, until an input comes
    if reading.link_state is RackState.STALE:
        return now_s  # its reason states its age
    return received_s + stale_after_s(roster_rack, telemetry)


def _view(
    rack_id: str,
    *,
    state: RackState,
    state_reason: str,
    admission: Admission,
    derate: Derate,
    in_parallel: Member | None,
    isolation: Isolation,
    charge_blocks: tuple[Block, ...],
    discharge_blocks: tuple[Block, ...],
    report_blocks: tuple[Block, ...],
    maintenance: bool,
) -> RackView:
    """The rack's line in the consolidated state; the blocks are this rack's own. Its limits are
    those that entered the policy (after the derates) while it is in parallel, else 0."""
    held = isolation.held
    hold_note = (
        f"{isolation.note}, last in parallel at CCL {amps_down(held.charge_limit_a):.1f} A, "
        f"DCL {amps_down(held.discharge_limit_a):.1f} A, "
        f"CVL {held.measurements.charge_voltage_limit_v:.1f} V, "
        f"DVL {held.measurements.discharge_voltage_limit_v:.1f} V"
        if held is not None
        else ""
    )
    reason = rack_reason(
        state_reason,
        hold_note=hold_note,
        admission_note=admission.note,
        charge_blocks=charge_blocks,
        discharge_blocks=discharge_blocks,
        reported=report_blocks,
        charge_notes=derate.charge_notes if in_parallel else (),
        discharge_notes=derate.discharge_notes if in_parallel else (),
    )
    return RackView(
        rack_id=rack_id,
        state=state,
        eligible=admission.eligible,
        share=admission.share,
        charge_current_limit_a=amps_down(in_parallel.charge_limit_a) if in_parallel else 0.0,
        discharge_current_limit_a=amps_down(in_parallel.discharge_limit_a) if in_parallel else 0.0,
        reason=reason,
        maintenance=maintenance,
    )
