"""Human-readable reasons: why each bank limit and each rack's state is what it is.

The strings are for people reading the consolidated state (monitoring, logs), not for
parsing. They always name the deciding rack and the arithmetic, e.g.::

    CCL 448.0 A = r3 112.0 A (cell max 3.430 V taper ×0.80, reports 140.0 A) × 4 eligible
    CCL 180.0 A = r1 100.0 A × 1.80 (1 full, r2 ramping 0.80), rising at 10 A/s toward 200.0 A
    CCL 0 A: r2 charge_over_temperature (latched)
    CCL 0 A: not enough racks (1 of min 2)
    CCL 80.0 A = r1 40.0 A × 2 eligible (counting held r1 at its last limits); held: r1 lost 2.1 s
        ago, isolation in 57.9 s
    CVL 51.2 V: no rack in parallel and no pack voltage known, fallback_voltage_v
    CVL 54.0 V = lowest ceiling r1 54.0 V (counting held r1 at its last limits); held: r1 lost
        2.1 s ago, isolation in 57.9 s
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.core.faults import Block
from controller.core.policies import Pick


def limit_reason(
    label: str,
    *,
    out_a: float,
    pick: Pick | None,
    zero_reasons: Sequence[str],
    capped_at_a: float | None,
    rising_to_a: float | None,
    rate_a_per_s: float,
    held: Sequence[str] = (),
) -> str:
    """Reason for a bank current limit (``label`` "CCL" or "DCL"); ``held``: the notes of the
    racks held at their last limits (``isolation``), which keep it from rising."""
    if zero_reasons:
        text = f"{label} 0 A: " + "; ".join(zero_reasons)
    elif pick is None:
        text = f"{label} 0 A: no rack in parallel"
    else:
        text = f"{label} {out_a:.1f} A = {pick.detail}"
        if capped_at_a is not None:
            text += f", capped at the configured maximum {capped_at_a:.1f} A"
        if rising_to_a is not None:
            text += f", rising at {rate_a_per_s:g} A/s toward {rising_to_a:.1f} A"
    return text + held_text(held)


# A bank reason names this many held racks; the others are counted (all of them lose the broker
# together at a thousand racks, and each still has its own line in its rack view).
HELD_NAMED_MAX = 3


def held_text(notes: Sequence[str]) -> str:
    """``"; held: r3 lost 2.1 s ago, isolation in 27.9 s"`` for each held rack, the first few."""
    if not notes:
        return ""
    text = "".join(f"; {note}" for note in notes[:HELD_NAMED_MAX])
    if len(notes) > HELD_NAMED_MAX:
        text += f"; {len(notes) - HELD_NAMED_MAX} more held"
    return text


def rack_reason(
    state_reason: str,
    *,
    hold_note: str = "",
    admission_note: str,
    charge_blocks: Sequence[Block],
    discharge_blocks: Sequence[Block],
    reported: Sequence[Block],
    charge_notes: Sequence[str],
    discharge_notes: Sequence[str],
) -> str:
    """Reason for one rack's view: its state, its hold when it is lost (``isolation``), admission,
    what its latches block (``reported``: latches that block nothing) and how the controller
    derates its limits."""
    parts = [state_reason]
    if hold_note:
        parts.append(hold_note)
    if admission_note:
        parts.append(admission_note)
    if charge_blocks:
        parts.append("blocks charge: " + ", ".join(f"{b.flag} ({b.label})" for b in charge_blocks))
    if discharge_blocks:
        parts.append("blocks discharge: " + ", ".join(f"{b.flag} ({b.label})" for b in discharge_blocks))
    if reported:
        parts.append("holds " + ", ".join(f"{b.flag} ({b.label})" for b in reported))
    if charge_notes:
        parts.append("CCL " + ", ".join(charge_notes))
    if discharge_notes:
        parts.append("DCL " + ", ".join(discharge_notes))
    return "; ".join(parts)
