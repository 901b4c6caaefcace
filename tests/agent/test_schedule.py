"""Fixed-rate schedule: poll n at t0 + n·interval, overruns skip slots (counted), never bunch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rack_agent.schedule import FixedRateSchedule


def test_on_time_slots_follow_t0_plus_n_interval() -> None:
    s = FixedRateSchedule(100.0, 0.5)
    starts = [s.next_slot(100.0 + 0.5 * n - 0.01).start_s for n in range(5)]
    assert starts == [100.0, 100.5, 101.0, 101.5, 102.0]
    assert s.skipped_total == 0


def test_slightly_late_runs_at_once_without_skipping() -> None:
    s = FixedRateSchedule(0.0, 1.0)
    s.next_slot(0.0)
    slot = s.next_slot(1.2)  # 0.2 s into slot 1: still ours
    assert (slot.index, slot.start_s, slot.skipped) == (1, 1.0, 0)


def test_overrun_skips_and_counts_never_bunches() -> None:
    s = FixedRateSchedule(0.0, 1.0)
    s.next_slot(0.0)
    slot = s.next_slot(3.7)  # slots 1, 2 missed; 3 is more than half gone
    assert (slot.index, slot.start_s, slot.skipped) == (4, 4.0, 3)
    assert s.skipped_total == 3
    # The next one is the following slot, not a burst of the missed ones.
    assert s.next_slot(4.0).index == 5


@given(st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=50))
def test_slot_starts_are_strictly_increasing_multiples(work_times: list[float]) -> None:
    s = FixedRateSchedule(10.0, 0.25)
    now = 10.0
    last = -1
    for work in work_times:
        slot = s.next_slot(now)
        assert slot.index > last
        assert slot.start_s == pytest.approx(10.0 + slot.index * 0.25)
        assert now - slot.start_s <= 0.125 + 1e-9
        last = slot.index
        now = max(now, slot.start_s) + work


def test_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        FixedRateSchedule(0.0, 0.0)
