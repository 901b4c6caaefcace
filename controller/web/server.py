"""The controller's read-only web page: aiohttp on the controller's own event loop.

Routes (GET only; README "Web page" documents the JSON):

* ``/`` with ``/app.js`` and ``/style.css``: the page, shipped in this package (no CDN: a site may be
  offline), a hand-written SVG plot included;
* ``/api/state``: racks, bank, controllers, latest journal events, the latest history sample;
* ``/api/history[?since=<unix s>]``: the plots' samples, one a second for ``web.history_s``;
* ``/api/events[?limit=N]``: the latest journal events;
* ``/api/stream``: Server-Sent Events, one ``state`` event (the ``/api/state`` document) per update.

Why it cannot stall the control loop, which shares the event loop with it:

* one update a second (:data:`UPDATE_PERIOD_S`) on absolute deadlines: the history sample, and the
  state document serialised **once** (msgspec) and handed to every stream as the same bytes;
* each stream has a queue of :data:`CLIENT_QUEUE` updates: a client that does not keep up skips
  updates (counted) instead of queueing them, and a write that does not finish within
  :data:`WRITE_TIMEOUT_S` (a client that stopped reading: the socket buffers are full) drops the client;
  what a client can hold is at most its queue (shared bytes), the transport's buffer and a kernel send
  buffer capped at :data:`STREAM_SNDBUF_BYTES`;
* at most ``web.max_clients`` streams; every start, stop and database read has an explicit deadline;
* the history is a fixed ring (:mod:`controller.web.history`), the events a bounded deque.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiohttp import web

from controller.failover import RoleMachine
from controller.journal import read_events
from controller.web.history import SAMPLE_PERIOD_S, History, Sample
from controller.web.view import (
    Json,
    NodeFacts,
    bank_view,
    controllers_view,
    event_view,
    rack_rows,
    sample_of,
    sample_view,
)
from shared.cluster import ConsolidatedState, JournalEvent
from shared.codec import DecodeError, Decoder
from shared.controller_config import ControllerConfig
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

UPDATE_PERIOD_S = SAMPLE_PERIOD_S  # one update (and one history sample) a second
CLIENT_QUEUE = 2  # updates a stream may have waiting; more are skipped
WRITE_TIMEOUT_S = 5.0  # a stream write that does not finish in this long drops its client
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
PREFILL_TIMEOUT_S = 2.0  # reading the journal's latest events from the state database at start
EVENTS_KEPT = 200  # journal events held for the page (the state database keeps the full journal)
EVENTS_IN_STATE = 50  # of which each state document carries the newest
# The kernel's send buffer of a live stream (Linux doubles it): without a cap it grows to tcp_wmem's
# maximum (4 MiB here) for a client that stopped reading, before the write timeout can notice.
STREAM_SNDBUF_BYTES = 128 * 1024
SSE_RETRY_MS = 2000  # the browser's EventSource reconnects after this long when the stream breaks
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Everything the page loads comes from this server; no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class WebServerError(Exception):
    """The web page could not start; ``address`` is the ``host:port`` it tried."""

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        self.detail = detail
        super().__init__(f"cannot serve the web page on {address}: {detail}")


class Observed(Protocol):
    """What the page reads of the controller (:class:`controller.service.ControllerService`)."""

    @property
    def state(self) -> ConsolidatedState | None: ...

    @property
    def roles(self) -> RoleMachine | None: ...

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def can_healthy(self) -> bool: ...

    @property
    def foreign_transmitter(self) -> bool: ...


@dataclass(slots=True)
class WebStats:
    updates: int = 0
    update_errors: int = 0
    streams_opened: int = 0
    streams_refused: int = 0  # beyond web.max_clients
    updates_skipped: int = 0  # a stream's queue was full: that client missed an update
    slow_clients_dropped: int = 0  # a write did not finish within WRITE_TIMEOUT_S
    events_seen: int = 0
    events_undecodable: int = 0
    max_write_buffer_bytes: int = 0  # the largest transport buffer seen behind a stream


@dataclass(eq=False, slots=True)
class _Stream:
    queue: asyncio.Queue[bytes | None]
    skipped: int = 0


class WebPage:
    """The page of one controller; :meth:`start` listens, :meth:`stop` closes every stream."""

    def __init__(
        self,
        config: ControllerConfig,
        observed: Observed,
        *,
        events_db: Path | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``events_db``: the state database whose journal fills the events list at start."""
        self.config = config.web
        self._node = NodeFacts(config.site_id, config.node_id,
                               config.failover.node_number if config.failover.enabled else 0)
        self._observed = observed
        self._events_db = events_db
        self._monotonic = monotonic
        self._wall = wall_clock
        self.history = History(max(1, int(self.config.history_s / SAMPLE_PERIOD_S)))
        self.events: deque[Json] = deque(maxlen=EVENTS_KEPT)
        self._event_decoder = Decoder(JournalEvent)
        self.stats = WebStats()
        self._throttled = ThrottledLog(log)
        self._streams: set[_Stream] = set()
        self._static = {route: (_asset(name), kind) for route, (name, kind) in STATIC.items()}
        # The latest update: what /api/state and the streams show until the next one.
        self._snapshot: tuple[ConsolidatedState | None, list[Json], Sample | None, float] | None = None
        self._document: bytes | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self.address = f"{self.config.host}:{self.config.port}"
        self.port = self.config.port  # the bound port, as the listener reports it once started

    @property
    def streams(self) -> int:
        """Live update streams open now."""
        return len(self._streams)

    # -- told by the service -----------------------------------------------------------------

    def on_event(self, payload: bytes) -> None:
        """A journal event as the journal publishes it (msgpack ``JournalEvent``)."""
        try:
            event = self._event_decoder.decode(payload)
        except DecodeError as exc:
            self.stats.events_undecodable += 1
            self._throttled.warning("event", "web: a journal event could not be read back: %s", exc)
            return
        self.stats.events_seen += 1
        self.events.append(event_view(event))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Fill the events from the journal, listen, start the updates; :class:`WebServerError` if the
        address cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("WebPage already started")
        await self._prefill_events()
        app = web.Application(client_max_size=1024)  # GET only: no request has a body worth reading
        app.on_response_prepare.append(_security_headers)
        for route in self._static:
            app.router.add_get(route, self._static_file)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/history", self._api_history)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/api/stream", self._api_stream)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_TIMEOUT_S)
        try:
            await asyncio.wait_for(runner.setup(), START_TIMEOUT_S)
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await asyncio.wait_for(site.start(), START_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            await runner.cleanup()
            raise WebServerError(self.address, f"{exc} (address in use, or not local to this host?)") from exc
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
        self._update()
        self._task = asyncio.create_task(self._updates(), name="controller-web-updates")
        log.info("web page on http://%s:%d/ (read-only; history %d s, at most %d live pages)",
                 self.config.host, self.port, self.config.history_s, self.config.max_clients)

    async def stop(self) -> None:
        """End every stream and close the listener; safe to call more than once, or before start()."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for stream in self._streams:
            _replace_all(stream.queue, None)
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                await asyncio.wait_for(runner.cleanup(), STOP_TIMEOUT_S + 1.0)
            except TimeoutError:
                log.warning("web: the listener did not close within %.0f s", STOP_TIMEOUT_S + 1.0)

    async def _prefill_events(self) -> None:
        path = self._events_db
        if path is None or not path.exists():
            return
        since_s = self._wall() - self.config.history_s

        def latest() -> list[Json]:
            kept: deque[Json] = deque(maxlen=EVENTS_KEPT)
            for _seq, wall_s, node_id, kind, rack_id, text in read_events(path, since_s=since_s):
                kept.append({"timestamp_s": wall_s, "node_id": node_id, "kind": kind, "rack_id": rack_id,
                             "text": text})
            return list(kept)

        try:
            rows = await asyncio.wait_for(asyncio.to_thread(latest), PREFILL_TIMEOUT_S)
        except Exception as exc:  # an unreadable journal must not keep the page (or the controller) down
            log.warning("web: the journal's latest events could not be read from %s: %s", path, exc)
            return
        # The journal's rows first, then whatever was recorded while they were read; newest kept.
        self.events = deque([*rows, *self.events], maxlen=EVENTS_KEPT)

    # -- updates -----------------------------------------------------------------------------

    async def _updates(self) -> None:
        """Every UPDATE_PERIOD_S on absolute deadlines; a late update skips, never bursts."""
        next_s = self._monotonic() + UPDATE_PERIOD_S
        while True:
            await asyncio.sleep(max(0.0, next_s - self._monotonic()))
            now = self._monotonic()
            missed = int((now - next_s) // UPDATE_PERIOD_S)
            next_s += (max(0, missed) + 1) * UPDATE_PERIOD_S
            try:
                self._update()
            except Exception:
                # A defect in the page must neither stop its updates nor reach the control loop.
                self.stats.update_errors += 1
                self._throttled.exception("update", "web: the page update failed")

    def _update(self) -> None:
        state = self._observed.state
        wall = self._wall()
        sample = None
        if state is not None:
            sample = sample_of(state, wall)
            self.history.append(sample)
        controllers = controllers_view(self._node, self._observed.roles, self._monotonic())
        self._snapshot = (state, controllers, sample, wall)
        self._document = None
        self.stats.updates += 1
        if not self._streams:
            return  # serialised only when asked for: nobody is watching
        frame = b"event: state\ndata: " + self._state_document() + b"\n\n"
        for stream in self._streams:
            try:
                stream.queue.put_nowait(frame)
            except asyncio.QueueFull:
                stream.skipped += 1
                self.stats.updates_skipped += 1

    def _state_document(self) -> bytes:
        """The latest update as JSON, serialised once however many clients read it."""
        if self._document is None:
            self._document = msgspec.json.encode(self._state_json())
        return self._document

    def _state_json(self) -> Json:
        assert self._snapshot is not None, "an update runs in start()"
        state, controllers, sample, wall = self._snapshot
        events = list(self.events)[-EVENTS_IN_STATE:]
        return {
            "site_id": self._node.site_id,
            "node_id": self._node.node_id,
            "updated_s": wall,
            "period_s": UPDATE_PERIOD_S,
            "history_s": self.config.history_s,
            "links": {"mqtt_connected": self._observed.mqtt_connected,
                      "can_healthy": self._observed.can_healthy,
                      "foreign_transmitter": self._observed.foreign_transmitter},
            "bank": bank_view(state) if state is not None else None,
            "racks": rack_rows(state) if state is not None else [],
            "controllers": controllers,
            "events": events,
            "sample": sample_view(sample),
        }

    # -- handlers ----------------------------------------------------------------------------

    async def _static_file(self, request: web.Request) -> web.Response:
        body, kind = self._static[request.path]
        return web.Response(body=body, headers={"Content-Type": kind})

    async def _api_state(self, _request: web.Request) -> web.Response:
        return _json_response(self._state_document())

    async def _api_history(self, request: web.Request) -> web.Response:
        since_s = _float_query(request, "since")
        body = {"period_s": SAMPLE_PERIOD_S, "history_s": self.config.history_s,
                "capacity": self.history.capacity, **self.history.columns(since_s)}
        return _json_response(msgspec.json.encode(body))

    async def _api_events(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", str(EVENTS_KEPT))
        if not (raw.isascii() and raw.isdigit()):
            raise web.HTTPBadRequest(text=f"limit must be a whole number >= 0, got {raw!r}")
        count = int(raw)
        events = list(self.events)[-count:] if count else []
        return _json_response(msgspec.json.encode({"events": events, "kept": EVENTS_KEPT}))

    async def _api_stream(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= self.config.max_clients:
            self.stats.streams_refused += 1
            raise web.HTTPServiceUnavailable(
                text=f"at most {self.config.max_clients} live pages at once (web.max_clients); close one")
        stream = _Stream(asyncio.Queue(CLIENT_QUEUE))
        self._streams.add(stream)  # counted before the first await: max_clients holds under a burst
        self.stats.streams_opened += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        _cap_send_buffer(request)
        try:
            await asyncio.wait_for(response.prepare(request), WRITE_TIMEOUT_S)
            stream.queue.put_nowait(f"retry: {SSE_RETRY_MS}\n".encode() + b"event: state\ndata: "
                                    + self._state_document() + b"\n\n")
            while (frame := await stream.queue.get()) is not None:
                await asyncio.wait_for(response.write(frame), WRITE_TIMEOUT_S)
                self._note_buffer(request)
        except TimeoutError:
            self.stats.slow_clients_dropped += 1
            self._throttled.info("slow", "web: dropped a live page that stopped reading (a write waited "
                                 "%.0f s; %s)", WRITE_TIMEOUT_S, request.remote)
            _abort(request)
        except ConnectionError:
            pass  # the page was closed
        finally:
            self._streams.discard(stream)
        return response

    def _note_buffer(self, request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            size = transport.get_write_buffer_size()
            self.stats.max_write_buffer_bytes = max(self.stats.max_write_buffer_bytes, size)


def _asset(name: str) -> bytes:
    return (resources.files("controller.web") / "static" / name).read_bytes()


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def _json_response(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": "application/json"})


def _float_query(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{name} must be a finite number, got {raw!r}")
    return value


def _replace_all(queue: asyncio.Queue[Any], item: object) -> None:
    """Empty ``queue`` and put ``item`` (the end of a stream goes in even when the queue is full)."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(item)


def _cap_send_buffer(request: web.Request) -> None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()
