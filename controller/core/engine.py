"""One control cycle of the cluster controller, as a pure function.

``step(snapshot, config, now_s, wall_s, memory) -> (ConsolidatedState, memory')`` reads no
clock, no socket and no random source: the same arguments always give the same result. Its
whole history is :class:`CoreMemory`, which the shell keeps and hands back next cycle
(``CoreMemory.initial()`` at start). ``now_s`` is the controller's monotonic time, the clock
of ``RackInput.received_s``/``invalid_at_s`` and ``Snapshot.clear_command_s``; ``wall_s`` only
becomes ``ConsolidatedState.timestamp_s``.

The cycle, each step in its own module:

1. per roster rack, in roster order: read freshness/validity/link (``classify.read_rack``),
   update its alarm latches (``faults``), classify it (``classify.classify``: stale >
   invalid > comm_lost > faulted > disconnected > ok), admit it (``admission``: hold, then
   share ramp), derate its own limits (``derates``: thermal rate-of-rise and cell taper, per
   rack), hold it at its last limits if it was in parallel and is lost from sight
   (``isolation``);
2. every consolidated quantity from the aggregation table (``policies``); CCL and DCL also with
   each held rack added, the lowest standing (``policies.lowest_with_held``);
3. the bank CCL/DCL: zeroing rules (quorum, latched alarms of that direction, a rack in
   parallel at 0 A), the configured maximum and the frame range, the slew (``slew``), 0.1 A
   rounding (``bounds``);
4. CVL/DVL with their invariants (``bounds``) and fallbacks, every held rack counted at its last
   ceiling and floor (``policies.held_voltages``); reasons (``provenance``).

CVL and DVL are not slewed: a rise of CVL (or fall of DVL) reaches the inverter in the cycle that
allows it, a held rack's release included.

``RackView`` limits are the rack's limits after the controller's derates, i.e. what entered
the policy, for every rack in parallel (eligible or still in its hold); 0 otherwise.

Only roster racks count. Ids in ``Snapshot.unknown_racks``, and any non-roster id found in
``Snapshot.racks``, are listed in ``ConsolidatedState.unknown_racks`` and raise
``ClusterFlags.unknown_rack_seen``; they never reach the table.

When no rack is in parallel the measured quantities keep the model defaults, CVL is the
last consolidated pack voltage (else ``fallback_voltage_v``) with CCL 0, and DVL the last
consolidated DVL (else 0 V), kept below CVL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from types import MappingProxyType
from typing import NamedTuple

from controller.core.admission import Admission, admit, fully_admitted, quorum_shortfall
from controller.core.bounds import amps_down, current_down_da, voltage_limits_dv
from controller.core.classify import Reading, classify, read_rack, stale_after_s
from controller.core.derates import Derate, DerateMemory, derate_rack
from controller.core.faults import (
    NO_LATCHES,
    Block,
    Direction,
    Latch,
    blocks,
    direction_of,
    latched_flags,
    update_latches,
)
from controller.core.isolation import Isolation, isolate, isolation_s
from controller.core.policies import (
    NO_FLAGS,
    NO_HELD_VOLTAGES,
    HeldVoltages,
    Member,
    Members,
    Pick,
    Population,
    held_voltages,
    lowest_with_held,
    table,
)
from controller.core.policies import member as make_member
from controller.core.provenance import held_text, limit_reason, rack_reason
from controller.core.slew import slew
from controller.core.snapshot import RackInput, Snapshot
from shared.cluster import ClusterFlags, ConsolidatedState, RackState, RackView
from shared.controller_config import AggregationConfig, ControllerConfig, RosterRack
from shared.models import CURRENT_ABS_MAX_A, ProtectionFlags

# CVL from a rack below this is no usable ceiling (a BMS saying 0 V means "do not charge").
CVL_USABLE_MIN_V = 0.1
# The rows a held rack (``isolation``) takes part in, at its last limits, and the column each reads.
CURRENT_ROWS = MappingProxyType({
    "charge_current_limit_a": "charge_limit_a",
    "discharge_current_limit_a": "discharge_limit_a",
})


def _no_racks() -> Mapping[str, RackMemory]:
    return MappingProxyType({})


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class RackMemory(NamedTuple):
    """What one rack carries between cycles."""

    ok_since_s: float | None = None
    latches: Mapping[str, Latch] = NO_LATCHES
    derate: DerateMemory = DerateMemory()
    # The rack's member of its latest ok cycle while it is in parallel or held, and when it was
    # first found lost since (``isolation``).
    in_parallel: Member | None = None
    lost_s: float | None = None


@dataclass(frozen=True, slots=True)
class CoreMemory:
    """Everything ``step`` carries from one cycle to the next (immutable; a new one per cycle).

    ``charge_limit_a``/``discharge_limit_a`` are the slewed bank limits before 0.1 A rounding;
    ``last_pack_voltage_v``/``last_dvl_v`` the latest consolidated values from racks in
    parallel, the fallbacks for CVL/DVL when none is.
    """

    last_now_s: float | None = None
    charge_limit_a: float = 0.0
    discharge_limit_a: float = 0.0
    last_pack_voltage_v: float | None = None
    last_dvl_v: float | None = None
    racks: Mapping[str, RackMemory] = field(default_factory=_no_racks)
    # Last cycle's per-rack outcomes, reused for racks whose inputs did not change (see
    # ``_Entry``). Derived data only: never compared, so a memory with or without it is equal.
    cache: StepCache | None = field(default=None, compare=False, repr=False)

    @classmethod
    def initial(cls) -> CoreMemory:
        """The memory of a controller that has just started (every rack goes through the hold)."""
        return cls()


class _Rack(NamedTuple):
    """One roster rack's outcome of step 1 (a NamedTuple: made for every changed rack;
    docs/performance.md, "Per-rack values")."""

    rack_id: str
    reading: Reading
    state: RackState
    state_reason: str
    admission: Admission
    derate: Derate
    member: Member | None  # set when reporting
    isolation: Isolation
    memory: RackMemory


def _rack_cycle(
    *,
    roster_rack: RosterRack,
    rack_input: RackInput,
    clear_command_s: float | None,
    config: ControllerConfig,
    now_s: float,
    previous: RackMemory,
) -> _Rack:
    agg = config.aggregation
    reading = read_rack(rack_input, roster_rack, config.site_id, now_s)
    m = reading.measurements
    observed_s = reading.received_s if reading.received_s is not None else now_s
    latches = update_latches(
        previous.latches, m.alarms if m is not None else None, observed_s, clear_command_s
    )
    state, state_reason = classify(reading, latches)
    is_ok = state is RackState.OK
    admission = admit(previous.ok_since_s, is_ok, now_s, agg.readmit_hold_s, agg.readmit_ramp_s)
    derate, derate_memory = derate_rack(previous.derate, m, reading.received_s, now_s, agg)
    member = None
    if m is not None:
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
    return _Rack(
        roster_rack.rack_id, reading, state, state_reason, admission, derate, member, isolation, memory
    )


class _Entry(NamedTuple):
    """One rack's outcome of a cycle, and what the next cycle checks before reusing it.

    ``given`` is the snapshot's own ``RackInput`` object (None: the rack was absent); inputs are
    immutable, so the same object means the same input. With the same input and the memory
    this outcome produced, every step of the rack cycle is idempotent (latches, the play
    operators, a full admission), so only time can change the outcome, through two
    thresholds, each re-checked with the arithmetic of the step it belongs to:

    - ``fresh_received_s``/``stale_limit_s``: the rack was judged on telemetry of that age
      (``read_rack``: stale when ``now - received > limit``; the limit is at least 1 s);
    - ``ok_since_s``: the rack had its full share at ``full_at_s`` (``admission.fully_admitted``,
      which only turns from False to True as time goes on: re-checked only for an earlier now).

    The thermal window ends at the rack's newest sample (``derates``): it moves with inputs only.

    ``reusable`` is False when the outcome moves with time alone: a stale rack's reason states
    its age, a rack in its hold or ramp changes share, a held lost rack (``isolation``) is
    released when its isolation time has passed (and its reason counts down to it).
    """

    given: RackInput | None
    rack: _Rack
    view: RackView
    charge_blocks: tuple[Block, ...]
    discharge_blocks: tuple[Block, ...]
    reusable: bool
    fresh_received_s: float | None
    stale_limit_s: float
    ok_since_s: float | None
    full_at_s: float
    parallel_member: Member | None  # the rack's member when it is in parallel (state ok)
    held_member: Member | None  # its last member in parallel while it is held (isolation)


_RACK = attrgetter("rack")
_RACK_MEMORY = attrgetter("rack.memory")
_PARALLEL_MEMBER = attrgetter("parallel_member")
_MEMBER = attrgetter("member")
_ELIGIBLE = attrgetter("admission.eligible")
_CHARGE_BLOCKS = attrgetter("charge_blocks")
_DISCHARGE_BLOCKS = attrgetter("discharge_blocks")
_VIEW = attrgetter("view")


@dataclass(frozen=True, slots=True)
class _Tally:
    """What one cycle's passes over all racks made of the per-rack outcomes (step 2's inputs, the
    blocks, the views, the memories), kept so that a cycle in which few racks changed patches it
    instead of reading every rack again (``_patched``; a thousand racks' objects are mostly out
    of the processor's cache by the time an urgent payload comes in)."""

    parallel: Members
    reporting: Members
    parallel_at: Mapping[str, int]  # rack id → index in parallel.members
    reporting_at: Mapping[str, int]
    held: tuple[Member, ...]  # lost racks held at their last limits (isolation), roster order
    held_notes: tuple[str, ...]  # their reasons, in the same order
    held_at: Mapping[str, int]  # rack id → index in held
    eligible: int
    latches_by_rack: tuple[tuple[str, Mapping[str, Latch]], ...]
    charge_blocks: tuple[Block, ...]
    discharge_blocks: tuple[Block, ...]
    views: tuple[RackView, ...]
    memories: Mapping[str, RackMemory]


def _tally(entries: Mapping[str, _Entry]) -> _Tally:
    """The passes over every rack; they run in C (map/filter over getters): at a thousand racks
    they are most of a cycle in which few racks changed."""
    outcomes = tuple(entries.values())
    racks = list(map(_RACK, outcomes))
    # Parallel: ok racks (which always carry a member); reporting: every rack with a member.
    parallel = [e for e in outcomes if e.parallel_member is not None]
    reporting = [r for r in racks if r.member is not None]
    held = [e for e in outcomes if e.held_member is not None]
    return _Tally(
        parallel=Members(list(map(_PARALLEL_MEMBER, parallel))),
        reporting=Members(list(map(_MEMBER, reporting))),
        parallel_at={e.rack.rack_id: i for i, e in enumerate(parallel)},
        reporting_at={r.rack_id: i for i, r in enumerate(reporting)},
        held=tuple(e.held_member for e in held if e.held_member is not None),
        held_notes=tuple(e.rack.isolation.note for e in held),
        held_at={e.rack.rack_id: i for i, e in enumerate(held)},
        eligible=sum(map(_ELIGIBLE, racks)),
        # Racks with nothing latched add nothing to the blocks nor to the latched set.
        latches_by_rack=tuple((r.rack_id, r.memory.latches) for r in racks if r.memory.latches),
        charge_blocks=tuple(chain.from_iterable(map(_CHARGE_BLOCKS, outcomes))),
        discharge_blocks=tuple(chain.from_iterable(map(_DISCHARGE_BLOCKS, outcomes))),
        views=tuple(map(_VIEW, outcomes)),
        memories=MappingProxyType(dict(zip(entries, map(_RACK_MEMORY, outcomes), strict=True))),
    )


def _patched(
    tally: _Tally,
    before: Mapping[str, _Entry],
    recomputed: Sequence[_Entry],
    roster_at: Mapping[str, int],
) -> _Tally | None:
    """``tally`` with the recomputed racks' outcomes in place of ``before``'s, or None when one of
    them changes the tally's shape (joins or leaves a population, or holds latches): then
    ``_tally`` makes it whole. Equal to ``_tally`` of the new entries (the told-cycle property
    test in tests/controller/core/test_cache.py compares them cycle by cycle)."""
    parallel: list[tuple[int, Member]] = []
    reporting: list[tuple[int, Member]] = []
    held = list(tally.held)
    held_notes = list(tally.held_notes)
    eligible = tally.eligible
    views = list(tally.views)
    memories = dict(tally.memories)
    for new in recomputed:
        rack_id = new.rack.rack_id
        old = before.get(rack_id)
        if (
            old is None
            or (old.parallel_member is None) != (new.parallel_member is None)
            or (old.rack.member is None) != (new.rack.member is None)
            or (old.held_member is None) != (new.held_member is None)
            or old.rack.memory.latches
            or new.rack.memory.latches
        ):
            return None
        if new.parallel_member is not None:
            parallel.append((tally.parallel_at[rack_id], new.parallel_member))
        if new.rack.member is not None:
            reporting.append((tally.reporting_at[rack_id], new.rack.member))
        if new.held_member is not None:
            at = tally.held_at[rack_id]
            held[at], held_notes[at] = new.held_member, new.rack.isolation.note
        eligible += new.rack.admission.eligible - old.rack.admission.eligible
        views[roster_at[rack_id]] = new.view
        memories[rack_id] = new.rack.memory
    return _Tally(
        parallel=tally.parallel.patched(parallel),
        reporting=tally.reporting.patched(reporting),
        parallel_at=tally.parallel_at,
        reporting_at=tally.reporting_at,
        held=tuple(held),
        held_notes=tuple(held_notes),
        held_at=tally.held_at,
        eligible=eligible,
        latches_by_rack=tally.latches_by_rack,  # no recomputed rack holds or held a latch
        charge_blocks=tally.charge_blocks,
        discharge_blocks=tally.discharge_blocks,
        views=tuple(views),
        memories=MappingProxyType(memories),
    )


# A rack is looked at again by time alone once ``now`` is within this of its staleness threshold
# (``_Entry``): far more than the rounding of ``received + limit`` against ``now - received > limit``.
DUE_MARGIN_S = 1e-3


@dataclass(frozen=True, slots=True)
class StepCache:
    """Per-rack outcomes of one cycle: valid with the same ``config`` object and clear command, and
    with the rack memories they produced (``racks`` is that mapping, checked by identity).

    ``retry`` and ``due_s`` let a full cycle that is told which inputs changed skip the walk over the
    roster: ``retry`` names the racks whose outcome is not reusable, ``due_s`` the time from which
    each reusable rack's staleness threshold may have passed (conservatively early).
    """

    config: ControllerConfig
    clear_command_s: float | None
    racks: Mapping[str, RackMemory]
    entries: Mapping[str, _Entry]
    roster_at: Mapping[str, int]  # rack id → index in config.roster (and in entries, views)
    retry: frozenset[str] = frozenset()
    due_s: Mapping[str, float] = field(default_factory=dict)
    tally: _Tally | None = None


def _entry(
    rack: _Rack, given: RackInput | None, roster_rack: RosterRack, now_s: float, previous: _Entry | None
) -> _Entry:
    if rack.memory.latches:
        latches = ((rack.rack_id, rack.memory.latches),)
        charge_blocks = blocks(latches, Direction.CHARGE)
        discharge_blocks = blocks(latches, Direction.DISCHARGE)
        report_blocks = blocks(latches, Direction.REPORT)
    else:  # the usual case: nothing latched blocks nothing
        charge_blocks = discharge_blocks = report_blocks = ()
    view = _view(rack, charge_blocks, discharge_blocks, report_blocks,
                 previous.view if previous is not None else None)
    reusable = True
    fresh_received_s, stale_limit_s = None, 0.0
    telemetry = given.telemetry if given is not None else None
    received_s = given.received_s if given is not None else None
    if telemetry is not None and received_s is not None:
        if rack.reading.link_state is RackState.STALE:
            reusable = False
        else:
            fresh_received_s, stale_limit_s = received_s, stale_after_s(roster_rack, telemetry)
    if rack.isolation.held is not None:
        reusable = False
    ok_since_s = None
    if rack.state is RackState.OK:
        a = rack.admission
        if a.eligible and a.share == 1.0 and not a.note and a.ok_since_s is not None:
            ok_since_s = a.ok_since_s
        else:
            reusable = False
    parallel_member = rack.member if rack.state is RackState.OK else None
    return _Entry(given, rack, view, charge_blocks, discharge_blocks, reusable, fresh_received_s,
                  stale_limit_s, ok_since_s, now_s, parallel_member, rack.isolation.held)


class Prepared(NamedTuple):
    """One rack's outcome for a new input, computed before the cycle that takes the input in."""

    entry: _Entry
    base: RackMemory | None  # the rack's memory it was computed from (compared by identity)
    config: ControllerConfig
    clear_command_s: float | None
    at_s: float


def prepare(
    rack_input: RackInput, config: ControllerConfig, now_s: float, memory: CoreMemory, *,
    clear_command_s: float | None,
) -> Prepared | None:
    """The outcome of a rack's new input, computed ahead of the next cycle (None: not worth it).

    The shell calls this in idle time for a routine payload, so that the next full cycle takes the
    outcome instead of recomputing the rack then: a full cycle at 100 racks recomputed ~20 racks
    in one block (docs/performance.md), and a lowering arriving meanwhile waited.

    Only an outcome that time cannot move is kept: not stale, fully admitted or out, and its
    admission started no earlier or later because of when it was computed (latches are observed at
    the payload's receive time, not at now). ``step`` then takes it only for the same
    input object, the same rack memory object, config and clear command, at a now no earlier
    than this one and before the rack's staleness threshold: the outcome it would compute itself.
    """
    cache = memory.cache
    if cache is None or cache.config is not config:
        return None  # no cycle yet on this config: nothing to take it in
    at = cache.roster_at.get(rack_input.rack_id)
    if at is None:
        return None
    roster_rack = config.roster[at]
    base = memory.racks.get(rack_input.rack_id)
    rack = _rack_cycle(
        roster_rack=roster_rack, rack_input=rack_input, clear_command_s=clear_command_s, config=config,
        now_s=now_s, previous=base or RackMemory(),
    )
    entry = _entry(rack, rack_input, roster_rack, now_s, cache.entries.get(rack_input.rack_id))
    if (
        not entry.reusable
        or rack.admission.ok_since_s != (base.ok_since_s if base is not None else None)
    ):
        return None
    return Prepared(entry, base, config, clear_command_s, now_s)


def _takes(
    ahead: Prepared, given: RackInput | None, base: RackMemory | None, *, config: ControllerConfig,
    clear_command_s: float | None, now_s: float,
) -> bool:
    """Whether a prepared outcome is the one this cycle would compute for the rack (see prepare)."""
    entry = ahead.entry
    return (
        entry.given is given  # never None: prepare() is given an input
        and ahead.base is base
        and ahead.config is config
        and ahead.clear_command_s == clear_command_s
        and ahead.at_s <= now_s
        # read_rack's comparison; a full admission only stays full as time goes on.
        and not (entry.fresh_received_s is not None and now_s - entry.fresh_received_s > entry.stale_limit_s)
    )


@dataclass(frozen=True, slots=True)
class _Limit:
    out_a: float
    slewed_a: float
    reason: str


def _bank_limit(
    label: str,
    *,
    pick: Pick | None,
    zero_reasons: list[str],
    maximum_a: float,
    previous_a: float,
    elapsed_s: float,
    rate_a_per_s: float,
    held_notes: Sequence[str],
) -> _Limit:
    if pick is not None and pick.forced_zero:
        zero_reasons = [*zero_reasons, pick.detail]
    wanted = 0.0 if zero_reasons or pick is None else pick.value
    target = min(max(0.0, wanted), maximum_a)
    slewed = slew(previous_a, target, elapsed_s, rate_a_per_s)
    out_a = current_down_da(slewed) / 10.0
    reason = limit_reason(
        label,
        out_a=out_a,
        pick=pick,
        zero_reasons=zero_reasons,
        capped_at_a=maximum_a if wanted > maximum_a else None,
        rising_to_a=target if slewed < target else None,
        rate_a_per_s=rate_a_per_s,
        held=held_notes,
    )
    return _Limit(out_a, slewed, reason)


@dataclass(frozen=True, slots=True)
class _Volts:
    cvl_dv: int
    dvl_dv: int
    cvl_reason: str
    dvl_reason: str
    charge_zero: list[str]  # a rack in parallel or held without a usable ceiling stops charging
    dvl_from_racks_v: float | None


def _voltage_limits(
    cvl_pick: Pick | None,
    dvl_pick: Pick | None,
    pack_voltage_v: float | None,
    memory: CoreMemory,
    agg: AggregationConfig,
    *,
    held: HeldVoltages = NO_HELD_VOLTAGES,
    held_notes: Sequence[str] = (),
) -> _Volts:
    """CVL = lowest ceiling in parallel; with none usable, hold the bank where it is (the pack
    voltage now or last seen, else the configured fallback). DVL = highest floor, else the last
    one, else 0 V; always below CVL.

    Racks held at their last limits (``isolation``, ``held``: their extremes) may still be in
    parallel: each may only lower CVL (to its last ceiling; one without a usable ceiling stops
    charging and lowers CVL to where the bank is held) and raise DVL, never the reverse, and the
    reasons name them (``held_notes``)."""
    charge_zero: list[str] = []
    if pack_voltage_v is not None and pack_voltage_v >= CVL_USABLE_MIN_V:
        where_v, where_why = pack_voltage_v, ", held at the consolidated pack voltage"
    else:
        where_v, where_why = agg.fallback_voltage_v, " and no pack voltage known, fallback_voltage_v"
    if cvl_pick is not None and cvl_pick.value >= CVL_USABLE_MIN_V:
        cvl_v, cvl_why = cvl_pick.value, f" = lowest ceiling {cvl_pick.rack_id} {cvl_pick.value:.1f} V"
    else:
        if cvl_pick is not None:
            why = f"{cvl_pick.rack_id} reports CVL {cvl_pick.value:.1f} V"
            charge_zero.append(why)
        else:
            why = "no rack in parallel"
        cvl_v, cvl_why = where_v, f": {why}{where_why}"
    if held.unusable is not None:
        why = f"held {held.unusable.rack_id} last reported CVL {held.unusable.value:.1f} V"
        charge_zero.append(why)
        if where_v < cvl_v:
            cvl_v, cvl_why = where_v, f": {why}{where_why}"
    if held.ceiling is not None and held.ceiling.value < cvl_v:
        rack_id = held.ceiling.rack_id
        cvl_v = held.ceiling.value
        cvl_why = f" = lowest ceiling {rack_id} {cvl_v:.1f} V (counting held {rack_id} at its last limits)"

    if dvl_pick is not None:
        dvl_v, dvl_why = dvl_pick.value, f" = highest floor {dvl_pick.rack_id} {dvl_pick.value:.1f} V"
    elif memory.last_dvl_v is not None:
        dvl_v, dvl_why = memory.last_dvl_v, ": no rack in parallel, last consolidated DVL"
    else:
        dvl_v, dvl_why = 0.0, ": no rack in parallel and none seen before"
    if held.floor is not None and held.floor.value > dvl_v:
        rack_id = held.floor.rack_id
        dvl_v = held.floor.value
        dvl_why = f" = highest floor {rack_id} {dvl_v:.1f} V (counting held {rack_id} at its last limits)"
    cvl_dv, dvl_dv, dvl_lowered = voltage_limits_dv(cvl_v, dvl_v)
    if dvl_lowered:
        dvl_why += f"; lowered to stay below CVL {cvl_dv / 10:.1f} V"
    notes = held_text(held_notes)
    return _Volts(
        cvl_dv,
        dvl_dv,
        f"CVL {cvl_dv / 10:.1f} V{cvl_why}{notes}",
        f"DVL {dvl_dv / 10:.1f} V{dvl_why}{notes}",
        charge_zero,
        dvl_pick.value if dvl_pick is not None else None,
    )


def _number(pick: Pick | None, default: float) -> float:
    return default if pick is None else pick.value


def split_by_effect(
    raised: ProtectionFlags, *, charge_zero: bool, discharge_zero: bool
) -> tuple[ProtectionFlags, ProtectionFlags]:
    """Split raised alarms into (alarms the output acts on, the rest reported as warnings).

    An inverter reads an alarm bit as "this direction is stopped" (a protection bit next to a granted
    current is a protocol violation), so ``alarms`` carries a flag only when the direction it protects
    is zero in this output: a faulted rack taken out while the others carry on, or an imbalance that
    blocks nothing, is visible as a warning (and in its rack's view), not as a bank trip.
    """
    if not raised.any():
        return raised, raised
    kept: dict[str, bool] = {}
    demoted: dict[str, bool] = {}
    for name in raised.raised():
        direction = direction_of(name)
        if direction is Direction.CHARGE:
            effective = charge_zero
        elif direction is Direction.DISCHARGE:
            effective = discharge_zero
        else:
            effective = charge_zero and discharge_zero
        (kept if effective else demoted)[name] = True
    return ProtectionFlags(**kept), ProtectionFlags(**demoted)


def step(
    snapshot: Snapshot,
    config: ControllerConfig,
    now_s: float,
    wall_s: float,
    memory: CoreMemory,
    *,
    inputs_only: bool = False,
    prepared: Mapping[str, Prepared] | None = None,
) -> tuple[ConsolidatedState, CoreMemory]:
    """Compute this cycle's consolidated battery from ``snapshot`` and the previous ``memory``.

    ``prepared``: racks' outcomes computed ahead by :func:`prepare`; one is taken instead of
    recomputing its rack only where it is exactly the outcome this cycle would compute.

    ``inputs_only`` (an urgent cycle, run the moment a payload may lower a limit): a rack whose
    input is the one of the last cycle keeps that cycle's outcome even where time alone would
    move it (staleness, hold and ramp progress, the release of a lost rack's hold when its
    isolation time passes: ``isolation``). Those wait for the next full cycle, a control
    tick away; the urgent one costs the changed racks plus one pass over the table instead of a
    re-evaluation of every rack that time touched. It can only be as permissive as the last full
    cycle was, lowered by the new inputs: a rack going stale was already counted there, and a
    share frozen mid-ramp, like a hold kept past its expiry, is the lower one.
    """
    agg = config.aggregation
    elapsed_s = 0.0 if memory.last_now_s is None else max(0.0, now_s - memory.last_now_s)

    cache = memory.cache
    previous_entries: Mapping[str, _Entry] = {}
    if (
        cache is not None
        and cache.config is config
        and cache.racks is memory.racks
        and cache.clear_command_s == snapshot.clear_command_s
    ):
        previous_entries = cache.entries
    roster_at: Mapping[str, int] = (
        cache.roster_at if cache is not None and cache.config is config
        else MappingProxyType({rr.rack_id: i for i, rr in enumerate(config.roster)})
    )
    hold_s, ramp_s = agg.readmit_hold_s, agg.readmit_ramp_s
    entries: dict[str, _Entry]
    candidates: Iterable[RosterRack]
    walk = not (
        snapshot.changed is not None
        and cache is not None
        and len(previous_entries) == len(config.roster)
        # A full cycle also re-checks what time moves; it relies on the cache's list of those, made
        # for a clock that does not run backwards (see _Entry: full_at_s).
        and (inputs_only or (memory.last_now_s is not None and now_s >= memory.last_now_s))
    )
    if walk:
        entries = {}
        candidates = config.roster
    else:
        assert cache is not None and snapshot.changed is not None
        # Only the racks the shell names can have a new input: start from last cycle's outcomes
        # (roster order kept) and look at those alone, and in a full cycle also at those whose
        # outcome time may move (not reusable, or near their staleness threshold).
        entries = dict(previous_entries)
        names = set(snapshot.changed)
        if not inputs_only:
            names |= cache.retry
            names.update(r for r, due_s in cache.due_s.items() if due_s <= now_s)
        candidates = [config.roster[roster_at[r]] for r in sorted(names) if r in roster_at]
    recomputed: list[_Entry] = []
    for rr in candidates:
        rack_id = rr.rack_id
        given = snapshot.racks.get(rack_id)
        entry = previous_entries.get(rack_id)
        # Reuse last cycle's outcome when nothing it depends on changed (see _Entry); the
        # comparisons are those of read_rack and admit, NaN included.
        if (
            entry is None
            or entry.given is not given
            or (
                not inputs_only
                and (
                    not entry.reusable
                    or (
                        entry.fresh_received_s is not None
                        and now_s - entry.fresh_received_s > entry.stale_limit_s
                    )
                    or (
                        entry.ok_since_s is not None
                        and now_s < entry.full_at_s
                        and not fully_admitted(entry.ok_since_s, now_s, hold_s, ramp_s)
                    )
                )
            )
        ):
            ahead = prepared.get(rack_id) if prepared else None
            base = memory.racks.get(rack_id)
            if ahead is not None and _takes(
                ahead, given, base, config=config, clear_command_s=snapshot.clear_command_s, now_s=now_s
            ):
                entry = ahead.entry
            else:
                rack = _rack_cycle(
                    roster_rack=rr,
                    rack_input=given or RackInput(rack_id),
                    clear_command_s=snapshot.clear_command_s,
                    config=config,
                    now_s=now_s,
                    previous=base or RackMemory(),
                )
                entry = _entry(rack, given, rr, now_s, entry)
            recomputed.append(entry)
        entries[rack_id] = entry
    tally = None
    if not walk and cache is not None and cache.tally is not None:
        tally = _patched(cache.tally, previous_entries, recomputed, roster_at)
    if tally is None:
        tally = _tally(entries)
    populations: dict[Population, Members] = {
        Population.PARALLEL: tally.parallel,
        Population.REPORTING: tally.reporting,
    }
    rules = table(agg)
    picks = {name: rule.combine(populations[rule.population]) for name, rule in rules.items()}
    held_notes = tally.held_notes
    if tally.held:
        # A lost rack may still be in parallel until it is known out (isolation): its exclusion
        # may lower the bank limits but never raise them.
        for name, column in CURRENT_ROWS.items():
            pick, binding = lowest_with_held(
                rules[name].combine, column, tally.parallel, tally.held, picks[name]
            )
            if binding is not None and pick is not None:
                counting = f" (counting held {binding.rack_id} at its last limits)"
                pick = pick._replace(detail=pick.detail + counting)
            picks[name] = pick
    eligible = tally.eligible
    latches_by_rack = tally.latches_by_rack
    charge_blocks, discharge_blocks = tally.charge_blocks, tally.discharge_blocks
    shortfall = quorum_shortfall(eligible, agg.min_racks)
    quorum_reasons = [shortfall] if shortfall else []

    pack_pick = picks["pack_voltage_v"]
    pack_voltage_v = pack_pick.value if pack_pick is not None else memory.last_pack_voltage_v
    volts = _voltage_limits(
        picks["charge_voltage_limit_v"], picks["discharge_voltage_limit_v"], pack_voltage_v, memory, agg,
        held=held_voltages(tally.held, CVL_USABLE_MIN_V), held_notes=held_notes,
    )

    ccl = _bank_limit(
        "CCL",
        pick=picks["charge_current_limit_a"],
        zero_reasons=quorum_reasons + [b.describe() for b in charge_blocks] + volts.charge_zero,
        maximum_a=agg.max_charge_current_a,
        previous_a=memory.charge_limit_a,
        elapsed_s=elapsed_s,
        rate_a_per_s=agg.ramp_up_a_per_s,
        held_notes=held_notes,
    )
    dcl = _bank_limit(
        "DCL",
        pick=picks["discharge_current_limit_a"],
        zero_reasons=quorum_reasons + [b.describe() for b in discharge_blocks],
        maximum_a=agg.max_discharge_current_a,
        previous_a=memory.discharge_limit_a,
        elapsed_s=elapsed_s,
        rate_a_per_s=agg.ramp_up_a_per_s,
        held_notes=held_notes,
    )

    latched = {flag for _, latches in latches_by_rack for flag in latches}
    raised = _flags(picks["alarms"]).union(latched_flags(latched))
    alarms, demoted = split_by_effect(raised, charge_zero=ccl.out_a == 0.0, discharge_zero=dcl.out_a == 0.0)
    unknown = tuple(dict.fromkeys((*snapshot.unknown_racks, *sorted(snapshot.racks.keys() - entries.keys()))))
    views = tally.views

    def place(name: str) -> str:
        pick = picks[name]
        return "" if pick is None else pick.location

    state = ConsolidatedState(
        site_id=config.site_id,
        node_id=config.node_id,
        timestamp_s=wall_s,
        charge_current_limit_a=ccl.out_a,
        discharge_current_limit_a=dcl.out_a,
        charge_voltage_limit_v=volts.cvl_dv / 10,
        discharge_voltage_limit_v=volts.dvl_dv / 10,
        charge_enabled=ccl.out_a > 0.0,
        discharge_enabled=dcl.out_a > 0.0,
        ccl_reason=ccl.reason,
        dcl_reason=dcl.reason,
        cvl_reason=volts.cvl_reason,
        dvl_reason=volts.dvl_reason,
        soc_pct=_number(picks["soc_pct"], 0.0),
        soh_pct=_number(picks["soh_pct"], 0.0),
        pack_voltage_v=_number(pack_pick, 0.0),
        current_a=max(-CURRENT_ABS_MAX_A, min(CURRENT_ABS_MAX_A, _number(picks["current_a"], 0.0))),
        temperature_avg_c=_number(picks["temperature_avg_c"], 25.0),
        cell_voltage_max_v=_number(picks["cell_voltage_max_v"], 0.0),
        cell_voltage_max_location=place("cell_voltage_max_v"),
        cell_voltage_min_v=_number(picks["cell_voltage_min_v"], 0.0),
        cell_voltage_min_location=place("cell_voltage_min_v"),
        temperature_max_c=_number(picks["temperature_max_c"], 25.0),
        temperature_max_location=place("temperature_max_c"),
        temperature_min_c=_number(picks["temperature_min_c"], 25.0),
        temperature_min_location=place("temperature_min_c"),
        alarms=alarms,
        warnings=_flags(picks["warnings"]).union(demoted),
        cluster=ClusterFlags(
            not_enough_racks=shortfall is not None,
            latched_alarm=any(latches for _, latches in latches_by_rack),
            unknown_rack_seen=bool(unknown),
        ),
        capacity_ah=_number(picks["capacity_ah"], 0.0),
        roster_size=len(config.roster),
        eligible_racks=eligible,
        racks=views,
        unknown_racks=unknown,
    )
    rack_memories = tally.memories
    next_memory = CoreMemory(
        last_now_s=now_s,
        charge_limit_a=ccl.slewed_a,
        discharge_limit_a=dcl.slewed_a,
        last_pack_voltage_v=pack_voltage_v,
        last_dvl_v=volts.dvl_from_racks_v if volts.dvl_from_racks_v is not None else memory.last_dvl_v,
        racks=rack_memories,
        cache=_next_cache(
            None if walk else cache, entries.values() if walk else recomputed, config=config,
            clear_command_s=snapshot.clear_command_s, racks=rack_memories, entries=entries,
            roster_at=roster_at, tally=tally,
        ),
    )
    return state, next_memory


def _next_cache(
    previous: StepCache | None,
    recomputed: Iterable[_Entry],
    *,
    config: ControllerConfig,
    clear_command_s: float | None,
    racks: Mapping[str, RackMemory],
    entries: Mapping[str, _Entry],
    roster_at: Mapping[str, int],
    tally: _Tally,
) -> StepCache:
    """This cycle's cache; ``retry`` and ``due_s`` are the previous ones updated for the racks
    recomputed now (``previous`` None: ``recomputed`` is every rack)."""
    retry = set(previous.retry) if previous is not None else set()
    due_s = dict(previous.due_s) if previous is not None else {}
    for entry in recomputed:
        rack_id = entry.rack.rack_id
        if entry.reusable:
            retry.discard(rack_id)
        else:
            retry.add(rack_id)
        if entry.reusable and entry.fresh_received_s is not None:
            due_s[rack_id] = entry.fresh_received_s + entry.stale_limit_s - DUE_MARGIN_S
        else:
            due_s.pop(rack_id, None)
    return StepCache(config, clear_command_s, racks, entries, roster_at, frozenset(retry), due_s, tally)


def _flags(pick: Pick | None) -> ProtectionFlags:
    return NO_FLAGS if pick is None else pick.flags


def _view(
    rack: _Rack,
    charge_blocks: tuple[Block, ...],
    discharge_blocks: tuple[Block, ...],
    report_blocks: tuple[Block, ...],
    previous: RackView | None = None,
) -> RackView:
    """The rack's line in the consolidated state; the blocks are this rack's own.

    ``previous`` (last cycle's view of the rack) is returned when every field is the same: a
    new payload usually changes nothing a view shows, and a view costs a pydantic validation.
    """
    in_parallel = rack.state is RackState.OK and rack.member is not None
    member = rack.member if in_parallel else None
    state, admission = rack.state, rack.admission
    charge_a = amps_down(member.charge_limit_a) if member else 0.0
    discharge_a = amps_down(member.discharge_limit_a) if member else 0.0
    held = rack.isolation.held
    hold_note = (
        f"{rack.isolation.note}, last in parallel at CCL {amps_down(held.charge_limit_a):.1f} A, "
        f"DCL {amps_down(held.discharge_limit_a):.1f} A, "
        f"CVL {held.measurements.charge_voltage_limit_v:.1f} V, "
        f"DVL {held.measurements.discharge_voltage_limit_v:.1f} V"
        if held is not None
        else ""
    )
    reason = rack_reason(
        rack.state_reason,
        hold_note=hold_note,
        admission_note=admission.note,
        charge_blocks=charge_blocks,
        discharge_blocks=discharge_blocks,
        reported=report_blocks,
        charge_notes=rack.derate.charge_notes if member else (),
        discharge_notes=rack.derate.discharge_notes if member else (),
    )
    if (
        previous is not None
        and previous.rack_id == rack.rack_id
        and previous.state is state
        and previous.eligible is admission.eligible
        and previous.share == admission.share
        and previous.charge_current_limit_a == charge_a
        and previous.discharge_current_limit_a == discharge_a
        and previous.reason == reason
    ):
        return previous
    return RackView(
        rack_id=rack.rack_id,
        state=state,
        eligible=admission.eligible,
        share=admission.share,
        charge_current_limit_a=charge_a,
        discharge_current_limit_a=discharge_a,
        reason=reason,
    )
