"""Two controller services in one process on a python-can virtual bus: the role logic wired to real
frames, with and without the controller heartbeat frame."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import can
import pytest

from controller.failover import Role
from controller.service import ControllerService
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from tests.agent.helpers import wait_until
from tests.fixtures.broker import MosquittoBroker, free_port


def cfg(broker: MosquittoBroker, prefix: str, channel: str, node: int, **failover: Any) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": f"n{node}",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
        "failover": {"enabled": True, "node_number": node, "rank": node - 1, **failover},
    }, ControllerConfig, "<test>")


@pytest.mark.parametrize("heartbeat", [True, False])
async def test_one_active_and_takeover_when_it_stops(mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
                                                     heartbeat: bool) -> None:
    channel = f"fo-{free_port()}"
    a = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1, heartbeat_enabled=heartbeat))
    b = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 2, heartbeat_enabled=heartbeat))
    await a.start()
    await b.start()
    try:
        await wait_until(lambda: Role.ACTIVE in (a.role, b.role), 3.0, "an active")
        await asyncio.sleep(1.5)
        roles = sorted([a.role, b.role])
        assert roles == [Role.ACTIVE, Role.STANDBY]
        active, standby = (a, b) if a.role is Role.ACTIVE else (b, a)
        assert active.stats.sets_sent > 0 and standby.stats.sets_sent == 0
        # A standby computes every tick (warm state) but never spins: ~10 cycles/s plus message wake-ups.
        assert standby.stats.cycles < 60, standby.stats
        stopped = time.monotonic()
        await active.stop()
        await wait_until(lambda: standby.role is Role.ACTIVE, 3.0, "the takeover")
        took = time.monotonic() - stopped
        # Includes the stopping service's own MQTT goodbye; the precise figures come from the process
        # tests and bench/failover_takeover.py. Without the heartbeat the 200 ms limits frames time it.
        assert took < 1.5, took
        assert standby.roles is not None and standby.roles.epoch >= 2
    finally:
        for svc in (a, b):
            if svc._tasks:  # stopped above, or still running
                await svc.stop()


async def test_resumed_stall_fences_instead_of_transmitting(mqtt_broker: MosquittoBroker,
                                                            unique_topic_prefix: str) -> None:
    channel = f"fo-{free_port()}"
    svc = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1))
    await svc.start()
    try:
        await wait_until(lambda: svc.role is Role.ACTIVE, 3.0, "active")
        sent = svc.stats.sets_sent
        time.sleep(0.4)  # deliberately block the loop: a stall as seen from inside
        svc.cycle(heartbeat_due=True)  # the first thing after the stall tries to transmit
        assert svc.role is Role.FENCED
        assert svc.stats.sets_sent == sent
        assert svc.stats.sends_refused >= 1
    finally:
        await svc.stop()


async def test_garbled_heartbeat_is_counted_not_fatal(mqtt_broker: MosquittoBroker,
                                                      unique_topic_prefix: str) -> None:
    channel = f"fo-{free_port()}"
    svc = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1))
    await svc.start()
    injector = can.Bus(interface="virtual", channel=channel)
    try:
        injector.send(can.Message(arbitration_id=0x6E0, data=b"\x01", is_extended_id=False))  # short
        injector.send(can.Message(arbitration_id=0x6E0, data=bytes([2, 0x09, 0, 0, 0, 0, 0, 0]),
                                  is_extended_id=False))  # role 9 does not exist
        await wait_until(lambda: svc.can.counters["bad_heartbeats"] == 2, 2.0, "two bad heartbeats counted")
        await wait_until(lambda: svc.role is Role.ACTIVE, 3.0, "still taking the role on an empty bus")
    finally:
        injector.shutdown()
        await svc.stop()
