"""Quorum and re-admission: which ``ok`` racks count toward the bank, and with what share.

**Re-admission.** A rack that is ``ok`` is in parallel, but it *counts* (is eligible) only
after it has been ``ok`` in every cycle for ``readmit_hold_s``; its share then ramps linearly
0 → 1 over ``readmit_ramp_s``. Any cycle in another state restarts the hold. This is also the
hysteresis of every rack-state threshold (staleness, comm loss, faults): a rack flapping
across one never gets a share.

Constraints apply at once, capacity is granted slowly: a rack that is ``ok`` but still in
its hold is physically in parallel, so its own limits (current minimum, the zero-limit rule,
voltage ceiling and floor) bind the bank from its first ``ok`` cycle, with share 0. What the
hold and the ramp delay is only what the rack *adds* (its share of N in N×min, its limit in
a sum). So re-admission can lower the bank limit at once but never raises it by a step.

**Cold start.** With an initial memory nothing has been seen ``ok`` yet, so every rack goes
through the hold and the ramp at start too: a cold start is exactly when the controller
knows least. With the default 10 s + 10 s the inverter gets CCL = DCL = 0 for 10 s, then a
ramp; the slew limit (``slew.py``) starts from 0 as well.

**Quorum.** Fewer eligible racks (full or ramping) than ``min_racks`` → CCL = DCL = 0 and
``ClusterFlags.not_enough_racks``. Since ``min_racks >= 1``, no eligible rack at all always
trips it, and both directions are disabled.
"""

from __future__ import annotations

from typing import NamedTuple


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class Admission(NamedTuple):
    """One rack's admission this cycle; ``ok_since_s`` is what the memory carries forward."""

    ok_since_s: float | None
    eligible: bool
    share: float
    note: str = ""


def admit(ok_since_s: float | None, is_ok: bool, now_s: float, hold_s: float, ramp_s: float) -> Admission:
    """Admission of a rack that has been ``ok`` since ``ok_since_s`` (None: not ok last cycle)."""
    if not is_ok:
        return Admission(None, eligible=False, share=0.0)
    since_s = now_s if ok_since_s is None else ok_since_s
    ok_for_s = max(0.0, now_s - since_s)
    if ok_for_s < hold_s:
        return Admission(since_s, False, 0.0, f"re-admission hold {ok_for_s:.1f} of {hold_s:.1f} s")
    ramped_s = ok_for_s - hold_s
    if ramp_s <= 0.0 or ramped_s >= ramp_s:
        return Admission(since_s, True, 1.0)
    share = ramped_s / ramp_s
    return Admission(since_s, True, share, f"ramping in, share {share:.2f}")


def quorum_shortfall(
    eligible: int, min_racks: int, *, in_hold: int = 0, in_maintenance: int = 0
) -> str | None:
    """The reason the bank may not carry current for lack of racks, or None when there are enough.

    ``in_hold``: racks ``ok`` but still in their re-admission hold; ``in_maintenance``: racks an operator
    took out. Both are named, so that a start-up with every rack ``ok`` says why it waits.
    """
    if eligible >= min_racks:
        return None
    waiting = [f"{in_hold} in the re-admission hold"] if in_hold else []
    waiting += [f"{in_maintenance} in maintenance"] if in_maintenance else []
    return f"not enough racks ({eligible} of min {min_racks}{'; ' if waiting else ''}{', '.join(waiting)})"
