"""A device that says something the agent cannot use: the unit is reported, the agent goes on.

Real pymodbus servers from ``sim/`` on 127.0.0.1 (TCP) and over a socat pty pair (RTU), serving
SunSpec maps that do not fit the profile (no marker, a short 802, no 803, no end marker) and answers
with fewer registers than asked. The unit is ``invalid_data`` with the reason, discovery is retried
on a bounded backoff (not at every poll), the other units of the agent keep publishing, and a device
that is fixed is heard again without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import pytest

from bmslink.processes import free_port
from rack_agent.agent import RackAgent
from shared.agent_config import AgentConfig
from shared.config import validate_config
from shared.models import LinkStatus, RackCommState, RackTelemetry
from sim.bms_server import SimulatedBms
from sim.faults import SunSpecLayout
from tests.agent.helpers import SimPeer, agent_config, served, started_links, stop_links, wait_until
from tests.agent.test_publishing import Listener
from tests.fixtures.broker import MosquittoBroker

# What the reason of each refused layout must say (the log line and the unit's last error).
LAYOUT_REASONS = {
    SunSpecLayout.NO_MARKER: "no SunS marker at any of [40000, 0, 50000]",
    SunSpecLayout.SHORT_802: "model 802 on the device is shorter than the profile needs (L=50",
    SunSpecLayout.NO_803: "model 803 instance 0 not on the device (models ['1', '802'])",
    SunSpecLayout.NO_END: "runs off the device's registers at 40196 without an end marker",
}


Peer: TypeAlias = SimPeer[SimulatedBms]


@pytest.fixture(params=["tcp", "rtu"])
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    async with served(SimulatedBms(), request.param, request) as served_peer:
        yield served_peer


@pytest.fixture
async def tcp_peer() -> AsyncIterator[Peer]:
    sim = SimulatedBms()
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    try:
        yield Peer(sim, {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port})
    finally:
        await sim.stop()


async def _polls(agent: RackAgent, n: int, pause_s: float = 0.0) -> list[RackTelemetry]:
    out = []
    for _ in range(n):
        out.append(await agent.poll_once())
        if pause_s:
            await asyncio.sleep(pause_s)
    return out


@pytest.mark.parametrize("layout", list(LAYOUT_REASONS), ids=str)
async def test_refused_sunspec_layout_is_invalid_data_with_its_reason(
    peer: Peer, layout: SunSpecLayout, caplog: pytest.LogCaptureFixture
) -> None:
    peer.sim.faults.set_sunspec_layout(layout)
    agent = RackAgent(agent_config(peer.link, profile="sunspec", comm_lost_after=3))
    try:
        await started_links(agent)
        telemetry = await _polls(agent, 4)
    finally:
        await stop_links(agent)
    last = telemetry[-1].units[0]
    assert [t.units[0].status for t in telemetry] == [LinkStatus.INVALID_DATA] * 4
    assert last.counters.invalid_data == 4
    assert last.consecutive_failures == 4
    # Never read: comm-lost from the start, with no measurements and so no current granted.
    assert telemetry[-1].comm_state is RackCommState.COMM_LOST
    assert telemetry[-1].measurements is None
    reason = agent.units["bms"].health.last_error
    assert reason is not None and LAYOUT_REASONS[layout] in reason
    assert "Invalid Data" in caplog.text and LAYOUT_REASONS[layout] in caplog.text


async def test_short_read_of_a_flat_map_is_invalid_data(peer: Peer) -> None:
    peer.sim.faults.set_short_read(3)
    agent = RackAgent(agent_config(peer.link, profile="acme_flat"))
    try:
        await started_links(agent)
        (telemetry,) = await _polls(agent, 1)
        assert telemetry.units[0].status is LinkStatus.INVALID_DATA
        assert agent.units["bms"].health.last_error == (
            "unit bms: Invalid Data: asked 21 registers at 0, got 18"
        )
        peer.sim.faults.set_short_read(0)
        (telemetry,) = await _polls(agent, 1)
        assert telemetry.units[0].status is LinkStatus.OK
        assert telemetry.comm_state is RackCommState.OK
    finally:
        await stop_links(agent)


async def test_refused_layout_is_not_rediscovered_at_every_poll(tcp_peer: Peer) -> None:
    tcp_peer.sim.faults.set_sunspec_layout(SunSpecLayout.NO_803)
    # Backoff 0.4 s doubling to 1.6 s (jitter x0.5..1) against a poll every 100 ms.
    agent = RackAgent(agent_config(tcp_peer.link, profile="sunspec", comm_lost_after=3, extra={
        "polling": {"reconnect_initial_s": 0.4, "reconnect_max_s": 1.6}}))
    try:
        await started_links(agent)
        started = time.monotonic()
        telemetry = await _polls(agent, 25, pause_s=0.1)
        elapsed_s = time.monotonic() - started
    finally:
        await stop_links(agent)
    # Every poll is reported (counted, comm-lost after 3) ...
    assert [t.units[0].status for t in telemetry] == [LinkStatus.INVALID_DATA] * 25
    assert telemetry[-1].units[0].counters.invalid_data == 25
    assert [t.comm_state for t in telemetry[:3]] == [RackCommState.COMM_LOST] * 3
    # ... but the device is asked again only when the backoff allows. The n-th retry comes after
    # delays of 0.4·2^k capped at 1.6 s, each scaled by 0.5..1: at the earliest 0.2, 0.6, 1.4, 2.2 s
    # after the first attempt, at the latest 0.4, 1.2, 2.8, 4.4 s (+ one poll). In ~2.6 s of polls
    # that is 3 to 5 discoveries, not 25.
    earliest = [0.2, 0.6, 1.4, 2.2, 3.0, 3.8, 4.6, 5.4]
    latest = [0.4, 1.2, 2.8, 4.4, 6.0, 7.6]
    attempts = agent.units["bms"].discovery.attempts
    most = 1 + sum(1 for t in earliest if t <= elapsed_s)
    fewest = 1 + sum(1 for t in latest if t + 0.2 <= elapsed_s)
    assert fewest <= attempts <= most, (attempts, elapsed_s)
    assert attempts <= 8
    # The device's own count: a discovery of this map reads 4 times (marker, 3 headers).
    assert tcp_peer.sim.register_reads == 4 * attempts
    assert agent.metrics.registry.get_sample_value(
        "bmslink_agent_discoveries_total", {"rack": "rack-01", "unit": "bms", "outcome": "invalid_data"}
    ) == attempts
    assert "next discovery in" in (agent.units["bms"].health.last_error or "")


async def test_fixed_device_is_rediscovered_and_recovers_by_itself(tcp_peer: Peer) -> None:
    tcp_peer.sim.faults.set_sunspec_layout(SunSpecLayout.SHORT_802)
    tcp_peer.sim.set_current(20.0)
    agent = RackAgent(agent_config(tcp_peer.link, profile="sunspec", comm_lost_after=2))
    try:
        await started_links(agent)
        broken = await _polls(agent, 4, pause_s=0.05)
        assert broken[-1].comm_state is RackCommState.COMM_LOST
        assert broken[-1].units[0].status is LinkStatus.INVALID_DATA
        tcp_peer.sim.faults.set_sunspec_layout(SunSpecLayout.STANDARD)  # e.g. the firmware is fixed
        for _ in range(40):
            t = await agent.poll_once()
            if t.comm_state is RackCommState.OK:
                break
            await asyncio.sleep(0.05)
    finally:
        await stop_links(agent)
    assert t.comm_state is RackCommState.OK, t.units
    assert t.units[0].status is LinkStatus.OK
    m = t.measurements
    assert m is not None and m.charge_current_limit_a > 0
    assert m.current_a == pytest.approx(tcp_peer.sim.model.measurements().current_a, abs=0.2)
    assert agent.units["bms"].health.last_error is None


def _two_unit_config(good: Peer, broken: Peer, broker_port: int, prefix: str) -> AgentConfig:
    return validate_config(
        {
            "site_id": "site-t",
            "rack_id": "rack-01",
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": prefix,
                     "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
            "polling": {"interval_ms": 100, "request_timeout_ms": 60, "comm_lost_after": 3,
                        "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
            "links": [{**good.link, "name": "good-lan"}, {**broken.link, "name": "broken-lan"}],
            "units": [
                {"name": "good", "link": "good-lan", "profile": "acme_flat"},
                {"name": "broken", "link": "broken-lan", "profile": "sunspec"},
            ],
        },
        AgentConfig,
        "<test>",
    )


async def test_broken_unit_is_reported_while_the_other_keeps_publishing(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tcp_peer: Peer
) -> None:
    broken = SimulatedBms()
    port = free_port()
    await broken.start_tcp("127.0.0.1", port)
    broken.faults.set_sunspec_layout(SunSpecLayout.NO_803)
    tcp_peer.sim.set_current(-30.0)
    config = _two_unit_config(
        tcp_peer, Peer(broken, {"type": "modbus_tcp", "host": "127.0.0.1", "port": port}),
        mqtt_broker.port, unique_topic_prefix,
    )
    agent = RackAgent(config)
    stop = asyncio.Event()
    try:
        async with Listener(mqtt_broker, unique_topic_prefix) as listener:
            task = asyncio.create_task(agent.run(stop), name="agent-under-test")
            try:
                await wait_until(lambda: len(listener.telemetry) >= 15, 10.0, "15 telemetry messages")
            finally:
                stop.set()
                await task
    finally:
        await broken.stop()
    latest = listener.telemetry[-1][1]
    units = {u.unit: u for u in latest.units}
    assert units["good"].status is LinkStatus.OK
    assert units["good"].counters.ok >= 14
    assert units["broken"].status is LinkStatus.INVALID_DATA
    assert units["broken"].counters.invalid_data >= 14
    assert "model 803 instance 0 not on the device" in (agent.units["broken"].health.last_error or "")
    # The good unit's readings are published; the rack grants no current while one of its parallel
    # strings cannot be read (comm-lost rule, rack_agent/health.py).
    m = latest.measurements
    assert m is not None
    truth = tcp_peer.sim.model.measurements()
    assert m.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=0.1)
    assert m.current_a == pytest.approx(truth.current_a, abs=0.2)
    assert latest.comm_state is RackCommState.COMM_LOST
    assert (m.charge_current_limit_a, m.discharge_current_limit_a) == (0.0, 0.0)
    seqs = [t.seq for _, t in listener.telemetry]
    assert seqs == sorted(seqs)


async def test_repeated_failures_are_logged_sparingly_and_counted_in_full(
    tcp_peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rack_agent")
    agent = RackAgent(agent_config(tcp_peer.link, comm_lost_after=5))
    try:
        await started_links(agent)
        # A unit that fails every other poll: each failure starts a new streak.
        for i in range(30):
            tcp_peer.sim.faults.set_exception(4 if i % 2 else None)
            await agent.poll_once()
    finally:
        await stop_links(agent)
    failures = [r for r in caplog.records if "Modbus Exception" in r.getMessage()]
    assert 1 <= len(failures) <= 3, [r.getMessage() for r in failures]
    assert agent.units["bms"].health.counts["modbus_exception"] == 15
    counted = agent.metrics.registry.get_sample_value(
        "bmslink_agent_polls_total", {"rack": "rack-01", "unit": "bms", "outcome": "modbus_exception"}
    )
    assert counted == 15
