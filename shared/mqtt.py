"""A small asyncio facade over paho-mqtt 2.x, shared by agents and controllers.

paho runs its network loop in its own thread (``loop_start``), which also
gives automatic reconnect with doubling backoff. Its callbacks only hand off
to the event loop: received messages go into a bounded queue as our own frozen
:class:`Message` (drops are counted), connection changes set events.

paho leaves Nagle's algorithm on; the first messages after a connect then
wait 30–40 ms for a delayed ACK, so TCP_NODELAY is set on every new socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.config import MqttConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    received_monotonic_s: float


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class MqttStats:
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    publish_dropped_offline: int = 0
    received: int = 0
    receive_queue_dropped: int = 0
    last_disconnect_reason: str = ""
    extra: dict[str, int] = field(default_factory=dict)


class MqttSession:
    """One MQTT connection with remembered subscriptions and an optional Last Will."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will: Will | None = None,
        receive_queue_size: int = 10_000,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.stats = MqttStats()
        self.messages: asyncio.Queue[Message] = asyncio.Queue(maxsize=receive_queue_size)
        self.connected = asyncio.Event()
        self._on_connected = on_connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[str, int] = {}
        self._expiry_props: dict[int, Properties] = {}
        self._v5 = config.protocol == "5"
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            reconnect_on_failure=True,
        )
        # paho annotates the delays as int but computes with floats; sub-second values matter here.
        self._client.reconnect_delay_set(
            min_delay=config.reconnect_min_s,  # type: ignore[arg-type]
            max_delay=config.reconnect_max_s,  # type: ignore[arg-type]
        )
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            tls = config.tls
            self._client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
            )
            self._client.tls_insecure_set(tls.insecure_skip_verify)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._started = False
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once (the broker may be down)."""
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()
        self._started = True

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, *, final: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly. ``final`` = (topic, payload, retain) is published first (QoS 1).

        A clean disconnect suppresses the Last Will, so a graceful stop publishes
        its own "offline" here.
        """
        if not self._started:
            return
        self._started = False
        self._stopping = True
        if final is not None and self._client.is_connected():
            info = self._client.publish(final[0], final[1], qos=1, retain=final[2])
            await asyncio.to_thread(_wait_published, info, 1.0)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self.connected.clear()

    # -- API ---------------------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        self._subscriptions[topic] = qos
        if self._client.is_connected():
            self._client.subscribe(topic, qos)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, expiry_s: int | None = None
    ) -> bool:
        """Publish; False (and counted) when not connected and QoS 0 (the message is gone)."""
        props = self._expiry(expiry_s) if expiry_s is not None and self._v5 else None
        if not self._client.is_connected() and qos == 0:
            self.stats.publish_dropped_offline += 1
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.stats.publish_dropped_offline += 1
            return False
        self.stats.published += 1
        return True

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected()

    def _expiry(self, seconds: int) -> Properties:
        props = self._expiry_props.get(seconds)
        if props is None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: unannotated
            props.MessageExpiryInterval = seconds
            self._expiry_props[seconds] = props
        return props

    # -- paho callbacks (paho's thread: hand off only) ---------------------------------------

    def _handle_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("mqtt %s: connection refused by broker: %s", self.client_id, reason_code)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)
        self._call_in_loop(self._connected_in_loop)

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        self._call_in_loop(self._disconnected_in_loop, str(reason_code))

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
        self._call_in_loop(self._enqueue, message)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed between the check and the call (shutdown).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    # -- event-loop side ---------------------------------------------------------------------

    def _connected_in_loop(self) -> None:
        self.stats.connects += 1
        self.connected.set()
        log.info("mqtt %s: connected to %s:%d", self.client_id, self.config.host, self.config.port)
        if self._on_connected is not None:
            self._on_connected()

    def _disconnected_in_loop(self, reason: str) -> None:
        if self.connected.is_set():
            self.stats.disconnects += 1
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "mqtt %s: disconnected (%s)", self.client_id, reason)
        self.stats.last_disconnect_reason = reason
        self.connected.clear()

    def _enqueue(self, message: Message) -> None:
        self.stats.received += 1
        try:
            self.messages.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.receive_queue_dropped += 1


def _wait_published(info: paho.MQTTMessageInfo, timeout_s: float) -> None:
    # RuntimeError, ValueError: not connected any more, nothing left to wait for.
    with contextlib.suppress(RuntimeError, ValueError):
        info.wait_for_publish(timeout_s)
