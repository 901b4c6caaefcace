"""The bank: every rack's outcome consolidated into the one battery the inverter is told about.

``consolidate(bank, config, memory, now_s, wall_s, unknown_racks)`` is the second half of the spec's
cycle:

1. every consolidated quantity from the aggregation table (``policies``), over the racks in
   parallel or the reporting ones as its row says; CCL and DCL also with each rack held at its last
   limits added (``isolation``), the lowest standing (``policies.lowest_with_held``);
2. the bank CCL/DCL: zeroing rules (quorum, latched alarms of that direction, a rack in parallel at
   0 A or without a usable ceiling), the configured maximum and the frame range, the slew (``slew``:
   a decrease at once, an increase ramped), 0.1 A rounding down (``bounds``);
3. CVL/DVL with their invariants (``bounds``) and fallbacks, every held rack counted at its last
   ceiling and floor (``policies.held_voltages``); CVL and DVL are not slewed;
4. alarms that stop a direction, the rest as warnings; the reasons (``provenance``).

When no rack is in parallel the measured quantities keep the model defaults, CVL is the last
consolidated pack voltage (else ``fallback_voltage_v``) with CCL 0, and DVL the last consolidated DVL
(else 0 V), kept below CVL.

:class:`BankInputs` is what the consolidation reads of the outcomes, in roster order; the reference
cycle (``step``) makes it from every outcome, the incremental engine (``engine``) patches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from types import MappingProxyType

from controller.core.admission import quorum_shortfall
from controller.core.bounds import current_down_da, voltage_limits_dv
from controller.core.faults import Block, Direction, Latch, direction_of, latched_flags
from controller.core.memory import CoreMemory, RackMemory
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
from controller.core.provenance import held_text, limit_reason
from controller.core.rack_outcome import RackOutcome
from controller.core.slew import slew
from shared.cluster import ClusterFlags, ConsolidatedState, RackState, RackView
from shared.controller_config import AggregationConfig, ControllerConfig
from shared.models import CURRENT_ABS_MAX_A, ProtectionFlags

# CVL from a rack below this is no usable ceiling (a BMS saying 0 V means "do not charge").
CVL_USABLE_MIN_V = 0.1
# The rows a held rack (``isolation``) takes part in, at its last limits, and the column each reads.
CURRENT_ROWS = MappingProxyType({
    "charge_current_limit_a": "charge_limit_a",
    "discharge_current_limit_a": "discharge_limit_a",
})

_PARALLEL_MEMBER = attrgetter("parallel_member")
_MEMBER = attrgetter("member")
_HELD_MEMBER = attrgetter("held_member")
_ELIGIBLE = attrgetter("admission.eligible")
_CHARGE_BLOCKS = attrgetter("charge_blocks")
_DISCHARGE_BLOCKS = attrgetter("discharge_blocks")
_VIEW = attrgetter("view")
_MEMORY = attrgetter("memory")


@dataclass(frozen=True, slots=True)
class BankInputs:
    """What the consolidation reads of the roster racks' outcomes (each sequence in roster order)."""

    parallel: Members  # the racks in parallel (state ok)
    reporting: Members  # every rack with current, valid measurements
    held: tuple[Member, ...]  # lost racks held at their last limits (isolation)
    held_notes: tuple[str, ...]  # their reasons, in the same order
    eligible: int  # racks that count towards the quorum
    latches_by_rack: tuple[tuple[str, Mapping[str, Latch]], ...]  # racks whose latches bind, only
    # Every rack holding latches, those suspended in maintenance included (what must be kept).
    kept_latches: tuple[tuple[str, Mapping[str, Latch]], ...]
    charge_blocks: tuple[Block, ...]
    discharge_blocks: tuple[Block, ...]
    views: tuple[RackView, ...]
    memories: Mapping[str, RackMemory]

    @classmethod
    def of(cls, outcomes: Sequence[RackOutcome]) -> BankInputs:
        """The inputs from every roster rack's outcome, in roster order (the passes run in C: map and
        filter over getters)."""
        return cls(
            parallel=Members([o.parallel_member for o in outcomes if o.parallel_member is not None]),
            reporting=Members([o.member for o in outcomes if o.member is not None]),
            held=tuple(o.held_member for o in outcomes if o.held_member is not None),
            held_notes=tuple(o.isolation.note for o in outcomes if o.held_member is not None),
            eligible=sum(map(_ELIGIBLE, outcomes)),
            latches_by_rack=tuple((o.rack_id, o.memory.latches) for o in outcomes
                                  if o.memory.latches and not o.latches_suspended),
            kept_latches=tuple((o.rack_id, o.memory.latches) for o in outcomes if o.memory.latches),
            charge_blocks=tuple(chain.from_iterable(map(_CHARGE_BLOCKS, outcomes))),
            discharge_blocks=tuple(chain.from_iterable(map(_DISCHARGE_BLOCKS, outcomes))),
            views=tuple(map(_VIEW, outcomes)),
            memories=MappingProxyType({o.rack_id: o.memory for o in outcomes}),
        )


