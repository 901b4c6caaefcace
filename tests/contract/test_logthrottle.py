"""Rate-limited logging: a flood costs a few lines, the rest is counted and said later."""

from __future__ import annotations

import logging

import pytest

from shared.logthrottle import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _throttled(caplog: pytest.LogCaptureFixture, clock: Clock, **kw: int) -> ThrottledLog:
    caplog.set_level(logging.INFO, logger="test.throttle")
    return ThrottledLog(logging.getLogger("test.throttle"), interval_s=10.0, burst=3, clock=clock, **kw)


def test_a_burst_passes_then_lines_are_counted_and_reported_with_the_next_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    throttled = _throttled(caplog, clock)
    written = [throttled.warning("k", "bad payload %d", n) for n in range(1000)]
    assert written[:3] == [True] * 3 and not any(written[3:])
    assert throttled.suppressed_total == 997
    clock.now = 10.0
    assert throttled.warning("k", "bad payload %d", 1000)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[-1] == "bad payload 1000 [997 similar suppressed in the last 10 s]"


def test_kinds_are_limited_separately(caplog: pytest.LogCaptureFixture) -> None:
    throttled = _throttled(caplog, Clock())
    for _ in range(10):
        throttled.warning(("rack-01", "invalid"), "a")
        throttled.warning(("rack-02", "invalid"), "b")
    assert [r.getMessage() for r in caplog.records].count("a") == 3
    assert [r.getMessage() for r in caplog.records].count("b") == 3


def test_attacker_chosen_kinds_cannot_grow_memory_or_the_log(caplog: pytest.LogCaptureFixture) -> None:
    throttled = _throttled(caplog, Clock(), max_kinds=16)
    for n in range(10_000):
        throttled.warning(("unknown", f"rack-{n}"), "telemetry from rack-%d", n)
    assert len(caplog.records) <= 16 * 3
    assert throttled.suppressed_total >= 10_000 - 16 * 3


def test_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    throttled = _throttled(caplog, Clock())
    caplog.set_level(logging.ERROR, logger="test.throttle")
    assert not throttled.info("k", "x")
    assert throttled.suppressed_total == 0
