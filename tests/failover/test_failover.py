"""Failover of the master role with real processes: two controllers, a real broker, the CAN bridge,
and a recorder on the bus asserting the takeover time, the longest gap and zero overlap."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.rig import HEARTBEAT_MS, Chain
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.procs import ProcessGroup
from tests.fixtures.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow
PERIOD_S = HEARTBEAT_MS / 1000.0
CONTROLLER_BEAT_S = 0.1
TAKEOVER_TARGET_S = 0.5
GAP_TARGET_S = PERIOD_S + 0.5


async def _two(tmp_path: Path, broker: MosquittoBroker, prefix: str, procs: ProcessGroup) -> Chain:
    chain = Chain(tmp_path, broker, prefix, procs, controllers=2, failover=True)
    await chain.start()
    await chain.wait_for(lambda: chain.recorder.active_node() is not None, 10.0, "an active controller")
    return chain


@pytest.fixture
async def pair(tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
               procs: ProcessGroup) -> AsyncIterator[Chain]:
    chain = await _two(tmp_path, mqtt_broker, unique_topic_prefix, procs)
    try:
        yield chain
    finally:
        await chain.stop()
    assert not chain.recorder.overlaps(CONTROLLER_BEAT_S), chain.recorder.overlaps(CONTROLLER_BEAT_S)
    assert chain.inverter().get("violations", 0) == 0, chain.inverter().get("violation_kinds")


def _name(node: int) -> str:
    return f"ctl-{node}"


async def test_simultaneous_start_gives_one_active_without_overlap(pair: Chain) -> None:
    first = pair.recorder.active_beats()[0]
    await asyncio.sleep(2.0)
    nodes = {b.node for b in pair.recorder.active_beats()}
    # One node only (the rank-0 one unless its process came up a stagger later than the other's).
    assert nodes == {first.node}
    assert pair.recorder.ccl() > 0 or pair.recorder.dcl() > 0


async def _takeover(pair: Chain, sig: signal.Signals) -> tuple[float, float, int]:
    await pair.settle()
    old = pair.recorder.active_node()
    assert old is not None
    killed = time.monotonic()
    pair.procs.send_signal(_name(old), sig)
    at = await pair.wait_for(
        lambda: pair.recorder.active_node() not in (None, old), 5.0, "the standby's takeover"
    )
    new_first = next(b for b in pair.recorder.active_beats(killed) if b.node != old)
    await asyncio.sleep(1.0)
    assert at >= new_first.t
    return new_first.t - killed, pair.recorder.max_gap(killed - 1.0), old


async def test_sigkill_of_the_active(pair: Chain) -> None:
    takeover, gap, old = await _takeover(pair, signal.SIGKILL)
    assert takeover <= TAKEOVER_TARGET_S
    assert gap <= GAP_TARGET_S
    # The old active comes back: it joins as standby, never preempting.
    pair.start_controller(_name(old), node_number=old, rank=old - 1)
    back = time.monotonic()
    await pair.wait_for(lambda: any(b.node == old and b.role == 2 for b in pair.recorder.beats if b.t > back),
                        10.0, "the old active announcing itself as standby")
    await asyncio.sleep(2.0)
    assert not [b for b in pair.recorder.active_beats(back) if b.node == old]


async def test_sigstop_of_the_active_and_it_stays_silent_on_resume(pair: Chain) -> None:
    takeover, gap, old = await _takeover(pair, signal.SIGSTOP)
    assert takeover <= TAKEOVER_TARGET_S
    assert gap <= GAP_TARGET_S
    limits_before = len(pair.recorder.limits())
    resumed = time.monotonic()
    pair.procs.send_signal(_name(old), signal.SIGCONT)
    await asyncio.sleep(3.0)
    # Not a single active frame from the resumed node, and the inverter sees one transmitter's pace.
    assert not [b for b in pair.recorder.active_beats(resumed) if b.node == old]
    sets = len(pair.recorder.limits()) - limits_before
    assert sets <= 3.0 / PERIOD_S + 3
    assert any(b.node == old and b.role == 2 for b in pair.recorder.beats if b.t > resumed)


async def test_broker_restart_changes_nothing_on_can(
    tmp_path: Path, private_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup
) -> None:
    chain = await _two(tmp_path, private_broker, unique_topic_prefix, procs)
    try:
        await chain.settle()
        before = chain.recorder.active_node()
        t0 = time.monotonic()
        await asyncio.to_thread(private_broker.kill)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(private_broker.restart)
        await asyncio.sleep(3.0)
        assert {b.node for b in chain.recorder.active_beats(t0)} == {before}  # no flapping
        assert chain.recorder.max_gap(t0) <= GAP_TARGET_S
    finally:
        await chain.stop()
    assert not chain.recorder.overlaps(CONTROLLER_BEAT_S)


async def test_active_losing_the_broker_hands_over_in_order(
    tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup
) -> None:
    chain = Chain(tmp_path, mqtt_broker, unique_topic_prefix, procs, controllers=2, failover=True)
    proxy = TcpProxy(mqtt_broker.port)
    await proxy.start()
    original = chain.start_controller

    def start_controller(name: str, **kwargs: object) -> None:
        if name == "ctl-1":  # the one that will be active reaches the broker through the proxy
            kwargs["mqtt_port"] = proxy.port
        original(name, **kwargs)

    chain.start_controller = start_controller  # type: ignore[method-assign]
    try:
        await chain.start(ctl_1_active_first=True)
        await chain.settle()
        assert chain.recorder.active_node() == 1
        cut = time.monotonic()
        await proxy.cut()
        # Its CAN side still works, so the standby hears it and must not start on its own...
        await chain.wait_for(lambda: chain.recorder.active_node() == 2, 8.0, "the orderly handover")
        handed = next(b for b in chain.recorder.active_beats(cut) if b.node == 2).t
        releasing = [b for b in chain.recorder.beats if b.node == 1 and b.role == 3 and b.t >= cut]
        assert releasing and releasing[0].t <= handed  # ...it starts on the active's release
        # Meanwhile the inverter never got a stale permission: once its racks were stale the old active
        # sent safe limits until it handed over.
        stale_after = 1.0 + PERIOD_S + 0.3
        released = releasing[0].t
        window = [ccl for t, ccl, _, _ in chain.recorder.limits(cut + stale_after) if t < released]
        assert all(ccl == 0.0 for ccl in window), window
        await chain.wait_for(lambda: chain.recorder.ccl() > 0, 10.0, "permission from the fresh standby")
        assert chain.recorder.max_gap(cut) <= GAP_TARGET_S
    finally:
        await chain.stop()
        await proxy.stop()
    assert not chain.recorder.overlaps(CONTROLLER_BEAT_S)


async def test_active_whose_can_side_fails_is_replaced(
    tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup
) -> None:
    chain = Chain(tmp_path, mqtt_broker, unique_topic_prefix, procs, controllers=2, failover=True)
    proxies: list[TcpProxy] = []

    async def prepare(c: Chain) -> None:
        assert c.bridge is not None
        proxy = TcpProxy(c.bridge.port)
        await proxy.start()
        proxies.append(proxy)

    original = chain.start_controller

    def start_controller(name: str, **kwargs: object) -> None:
        if name == "ctl-1":  # the one that will be active reaches the CAN bus through the proxy
            kwargs["can_channel"] = f"127.0.0.1:{proxies[0].port}"
        original(name, **kwargs)

    chain.start_controller = start_controller  # type: ignore[method-assign]
    try:
        await chain.start(prepare=prepare, ctl_1_active_first=True)
        await chain.settle()
        assert chain.recorder.active_node() == 1
        cut = time.monotonic()
        await proxies[0].cut()
        await chain.wait_for(lambda: chain.recorder.active_node() == 2, 5.0, "the standby's takeover")
        first = next(b for b in chain.recorder.active_beats(cut) if b.node == 2).t
        assert first - cut <= TAKEOVER_TARGET_S + 0.5
        await asyncio.sleep(1.0)
        assert chain.recorder.max_gap(cut) <= GAP_TARGET_S
    finally:
        await chain.stop()
        for proxy in proxies:
            await proxy.stop()
    assert not chain.recorder.overlaps(CONTROLLER_BEAT_S)