def consolidate(
    bank: BankInputs,
    *,
    config: ControllerConfig,
    memory: CoreMemory,
    now_s: float,
    wall_s: float,
    unknown_racks: tuple[str, ...],
) -> tuple[ConsolidatedState, CoreMemory]:
    """This cycle's consolidated battery, and the memory the next cycle starts from.

    ``memory`` is the previous cycle's (its bank limits before rounding and the voltage fallbacks);
    ``now_s`` the controller's monotonic time (the slew's clock), ``wall_s`` only the state's stamp;
    ``unknown_racks`` ids heard that are not on the roster (reported, never counted).
    """
    agg = config.aggregation
    elapsed_s = 0.0 if memory.last_now_s is None else max(0.0, now_s - memory.last_now_s)
    populations: dict[Population, Members] = {
        Population.PARALLEL: bank.parallel,
        Population.REPORTING: bank.reporting,
    }
    rules = table(agg)
    picks = {name: rule.combine(populations[rule.population]) for name, rule in rules.items()}
    held_notes = bank.held_notes
    if bank.held:
        # A lost rack may still be in parallel until it is known out (isolation): its exclusion
        # may lower the bank limits but never raise them.
        for name, column in CURRENT_ROWS.items():
            pick, binding = lowest_with_held(
                rules[name].combine, column, bank.parallel, bank.held, picks[name]
            )
            if binding is not None and pick is not None:
                counting = f" (counting held {binding.rack_id} at its last limits)"
                pick = pick._replace(detail=pick.detail + counting)
            picks[name] = pick
    eligible = bank.eligible
    latches_by_rack = bank.latches_by_rack
    charge_blocks, discharge_blocks = bank.charge_blocks, bank.discharge_blocks
    shortfall = None
    if eligible < agg.min_racks:  # rare: counting the waiting racks costs a pass over the views
        shortfall = quorum_shortfall(
            eligible, agg.min_racks,
            in_hold=sum(v.state is RackState.OK and not v.eligible and not v.maintenance for v in bank.views),
            in_maintenance=sum(v.maintenance for v in bank.views),
        )
    quorum_reasons = [shortfall] if shortfall else []

    pack_pick = picks["pack_voltage_v"]
    pack_voltage_v = pack_pick.value if pack_pick is not None else memory.last_pack_voltage_v
    volts = _voltage_limits(
        picks["charge_voltage_limit_v"], picks["discharge_voltage_limit_v"], pack_voltage_v, memory, agg,
        held=held_voltages(bank.held, CVL_USABLE_MIN_V), held_notes=held_notes,
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
    unknown = unknown_racks
    views = bank.views

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
    next_memory = CoreMemory(
        last_now_s=now_s,
        charge_limit_a=ccl.slewed_a,
        discharge_limit_a=dcl.slewed_a,
        last_pack_voltage_v=pack_voltage_v,
        last_dvl_v=volts.dvl_from_racks_v if volts.dvl_from_racks_v is not None else memory.last_dvl_v,
        racks=bank.memories,
    )
    return state, next_memory


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


def _flags(pick: Pick | None) -> ProtectionFlags:
    return NO_FLAGS if pick is None else pick.flags
