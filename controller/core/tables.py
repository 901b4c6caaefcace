"""Piecewise-linear derate tables and the hysteresis operator put on every derate threshold.

A table (``shared.controller_config.Breakpoint`` points, strictly increasing ``x``) gives a
factor 0..1; outside its range the end factor holds. The hysteresis is a *play* (backlash)
operator on the table's input rather than on its output, so it works for any table shape:
the input follows a move toward the harmful side at once (the limit falls in the same
cycle) and follows a move back only once it exceeds the band ``width``, after which it lags
the measurement by ``width``. Noise narrower than the band therefore never moves the factor,
which is what keeps the limits from chattering at a steady temperature or cell voltage.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from itertools import pairwise

from shared.controller_config import Breakpoint


class Harmful(StrEnum):
    """Which direction of the input is the harmful one (the one that must act at once)."""

    HIGH = "high"  # temperature, max cell voltage: rising is bad
    LOW = "low"  # min cell voltage: falling is bad


def interpolate(table: Sequence[Breakpoint], x: float) -> float:
    """Factor of ``table`` at ``x``: linear between breakpoints, the end factor beyond them."""
    first, last = table[0], table[-1]
    if x <= first.x:
        return first.factor
    for lo, hi in pairwise(table):
        if x <= hi.x:
            return lo.factor + (x - lo.x) / (hi.x - lo.x) * (hi.factor - lo.factor)
    return last.factor


def play(held: float | None, x: float, width: float, harmful: Harmful) -> float:
    """The hysteresis-filtered input, given the previously ``held`` value (None: no history).

    Moves to a more harmful ``x`` at once; moves back toward a less harmful one only when ``x``
    has left the band of ``width`` around ``held``, and then stops ``width`` short of it.
    """
    if held is None:
        return x
    if harmful is Harmful.HIGH:
        if x >= held:
            return x
        return x + width if x < held - width else held
    if x <= held:
        return x
    return x - width if x > held + width else held
