"""The choice for a foreign transmitter with failover on (docs/failover.md, "Foreign transmitter"),
tested with a real second transmitter on a virtual bus:

* heartbeats on: a bmslink controller is recognised by its heartbeat, a foreign node is not. The
  active holds (keeps sending, raises the alarm); a standby does not take the foreign frames for an
  active, so when the active dies it takes over through the flood. A new bmslink active's first set
  (sent just before its heartbeat) is not mistaken for a foreign one.
* heartbeats off: the limits frames are the only sign of another active, so an active yields (two
  bmslink actives must never both transmit), and raises the alarm.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from controller.failover import Role
from controller.service import ControllerService
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from tests.agent.helpers import wait_until
from tests.controller.test_foreign_transmitter import ForeignNode, Witness
from tests.fixtures.broker import MosquittoBroker, free_port


def cfg(broker: MosquittoBroker, prefix: str, channel: str, node: int, **failover: Any) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": f"n{node}",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
        "failover": {"enabled": True, "node_number": node, "rank": node - 1, **failover},
    }, ControllerConfig, "<test>")


async def test_heartbeats_on_the_active_holds_and_a_standby_takes_over_through_the_flood(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    channel = f"ff-{free_port()}"
    witness = Witness(channel)
    a = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1))
    b = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 2))
    foreign = ForeignNode(channel)
    await a.start()
    await b.start()
    try:
        await wait_until(lambda: Role.ACTIVE in (a.role, b.role), 3.0, "an active")
        await asyncio.sleep(1.0)
        active, standby = (a, b) if a.role is Role.ACTIVE else (b, a)
        assert standby.role is Role.STANDBY
        # The standby heard the active's first set before its first heartbeat: claimed, not foreign.
        assert standby.foreign.detections == 0 and active.foreign.detections == 0
        assert active.roles is not None
        transitions = active.roles.transitions
        refused = standby.stats.sets_sent

        foreign.start()
        flood = time.monotonic()
        await wait_until(lambda: active.foreign_transmitter, 1.0, "the active's alarm")
        await asyncio.sleep(2.0)
        # Held: the active did not step down and its frames kept their pace.
        assert active.role is Role.ACTIVE and active.roles.transitions == transitions
        assert len([t for t in witness.ours if t > flood]) >= 2.0 / 0.2 - 2
        assert active.state is not None and active.state.cluster.foreign_transmitter
        # The standby hears the active's heartbeat: the frames may be the active's; it stays quiet.
        assert standby.role is Role.STANDBY and standby.stats.sets_sent == refused
        assert not standby.foreign_transmitter

        # The active dies during the flood: the foreign frames do not count as an active.
        stopped = time.monotonic()
        await active.stop()
        await wait_until(lambda: standby.role is Role.ACTIVE, 2.0, "the takeover through the flood")
        assert time.monotonic() - stopped < 1.5
        await wait_until(lambda: any(t > stopped + 0.1 for t in witness.ours), 1.0, "the new active's frames")
        await wait_until(lambda: standby.foreign_transmitter, 1.0, "the new active's alarm")
        assert foreign.sent > 100
    finally:
        foreign.stop()
        for svc in (a, b):
            if svc._tasks:
                await svc.stop()
        witness.close()


async def test_heartbeats_off_an_active_yields_and_raises_the_alarm(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    channel = f"ff-{free_port()}"
    witness = Witness(channel)
    svc = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1, heartbeat_enabled=False))
    foreign = ForeignNode(channel, period_s=0.05)
    await svc.start()
    try:
        await wait_until(lambda: svc.role is Role.ACTIVE and len(witness.ours) >= 2, 5.0, "active, sending")
        foreign.start()
        await wait_until(lambda: svc.role is Role.STANDBY, 1.0, "yielding")
        assert svc.foreign_transmitter
        assert svc.foreign.detections == 1
        yielded = time.monotonic()
        await asyncio.sleep(1.0)
        assert not [t for t in witness.ours if t > yielded + 0.05]  # never talks over it
        foreign.stop()
        stopped = time.monotonic()
        # Silence again (3 periods of 200 ms): it takes the role back; the alarm stays up a while.
        await wait_until(lambda: svc.role is Role.ACTIVE, 2.0, "active again")
        await wait_until(lambda: any(t > stopped for t in witness.ours), 1.0, "its frames again")
        assert svc.foreign_transmitter
    finally:
        foreign.stop()
        await svc.stop()
        witness.close()


@pytest.mark.parametrize("heartbeat", [True, False])
async def test_a_lone_active_without_foreign_frames_raises_nothing(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, heartbeat: bool
) -> None:
    channel = f"ff-{free_port()}"
    svc = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, 1, heartbeat_enabled=heartbeat))
    await svc.start()
    try:
        await wait_until(lambda: svc.role is Role.ACTIVE, 3.0, "active")
        await asyncio.sleep(1.0)
        assert not svc.foreign_transmitter and svc.foreign.frames == 0
        assert svc.state is not None and not svc.state.cluster.foreign_transmitter
    finally:
        await svc.stop()
