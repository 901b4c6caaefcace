"""Slew limit on the bank current limits: decreases apply at once, increases ramp.

A falling limit protects a rack and must reach the inverter in the same cycle. A rising one
ramps at ``AggregationConfig.ramp_up_a_per_s`` because inverters follow fast rises badly
(Louisvdw#659: a MultiPlus "not able to stay behind" per-second changes) and a returning
rack should not take a current step. The memory holds the unrounded slewed value so that
increments smaller than the 0.1 A output step still add up; under steady input the value
reaches its target exactly and stays there (no chatter). The first cycle (no previous time)
ramps from 0.
"""

from __future__ import annotations


def slew(previous_a: float, target_a: float, elapsed_s: float, rate_a_per_s: float) -> float:
    """The next limit: ``target_a`` if it is lower, else at most ``rate × elapsed`` above ``previous_a``."""
    if target_a <= previous_a:
        return target_a
    return min(target_a, previous_a + rate_a_per_s * max(0.0, elapsed_s))
