"""A small asyncio facade over gmqtt, shared by agents and controllers.

gmqtt is an asyncio-native MQTT client: it reads its connection through an asyncio transport and
parses packets itself, so every callback, received messages included, runs on the event loop, with
no thread and no hand-off between threads. It is used through its public API only (``Client``,
``Message``, its callbacks and configuration). docs/performance.md ("MQTT receive path") has the
measurement that chose it over paho's own thread, paho driven from the loop, and aiomqtt. One trait
to know: gmqtt hands what it reads to its reader task, so messages are handled one loop turn after
the socket became readable, behind the callbacks already due in that turn.

The session owns the connection's life: it connects (TCP, TLS and CONNECT bounded by
``CONNECT_TIMEOUT_S``), reconnects at once when a connection is lost and then backs off from
``reconnect_min_s`` doubling to ``reconnect_max_s``, back to the minimum once connected, and renews
its subscriptions on every connect. Each connection gets a fresh gmqtt client whose own reconnecting
is switched off (see :func:`_new_client`), so that no attempt of gmqtt's outlives :meth:`stop`.

Received messages go to an ``on_message`` handler when one is given (called on the loop, one call
per message; what it raises is logged and counted), else into a bounded queue as our own frozen
:class:`Message` (drops are counted). A handler that returns True ("act now") asks for the loop at
once: the messages already read behind that one are held and handed over only after the callbacks
the handler made ready (its own wake-up among them) have run, so an urgent message is acted on before
the rest of a burst is handled. A lowered limit is therefore never queued behind routine telemetry.

asyncio sets TCP_NODELAY on every TCP connection it makes: no message waits for a delayed ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from shared.config import MqttConfig, TlsConfig
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # TCP + TLS handshake + CONNECT/CONNACK
STOP_TIMEOUT_S = 1.0  # the last publish and DISCONNECT written, the socket closed

# gmqtt's reconnect_retries: -1 is unlimited, and a count >= 0 still allows one attempt after a
# healthy connection (it counts failed attempts only). Below both, gmqtt never reconnects by itself.
_GMQTT_NO_RECONNECTS = -2
# What gmqtt's client logs about connect refusals and its own reconnect decisions, at WARNING and
# ERROR on every attempt: the session decides about reconnecting, and reports a failed connect itself
# (the first of a run logged, all counted in stats.connect_failures), so these lines are dropped.
_GMQTT_LINES_THE_SESSION_REPORTS = (
    "max number of failed connection attempts achieved",
    "not reconnecting after a permanent CONNACK refusal",
    "is permanent, not reconnecting",
    "CONNACK: ",
)


class _DropWhatTheSessionReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(line in text for line in _GMQTT_LINES_THE_SESSION_REPORTS)


_gmqtt_log = logging.getLogger(f"{__name__}.gmqtt")  # what gmqtt's client logs, under our name
_gmqtt_log.addFilter(_DropWhatTheSessionReports())


class Message(NamedTuple):
    """One received message (a NamedTuple: one is made per message, and it is the cheapest record)."""

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
    handler_errors: int = 0  # exceptions raised by the on_message handler (logged, message dropped)
    connect_failures: int = 0
    last_disconnect_reason: str = ""
    extra: dict[str, int] = field(default_factory=dict)


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client side of TLS: the broker verified against ``ca_file`` (the system's CAs without one),
    its name checked, our certificate offered when configured; ``insecure_skip_verify`` skips both
    checks (a test broker with a self-made certificate)."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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
        on_message: Callable[[Message], bool | None] | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.stats = MqttStats()
        self._throttled = ThrottledLog(log)  # a handler defect hit by every message: a sample, counted
        self.messages: asyncio.Queue[Message] = asyncio.Queue(maxsize=receive_queue_size)
        self.connected = asyncio.Event()
        self._on_connected = on_connected
        self._deliver: Callable[[Message], bool | None] = on_message or self._enqueue
        self._v5 = config.protocol == "5"
        self._will = None if will is None else gmqtt.Message(
            will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._ssl: ssl.SSLContext | bool = _ssl_context(config.tls) if config.tls is not None else False
        self._subscriptions: dict[str, int] = {}
        self._client: Any = None  # the gmqtt client of the current connection (or attempt)
        self._live: Any = None  # the same, once the broker accepted it, until it is lost
        self._lost = asyncio.Event()  # the current connection ended
        self._held: deque[tuple[str, bytes, bool]] | None = None  # read behind an "act now"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once (the broker may be down)."""
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._stopping = False
        self._keeper = asyncio.create_task(self._keep_connected(), name=f"mqtt-{self.client_id}")

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, *, final: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly. ``final`` = (topic, payload, retain) is published first (QoS 1).

        A clean disconnect suppresses the Last Will, so a graceful stop publishes its own "offline"
        here. The broker handles a connection's packets in order: the final message is taken before
        the DISCONNECT that follows it, so there is no acknowledgement to wait for.
        """
        if not self._started:
            return
        self._started = False
        self._stopping = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        if final is not None:
            self.publish(final[0], final[1], qos=1, retain=final[2])
        if self._client is not None:
            await self._close(self._client)
        self._client = self._live = None
        self._held = None
        self.connected.clear()

    async def _keep_connected(self) -> None:
        """Connect; once a connection is lost, reconnect at once, then with backoff."""
        delay = self.config.reconnect_min_s
        failures_in_row = 0
        while True:
            client = self._client = self._new_client()
            self._lost.clear()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self._connect_or_lost(client)
            except (OSError, TimeoutError, gmqtt.MQTTConnectError) as exc:
                # OSError includes ssl.SSLError (a broker that cannot be verified) and a refused TCP
                # connect; MQTTConnectError is a CONNACK refusal; TimeoutError a peer that never answered.
                await self._close(client)  # a connection made before the failure, if any
                self.stats.connect_failures += 1
                failures_in_row += 1
                if failures_in_row == 1:
                    log.warning("mqtt %s: cannot connect to %s:%d (retrying every %g–%g s): %s",
                                self.client_id, self.config.host, self.config.port,
                                self.config.reconnect_min_s, self.config.reconnect_max_s,
                                exc or type(exc).__name__)
                self._disconnected(f"connect failed: {exc or type(exc).__name__}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reconnect_max_s)
                continue
            delay, failures_in_row = self.config.reconnect_min_s, 0
            await self._lost.wait()

    async def _connect_or_lost(self, client: Any) -> None:
        """``client.connect``, ended early when the connection is lost before the broker's CONNACK (a
        broker that was going down as it accepted us): waiting out CONNECT_TIMEOUT_S then would keep
        this node off the broker for seconds after the broker is back, long enough for a standby
        that reconnected at once to take the active role on fresher telemetry."""
        connecting = asyncio.ensure_future(client.connect(
            self.config.host, self.config.port, ssl=self._ssl, keepalive=self.config.keepalive_s,
            version=MQTTv50 if self._v5 else MQTTv311,
        ))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((connecting, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not connecting.done():
                connecting.cancel()
        if connecting.done() and not connecting.cancelled():
            connecting.result()  # raises what the connect raised, if it failed
            return
        raise ConnectionError("connection lost before the broker's CONNACK")

    def _new_client(self) -> Any:
        """A gmqtt client for one connection: our callbacks, credentials and Will, and no reconnecting
        of its own (the session's keeper reconnects, with backoff, and stop() ends it)."""
        client = gmqtt.Client(self.client_id, will_message=self._will, logger=_gmqtt_log)
        client.set_config({"reconnect_retries": _GMQTT_NO_RECONNECTS})
        if self.config.username is not None:
            client.set_auth_credentials(self.config.username, self.config.password)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        return client

    async def _close(self, client: Any) -> None:
        """Send DISCONNECT and close the client's connection (the current one's), unless it is gone
        already."""
        if self._lost.is_set():
            return
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await client.disconnect()

    # -- API ---------------------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        self._subscriptions[topic] = qos
        if self.is_connected:
            self._live.subscribe(topic, qos=qos)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, expiry_s: int | None = None
    ) -> bool:
        """Publish; False (and counted) when not connected: the message is gone, whatever its QoS
        (none is kept to be sent late, after a reconnect, as if it were current).

        ``expiry_s`` is the MQTT 5 Message Expiry Interval; MQTT 3.1.1 has none to carry it.
        """
        if not self.is_connected:
            self.stats.publish_dropped_offline += 1
            return False
        if expiry_s is not None and self._v5:
            self._live.publish(topic, payload, qos=qos, retain=retain, message_expiry_interval=expiry_s)
        else:
            self._live.publish(topic, payload, qos=qos, retain=retain)
        self.stats.published += 1
        return True

    @property
    def is_connected(self) -> bool:
        return self._live is not None and bool(self._live.is_connected)

    # -- gmqtt callbacks (on the loop) -------------------------------------------------------------

    def _handle_connect(self, client: Any, _flags: int, _result: int, _properties: Any) -> None:
        # Called for an accepted CONNACK only (a refusal ends client.connect() with MQTTConnectError).
        if client is not self._client:
            return
        self._live = client
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos=qos)
        self.stats.connects += 1
        self.connected.set()
        log.info("mqtt %s: connected to %s:%d", self.client_id, self.config.host, self.config.port)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:
                log.exception("mqtt %s: on_connected callback failed", self.client_id)

    def _handle_disconnect(self, client: Any, packet: Any, _exc: Any = None) -> None:
        # packet: the body of the broker's DISCONNECT (MQTT 5: its reason code first), b"" when the
        # connection just ended.
        if client is not self._client:
            return
        self._live = None
        self._lost.set()
        if isinstance(packet, bytes | bytearray) and packet:
            reason = f"DISCONNECT from the broker, reason code {packet[0]:#04x}"
        else:
            reason = "closed" if self._stopping else "connection lost"
        self._disconnected(reason)

    def _handle_message(self, _client: Any, topic: str | bytes, payload: bytes, _qos: int,
                        properties: dict[str, Any]) -> None:
        if not isinstance(topic, str):  # not UTF-8: gmqtt hands the raw bytes
            topic = topic.decode("utf-8", "replace")
        retain = bool(properties.get("retain"))  # gmqtt passes the flag among the properties
        held = self._held
        if held is not None:  # an "act now" is being served: behind it, in order
            held.append((topic, payload, retain))
        elif self._receive(topic, payload, retain):
            self._hold()

    def _receive(self, topic: str, payload: bytes, retain: bool) -> bool:
        """One received message to the handler; True when it asked to act now."""
        self.stats.received += 1
        message = Message(topic, payload, retain, time.monotonic())
        try:
            return bool(self._deliver(message))
        except Exception:
            # The handler's defect must not take the connection down with it.
            self.stats.handler_errors += 1
            self._throttled.exception("handler", "mqtt %s: message handler failed on %s", self.client_id,
                                      topic)
            return False

    def _hold(self) -> None:
        """Hold what arrives from now on until the callbacks ready now (the handler's wake-up among
        them) have run: the loop runs ready callbacks in the order they were scheduled."""
        if self._held is None:
            self._held = deque()
        assert self._loop is not None
        self._loop.call_soon(self._release)

    def _release(self) -> None:
        held = self._held
        if held is None:  # stopped meanwhile
            return
        while held:
            topic, payload, retain = held.popleft()
            if self._receive(topic, payload, retain):
                self._hold()  # the rest waits again, for this one's wake-up
                return
        self._held = None

    # -- event-loop side ---------------------------------------------------------------------

    def _disconnected(self, reason: str) -> None:
        if self.connected.is_set():
            self.stats.disconnects += 1
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "mqtt %s: disconnected (%s)", self.client_id, reason)
        self.stats.last_disconnect_reason = reason
        self.connected.clear()

    def _enqueue(self, message: Message) -> None:
        try:
            self.messages.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.receive_queue_dropped += 1
