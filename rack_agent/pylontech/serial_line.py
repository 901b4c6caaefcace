"""A serial port on the event loop, carrying Pylontech frames; used by the agent's link and the simulator.

pyserial-asyncio is not a dependency (constraints.txt), so pyserial's public API is used in the way
pymodbus's own serial transport uses it, and nothing ever blocks the loop:

* the port is opened by ``serial.serial_for_url`` in a worker thread under a deadline (opening a
  ``socket://`` gateway is a TCP connect that may take seconds; a late open is closed when it
  completes);
* it is opened with ``timeout=0`` and ``write_timeout=0`` (non-blocking reads and writes), and the
  loop watches its file descriptor: ``add_reader`` drains whatever arrived into a
  :class:`FrameAssembler`, and each write waits for ``add_writer`` first (pyserial's non-blocking
  write would spin on a full output buffer).

A port without a file descriptor (``loop://``, ``rfc2217://``) cannot be watched and is refused at open.
A port that goes away while open (a USB adapter unplugged, the gateway closing the socket) makes every
waiting and later call raise :class:`SerialLostError` until the line is opened again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import termios
from typing import Any

import serial

from rack_agent.pylontech.codec import FrameAssembler

READ_CHUNK_BYTES = 4096
# Whole frames waiting to be taken; more means nobody is reading (oldest are dropped and counted).
MAX_QUEUED_FRAMES = 64


class SerialLineError(ConnectionError):
    """The serial line cannot be used; ``device`` names it."""

    def __init__(self, device: str, detail: str) -> None:
        self.device = device
        self.detail = detail
        super().__init__(f"serial line {device}: {detail}")


class SerialOpenError(SerialLineError):
    """The port could not be opened; ``os_error`` is the operating system's reason, when it gave one."""

    def __init__(self, device: str, detail: str, os_error: OSError | None = None) -> None:
        super().__init__(device, detail)
        self.os_error = os_error


class SerialLostError(SerialLineError):
    """The open port failed (device gone, socket closed) or was closed under a waiting caller."""


def _serial_for_url(device: str, baudrate: int) -> Any:
    # 8N1 is the protocol's framing (Pylon LV RS485 V3.3); exclusive: a second process on the same
    # adapter would steal answers.
    return serial.serial_for_url(
        device, baudrate=baudrate, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
        stopbits=serial.STOPBITS_ONE, timeout=0, write_timeout=0, exclusive=True,
    )


def _close_quietly(port: Any) -> None:
    with contextlib.suppress(Exception):  # closing a failed port may fail again; nothing to do about it
        port.close()


