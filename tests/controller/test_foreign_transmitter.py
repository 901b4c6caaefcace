"""A foreign transmitter on 0x351 is an alarm an installer sees: an ERROR log line (rate-limited),
the controller's status, a metric and the published cluster state; the controller holds (keeps
sending its own limits). The failover side of the choice is in tests/failover/test_foreign_failover.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import can
import pytest

from controller.failover import ForeignTransmitterWatch
from controller.frames import FrameDecoder
from controller.service import ControllerService
from shared.cluster import ConsolidatedState, ControllerStatus
from shared.codec import Decoder
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig, Dialect
from shared.mqtt import Message, MqttSession
from shared.topics import Topics
from tests.agent.helpers import scrape_metrics, wait_until
from tests.fixtures.broker import MosquittoBroker, free_port

FOREIGN_CCL_A = 999.0  # what the foreign node claims; our controller (no racks) says 0 A


# -- the watch, as a table ---------------------------------------------------------------------


def test_single_controller_confirms_at_once_and_holds_the_alarm() -> None:
    w = ForeignTransmitterWatch(grace_s=0.0, hold_s=10.0)
    assert not w.raised(0.0)
    w.unattributed(1.0)
    assert w.update(1.0) is True and w.raised(1.0)
    w.unattributed(2.0)
    assert w.update(2.0) is False  # still the same alarm
    assert w.raised(12.0) and not w.raised(12.01)  # held 10 s after the last foreign frame
    assert (w.frames, w.detections) == (2, 1)
    w.unattributed(30.0)
    assert w.update(30.0) is True and w.detections == 2  # a new episode


def test_a_heartbeat_within_the_grace_claims_the_frames() -> None:
    """A new bmslink active's first set leaves just before its first heartbeat: not foreign."""
    w = ForeignTransmitterWatch(grace_s=0.3, hold_s=10.0)
    w.unattributed(1.0)
    assert w.update(1.2) is False
    w.claimed()  # the heartbeat at 1.001 s
    assert w.update(1.5) is False and not w.raised(1.5)
    w.unattributed(2.0)
    w.unattributed(2.1)
    assert w.update(2.29) is False
    assert w.update(2.31) is True and w.raised(2.31)  # nobody claimed them within 300 ms
    assert w.last_foreign_s == 2.1


# -- single controller, a real second transmitter ------------------------------------------------


def cfg(broker: MosquittoBroker, prefix: str, channel: str, metrics_port: int) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": "n1",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "state_publish_period_ms": 200,
    }, ControllerConfig, "<test>")


class ForeignNode:
    """Another transmitter on the bus: 0x351 with its own (high) limits every ``period_s``."""

    def __init__(self, channel: str, period_s: float = 0.02) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        # CVL 53.2 V, CCL = DCL = 999.0 A, DVL 46.0 V (Pylon layout, little-endian, 0.1 units).
        current = int(FOREIGN_CCL_A * 10).to_bytes(2, "little")
        self.frame = can.Message(arbitration_id=0x351, is_extended_id=False,
                                 data=bytes([0x14, 0x02]) + current * 2 + bytes([0xCC, 0x01]))
        self.period_s = period_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-node", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.bus.send(self.frame)
            self.sent += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(2)
        self.bus.shutdown()


class Witness:
    """The inverter's view: which limits frames are ours (not the foreign CCL) and when."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.decoder = FrameDecoder(Dialect.PYLON)
        self.ours: list[float] = []
        self.theirs = 0
        self.notifier = can.Notifier(self.bus, [self._rx], timeout=0.05)

    def _rx(self, msg: can.Message) -> None:
        if msg.arbitration_id != 0x351:
            return
        if self.decoder.decode(0x351, msg.data)["ChargeCurrentLimit"] == pytest.approx(FOREIGN_CCL_A):
            self.theirs += 1
        else:
            self.ours.append(time.monotonic())

    def close(self) -> None:
        self.notifier.stop()
        self.bus.shutdown()


class Watcher:
    """What an installer's tools see over MQTT: the last status and cluster state published."""

    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        self.topics = Topics(prefix, "site-a")
        self.status: ControllerStatus | None = None
        self.state: ConsolidatedState | None = None
        self._status = Decoder(ControllerStatus)
        self._state = Decoder(ConsolidatedState)
        self.session = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix),
                                   f"watch-{prefix}", on_message=self._rx)
        self.session.subscribe(self.topics.all_controller_status, qos=1)
        self.session.subscribe(self.topics.cluster_state, qos=0)

    def _rx(self, msg: Message) -> bool:
        if msg.topic == self.topics.cluster_state:
            self.state = self._state.decode(msg.payload, msg.topic)
        elif msg.payload and msg.payload != b"offline":
            self.status = self._status.decode(msg.payload, msg.topic)
        return False


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


async def test_single_controller_raises_the_alarm_everywhere_and_holds(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, errors: pytest.LogCaptureFixture
) -> None:
    channel = f"fx-{free_port()}"
    metrics_port = free_port()
    witness = Witness(channel)
    svc = ControllerService(cfg(mqtt_broker, unique_topic_prefix, channel, metrics_port))
    watcher = Watcher(mqtt_broker, unique_topic_prefix)
    foreign = ForeignNode(channel)
    await svc.start()
    await watcher.session.start()
    try:
        assert await watcher.session.wait_connected(5) and await svc.mqtt.wait_connected(5)
        await wait_until(lambda: len(witness.ours) >= 2, 3.0, "our frames")
        assert not svc.foreign_transmitter
        foreign.start()
        flood = time.monotonic()
        await wait_until(lambda: svc.foreign_transmitter, 1.0, "the alarm")
        await asyncio.sleep(2.0)  # a 50 Hz flood for a while
        # Held: our frames kept their pace through the flood (200 ms period).
        ours = [t for t in witness.ours if t > flood]
        assert len(ours) >= 2.0 / 0.2 - 2, len(ours)
        assert witness.theirs > 50
        # The alarm, everywhere an installer looks.
        await wait_until(lambda: watcher.state is not None and watcher.state.cluster.foreign_transmitter,
                         2.0, "the published cluster state")
        await wait_until(lambda: watcher.status is not None and watcher.status.foreign_transmitter,
                         2.0, "the published status")
        status: Any = watcher.status
        assert status.foreign_limits_frames > 0 and status.foreign_transmitter_last_seen_s is not None
        assert abs(status.foreign_transmitter_last_seen_s - time.time()) < 5.0
        assert svc.state is not None and svc.state.cluster.foreign_transmitter
        text = await scrape_metrics(metrics_port)
        assert "bmslink_controller_foreign_transmitter 1.0" in text
        assert "bmslink_controller_foreign_transmitter_detections_total 1.0" in text
        assert "bmslink_controller_foreign_limits_frames_total " in text
        lines = [r for r in errors.records if "foreign transmitter" in r.getMessage()]
        assert lines and all(r.levelno == logging.ERROR for r in lines)
        assert len(lines) <= 3  # rate-limited: a 50 Hz flood is not 100 lines
        assert svc.can.counters["foreign_limits_frames"] >= witness.theirs - 5
    finally:
        foreign.stop()
        await watcher.session.stop()
        await svc.stop()
        witness.close()
