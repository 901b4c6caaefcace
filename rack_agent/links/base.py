"""The narrow interface every BMS transport implements.

Generic work lives here once: the per-request deadline, conversion of a
missed deadline into our typed timeout, and the reconnect loop (tenacity,
bounded exponential backoff with jitter, started afresh after every healthy
connection). A driver implements three hooks: ``_connect``, ``_disconnect``
and ``_read``.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from abc import ABC, abstractmethod

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from rack_agent.errors import ConnectionRefusedPollError, InvalidDataError, PollError, PollTimeoutError
from rack_agent.unit import UnitRuntime
from shared.logthrottle import ThrottledLog
from shared.models import RackMeasurements

log = logging.getLogger(__name__)

# A unit read may take several requests (blocks, SunSpec discovery), each with its own timeout.
UNIT_READ_DEADLINE_REQUESTS = 8


class _Traceback:
    """An exception's traceback, formatted only if the log line carrying it is written."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __str__(self) -> str:
        return "".join(traceback.format_exception(self.exc)).rstrip()


class BmsLink(ABC):
    """One physical link (a TCP connection, a serial line, a CAN bus) to one or more BMS units."""

    # Whether a fresh connection can help once every unit on the link is comm-lost
    # (it clears half-open TCP sockets and wedged gateways; a serial port gains nothing).
    reconnect_on_comm_loss = True

    def __init__(self, name: str, *, reconnect_initial_s: float, reconnect_max_s: float) -> None:
        self.name = name
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._connected = False
        self._up = asyncio.Event()  # mirrors _connected, so a caller can await the connection
        self._wanted = False
        self._need_connect = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        # Units on one link are polled in turn (a serial bus carries one request at a time).
        self._turn = asyncio.Lock()
        self.connect_attempts = 0
        # Lines that can recur with the link's ups and downs: a flapping link costs a few lines.
        self._log = ThrottledLog(log)

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self) -> None:
        """Return once the link is connected (at once if it is); no deadline of its own."""
        await self._up.wait()

    async def start(self) -> None:
        """Begin connecting in the background; polls fail fast with ``connection_refused`` until up."""
        self._wanted = True
        self._need_connect.set()
        self._connector = asyncio.create_task(self._connect_forever(), name=f"link-{self.name}-connector")

    async def stop(self) -> None:
        self._wanted = False
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
            self._connector = None
        if self._connected:
            self._connected = False
            self._up.clear()
        await self._disconnect()

    def mark_broken(self, reason: str) -> None:
        """Drop the connection and let the connector re-establish it (e.g. after comm loss)."""
        if self._connected:
            self._log.warning(("reconnect",), "link %s: reconnecting: %s", self.name, reason)
        self._connected = False
        self._up.clear()
        self._need_connect.set()

    async def _connect_forever(self) -> None:
        while self._wanted:
            await self._need_connect.wait()
            self._need_connect.clear()
            if self._connected:
                continue
            await self._disconnect()
            # A fresh retrying object per outage: the backoff starts small again after a healthy link.
            # pymodbus's connect() may swallow a cancellation, so the loop also ends when unwanted.
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(ConnectionRefusedPollError),
                    stop=lambda _state: not self._wanted,
                    wait=wait_exponential_jitter(
                        multiplier=self._reconnect_initial_s,
                        max=self._reconnect_max_s,
                        jitter=self._reconnect_initial_s,
                    ),
                    reraise=True,
                ):
                    with attempt:
                        self.connect_attempts += 1
                        try:
                            await self._connect()
                        except ConnectionRefusedPollError as exc:
                            log.debug("link %s: connect failed: %s", self.name, exc)
                            raise
            except ConnectionRefusedPollError:
                return  # stopped while still failing to connect
            if not self._wanted:
                await self._disconnect()
                return
            self._connected = True
            self._up.set()
            self._log.info(("connected",), "link %s: connected", self.name)

    async def read_unit(self, unit: UnitRuntime, timeout_s: float) -> RackMeasurements:
        """One poll of one unit, within ``timeout_s``; raises a :class:`PollError` subclass."""
        async with self._turn:
            if not self._connected:
                raise ConnectionRefusedPollError(f"link {self.name} is not connected", unit=unit.name)
            # Each request has its own deadline in the driver; this one bounds the whole unit read
            # (several blocks, or SunSpec discovery) so that nothing can hang a poll slot.
            deadline_s = timeout_s * UNIT_READ_DEADLINE_REQUESTS
            try:
                async with asyncio.timeout(deadline_s):
                    return await self._read(unit, timeout_s)
            except TimeoutError as exc:
                if isinstance(exc, PollError):
                    raise exc.for_unit(unit.name) from None
                raise self._deadline_error(deadline_s).for_unit(unit.name) from exc
            except ConnectionRefusedPollError as exc:
                self.mark_broken(exc.detail)
                raise exc.for_unit(unit.name) from None
            except PollError as exc:
                raise exc.for_unit(unit.name) from None
            except Exception as exc:
                # Every failure a device can cause is meant to be typed above; one that is not is a
                # gap in our decoding, and still no reason to end the agent (its other units, and
                # the comm-lost rule for this one, must go on). Classified, counted, traceback logged.
                self._log.error(
                    ("unexpected", unit.name, type(exc).__name__),
                    "link %s unit %s: unexpected %s while reading (a bug, reported as invalid data)\n%s",
                    self.name, unit.name, type(exc).__name__, _Traceback(exc),
                )
                raise InvalidDataError(
                    f"unexpected {type(exc).__name__} decoding the answer: {exc}", unit=unit.name
                ) from exc

    def _deadline_error(self, deadline_s: float) -> PollError:
        """What a missed unit-read deadline means on this link (a driver may know better)."""
        return PollTimeoutError(f"no complete answer within {deadline_s * 1000:.0f} ms on link {self.name}")

    @abstractmethod
    async def _connect(self) -> None:
        """Open the link or raise :class:`ConnectionRefusedPollError`."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the link; must be idempotent."""

    @abstractmethod
    async def _read(self, unit: UnitRuntime, timeout_s: float) -> RackMeasurements:
        """Read one unit's telemetry; raise a :class:`PollError` subclass on failure."""