class SerialLine:
    """One port; whole frames (``~ ... \\r``) come out of :meth:`receive_frame`, oldest first."""

    def __init__(self, device: str, baudrate: int) -> None:
        self.device = device
        self.baudrate = baudrate
        self._port: Any = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._assembler = FrameAssembler()
        self._frames: collections.deque[bytes] = collections.deque()
        self._arrived = asyncio.Event()
        self._lost: SerialLostError | None = None
        self._write_ready: asyncio.Future[None] | None = None
        # Bytes received since the last clear_input(): tells a garbled answer from silence.
        self.rx_bytes = 0
        self.frames_dropped = 0

    def __repr__(self) -> str:
        return f"SerialLine({self.device!r}, {self.baudrate})"

    @property
    def is_open(self) -> bool:
        return self._port is not None and self._lost is None

    @property
    def stray_bytes(self) -> int:
        """Bytes received outside any frame since the line was created (noise, cut frames)."""
        return self._assembler.stray_bytes

    async def open(self, timeout_s: float) -> None:
        """Open the port within ``timeout_s`` or raise :class:`SerialOpenError` naming it and the OS error."""
        if self._port is not None:
            raise SerialOpenError(self.device, "already open")
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, _serial_for_url, self.device, self.baudrate)
        try:
            async with asyncio.timeout(timeout_s):
                port = await asyncio.shield(opening)
        except TimeoutError:
            opening.add_done_callback(_close_when_opened)
            raise SerialOpenError(self.device, f"not open within {timeout_s * 1000:.0f} ms") from None
        except asyncio.CancelledError:
            opening.add_done_callback(_close_when_opened)
            raise
        except (serial.SerialException, OSError, ValueError) as exc:
            os_error = exc if isinstance(exc, OSError) and exc.errno is not None else None
            detail = f"cannot open at {self.baudrate} baud: {exc}"
            raise SerialOpenError(self.device, detail, os_error) from exc
        try:
            fd = port.fileno()
        except (AttributeError, OSError, serial.SerialException) as exc:
            _close_quietly(port)
            raise SerialOpenError(
                self.device, "has no file descriptor the event loop can wait on (use a device path or socket://)"
            ) from exc
        self._port, self._fd, self._loop, self._lost = port, fd, loop, None
        self._frames.clear()
        self._assembler.reset()
        self.rx_bytes = 0
        loop.add_reader(fd, self._on_readable)

    def close(self) -> None:
        """Close the port (idempotent); a waiting caller gets :class:`SerialLostError`."""
        port, self._port = self._port, None
        if port is None:
            return
        if self._lost is None:
            self._lost = SerialLostError(self.device, "closed")
        self._unwatch()
        _close_quietly(port)
        self._arrived.set()

    def clear_input(self) -> None:
        """Forget every byte received so far: a late answer to an earlier request is not this one's."""
        self._frames.clear()
        self._assembler.reset()
        self.rx_bytes = 0
        if self._port is not None and self._lost is None:
            try:
                self._port.reset_input_buffer()  # what the kernel holds but we have not read yet
            except (serial.SerialException, OSError, termios.error) as exc:  # tcflush: termios.error
                self._fail(exc)

    async def send(self, data: bytes) -> None:
        """Write ``data``, waiting for the port to take it (the caller bounds the wait)."""
        view = memoryview(data)
        while view:
            port = self._require_open()
            await self._writable()
            try:
                written = port.write(view)
            except (serial.SerialException, OSError) as exc:
                self._fail(exc)
                raise self._require_lost() from exc
            view = view[len(view) if written is None else written:]

    async def receive_frame(self) -> bytes:
        """The next whole frame received (SOI to EOI), waiting as long as the caller lets it."""
        while not self._frames:
            self._require_open()
            self._arrived.clear()
            await self._arrived.wait()
        return self._frames.popleft()

    # -- loop callbacks ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            data = port.read(READ_CHUNK_BYTES)
        except (serial.SerialException, OSError) as exc:
            self._fail(exc)
            return
        if not data:
            return
        self.rx_bytes += len(data)
        for frame in self._assembler.feed(data):
            if len(self._frames) >= MAX_QUEUED_FRAMES:
                self._frames.popleft()
                self.frames_dropped += 1
            self._frames.append(frame)
        self._arrived.set()

    async def _writable(self) -> None:
        loop = self._loop
        if loop is None:
            raise self._require_lost()
        ready: asyncio.Future[None] = loop.create_future()
        self._write_ready = ready

        def on_writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(self._fd, on_writable)
        try:
            await ready
        finally:
            self._write_ready = None
            if self._lost is None:
                loop.remove_writer(self._fd)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = SerialLostError(self.device, f"failed: {exc}")
        self._unwatch()
        self._arrived.set()

    def _unwatch(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        waiting = self._write_ready
        if waiting is not None and not waiting.done():
            waiting.set_exception(self._require_lost())

    def _require_open(self) -> Any:
        if self._lost is not None:
            raise SerialLostError(self.device, self._lost.detail)
        if self._port is None:
            raise SerialLostError(self.device, "not open")
        return self._port

    def _require_lost(self) -> SerialLostError:
        return self._lost or SerialLostError(self.device, "not open")


def _close_when_opened(opening: asyncio.Future[Any]) -> None:
    """Done-callback of an open given up on: close the port it produced, if any."""
    if not opening.cancelled() and opening.exception() is None:
        _close_quietly(opening.result())
