"""The controller's port on the inverter CAN bus: sends frame sets, listens, and tracks bus health.

The port never gives up on the bus. Whatever happens to the interface (the python-can-remote bridge
killed and restarted, a socketcan link taken down and up, bus-off, a full send buffer), it drops the
bus it has and opens a new one on a bounded schedule (:class:`Backoff`: 50 ms doubling to 1 s), so
the frames resume within about a second of the interface's return; the service sends a set at once
when a bus is (re)opened (``on_reopened``).

Three things make a dead bus harmless:

* **Reading** runs in python-can's :class:`can.Notifier` thread (no event-loop reader: python-can
  reports a read error on that path only to the loop's exception handler, once per loop turn for
  as long as the socket stays readable, which a closed one does: ~3,800 tracebacks a second). Our
  :class:`can.Listener` hands frames to the loop through a bounded queue, and a read error to the
  port once; it then waits for the port to stop the notifier instead of letting it spin.
* **Dropping** a bus removes the references first and closes it off the loop, in a thread, whatever
  ``shutdown`` raises (a remote bus whose peer vanished raises ``OSError`` 107 in it, and a hung
  peer can make it wait for ever): no failed shutdown leaves a dead bus in place.
* **Logging** of repeated events goes through :class:`~shared.logthrottle.ThrottledLog`; the
  counters keep the full count.

Error frames (bus-off, error-passive, no-ACK) and send failures (ENOBUFS when nobody acknowledges)
are counted, never fatal: after ``failures_before_fault`` consecutive failed sends the port reports
itself unhealthy (failover acts on that) and reopens the bus.

In a dialect whose inverter asks for the frame set (Pylon HV's 0x4200), the control loop registers a
request handler (:meth:`CanPort.set_request_handler`): the inverter's requests go there, on the
loop, as soon as they are read (``inverter_requests``), and never to ``on_frame``: a request is
neither ours nor another battery's frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import can

from shared.controller_config import InverterCanConfig
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

# linux/can/error.h classes carried in the arbitration id of an error frame.
CAN_ERR_CRTL = 0x004
CAN_ERR_ACK = 0x020
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_RX_PASSIVE = 0x10
SEND_TIMEOUT_S = 0.01  # a healthy bus takes a frame in well under a millisecond
# Reopen schedule: the first attempt soon after a bus dies, doubling to a cap that keeps the gap
# between the interface's return and the first frame at about a second.
REOPEN_FIRST_S = 0.05
REOPEN_MAX_S = 1.0
REOPEN_JITTER = 0.2  # each delay is drawn from [(1 - jitter) × d, d]: controllers do not retry in step
# Opening runs in a thread; a driver that has not answered by then (a remote bridge that accepts the
# TCP connection but never replies) is abandoned, and its bus closed if it ever arrives.
OPEN_DEADLINE_S = 5.0
NOTIFIER_TIMEOUT_S = 0.2  # the reader thread's recv timeout: how soon it sees a stop
# After a read error python-can's Notifier thread calls recv again at once; the listener waits this
# long (or until the port stops the notifier, which it does within a loop turn) before returning.
READER_ERROR_PAUSE_S = 0.5
CLOSE_JOIN_S = 1.0  # how long the closing thread waits for the reader thread to finish
STOP_WAIT_S = 2.0  # how long stop() waits for closing threads
RX_QUEUE_FRAMES = 4096  # frames between the reader thread and the loop; beyond it they are dropped, counted

FrameHandler = Callable[[can.Message, float], None]
RequestMatcher = Callable[[can.Message], bool]


@dataclass
class Backoff:
    """Delays between attempts to open the bus: ``first_s``, doubling, capped at ``max_s``.

    Each delay is jittered downwards (never above the cap). :meth:`reset` after a bus has proven
    itself (a set went out), so that the next failure is retried soon again.
    """

    first_s: float = REOPEN_FIRST_S
    max_s: float = REOPEN_MAX_S
    jitter: float = REOPEN_JITTER
    rng: random.Random = field(default_factory=random.Random)
    _next_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s or not 0 <= self.jitter < 1:
            raise ValueError("0 < first_s <= max_s and 0 <= jitter < 1 are required")
        self._next_s = self.first_s

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self.max_s, delay * 2.0)
        return delay * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self._next_s = self.first_s


class _Reader(can.Listener):
    """Runs in the Notifier's thread: hands frames to the loop through a bounded queue and a read
    error to the port once; never does work in that thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[_Reader], None],
                 failed: Callable[[_Reader, BaseException], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._failed = failed
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[can.Message, float]] = collections.deque()
        self._scheduled = False
        self._stopped = threading.Event()
        self.dropped = 0
        self.errors = 0

    def on_message_received(self, msg: can.Message) -> None:
        received = time.monotonic()
        with self._lock:
            if self._stopped.is_set():
                return
            if len(self._queue) >= RX_QUEUE_FRAMES:
                self.dropped += 1
                return
            self._queue.append((msg, received))
            if self._scheduled:
                return
            self._scheduled = True
        self._call(self._deliver, self)

    def on_error(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = self.errors == 1
        if first:
            self._call(self._failed, self, exc)
        # Returning lets the Notifier call recv on the dead bus again at once: wait for the stop.
        self._stopped.wait(READER_ERROR_PAUSE_S)

    def stop(self) -> None:
        self._stopped.set()

    def take(self) -> list[tuple[can.Message, float]]:
        """On the loop: every frame queued so far, in order."""
        with self._lock:
            frames = list(self._queue)
            self._queue.clear()
            self._scheduled = False
            return frames

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the port is gone
            self._loop.call_soon_threadsafe(fn, *args)


@dataclass(slots=True)
class _Open:
    """One opened bus and the notifier and listener reading it."""

    bus: can.BusABC
    notifier: can.Notifier
    reader: _Reader
    proven: bool = False  # a set went out on it


class CanPort:
    """The inverter bus, opened and reopened by the port itself; :meth:`send_all` never raises."""

    def __init__(self, config: InverterCanConfig, *, on_frame: FrameHandler | None = None,
                 on_reopened: Callable[[], None] | None = None,
                 failures_before_fault: int | None = None, backoff: Backoff | None = None) -> None:
        self.config = config
        self._failures_before_fault = failures_before_fault or config.send_failures_before_fault
        self._on_frame = on_frame
        self._requests: tuple[RequestMatcher, FrameHandler] | None = None
        self._on_reopened = on_reopened
        self._backoff = backoff or Backoff()
        self._open: _Open | None = None
        self._need_open = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._throttled = ThrottledLog(log)
        self.counters: Counter[str] = Counter()
        self.consecutive_send_failures = 0
        self.last_error = ""

    def set_request_handler(self, is_request: RequestMatcher, handler: FrameHandler) -> None:
        """Frames for which ``is_request(msg)`` holds (an inverter asking for the set) go to
        ``handler(msg, received_monotonic_s)`` instead of ``on_frame``."""
        self._requests = (is_request, handler)

    # -- state ---------------------------------------------------------------------------------

    @property
    def bus(self) -> can.BusABC | None:
        """The bus in use, or None while the port is waiting to reopen it."""
        return self._open.bus if self._open is not None else None

    @property
    def is_open(self) -> bool:
        return self._open is not None

    @property
    def healthy(self) -> bool:
        return self._open is not None and self.consecutive_send_failures < self._failures_before_fault

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> bool:
        """Open the bus (one attempt, awaited) and keep it open from then on; True if it is open."""
        self._loop = asyncio.get_running_loop()
        await self._open_once()
        if self._open is None:
            self._need_open.set()
        self._supervisor = asyncio.create_task(self._supervise(), name="can-port-reopen")
        return self._open is not None

    async def stop(self) -> None:
        """Stop reopening, close the bus, and wait (bounded) for the closing threads."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._drop("port stopped", failed=False)
        deadline = time.monotonic() + STOP_WAIT_S
        # Threads cannot await; polling a few times for at most STOP_WAIT_S is the simple way.
        while any(t.is_alive() for t in self._closers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._closers = [t for t in self._closers if t.is_alive()]

    async def _supervise(self) -> None:
        """The outer reconnect loop: whenever the bus is gone, open it again on the backoff schedule."""
        while True:
            await self._need_open.wait()
            await asyncio.sleep(self._backoff.next_delay())
            if self._open is None:
                await self._open_once()
            if self._open is not None:
                self._need_open.clear()
                if self._on_reopened is not None:
                    self._on_reopened()

    def _bus_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"interface": self.config.interface, "channel": self.config.channel}
        if self.config.interface not in ("virtual", "remote", "socketcan"):
            kwargs["bitrate"] = self.config.bitrate
        if self.config.interface == "virtual":
            kwargs["receive_own_messages"] = False
        return kwargs

    async def _open_once(self) -> None:
        """One attempt to open the bus, in a thread (a driver may block), bounded by OPEN_DEADLINE_S."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[can.BusABC] = loop.create_future()
        kwargs = self._bus_kwargs()

        def settle(bus: can.BusABC | None, exc: BaseException | None) -> None:
            if result.done():  # abandoned (deadline passed, port stopping): the bus arrived too late
                if bus is not None:
                    self._retire_bus(bus, None, None)
                return
            if exc is not None:
                result.set_exception(exc)
            else:
                assert bus is not None
                result.set_result(bus)

        def work() -> None:
            bus: can.BusABC | None = None
            error: BaseException | None = None
            try:
                bus = can.Bus(**kwargs)
            except Exception as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(settle, bus, error)
            except RuntimeError:  # the loop is gone
                if bus is not None:
                    _shutdown_quietly(bus)

        self.counters["open_attempts"] += 1
        threading.Thread(target=work, name="can-port-open", daemon=True).start()
        try:
            bus = await asyncio.wait_for(result, OPEN_DEADLINE_S)
        except TimeoutError:
            self._open_failed(f"no answer within {OPEN_DEADLINE_S:g} s")
            return
        except Exception as exc:
            self._open_failed(f"{type(exc).__name__}: {exc}")
            return
        reader = _Reader(loop, self._drain, self._reader_failed)
        try:
            # No loop given: the Notifier reads in its own thread, whose errors reach Listener.on_error.
            notifier = can.Notifier(bus, [reader], timeout=NOTIFIER_TIMEOUT_S)
        except Exception as exc:
            self._retire_bus(bus, None, reader)
            self._open_failed(f"cannot listen: {exc}")
            return
        self._open = _Open(bus, notifier, reader)
        # A fresh bus gets a fresh streak: its own sends decide whether it is healthy.
        self.consecutive_send_failures = 0
        self.counters["opened"] += 1
        self._throttled.info("open", "CAN %s:%s open", self.config.interface, self.config.channel)

    def _open_failed(self, reason: str) -> None:
        self.counters["open_failed"] += 1
        self.last_error = f"cannot open CAN {self.config.interface}:{self.config.channel}: {reason}"
        self._throttled.error("open_failed", "%s (retrying)", self.last_error)

    def _drop(self, reason: str, *, failed: bool = True) -> None:
        """Forget the bus at once and close it off the loop; the supervisor opens a new one."""
        current, self._open = self._open, None
        if current is None:
            return
        if failed:
            self.counters["dropped"] += 1
            self._throttled.error("dropped", "CAN %s: %s: closing the bus and opening it again",
                                  self.config.channel, reason)
            self._need_open.set()
        self._retire_bus(current.bus, current.notifier, current.reader)

    def _retire_bus(self, bus: can.BusABC, notifier: can.Notifier | None, reader: _Reader | None) -> None:
        if reader is not None:
            reader.stop()  # a reader waiting after an error returns; later frames are ignored
        loop = self._loop

        def report(exc: BaseException) -> None:
            self.counters["shutdown_failed"] += 1
            self._throttled.warning("shutdown_failed", "CAN %s: closing the old bus failed (%s: %s); "
                                    "dropped anyway", self.config.channel, type(exc).__name__, exc)

        def work() -> None:
            if notifier is not None:
                with contextlib.suppress(Exception):
                    notifier.stop(timeout=CLOSE_JOIN_S)
            exc = _shutdown_quietly(bus)
            if exc is not None and loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(report, exc)

        closer = threading.Thread(target=work, name="can-port-close", daemon=True)
        closer.start()
        self._closers = [t for t in self._closers if t.is_alive()]
        self._closers.append(closer)

    # -- receiving -----------------------------------------------------------------------------

    def _drain(self, reader: _Reader) -> None:
        frames = reader.take()
        current = self._open
        if current is None or current.reader is not reader:
            return  # frames of a bus already dropped
        if reader.dropped:
            self.counters["rx_dropped"] += reader.dropped
            reader.dropped = 0
        for msg, received in frames:
            try:
                self._received(msg, received)
            except Exception:
                self.counters["rx_handler_errors"] += 1
                self._throttled.log(logging.ERROR, "rx_handler", "CAN %s: frame handler failed on %s",
                                    self.config.channel, msg)

    def _reader_failed(self, reader: _Reader, exc: BaseException) -> None:
        self.counters["reader_errors"] += 1
        current = self._open
        if current is None or current.reader is not reader:
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._drop(f"receiving failed ({self.last_error})")

    def _received(self, msg: can.Message, now: float) -> None:
        if msg.is_error_frame:
            self._count_error_frame(msg)
            return
        self.counters["rx_frames"] += 1
        requests = self._requests
        if requests is not None and requests[0](msg):
            self.counters["inverter_requests"] += 1
            requests[1](msg, now)
            return
        if self._on_frame is not None:
            self._on_frame(msg, now)

    def _count_error_frame(self, msg: can.Message) -> None:
        self.counters["error_frames"] += 1
        cls = msg.arbitration_id
        channel = self.config.channel
        if cls & CAN_ERR_BUSOFF:
            self.counters["bus_off"] += 1
            self._throttled.error("bus_off", "CAN %s: bus-off", channel)
        if cls & CAN_ERR_ACK:
            self.counters["no_ack"] += 1
            self._throttled.warning("no_ack", "CAN %s: no ACK (is the inverter connected and at %d bit/s?)",
                                    channel, self.config.bitrate)
        passive = CAN_ERR_CRTL_TX_PASSIVE | CAN_ERR_CRTL_RX_PASSIVE
        if cls & CAN_ERR_CRTL and len(msg.data) > 1 and msg.data[1] & passive:
            self.counters["error_passive"] += 1
            self._throttled.warning("error_passive", "CAN %s: error-passive", channel)
        if cls & CAN_ERR_RESTARTED:
            self.counters["restarted"] += 1
            self._throttled.info("restarted", "CAN %s: controller restarted after bus-off", channel)

    # -- sending -------------------------------------------------------------------------------

    def send_all(self, frames: Iterable[can.Message], *, kind: str = "sets") -> bool:
        """Send a frame set in order; False if the bus is not open or any frame failed (counted).

        ``frames`` may be a generator: each frame leaves as soon as it is made (the limits first).
        """
        current = self._open
        if current is None:
            self.counters["send_skipped_closed"] += 1
            self.consecutive_send_failures += 1
            self._throttled.warning("skipped", "CAN %s: not sending: the bus is not open (%s)",
                                    self.config.channel, self.last_error or "opening")
            return False
        sent = 0
        for frame in frames:  # a frame that cannot be made is a defect of ours: it propagates
            try:
                current.bus.send(frame, timeout=SEND_TIMEOUT_S)
            except Exception as exc:
                return self._send_failed(exc)
            sent += 1
        self.counters[f"{kind}_sent"] += 1
        self.counters["frames_sent"] += sent
        if self.consecutive_send_failures:
            self._throttled.info("recovered", "CAN %s: sending again after %d failed attempt(s)",
                                 self.config.channel, self.consecutive_send_failures)
        self.consecutive_send_failures = 0
        if not current.proven:
            current.proven = True
            self._backoff.reset()
        return True

    def _send_failed(self, exc: BaseException) -> bool:
        # The rest of the set would fail the same way; the next cycle retries.
        self.counters["send_failed"] += 1
        self.consecutive_send_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._throttled.error("send_failed", "CAN %s: send failed: %s", self.config.channel, self.last_error)
        if self.consecutive_send_failures >= self._failures_before_fault:
            self._drop(f"{self.consecutive_send_failures} consecutive send failures")
        return False


def _shutdown_quietly(bus: can.BusABC) -> BaseException | None:
    """Shut ``bus`` down; if the driver raises half-way, mark it shut down all the same so that its
    finaliser does not try again against the dead handle (and print a traceback at collection)."""
    try:
        bus.shutdown()
    except Exception as exc:
        with contextlib.suppress(Exception):
            can.BusABC.shutdown(bus)
        return exc
    return None
