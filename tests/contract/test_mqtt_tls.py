"""The MQTT session over TLS against a real Mosquitto TLS listener (certificates made with openssl):
a burst of large messages arrives complete and in order (TLS handshake and reads on the event loop),
and a broker it cannot verify is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import MqttConfig, TlsConfig
from shared.mqtt import Message, MqttSession
from tests.agent.helpers import wait_until
from tests.conftest import BrokerFactory
from tests.fixtures.broker import MosquittoBroker, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(where: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=where)


@pytest.fixture(scope="module")
def certificates() -> Iterator[Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    where = Path(tempfile.mkdtemp(prefix="bmslink-tls-"))
    os.chmod(where, 0o755)  # the broker may drop to its own user
    try:
        _ca(where, "ca")
        _ca(where, "other-ca")
        (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                 "-keyout", "server.key", "-out", "server.csr", cwd=where)
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=where)
        for f in where.iterdir():
            os.chmod(f, 0o644)
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory, certificates: Path) -> tuple[MosquittoBroker, int]:
    port = free_port()
    broker = broker_factory(extra_config=[
        f"listener {port} 127.0.0.1",
        f"cafile {certificates / 'ca.crt'}",
        f"certfile {certificates / 'server.crt'}",
        f"keyfile {certificates / 'server.key'}",
    ])
    return broker, port


def _config(port: int, prefix: str, ca: Path, protocol: str = "5") -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, topic_prefix=prefix, tls=TlsConfig(ca_file=ca),
                      reconnect_min_s=0.05, reconnect_max_s=0.2, protocol=protocol)


# The controller's MQTT 3.1.1 and everyone else's MQTT 5.
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_burst_of_large_messages_arrives_complete_over_tls(
    tls_broker: tuple[MosquittoBroker, int], certificates: Path, unique_topic_prefix: str, protocol: str
) -> None:
    _broker, port = tls_broker
    got: list[bytes] = []

    def keep(msg: Message) -> None:
        got.append(msg.payload)

    sub = MqttSession(_config(port, unique_topic_prefix, certificates / "ca.crt", protocol), "tls-sub",
                      on_message=keep)
    sub.subscribe(f"{unique_topic_prefix}/#")
    pub = MqttSession(_config(port, unique_topic_prefix, certificates / "ca.crt"), "tls-pub")
    await sub.start()
    await pub.start()
    try:
        assert await sub.wait_connected(10) and await pub.wait_connected(10)
        await asyncio.sleep(0.2)  # SUBACK
        sent = [i.to_bytes(4, "big") + bytes(1300) for i in range(2000)]
        for i, payload in enumerate(sent):
            pub.publish(f"{unique_topic_prefix}/rack/r{i % 20}/telemetry", payload)
            if i % 500 == 499:
                await asyncio.sleep(0)
        # Once the burst is in, nothing more arrives: every message must have been read without a
        # later segment to wake the reader.
        await wait_until(lambda: len(got) == len(sent), 10, "every message over TLS")
        assert got == sent
    finally:
        await pub.stop()
        await sub.stop()


async def test_a_broker_it_cannot_verify_is_refused(
    tls_broker: tuple[MosquittoBroker, int], certificates: Path, unique_topic_prefix: str
) -> None:
    _broker, port = tls_broker
    session = MqttSession(_config(port, unique_topic_prefix, certificates / "other-ca.crt"), "tls-wrong-ca")
    await session.start()
    try:
        await asyncio.sleep(1.0)
        assert not session.is_connected
        assert session.stats.connect_failures >= 2  # retried with backoff, the loop kept running
    finally:
        await session.stop()


async def test_insecure_skip_verify_connects_to_a_broker_it_cannot_verify(
    tls_broker: tuple[MosquittoBroker, int], certificates: Path, unique_topic_prefix: str
) -> None:
    _broker, port = tls_broker
    config = MqttConfig(host="127.0.0.1", port=port, topic_prefix=unique_topic_prefix,
                        tls=TlsConfig(ca_file=certificates / "other-ca.crt", insecure_skip_verify=True),
                        reconnect_min_s=0.05, reconnect_max_s=0.2)
    session = MqttSession(config, "tls-insecure")
    await session.start()
    try:
        assert await session.wait_connected(10)
        assert session.stats.connect_failures == 0
    finally:
        await session.stop()
