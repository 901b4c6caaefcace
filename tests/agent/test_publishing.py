"""The agent's MQTT side against a real Mosquitto: telemetry, retained status with Last Will,
broker loss and return, the drift-free schedule, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rack_agent.agent import RackAgent
from shared.codec import telemetry_decoder
from shared.config import MqttConfig
from shared.models import RackCommState, RackTelemetry
from shared.mqtt import Message, MqttSession
from shared.topics import Topics
from sim.bms_server import SimulatedBms
from tests.agent.helpers import agent_config, scrape_metrics, wait_until
from tests.fixtures.broker import MosquittoBroker, free_port


class Listener:
    """A plain subscriber on the real broker, decoding telemetry as the controller will."""

    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        self.topics = Topics(prefix, "site-t")
        self.session = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix,
                                              reconnect_min_s=0.1, reconnect_max_s=0.5), f"listener-{prefix}")
        self.session.subscribe(self.topics.all_rack_telemetry)
        self.session.subscribe(self.topics.all_rack_status, qos=1)
        self.decoder = telemetry_decoder()
        self.telemetry: list[tuple[float, RackTelemetry]] = []
        self.status: list[tuple[float, str, bool]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        await self.session.start()
        assert await self.session.wait_connected(5.0)
        self._task = asyncio.create_task(self._pump(), name="listener-pump")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.session.stop()

    async def _pump(self) -> None:
        while True:
            msg: Message = await self.session.messages.get()
            if msg.topic.endswith("/status"):
                self.status.append((msg.received_monotonic_s, msg.payload.decode(), msg.retain))
            else:
                self.telemetry.append((msg.received_monotonic_s, self.decoder.decode(msg.payload, msg.topic)))


@pytest.fixture
async def sim_tcp() -> AsyncIterator[tuple[SimulatedBms, dict[str, Any]]]:
    sim = SimulatedBms()
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    try:
        yield sim, {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port}
    finally:
        await sim.stop()


async def _run_agent(agent: RackAgent) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(agent.run(stop), name="agent-under-test")


async def test_publishes_telemetry_and_retained_status_with_last_will(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, sim_tcp: tuple[SimulatedBms, dict[str, Any]]
) -> None:
    _sim, link = sim_tcp
    agent = RackAgent(agent_config(link, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix))
    async with Listener(mqtt_broker, unique_topic_prefix) as listener:
        stop, task = await _run_agent(agent)
        try:
            await wait_until(lambda: len(listener.telemetry) >= 5, 5.0, "5 telemetry messages")
            await wait_until(lambda: ("online" in [s for _, s, _ in listener.status]), 2.0, "online status")
        finally:
            stop.set()
            await task
        await wait_until(lambda: listener.status[-1][1] == "offline", 2.0, "offline on clean stop")
    seqs = [t.seq for _, t in listener.telemetry]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(t.comm_state is RackCommState.OK for _, t in listener.telemetry)
    assert listener.decoder.rejected == {}


async def test_status_is_retained_for_late_subscribers(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, sim_tcp: tuple[SimulatedBms, dict[str, Any]]
) -> None:
    _sim, link = sim_tcp
    agent = RackAgent(agent_config(link, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix))
    stop, task = await _run_agent(agent)
    try:
        await wait_until(lambda: agent.stats.published >= 2, 5.0, "agent publishing")
        async with Listener(mqtt_broker, unique_topic_prefix) as late:
            await wait_until(lambda: bool(late.status), 2.0, "retained status")
            assert late.status[0][1:] == ("online", True)
    finally:
        stop.set()
        await task


async def test_survives_broker_restart_and_publishes_fresh_state_within_5_s(
    private_broker: MosquittoBroker, unique_topic_prefix: str, sim_tcp: tuple[SimulatedBms, dict[str, Any]]
) -> None:
    _sim, link = sim_tcp
    agent = RackAgent(agent_config(link, mqtt_port=private_broker.port, prefix=unique_topic_prefix,
                                   interval_ms=200, timeout_ms=100))
    stop, task = await _run_agent(agent)
    try:
        await wait_until(lambda: agent.stats.published >= 3, 5.0, "agent publishing")
        private_broker.kill()
        await asyncio.sleep(2.0)
        polls_while_away = agent.stats.polls
        await asyncio.sleep(1.0)
        assert agent.stats.polls > polls_while_away, "polling must go on while the broker is away"
        assert not task.done()
        restart_wall = time.time()
        private_broker.restart()
        returned = time.monotonic()
        async with Listener(private_broker, unique_topic_prefix) as listener:
            await wait_until(lambda: bool(listener.telemetry), 5.0, "telemetry after broker return")
            first_at, first = listener.telemetry[0]
            assert first_at - returned < 5.0
            # Nothing polled while the broker was away may be delivered late as if current.
            assert first.timestamp_s >= restart_wall - 0.5
            await wait_until(
                lambda: "online" in [s for _, s, _ in listener.status], 5.0, "online re-announced"
            )
    finally:
        stop.set()
        await task


async def test_two_hundred_polls_at_100_ms_do_not_drift(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, sim_tcp: tuple[SimulatedBms, dict[str, Any]]
) -> None:
    _sim, link = sim_tcp
    agent = RackAgent(agent_config(link, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix,
                                   interval_ms=100, timeout_ms=50))
    stop = asyncio.Event()
    await agent.run(stop, max_polls=200)
    ended = time.monotonic()
    assert agent.schedule is not None
    interval = agent.schedule.interval_s
    expected_end = agent.schedule.t0_s + 200 * interval
    assert agent.stats.polls == 200
    assert abs(ended - expected_end) <= interval, (ended - expected_end, agent.stats.slots_skipped)


async def test_metrics_endpoint_reports_latency_and_failures(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, sim_tcp: tuple[SimulatedBms, dict[str, Any]]
) -> None:
    sim, link = sim_tcp
    port = free_port()
    agent = RackAgent(agent_config(link, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix,
                                   extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": port}}))
    stop, task = await _run_agent(agent)
    try:
        await wait_until(lambda: agent.stats.polls >= 3, 5.0, "polls")
        sim.faults.set_exception(2)
        await wait_until(
            lambda: agent.units["bms"].health.counts["modbus_exception"] >= 1, 5.0, "an exception"
        )

        text = await scrape_metrics(port)
        assert 'bmslink_agent_polls_total{outcome="ok",rack="rack-01",unit="bms"}' in text
        assert 'outcome="modbus_exception"' in text
        assert "bmslink_agent_poll_latency_seconds_bucket" in text
    finally:
        stop.set()
        await task


async def test_metrics_off_by_default(sim_tcp: tuple[SimulatedBms, dict[str, Any]]) -> None:
    _sim, link = sim_tcp
    agent = RackAgent(agent_config(link))
    assert agent.config.metrics.enabled is False
    agent.metrics.serve(agent.config.metrics)
    assert agent.metrics._server is None
