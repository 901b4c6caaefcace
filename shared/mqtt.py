"""A small asyncio facade over paho-mqtt 2.x, shared by agents and controllers.

paho is driven from the event loop itself, through its external-loop API
(``loop_read``/``loop_write``/``loop_misc`` and the ``on_socket_*`` callbacks),
not from its own thread: every callback, received messages included, runs on
the loop, with no hand-off between threads. With paho's thread
(``loop_start``), each message cost a ``select`` in that thread, a
``call_soon_threadsafe`` wake-up of the loop and contention for the GIL: a
controller at 2000 msg/s spent about a third of a core in that path, and a
lowered limit could wait a GIL switch interval (5 ms) behind it. Only the TCP
(and TLS) connect, which blocks, runs in a worker thread; reconnects back off
from ``reconnect_min_s`` doubling to ``reconnect_max_s``.

Received messages go to an ``on_message`` handler when one is given (called on
the loop, one call per message; what it raises is logged and counted), else
into a bounded queue as our own frozen :class:`Message` (drops are counted).
A handler that returns True asks for the loop at once: the session stops the
batch of already-read messages there and goes on after the callbacks that are
ready (the handler's own wake-up among them), so an urgent message is acted on
before the rest of a burst is handled.

Under MQTT 3.1.1 the session's client parses QoS 0 PUBLISH packets itself, straight from its
read-ahead buffer, and leaves every other packet to paho (see :class:`_ReadAheadClient`).

paho leaves Nagle's algorithm on; the first messages after a connect then
wait 30–40 ms for a delayed ACK, so TCP_NODELAY is set on every new socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.config import MqttConfig
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # TCP + TLS connect, in the worker thread
MISC_PERIOD_S = 0.5  # keep-alive housekeeping (PINGREQ when due, dead broker detection)
FINAL_PUBLISH_TIMEOUT_S = 1.0


READ_AHEAD_BYTES = 64 * 1024
PACKETS_PER_READ_EVENT = 64  # then the loop runs other callbacks before the next batch

_PUBLISH_QOS0_MASK, _PUBLISH_QOS0 = 0xF6, 0x30  # packet type 3 with QoS bits 00 (DUP, RETAIN free)

# One received QoS 0 message (topic, payload, retain) to the session; True: act now (end the batch).
Receiver = Callable[[str, bytes, bool], bool]


class _ReadAheadClient(paho.Client):
    """A paho client that reads its socket in large chunks and parses QoS 0 PUBLISH packets itself.

    paho reads a packet with several small ``recv`` calls (the type byte, each byte of the length,
    then the body) and ``loop_read`` handles one packet per call, so every message cost several
    system calls and a trip through the selector. Here one ``recv`` fills a buffer and paho's reads
    are served from it (``_sock_recv`` is paho's private read hook, paho 2.x).

    :meth:`take_publishes` goes further for the packets that make up nearly all of the traffic, QoS 0
    PUBLISH under MQTT 3.1.1 (fixed header, topic, payload: nothing to acknowledge, no properties):
    it parses them straight from the buffer and hands (topic, payload, retain) to the session. paho's
    path for the same packet (its packet state, a decode into an ``MQTTMessage``, its callback
    locks) cost ~17 µs of CPU per 1.4 kB telemetry message in-process against ~3.5 µs. Everything
    else — CONNACK, SUBACK, PINGRESP, QoS 1/2, MQTT 5, a malformed or oversized packet, the end of
    the connection — is left in the buffer for paho, so its protocol handling is unchanged.
    tests/contract/test_mqtt_session.py checks mixed traffic keeps its order and flags.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx_source: object = None  # the socket the buffer was read from
        self._rx = b""
        self._rx_at = 0
        self._rx_end: OSError | None = None  # how a read ended the connection, kept for paho to see
        self.rx_reads = 0  # recv calls on the socket (for tests and the curious)
        self.rx_handed = 0  # bytes handed to paho: tells whether a loop_read made progress
        self.rx_direct = 0  # QoS 0 PUBLISH packets parsed here rather than by paho

    def rx_buffered(self) -> int:
        """Bytes read from the current socket and not yet handled."""
        if self._rx_source is not self.socket():
            return 0
        return len(self._rx) - self._rx_at

    def _adopt_socket(self) -> None:
        if self._rx_source is not self.socket():  # a new connection: nothing of the old one counts
            self._rx_source, self._rx, self._rx_at, self._rx_end = self.socket(), b"", 0, None

    def _read_chunk(self) -> bytes:
        """One ``recv`` of up to a chunk; BlockingIOError when there is nothing yet, b"" at the end."""
        if self._rx_end is not None:
            raise self._rx_end
        data = super()._sock_recv(READ_AHEAD_BYTES)
        self.rx_reads += 1
        return data

    def _sock_recv(self, bufsize: int) -> bytes:
        self._adopt_socket()
        if self._rx_at >= len(self._rx):
            data = self._read_chunk()  # BlockingIOError, OSError, EOF (b"") pass through to paho
            if len(data) <= bufsize:
                self._rx, self._rx_at = b"", 0
                self.rx_handed += len(data)
                return data
            self._rx, self._rx_at = data, 0
        start = self._rx_at
        self._rx_at = end = min(len(self._rx), start + bufsize)
        self.rx_handed += end - start
        return self._rx[start:end]

    def take_publishes(self, receive: Receiver, budget: int) -> tuple[int, bool]:
        """Hand up to ``budget`` QoS 0 PUBLISH packets from the buffer (reading more as needed) to
        ``receive``. Returns (handled, paho_next): paho_next is True when the next packet is paho's
        to read (see the class); False when the batch ended otherwise (budget spent, the receiver
        asked to act now, or the socket has nothing more for now)."""
        if self._in_packet["command"] or not self.is_connected() or self._protocol == paho.MQTTv5:
            return 0, True  # paho is inside a packet, or the session is not one this parser knows
        self._adopt_socket()
        rx, at, handled = self._rx, self._rx_at, 0
        try:
            while handled < budget:
                end = len(rx)
                if end - at >= 2:
                    first = rx[at]
                    if first & _PUBLISH_QOS0_MASK != _PUBLISH_QOS0:
                        return handled, True
                    # Remaining length: 1–4 bytes, 7 bits each, least significant first.
                    i, length, shift = at + 1, 0, 0
                    while i < end and i <= at + 4:
                        byte = rx[i]
                        i += 1
                        length |= (byte & 0x7F) << shift
                        shift += 7
                        if not byte & 0x80:
                            break
                    else:
                        if i > at + 4:
                            return handled, True  # malformed length: paho's to refuse
                        length = -1  # the length itself is not all here yet
                    if length >= 0:
                        packet_end = i + length
                        if packet_end - at > READ_AHEAD_BYTES:
                            return handled, True  # larger than a chunk: paho reads it piecewise
                        if packet_end <= end:
                            if length < 2:
                                return handled, True  # no room for a topic: paho's to refuse
                            topic_end = i + 2 + ((rx[i] << 8) | rx[i + 1])
                            if topic_end == i + 2 or topic_end > packet_end:
                                return handled, True  # empty or overlong topic: paho's to refuse
                            try:
                                topic = rx[i + 2:topic_end].decode()
                            except UnicodeDecodeError:
                                return handled, True
                            at = self._rx_at = packet_end
                            handled += 1
                            if receive(topic, rx[topic_end:packet_end], bool(first & 1)):
                                return handled, False
                            continue
                # Not a whole packet left: read more behind what is left.
                try:
                    data = self._read_chunk()
                except BlockingIOError:
                    return handled, False
                except OSError as exc:
                    self._rx_end = exc
                    return handled, True
                if not data:
                    self._rx_end = ConnectionResetError("connection closed by the broker")
                    return handled, True
                rx = self._rx = rx[at:] + data if at < end else data
                at = self._rx_at = 0
            return handled, False
        finally:
            if handled:
                self.rx_direct += handled
                with self._msgtime_mutex:  # what paho's keep-alive check reads (as paho sets it)
                    self._last_bytes_received = paho.time_func()


class _NoTopicCallbacks(MQTTMatcher):
    """paho's table of per-topic callbacks, for a client that registers none.

    paho looks every received message up in it, and its lookup (paho 2.2, ``iter_match``) builds a
    recursive closure: one reference cycle per message, which only the garbage collector frees. At
    2000 msg/s that was thousands of cyclic objects a second and a 10–30 ms collection several
    times a second in the controller. With no per-topic callbacks (this facade never calls
    ``message_callback_add``), the lookup has nothing to find.
    """

    def iter_match(self, topic: str) -> Iterator[Any]:
        return iter(())


class Message(NamedTuple):
    """One received message (a NamedTuple: one per message, a third of a frozen dataclass's cost)."""

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
        self._act_now = False  # the handler asked for the loop: end the read batch
        self._resume_queued = False  # a batch ended early; its resumption is queued on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._socket_closed = asyncio.Event()  # wakes the connection keeper at once
        self._keeper: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[MQTTErrorCode] | None = None
        self._final_mid: int | None = None  # the stop's last publish, and the event of its PUBACK
        self._final_acked = asyncio.Event()
        self._reading_fd: int | None = None
        self._writing_fd: int | None = None
        self._subscriptions: dict[str, int] = {}
        self._expiry_props: dict[int, Properties] = {}
        self._v5 = config.protocol == "5"
        self._client = _ReadAheadClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
        )
        # paho's attribute for its per-topic callback table (no public setter; see the class).
        self._client._on_message_filtered = _NoTopicCallbacks()  # type: ignore[no-untyped-call]
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_socket_open = self._handle_socket_open
        self._client.on_socket_close = self._handle_socket_close
        self._client.on_socket_register_write = self._handle_register_write
        self._client.on_socket_unregister_write = self._handle_unregister_write
        self._client.connect_timeout = CONNECT_TIMEOUT_S
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
        self._loop_thread = threading.get_ident()
        # Stores host, port and keepalive only; the connect itself is the keeper's.
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
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

        A clean disconnect suppresses the Last Will, so a graceful stop publishes
        its own "offline" here.
        """
        if not self._started:
            return
        self._started = False
        self._stopping = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        if self._connecting is not None:
            # A connect in its worker thread cannot be cancelled: it ends within the connect timeout.
            await asyncio.gather(self._connecting, return_exceptions=True)
            self._connecting = None
        if final is not None and self._client.is_connected():
            self._final_acked.clear()
            info = self._client.publish(final[0], final[1], qos=1, retain=final[2])
            self._final_mid = info.mid
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_PUBLISH_TIMEOUT_S):
                    await self._final_acked.wait()
        if self._client.socket() is not None:
            self._socket_closed.clear()
            self._client.disconnect()  # queues DISCONNECT; paho closes the socket once it is written
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_PUBLISH_TIMEOUT_S):
                    await self._socket_closed.wait()
        self._forget_socket()
        self.connected.clear()

    async def _keep_connected(self) -> None:
        """Connect, then keep-alive housekeeping; reconnect with backoff whenever the socket is gone."""
        delay = self.config.reconnect_min_s
        failures_in_row = 0
        while True:
            if self._client.socket() is None:
                self._socket_closed.clear()
                # The blocking TCP/TLS connect (bounded by paho's connect timeout) runs off the loop;
                # shielded, so that stop() can wait for it rather than leave a socket behind.
                self._connecting = asyncio.ensure_future(asyncio.to_thread(self._client.reconnect))
                try:
                    await asyncio.shield(self._connecting)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    self.stats.connect_failures += 1
                    failures_in_row += 1
                    if failures_in_row == 1:
                        log.warning("mqtt %s: cannot connect to %s:%d (retrying every %g–%g s): %s",
                                    self.client_id, self.config.host, self.config.port,
                                    self.config.reconnect_min_s, self.config.reconnect_max_s, exc)
                    self._disconnected_in_loop(f"connect failed: {exc}")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.config.reconnect_max_s)
                    continue
            if self._client.is_connected():
                delay, failures_in_row = self.config.reconnect_min_s, 0
            # PINGREQ when due, and the connection dropped when the broker stops answering.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MISC_PERIOD_S):
                    await self._socket_closed.wait()
            if self._client.socket() is not None:
                self._client.loop_misc()
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reconnect_max_s)

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

    # -- paho callbacks ------------------------------------------------------------------------
    # On the loop, except those that the connect in its worker thread triggers (socket open,
    # first write): ``_on_loop`` moves them onto the loop.

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
        self._on_loop(self._connected_in_loop)

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        self._on_loop(self._disconnected_in_loop, str(reason_code))

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        # What paho parses itself (QoS 1/2, MQTT 5); QoS 0 under 3.1.1 comes through take_publishes.
        self._receive(msg.topic, bytes(msg.payload), bool(msg.retain))

    def _receive(self, topic: str, payload: bytes, retain: bool) -> bool:
        """One received message to the handler; True when it asked to act now."""
        self.stats.received += 1
        message = Message(topic, payload, retain, time.monotonic())
        try:
            act_now = bool(self._deliver(message))
        except Exception:
            # The handler's defect must not take the connection down with it (paho would re-raise).
            self.stats.handler_errors += 1
            self._throttled.exception("handler", "mqtt %s: message handler failed on %s", self.client_id,
                                      topic)
            return False
        if act_now:
            self._act_now = True
        return act_now

    def _handle_publish(self, _client: paho.Client, _userdata: Any, mid: int, _rc: Any, _props: Any) -> None:
        if mid == self._final_mid:
            self._on_loop(self._final_acked.set)

    def _handle_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_reads, sock.fileno())

    def _handle_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        # The fd is captured now: paho closes the socket as soon as this returns.
        self._on_loop(self._unwatch, sock.fileno())

    def _handle_register_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_writes, sock.fileno())

    def _handle_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch_writes, sock.fileno())

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        # RuntimeError: the loop closed between the check and the call (shutdown).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    # -- socket readiness (loop only) ------------------------------------------------------------

    def _watch_reads(self, fd: int) -> None:
        assert self._loop is not None
        self._reading_fd = fd
        self._loop.add_reader(fd, self._readable)

    def _watch_writes(self, fd: int) -> None:
        assert self._loop is not None
        if fd != self._reading_fd or fd < 0:
            return  # a write registration that arrived after its socket was closed
        self._writing_fd = fd
        self._loop.add_writer(fd, self._writable)

    def _unwatch_writes(self, fd: int) -> None:
        if self._writing_fd == fd and self._loop is not None:
            self._loop.remove_writer(fd)
            self._writing_fd = None

    def _unwatch(self, fd: int) -> None:
        if self._loop is not None:
            if self._reading_fd == fd:
                self._loop.remove_reader(fd)
                self._reading_fd = None
            self._unwatch_writes(fd)
        self._socket_closed.set()

    def _forget_socket(self) -> None:
        if self._reading_fd is not None:
            self._unwatch(self._reading_fd)

    def _readable(self) -> None:
        if self._resume_queued:
            # A batch ended early and its resumption is queued behind what the handler woke: reading
            # now (the selector called in the same loop turn) would run ahead of that wake-up.
            return
        self._read_batch()

    def _resume_reading(self) -> None:
        self._resume_queued = False
        self._read_batch()

    def _read_batch(self) -> None:
        # QoS 0 PUBLISH packets parsed by the client itself, anything else by paho's loop_read (one
        # packet per call), up to a budget; then the loop runs its other callbacks.
        client = self._client
        self._act_now = False
        budget = PACKETS_PER_READ_EVENT
        while budget > 0 and not self._act_now:
            handled, paho_next = client.take_publishes(self._receive, budget)
            budget -= handled
            if not paho_next or budget <= 0 or self._act_now:
                break
            handed = client.rx_handed
            client.loop_read()
            budget -= 1
            if client.rx_handed == handed or not client.rx_buffered():
                break  # paho took nothing (not connected, or waiting for bytes), or all is handled
        sock = client.socket()
        # Decrypted bytes already inside the TLS object do not wake the selector either.
        tls_pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        more = tls_pending or (client.rx_buffered() and (budget <= 0 or self._act_now))
        if more and self._loop is not None:
            # Batch full, or a handler asked for the loop (its wake-up is already queued, so it runs
            # before this resumption); the selector would not call for bytes already read.
            self._resume_queued = True
            self._loop.call_soon(self._resume_reading)

    def _writable(self) -> None:
        self._client.loop_write()

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
        try:
            self.messages.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.receive_queue_dropped += 1

