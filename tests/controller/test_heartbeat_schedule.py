"""A drift-free heartbeat: N sets in N periods, on absolute deadlines that urgent sets do not move.

Before, each set scheduled the next one a period after *itself*, so every millisecond of lateness
was added to all later periods (597 sets in 600 s), and an urgent set postponed the heartbeat.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import can
import pytest

from controller.service import ControllerService, HeartbeatSchedule
from shared.codec import encode
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import measurements, telemetry
from tests.fixtures.broker import MosquittoBroker, free_port

WALL_EPOCH_S = 1_790_000_000.0


def config(channel: str, period_ms: int, *, dialect: str = "pylon", port: int = 1,
           prefix: str = "hb") -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": "n1",
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000},
        "can": {"interface": "virtual", "channel": channel, "period_ms": period_ms, "dialect": dialect},
    }, ControllerConfig, "<test>")


# -- the schedule itself -----------------------------------------------------------------------


def test_late_sends_do_not_move_the_deadlines() -> None:
    s = HeartbeatSchedule(1.0)
    s.restart(10.0)
    assert s.due(10.0) and s.next_s == 10.0
    for k, late in enumerate((0.0, 0.006, 0.3, 0.999, 0.0)):
        now = 10.0 + k + late
        assert s.due(now)
        s.sent(now)
        assert s.next_s == pytest.approx(10.0 + k + 1)  # not now + period
        assert not s.due(now)
    assert s.skipped == 0


def test_a_set_more_than_a_period_late_skips_the_past_deadlines_counted() -> None:
    s = HeartbeatSchedule(1.0)
    s.restart(0.0)
    s.sent(0.0)  # deadline 0 done; next 1.0
    s.sent(3.5)  # deadline 1 served at 3.5: 2 and 3 are past -> skipped, next is 4
    assert s.next_s == pytest.approx(4.0)
    assert s.skipped == 2
    s.sent(5.0)  # exactly on the following deadline: served late, that one is skipped too
    assert s.next_s == pytest.approx(6.0)
    assert s.skipped == 3


def test_restart_anchors_a_new_schedule() -> None:
    s = HeartbeatSchedule(0.2)
    s.restart(0.0)
    s.sent(0.0)
    s.restart(5.05)  # a takeover: this node's schedule starts with its first set
    assert s.due(5.05) and s.next_s == 5.05
    s.sent(5.06)
    assert s.next_s == pytest.approx(5.25)
    with pytest.raises(ValueError, match="period_s"):
        HeartbeatSchedule(0.0)


# -- the service on an injected clock ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_EPOCH_S + self.now


@pytest.fixture
async def clocked() -> AsyncIterator[Callable[..., Any]]:
    made: list[ControllerService] = []

    async def make(period_ms: int, **kw: Any) -> tuple[ControllerService, FakeClock]:
        clock = FakeClock()
        svc = ControllerService(config(f"hb-{free_port()}", period_ms, **kw), monotonic=clock,
                                wall_clock=clock.wall)
        assert await svc.can.start()
        made.append(svc)
        return svc, clock

    yield make
    for svc in made:
        await svc.can.stop()


def _payload(svc: ControllerService, clock: FakeClock, seq: int, ccl: float) -> None:
    t = telemetry(rack_id="rack-01", seq=seq, timestamp_s=clock.wall(),
                  measurements=measurements(charge_current_limit_a=ccl))
    ingest = svc.table.ingest(svc.topics.rack_telemetry("rack-01"), encode(t), clock.now)
    assert ingest.accepted


def _run(svc: ControllerService, clock: FakeClock, until: float, step: float,
         each: Callable[[float], None] | None = None) -> list[tuple[float, bool]]:
    """Drive the control cycle as the loop would, every ``step`` s: (time, is heartbeat) of each set."""
    sets: list[tuple[float, bool]] = []
    while clock.now < until:
        if each is not None:
            each(clock.now)
        hb, urgent = svc.stats.heartbeat_sets, svc.stats.urgent_sets
        svc.run_due_cycle()
        if svc.stats.heartbeat_sets > hb:
            sets.append((clock.now, True))
        if svc.stats.urgent_sets > urgent:
            sets.append((clock.now, False))
        clock.now += step
    return sets


async def test_n_heartbeats_in_n_periods_on_their_deadlines(clocked: Callable[..., Any]) -> None:
    svc, clock = await clocked(1000)
    start = clock.now
    svc.heartbeat.restart(start)
    # The loop wakes 7 ms apart here: every set is up to 7 ms late; none of that may accumulate.
    sets = _run(svc, clock, start + 60.0, 0.007)
    beats = [t for t, hb in sets if hb]
    assert len(beats) == 60
    for k, t in enumerate(beats):
        assert start + k <= t < start + k + 0.007 + 1e-9, (k, t - start)
    assert svc.stats.heartbeats_skipped == 0


async def test_urgent_sets_in_between_do_not_shift_the_deadlines(clocked: Callable[..., Any]) -> None:
    svc, clock = await clocked(1000)
    start = clock.now
    svc.heartbeat.restart(start)
    seq = [0]
    next_payload = [start]

    def feed(now: float) -> None:  # a lowered CCL every 350 ms: each one is an urgent set
        if now >= next_payload[0]:
            seq[0] += 1
            _payload(svc, clock, seq[0], 200.0 - seq[0])
            next_payload[0] += 0.35

    sets = _run(svc, clock, start + 20.0, 0.005, feed)
    beats = [t for t, hb in sets if hb]
    urgent = [t for t, hb in sets if not hb]
    assert len(urgent) >= 40  # they did happen in between...
    assert len(beats) == 20  # ...and the heartbeat kept its own deadlines
    for k, t in enumerate(beats):
        assert start + k <= t < start + k + 0.005 + 1e-9, (k, t - start)


async def test_sma_inhibit_holds_and_the_schedule_still_does(clocked: Callable[..., Any]) -> None:
    """SMA: no ID more often than every 200 ms. An urgent set just before a deadline holds that
    heartbeat back until the inhibit ends; the next deadline stays where it was."""
    svc, clock = await clocked(1000, dialect="sma")
    start = clock.now
    svc.heartbeat.restart(start)
    seq = [0]
    lowered: set[int] = set()

    def feed(now: float) -> None:  # a lowered CCL 50 ms before each deadline from the 2nd on
        k = round(now - start)
        if k >= 1 and k not in lowered and now >= start + k - 0.05:
            lowered.add(k)
            seq[0] += 1
            _payload(svc, clock, seq[0], 200.0 - seq[0])

    sets = _run(svc, clock, start + 10.0, 0.005, feed)
    times = [t for t, _ in sets]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.2 - 1e-9, gaps
    beats = [t for t, hb in sets if hb]
    assert len(beats) == 10
    for k, t in enumerate(beats):
        # On its deadline, or held back until 200 ms after the set before it (the urgent one that
        # went out ~50 ms before the deadline), and no later than the loop's next wake-up.
        before = max((x for x in times if x < t), default=-1e9)
        assert start + k <= t <= max(start + k, before + 0.2) + 0.005 + 1e-6, (k, t - start, before - start)
    assert svc.stats.heartbeats_skipped == 0


# -- real time, on a virtual bus ---------------------------------------------------------------


@pytest.fixture
async def live(mqtt_broker: MosquittoBroker, unique_topic_prefix: str
               ) -> AsyncIterator[tuple[ControllerService, MqttSession, Topics, list[float]]]:
    channel = f"hb-{free_port()}"
    frames: list[float] = []
    witness = can.Bus(interface="virtual", channel=channel)
    notifier = can.Notifier(witness, [lambda m: frames.append(time.monotonic())
                                      if m.arbitration_id == 0x351 else None], timeout=0.05)
    svc = ControllerService(config(channel, 200, port=mqtt_broker.port, prefix=unique_topic_prefix))
    pub = MqttSession(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, topic_prefix=unique_topic_prefix),
                      "hb-pub")
    await svc.start()
    await pub.start()
    try:
        assert await pub.wait_connected(5) and await svc.mqtt.wait_connected(5)
        yield svc, pub, Topics(unique_topic_prefix, "site-a"), frames
    finally:
        await pub.stop()
        await svc.stop()
        notifier.stop()
        witness.shutdown()


async def test_real_time_heartbeats_keep_their_count_through_urgent_sets(live: Any) -> None:
    svc, pub, topics, frames = live
    seq = 0

    async def feed(seconds: float, lower: bool) -> None:
        nonlocal seq
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            seq += 1
            ccl = 200.0 - seq if lower else 200.0
            t = telemetry(rack_id="rack-01", seq=seq, timestamp_s=time.time(),
                          measurements=measurements(charge_current_limit_a=ccl))
            pub.publish(topics.rack_telemetry("rack-01"), encode(t))
            await asyncio.sleep(0.13)

    await feed(1.0, lower=False)
    await wait_until(lambda: svc.stats.heartbeat_sets >= 3, 2.0, "heartbeats")
    beats0, urgent0, frames0 = svc.stats.heartbeat_sets, svc.stats.urgent_sets, len(frames)
    await feed(3.0, lower=True)  # a lowered limit every 130 ms: an urgent set each, period 200 ms
    beats = svc.stats.heartbeat_sets - beats0
    urgent = svc.stats.urgent_sets - urgent0
    assert urgent >= 15, svc.stats
    assert 14 <= beats <= 16, svc.stats  # 3 s / 200 ms, the window's edges aside
    assert len(frames) - frames0 >= beats + urgent - 2  # every set reached the bus
