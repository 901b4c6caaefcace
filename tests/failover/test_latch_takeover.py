"""Latches across controllers: a standby holds the active's latches, a takeover keeps them, a clear
accepted by one node releases them on the other too. Two controller services in one process on a
python-can virtual bus and a real broker, each with its own state database and the same operator key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import can
import pytest

from controller.failover import Role
from controller.frames import FrameDecoder
from controller.service import ControllerService
from shared.codec import encode
from shared.commands import CommandAction, encode_request, new_command, new_key
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig, Dialect
from shared.models import ProtectionFlags
from shared.mqtt import Message, MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import measurements, telemetry
from tests.fixtures.broker import MosquittoBroker, free_port

KEY = new_key()


def cfg(broker: MosquittoBroker, prefix: str, channel: str, node: int, tmp: Path) -> ControllerConfig:
    keys = tmp / "keys.toml"
    if not keys.exists():
        keys.write_text(f'[keys]\nalice = "{KEY}"\n')
        keys.chmod(0o600)
    state = tmp / f"state-{node}"
    state.mkdir(exist_ok=True)
    return validate_config({
        "site_id": "site-a", "node_id": f"n{node}",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}, {"rack_id": "rack-02", "capacity_ah": 280}],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000},
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
        "failover": {"enabled": True, "node_number": node, "rank": node - 1},
        "commands": {"keys_file": str(keys)},
        "state_dir": str(state),
    }, ControllerConfig, "<test>")


class Site:
    def __init__(self, broker: MosquittoBroker, prefix: str, tmp: Path) -> None:
        self.broker, self.prefix, self.tmp = broker, prefix, tmp
        self.channel = f"lt-{free_port()}"
        self.topics = Topics(prefix, "site-a")
        self.nodes: dict[int, ControllerService] = {}
        self.ccl: list[float] = []
        self.listener = can.Bus(interface="virtual", channel=self.channel)
        decoder = FrameDecoder(Dialect.PYLON)

        def on_frame(msg: can.Message) -> None:
            if msg.arbitration_id == 0x351:
                self.ccl.append(decoder.decode(0x351, msg.data)["ChargeCurrentLimit"])

        self.notifier = can.Notifier(self.listener, [on_frame], loop=asyncio.get_running_loop())
        self.pub = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix), "pub")
        self.seq = 1

    async def start(self, node: int) -> ControllerService:
        svc = ControllerService(cfg(self.broker, self.prefix, self.channel, node, self.tmp))
        await svc.start()
        self.nodes[node] = svc
        return svc

    def publish(self, *, hot: bool = False) -> None:
        for rack in ("rack-01", "rack-02"):
            alarms = ProtectionFlags(charge_over_temperature=hot and rack == "rack-01")
            t = telemetry(rack_id=rack, seq=self.seq, timestamp_s=1_790_000_000.0 + self.seq,
                          measurements=measurements(charge_current_limit_a=100.0, alarms=alarms))
            self.pub.publish(self.topics.rack_telemetry(rack), encode(t))
        self.seq += 1

    async def feed(self, seconds: float, *, hot: bool = False) -> None:
        for _ in range(int(seconds / 0.1)):
            self.publish(hot=hot)
            await asyncio.sleep(0.1)

    def active(self) -> ControllerService | None:
        actives = [svc for svc in self.nodes.values() if svc.role is Role.ACTIVE]
        return actives[0] if len(actives) == 1 else None

    async def close(self) -> None:
        await self.pub.stop()
        for svc in self.nodes.values():
            await svc.stop()
        self.notifier.stop()
        self.listener.shutdown()


@pytest.fixture
async def site(mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path) -> AsyncIterator[Site]:
    s = Site(mqtt_broker, unique_topic_prefix, tmp_path)
    await s.pub.start()
    assert await s.pub.wait_connected(5)
    try:
        yield s
    finally:
        await s.close()


def latched(svc: ControllerService) -> set[tuple[str, str]]:
    return {(rack_id, flag) for rack_id, rack in svc.engine.memory.racks.items() for flag in rack.latches}


async def test_a_standby_holds_the_actives_latch_and_keeps_it_through_a_takeover(site: Site) -> None:
    first = await site.start(1)
    await wait_until(lambda: first.role is Role.ACTIVE, 3.0, "n1 active")
    await site.feed(1.0)
    await site.feed(0.3, hot=True)
    await site.feed(0.5)  # the condition is gone again: the latch holds, CCL 0
    assert ("rack-01", "charge_over_temperature") in latched(first)
    assert site.ccl[-1] == 0.0

    # A standby started now never saw the alarm: it holds the latch from the active's retained set.
    second = await site.start(2)
    await wait_until(lambda: ("rack-01", "charge_over_temperature") in latched(second), 3.0, "adopted latch")
    assert second.role is not Role.ACTIVE
    await site.feed(1.0)

    await first.stop()
    del site.nodes[1]
    n = len(site.ccl)
    await wait_until(lambda: second.role is Role.ACTIVE, 3.0, "the takeover")
    await site.feed(1.5)
    assert site.ccl[n:] and max(site.ccl[n:]) == 0.0  # the new active never granted charge current
    assert second.state is not None and second.state.cluster.latched_alarm


async def test_a_clear_accepted_by_the_active_releases_the_standbys_latch_too(site: Site) -> None:
    first = await site.start(1)
    await wait_until(lambda: first.role is Role.ACTIVE, 3.0, "n1 active")
    second = await site.start(2)
    await site.feed(0.5)
    await site.feed(0.3, hot=True)  # both see the alarm and latch it
    await site.feed(0.5)
    assert ("rack-01", "charge_over_temperature") in latched(first) & latched(second)

    command = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id="site-a")
    replies: list[bytes] = []

    def on_reply(message: Message) -> None:
        replies.append(message.payload)

    watcher = MqttSession(MqttConfig(host="127.0.0.1", port=site.broker.port, topic_prefix=site.prefix), "w",
                          on_message=on_reply)
    watcher.subscribe(site.topics.command_reply(command.id), qos=1)
    await watcher.start()
    try:
        assert await watcher.wait_connected(5)
        await asyncio.sleep(0.2)
        site.pub.publish(site.topics.command_request, encode_request(command, bytes.fromhex(KEY)), qos=1)
        await wait_until(lambda: bool(replies), 3.0, "the reply")
    finally:
        await watcher.stop()
    assert len(replies) == 1  # only the active answered
    await wait_until(lambda: not latched(second), 3.0, "the standby released the latch too")
    assert not latched(first)
    assert first.commands.counters["accepted"] == 1 and second.commands.counters["ignored_standby"] == 1

    # After a takeover, the operator's retry of the same command is answered, not run again.
    await first.stop()
    del site.nodes[1]
    await wait_until(lambda: second.role is Role.ACTIVE, 3.0, "the takeover")
    second.commands.on_request(encode_request(command, bytes.fromhex(KEY)))  # the same bytes again
    assert second.commands.counters["retransmitted"] == 1
    assert second.commands.counters["accepted"] == 0


async def _send(site: Site, command_action: CommandAction, racks: tuple[str, ...]) -> None:
    command = new_command(command_action, key_id="alice", site_id="site-a", racks=racks)
    site.pub.publish(site.topics.command_request, encode_request(command, bytes.fromhex(KEY)), qos=1)


async def test_maintenance_is_shared_kept_through_a_takeover_and_ended_everywhere(site: Site) -> None:
    first = await site.start(1)
    await wait_until(lambda: first.role is Role.ACTIVE, 3.0, "n1 active")
    await site.feed(1.0)
    await wait_until(lambda: site.ccl[-1] == 200.0, 2.0, "both racks admitted")
    await _send(site, CommandAction.MAINTENANCE_ON, ("rack-02",))
    await wait_until(lambda: first.maintenance == {"rack-02"}, 3.0, "rack-02 in maintenance")

    # A standby started afterwards never saw the command: it holds rack-02 in maintenance from the
    # active's retained set.
    second = await site.start(2)
    await wait_until(lambda: second.maintenance == {"rack-02"}, 3.0, "adopted maintenance")
    await site.feed(1.0)
    await first.stop()
    del site.nodes[1]
    n = len(site.ccl)
    await wait_until(lambda: second.role is Role.ACTIVE, 3.0, "the takeover")
    await site.feed(1.5)
    assert site.ccl[n:] and max(site.ccl[n:]) <= 100.0  # rack-02 never returned to the bank's capacity

    # The old active comes back as a standby; the new active's "off" ends maintenance on both.
    third = await site.start(1)
    assert third.maintenance == {"rack-02"}  # restored from its own state database
    # Subscribed before the command: a node that misses the "off" reply keeps the rack in maintenance
    # (the safe side; one more "off" ends it), which is not what this test is about.
    assert await third.mqtt.wait_connected(5)
    await asyncio.sleep(0.3)
    await _send(site, CommandAction.MAINTENANCE_OFF, ("rack-02",))
    await wait_until(lambda: not second.maintenance and not third.maintenance, 3.0, "ended everywhere")
    await site.feed(1.0)
    await wait_until(lambda: site.ccl[-1] == 200.0, 2.0, "rack-02 back")
