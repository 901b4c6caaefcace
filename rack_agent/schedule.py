"""Fixed-rate poll schedule without drift.

Poll n starts at t0 + n·interval. A poll that overruns its slot makes the
schedule skip the slots it ran into (they are counted), never bunch them up.
Pure: the caller supplies the clock readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    start_s: float
    skipped: int


class FixedRateSchedule:
    def __init__(self, t0_s: float, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval must be positive")
        self.t0_s = t0_s
        self.interval_s = interval_s
        self._next_index = 0
        self.skipped_total = 0

    def next_slot(self, now_s: float) -> Slot:
        """The next slot to run at or after ``now_s``; slots already past are skipped and counted."""
        index = self._next_index
        start = self.t0_s + index * self.interval_s
        skipped = 0
        if now_s > start:
            # Late: a slot whose start has passed is only usable if we are still within it.
            late_slots = math.floor((now_s - self.t0_s) / self.interval_s)
            if late_slots > index:
                skipped = late_slots - index
                index = late_slots
            start = self.t0_s + index * self.interval_s
            if now_s - start > 0.5 * self.interval_s:
                # More than half a slot late: running now would bunch against the next slot.
                skipped += 1
                index += 1
                start = self.t0_s + index * self.interval_s
        self._next_index = index + 1
        self.skipped_total += skipped
        return Slot(index, start, skipped)
