"""The MQTT session driven from the event loop, against real Mosquitto brokers: delivery to a handler,
a failing handler, connecting to a broker that is not up yet, broker restarts and a clean stop."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.config import MqttConfig
from shared.mqtt import Message, MqttSession
from tests.agent.helpers import wait_until
from tests.conftest import BrokerFactory
from tests.fixtures.broker import MosquittoBroker, free_port


def _config(port: int, prefix: str, protocol: str = "5") -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, topic_prefix=prefix, reconnect_min_s=0.05,
                      reconnect_max_s=0.2, protocol=protocol)


# The controller's MQTT 3.1.1 and everyone else's MQTT 5 (properties on every packet).
BOTH_PROTOCOLS = pytest.mark.parametrize("protocol", ["3.1.1", "5"])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


Handler = Callable[[Message], bool | None]


async def _pair(
    port: int, prefix: str, handler: Handler, protocol: str = "5"
) -> tuple[MqttSession, MqttSession]:
    sub = MqttSession(_config(port, prefix, protocol), f"{prefix}-sub", on_message=handler)
    sub.subscribe(f"{prefix}/#")
    pub = MqttSession(_config(port, prefix), f"{prefix}-pub")
    await sub.start()
    await pub.start()
    assert await sub.wait_connected(5) and await pub.wait_connected(5)
    return sub, pub


async def test_messages_reach_the_handler_in_order_and_a_failing_handler_is_counted(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    got: list[bytes] = []

    def handler(msg: Message) -> None:
        if msg.payload == b"bad":
            raise RuntimeError("handler defect")
        got.append(msg.payload)

    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, handler)
    try:
        await asyncio.sleep(0.2)  # SUBACK
        for i in range(200):
            pub.publish(f"{unique_topic_prefix}/x", b"bad" if i == 50 else str(i).encode())
        await wait_until(lambda: len(got) == 199, 5, "199 good messages")
        assert got == [str(i).encode() for i in range(200) if i != 50]
        assert sub.stats.handler_errors == 1
        assert sub.stats.received == 200
        assert sub.is_connected  # the defect did not take the connection down
    finally:
        await pub.stop()
        await sub.stop()


async def test_a_handler_defect_hit_by_every_message_logs_a_sample_and_counts_all(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(msg: Message) -> None:
        raise RuntimeError("handler defect")

    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, handler)
    try:
        await asyncio.sleep(0.2)  # SUBACK
        with caplog.at_level("ERROR", logger="shared.mqtt"):
            for i in range(500):
                pub.publish(f"{unique_topic_prefix}/x", str(i).encode())
            await wait_until(lambda: sub.stats.handler_errors == 500, 5, "500 handler errors")
        assert len([r for r in caplog.records if "message handler failed" in r.getMessage()]) <= 5
        assert sub.is_connected
    finally:
        await pub.stop()
        await sub.stop()


async def test_connects_once_the_broker_is_up_and_comes_back_after_restarts(
    private_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    private_broker.stop()
    got: list[bytes] = []
    sub = MqttSession(_config(private_broker.port, unique_topic_prefix), "late-sub",
                      on_message=lambda m: got.append(m.payload))
    sub.subscribe(f"{unique_topic_prefix}/#")
    await sub.start()
    try:
        await asyncio.sleep(0.5)
        assert not sub.is_connected
        assert sub.stats.connect_failures >= 2  # retried with backoff, the loop kept running
        private_broker.start()
        assert await sub.wait_connected(5)
        for round_ in range(2):
            private_broker.restart()
            await wait_until(lambda: sub.is_connected, 5, "reconnected")
            pub = MqttSession(_config(private_broker.port, unique_topic_prefix), f"pub-{round_}")
            await pub.start()
            assert await pub.wait_connected(5)
            want = f"after restart {round_}".encode()
            # Subscriptions are renewed on every connect: keep publishing until the SUBACK is in.
            for _ in range(50):
                pub.publish(f"{unique_topic_prefix}/y", want)
                await asyncio.sleep(0.05)
                if want in got:
                    break
            await pub.stop()
            assert want in got
        assert sub.stats.connects == 3
    finally:
        await sub.stop()


async def test_stop_closes_the_socket_and_leaves_no_watcher(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    before = _open_fds()
    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, lambda _m: None)
    await pub.stop()
    await sub.stop()
    assert not sub.is_connected and not sub.connected.is_set()
    assert _open_fds() == before


async def test_stop_while_the_broker_is_unreachable_returns_promptly(unique_topic_prefix: str) -> None:
    from tests.fixtures.broker import free_port  # noqa: PLC0415

    session = MqttSession(_config(free_port(), unique_topic_prefix), "nobody-home")
    await session.start()
    await asyncio.sleep(0.2)
    async with asyncio.timeout(2):
        await session.stop(final=("t/x", b"offline", True))
    assert not session.is_connected


async def test_receiving_leaves_no_cyclic_garbage(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    """Messages are freed by reference counting alone: the receive path creates no reference cycles
    (paho's own per-topic lookup made one per message; a controller at 2000 msg/s paid for it in
    frequent 10–30 ms collections)."""
    import gc  # noqa: PLC0415

    got: list[bytes] = []
    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, lambda m: got.append(m.payload))
    try:
        await asyncio.sleep(0.2)  # SUBACK
        gc.collect()
        gc.disable()
        try:
            for i in range(1000):
                pub.publish(f"{unique_topic_prefix}/rack/r{i % 50}/telemetry", b"x" * 200)
                if i % 100 == 99:
                    await asyncio.sleep(0.01)
            await wait_until(lambda: len(got) == 1000, 5, "1000 messages")
            cyclic = gc.collect()
        finally:
            gc.enable()
        assert cyclic < 200, f"{cyclic} objects in reference cycles after 1000 messages"
    finally:
        await pub.stop()
        await sub.stop()


@BOTH_PROTOCOLS
async def test_a_burst_is_read_ahead_in_large_chunks_and_arrives_whole_and_in_order(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, protocol: str
) -> None:
    """A burst read from the socket in large chunks: packets that straddle chunks, and one larger
    than a chunk, arrive whole and in order."""
    got: list[bytes] = []
    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, lambda m: got.append(m.payload), protocol)
    sizes = [(i * 7919) % 1500 for i in range(3000)]
    sizes[1234] = 200_000  # larger than a read-ahead chunk
    payloads = [bytes([i % 251]) * size + i.to_bytes(4, "big") for i, size in enumerate(sizes)]
    try:
        await asyncio.sleep(0.2)  # SUBACK
        for payload in payloads:
            pub.publish(f"{unique_topic_prefix}/burst", payload)
        await wait_until(lambda: len(got) == len(payloads), 10, "the whole burst")
        assert got == payloads
    finally:
        await pub.stop()
        await sub.stop()


@BOTH_PROTOCOLS
async def test_mixed_traffic_keeps_its_order_qos_and_retain_flags(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, protocol: str
) -> None:
    """QoS 0 and QoS 1 PUBLISH packets (with their PUBACK), SUBACK, retained deliveries: interleaved,
    they reach the handler in order, with their retain flags, and the QoS 1 acknowledgements keep the
    broker sending."""
    prefix = unique_topic_prefix
    got: list[tuple[str, bytes, bool]] = []
    pub = MqttSession(_config(mqtt_broker.port, prefix), f"{prefix}-pub")
    await pub.start()
    assert await pub.wait_connected(5)
    for i in range(5):  # retained before the subscriber exists: delivered to it with the flag set
        pub.publish(f"{prefix}/kept/{i}", b"kept%d" % i, qos=i % 2, retain=True)
    await asyncio.sleep(0.2)
    sub = MqttSession(_config(mqtt_broker.port, prefix, protocol), f"{prefix}-sub",
                      on_message=lambda m: got.append((m.topic, m.payload, m.retain)))
    sub.subscribe(f"{prefix}/kept/#", qos=1)
    sub.subscribe(f"{prefix}/live", qos=1)
    await sub.start()
    try:
        assert await sub.wait_connected(5)
        await wait_until(lambda: len(got) == 5, 5, "the retained messages")
        assert sorted(got) == [(f"{prefix}/kept/{i}", b"kept%d" % i, True) for i in range(5)]
        got.clear()
        # Fewer QoS 1 messages than a publisher's window (paho's: 20 in flight): more could be held
        # back at the publisher while QoS 0 ones pass them, which is its order, not the session's.
        qos = [1 if i % 25 == 0 else 0 for i in range(400)]
        for i, q in enumerate(qos):
            pub.publish(f"{prefix}/live", b"live%d" % i, qos=q, retain=False)
        await wait_until(lambda: len(got) == len(qos), 5, "the live burst")
        assert got == [(f"{prefix}/live", b"live%d" % i, False) for i in range(len(qos))]
    finally:
        await pub.stop()
        await sub.stop()


@BOTH_PROTOCOLS
async def test_a_handler_asking_to_act_now_is_acted_on_before_the_rest_of_the_burst(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, protocol: str
) -> None:
    """The controller's handler returns True for an urgent payload: what waits for it (the urgent
    cycle) runs before the messages read ahead behind it are handled."""
    got: list[bytes] = []
    urgent = asyncio.Event()
    seen_when_woken: list[int] = []

    def handler(msg: Message) -> bool:
        got.append(msg.payload)
        if msg.payload.startswith(b"urgent"):
            urgent.set()
            return True
        return False

    async def act() -> None:
        while True:
            await urgent.wait()
            urgent.clear()
            seen_when_woken.append(len(got))

    sub, pub = await _pair(mqtt_broker.port, unique_topic_prefix, handler, protocol)
    actor = asyncio.create_task(act())
    try:
        await asyncio.sleep(0.2)  # SUBACK
        marks = {100, 140, 141, 250}
        for i in range(300):
            pub.publish(f"{unique_topic_prefix}/x", (b"urgent" if i in marks else b"routine") + bytes(20))
        await wait_until(lambda: len(got) == 300, 5, "the whole burst")
        await asyncio.sleep(0.05)
        assert seen_when_woken == [101, 141, 142, 251]
    finally:
        actor.cancel()
        await pub.stop()
        await sub.stop()


async def test_username_and_password_are_sent_and_a_refusal_is_retried(
    broker_factory: BrokerFactory, unique_topic_prefix: str
) -> None:
    """A broker that allows only a known user: the right password connects; a wrong one is refused
    (a CONNACK refusal, counted and retried like any failed connect, the loop still running)."""
    where = Path(tempfile.mkdtemp(prefix="bmslink-passwd-"))
    os.chmod(where, 0o755)  # the broker may drop to its own user
    try:
        passwd = where / "passwd"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "rack-01", "s3cret"], check=True,
                       capture_output=True, timeout=30)
        os.chmod(passwd, 0o644)
        port = free_port()
        broker_factory(extra_config=[f"listener {port} 127.0.0.1", "allow_anonymous false",
                                     f"password_file {passwd}"])

        def config(password: str) -> MqttConfig:
            return MqttConfig(host="127.0.0.1", port=port, topic_prefix=unique_topic_prefix,
                              username="rack-01", password=password, reconnect_min_s=0.05,
                              reconnect_max_s=0.2)

        good = MqttSession(config("s3cret"), "auth-good")
        bad = MqttSession(config("wrong"), "auth-bad")
        await good.start()
        await bad.start()
        try:
            assert await good.wait_connected(5)
            await wait_until(lambda: bad.stats.connect_failures >= 2, 5, "refusals retried")
            assert not bad.is_connected
        finally:
            await bad.stop()
            await good.stop()
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def test_mqtt5_message_expiry_is_carried_and_3_1_1_publishes_without_it(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    """A retained message published with ``expiry_s`` under MQTT 5 is gone once it expired; under
    3.1.1, which has no expiry, the same publish goes out and stays."""
    prefix = unique_topic_prefix
    v5 = MqttSession(_config(mqtt_broker.port, prefix, "5"), f"{prefix}-v5")
    v311 = MqttSession(_config(mqtt_broker.port, prefix, "3.1.1"), f"{prefix}-v311")
    await v5.start()
    await v311.start()
    try:
        assert await v5.wait_connected(5) and await v311.wait_connected(5)
        assert v5.publish(f"{prefix}/expiring", b"v5", qos=1, retain=True, expiry_s=1)
        assert v311.publish(f"{prefix}/kept", b"v311", qos=1, retain=True, expiry_s=1)
        await asyncio.sleep(2.5)
        got: list[tuple[str, bytes]] = []
        late = MqttSession(_config(mqtt_broker.port, prefix), f"{prefix}-late",
                           on_message=lambda m: got.append((m.topic, m.payload)))
        late.subscribe(f"{prefix}/#")
        await late.start()
        try:
            assert await late.wait_connected(5)
            await wait_until(lambda: len(got) >= 1, 5, "the retained message")
            await asyncio.sleep(0.3)
            assert got == [(f"{prefix}/kept", b"v311")]
        finally:
            await late.stop()
        v311.publish(f"{prefix}/kept", b"", qos=1, retain=True)  # clear the retained message
    finally:
        await v311.stop()
        await v5.stop()


async def test_a_publish_while_disconnected_is_dropped_whatever_its_qos(
    private_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    """Not connected: publish returns False and counts the message, QoS 1 included; nothing is kept
    to be sent after the reconnect, where it would arrive late as if current."""
    prefix = unique_topic_prefix
    private_broker.stop()
    session = MqttSession(_config(private_broker.port, prefix), f"{prefix}-offline")
    await session.start()
    try:
        assert not session.publish(f"{prefix}/late", b"stale", qos=1, retain=True)
        assert not session.publish(f"{prefix}/late", b"stale", qos=0, retain=True)
        assert session.stats.publish_dropped_offline == 2
        private_broker.start()
        assert await session.wait_connected(5)
        await asyncio.sleep(0.3)
        got: list[bytes] = []
        watcher = MqttSession(_config(private_broker.port, prefix), f"{prefix}-watcher",
                              on_message=lambda m: got.append(m.payload))
        watcher.subscribe(f"{prefix}/#")
        await watcher.start()
        try:
            assert await watcher.wait_connected(5)
            assert session.publish(f"{prefix}/now", b"current", qos=1)
            await wait_until(lambda: got == [b"current"], 5, "the current message only")
        finally:
            await watcher.stop()
    finally:
        await session.stop()
