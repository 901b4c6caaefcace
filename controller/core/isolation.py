"""Lost racks: a rack that was in parallel and is lost from sight is held at its last limits.

A rack in state ``ok`` is in parallel (its contactor closed or unknown) and its limits bind the
bank. When it turns ``stale``, ``invalid`` or ``comm_lost`` the controller no longer knows what
it does: its BMS may still have its contactor closed and take its share of the bank current.
Excluding it at once would *raise* the bank limit whenever it was the weakest rack (two racks at
40 A and 100 A: N × min gives 80 A with it, 100 A without). So it is **held**: it stays in the
bank's limit at the limits and share it last had in parallel (``Isolation.held``, the policies'
``Member`` of its last ``ok`` cycle) until it is known to be out of the bank:

- its agent reports the contactor open (a ``disconnected`` rack; the same for any rack judged on
  current telemetry that is not ``ok``: it is seen, not lost, and the classification rules apply);
- or its isolation time (``RosterRack.isolation_s``, else ``AggregationConfig.isolation_s``: the
  time within which the rack's own BMS opens its contactor on loss of communication) has passed
  since the first cycle that found it lost. Counting from that cycle, not from the last payload,
  errs on the side of a longer hold.

A held rack never raises the bank (``engine``: the bank CCL/DCL is the lowest of the policy over
the racks in parallel and over the racks in parallel with each held rack added; see
``policies`` for why one at a time is the worst case), so a hold can only lower the bank, and a
limit held back is released through the slew, ramping. Nor does it widen the bank's voltage
range: CVL is the lowest ceiling and DVL the highest floor over the racks in parallel and every
held rack at its last ones (``policies.held_voltages``; a held rack last without a usable
ceiling stops charging, as one in parallel does). Those are not slewed: on release CVL rises
(DVL falls) in that cycle. A rack that comes back is ``ok`` again:
its new limits replace the held ones at once and it goes through the re-admission hold and ramp
(``admission``). A rack never seen ``ok`` since the controller started has nothing to hold.

The hold depends on time, so a held rack's outcome is never reused by a later full cycle
(``engine._Entry.reusable``): its expiry is always seen. An urgent (inputs-only) cycle keeps the
last full cycle's hold, which is never more permissive.
"""

from __future__ import annotations

from typing import NamedTuple

from controller.core.policies import Member
from shared.cluster import RackState
from shared.controller_config import AggregationConfig, RosterRack

# The states in which the controller cannot see whether the rack is in parallel.
LOST_STATES = frozenset({RackState.STALE, RackState.INVALID, RackState.COMM_LOST})


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class Isolation(NamedTuple):
    """One rack's place in the bank as last known, after this cycle.

    ``last_in_parallel``/``lost_s`` are what the memory carries: the rack's policy member of its
    latest ``ok`` cycle (None: not in parallel, or known out) and the time of the first cycle
    that found it lost since (None: not lost). ``held`` is that member while the hold lasts,
    ``note`` the reason (``"held: r3 lost 2.1 s ago, isolation in 27.9 s"``).
    """

    last_in_parallel: Member | None = None
    lost_s: float | None = None
    held: Member | None = None
    note: str = ""


NOT_HELD = Isolation()


def isolation_s(roster_rack: RosterRack, agg: AggregationConfig) -> float:
    """The rack's isolation time: its own override, else the aggregation default."""
    return roster_rack.isolation_s if roster_rack.isolation_s is not None else agg.isolation_s


def isolate(
    rack_id: str,
    state: RackState,
    in_parallel: Member | None,
    *,
    last_in_parallel: Member | None,
    lost_s: float | None,
    now_s: float,
    isolation_time_s: float,
) -> Isolation:
    """This cycle's hold of a rack in ``state`` (``in_parallel``: its member when ``ok``), given
    what the memory carries (``last_in_parallel``, ``lost_s``)."""
    if state is RackState.OK:
        return Isolation(in_parallel)
    if last_in_parallel is None or state not in LOST_STATES:
        return NOT_HELD  # never in parallel, already released, or seen out of it
    since_s = now_s if lost_s is None else lost_s
    lost_for_s = now_s - since_s
    if lost_for_s >= isolation_time_s:
        return NOT_HELD  # its BMS has opened its contactor by now: out of the bank
    # A clock stepping back (tests do this) must not print a negative age.
    age_s = max(0.0, lost_for_s)
    note = f"held: {rack_id} lost {age_s:.1f} s ago, isolation in {isolation_time_s - age_s:.1f} s"
    return Isolation(last_in_parallel, since_s, last_in_parallel, note)
