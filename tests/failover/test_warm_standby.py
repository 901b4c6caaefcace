"""A warm standby (controller/warm_standby.py): started shortly before the active dies, it takes over
with the limits in force instead of sending its racks back through the hold and the ramp; and it never
grants more than it computes itself. Two controller services in one process on a python-can virtual
bus and a real broker, judged by the 0x351 frames on the bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import can
import pytest

from controller.core.memory import CoreMemory, RackMemory
from controller.failover import Role
from controller.frames import FrameDecoder
from controller.service import ControllerService
from controller.warm_standby import warm_memory
from shared.codec import encode
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig, Dialect
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import measurements, telemetry
from tests.fixtures.broker import MosquittoBroker, free_port

HOLD_S, RAMP_S = 3.0, 2.0


def cfg(broker: MosquittoBroker, prefix: str, channel: str, node: int) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": f"n{node}",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}, {"rack_id": "rack-02", "capacity_ah": 280}],
        "aggregation": {"readmit_hold_s": HOLD_S, "readmit_ramp_s": RAMP_S, "ramp_up_a_per_s": 40},
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
        "failover": {"enabled": True, "node_number": node, "rank": node - 1},
        "state_publish_period_ms": 500,
    }, ControllerConfig, "<test>")


class Bank:
    """Two racks publishing at 10 Hz, and the 0x351 frames on the inverter bus."""

    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        self.broker, self.prefix = broker, prefix
        self.channel = f"ws-{free_port()}"
        self.topics = Topics(prefix, "site-a")
        self.frames: list[tuple[float, float, float]] = []  # (time, CCL, DCL)
        self.listener = can.Bus(interface="virtual", channel=self.channel)
        decoder = FrameDecoder(Dialect.PYLON)

        def on_frame(msg: can.Message) -> None:
            if msg.arbitration_id == 0x351:
                v = decoder.decode(0x351, msg.data)
                self.frames.append((time.monotonic(), v["ChargeCurrentLimit"], v["DischargeCurrentLimit"]))

        self.notifier = can.Notifier(self.listener, [on_frame], loop=asyncio.get_running_loop())
        self.pub = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix), "pub")
        self.seq = 1
        self.ccl_per_rack = 100.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pub.start()
        assert await self.pub.wait_connected(5)
        self._task = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        while True:
            for rack in ("rack-01", "rack-02"):
                t = telemetry(rack_id=rack, seq=self.seq, timestamp_s=1_790_000_000.0 + self.seq,
                              measurements=measurements(charge_current_limit_a=self.ccl_per_rack))
                self.pub.publish(self.topics.rack_telemetry(rack), encode(t))
            self.seq += 1
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.pub.stop()
        self.notifier.stop()
        self.listener.shutdown()


@pytest.fixture
async def bank(mqtt_broker: MosquittoBroker, unique_topic_prefix: str) -> AsyncIterator[Bank]:
    b = Bank(mqtt_broker, unique_topic_prefix)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def _takeover_after(bank: Bank, standby_lead_s: float) -> tuple[list[float], float, ControllerService]:
    """An active at full grant; a standby started ``standby_lead_s`` before the active stops. Returns
    the CCLs sent after the stop, the last CCL before it, and the new active."""
    active = ControllerService(cfg(bank.broker, bank.prefix, bank.channel, 1))
    await active.start()
    standby: ControllerService | None = None
    try:
        await wait_until(lambda: active.role is Role.ACTIVE, 3.0, "n1 active")
        await wait_until(lambda: bool(bank.frames) and bank.frames[-1][1] == pytest.approx(200.0),
                         HOLD_S + RAMP_S + 10, "full grant")
        standby = ControllerService(cfg(bank.broker, bank.prefix, bank.channel, 2))
        await standby.start()
        await asyncio.sleep(standby_lead_s)
        before = bank.frames[-1][1]
        stopped = time.monotonic()
        await active.stop()
        await wait_until(lambda: standby is not None and standby.role is Role.ACTIVE, 3.0, "the takeover")
        await asyncio.sleep(1.0)
        return [ccl for t, ccl, _ in bank.frames if t > stopped], before, standby
    finally:
        if active._tasks:
            await active.stop()
        if standby is not None:
            await standby.stop()


async def test_a_standby_started_3_s_before_the_active_dies_keeps_the_limits(bank: Bank) -> None:
    after, before, new_active = await _takeover_after(bank, 3.0)
    assert before == pytest.approx(200.0)
    assert after, "no frames after the takeover"
    assert after[0] == pytest.approx(before)  # the first set of the new active equals the old one's
    assert min(after) == pytest.approx(before)  # and it never dipped
    assert new_active.warm.counters["warm_takeovers"] == 1


async def test_a_warm_takeover_never_grants_more_than_the_new_active_computes(bank: Bank) -> None:
    active = ControllerService(cfg(bank.broker, bank.prefix, bank.channel, 1))
    await active.start()
    standby = ControllerService(cfg(bank.broker, bank.prefix, bank.channel, 2))
    try:
        await wait_until(lambda: active.role is Role.ACTIVE, 3.0, "n1 active")
        await wait_until(lambda: bool(bank.frames) and bank.frames[-1][1] == pytest.approx(200.0),
                         HOLD_S + RAMP_S + 10, "full grant")
        await standby.start()
        await asyncio.sleep(2.0)
        bank.ccl_per_rack = 60.0  # the racks lower their limits as the active dies
        await asyncio.sleep(0.05)
        await active.stop()
        stopped = time.monotonic()
        await wait_until(lambda: standby.role is Role.ACTIVE, 3.0, "the takeover")
        await asyncio.sleep(1.0)
        after = [ccl for t, ccl, _ in bank.frames if t > stopped]
        assert after and max(after) <= 120.0 + 0.1  # 2 × 60 A at once, never the 200 A in force before
    finally:
        for svc in (active, standby):
            if svc._tasks:
                await svc.stop()


def test_warm_memory_skips_the_hold_only_for_the_racks_given() -> None:
    config = validate_config({
        "site_id": "s", "node_id": "n",
        "roster": [{"rack_id": "r1", "capacity_ah": 1}, {"rack_id": "r2", "capacity_ah": 1}],
        "aggregation": {"readmit_hold_s": HOLD_S, "readmit_ramp_s": RAMP_S},
    }, ControllerConfig, "<test>")
    memory = CoreMemory(racks={"r1": RackMemory(ok_since_s=99.0), "r2": RackMemory(ok_since_s=99.0)},
                        charge_limit_a=0.0, discharge_limit_a=0.0, last_now_s=100.0)
    warm = warm_memory(memory, admitted=frozenset({"r1"}), charge_a=150.0, discharge_a=90.0, now_s=100.0,
                       config=config)
    assert warm.racks["r1"].ok_since_s == 100.0 - HOLD_S - RAMP_S
    assert warm.racks["r2"].ok_since_s == 99.0
    assert (warm.charge_limit_a, warm.discharge_limit_a) == (150.0, 90.0)
    older = warm_memory(warm, admitted=frozenset({"r1"}), charge_a=1.0, discharge_a=1.0, now_s=200.0,
                        config=config)
    assert older.racks["r1"].ok_since_s == 100.0 - HOLD_S - RAMP_S  # an earlier admission is kept
