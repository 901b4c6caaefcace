"""One simulated rack BMS on the wire: the battery model behind a pymodbus server and/or a CAN broadcaster.

How the faults are made, in pymodbus 3.16 terms:

* The registers live in a :class:`pymodbus.simulator.SimDevice` whose ``action`` hook runs on every
  access. The hook copies the current register image (rebuilt only when the model or the faults
  changed) into the device memory it is handed, so each answer comes from one snapshot.
* **delay**: the hook ``await``\\ s before answering; **exception**: the hook returns an ``ExcCodes``
  member and pymodbus sends the exception response.
* **no answer** and **corrupt CRC** act on the outgoing bytes through the server's ``trace_packet``
  callback: it returns ``b""`` (the transport writes nothing, so the client sees true silence) or the
  frame with both CRC bytes inverted (RTU only: the client receives a full-length frame and drops it).
* **short read**: the same callback cuts registers off the end of a read's answer and fixes the
  frame around them (byte count, MBAP length or RTU CRC), so the answer is well-formed but short.
* **SunSpec layout**: the hook serves the variant of the SunSpec image the faults name.

On CAN, "no answer" silences the broadcast; the other link faults are Modbus-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from types import TracebackType
from typing import Any, Self

import can
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from sim.battery import BatteryModel, SimRackConfig
from sim.can_frames import pylon_frames
from sim.faults import FaultState
from sim.registers import (
    FLAT_BASE_ADDRESS,
    SUNSPEC_BASE_ADDRESS,
    Identity,
    flat_image,
    sunspec_image,
)

log = logging.getLogger(__name__)

# python-can's send() blocks the loop for at most this long when the TX queue is full.
CAN_SEND_TIMEOUT_S = 0.05
# Bounded waits on the way down: a peer that never lets go must not hang stop().
STOP_DEADLINE_S = 2.0
CRC_BYTES = 2
READ_FUNCTION_CODES = (3, 4)  # read holding / input registers
MBAP_BYTES = 7  # transaction id, protocol id, length, unit id
MBAP_LENGTH_AT = 4  # the MBAP length field: bytes after it (unit id + PDU)


class SimulatorError(Exception):
    """Base of the simulator's own errors."""


class SimStartError(SimulatorError):
    """A transport could not be opened; ``transport`` and ``address`` say which."""

    def __init__(self, transport: str, address: str, detail: str) -> None:
        self.transport = transport
        self.address = address
        self.detail = detail
        super().__init__(f"cannot start {transport} on {address}: {detail}")


def quiet_pymodbus_logging(level: int = logging.CRITICAL) -> None:
    """Silence pymodbus's own logger (it logs every client timeout at ERROR with hex dumps).

    Process-wide, so it is for entry points (the CLI, a test fixture), not for library code.
    """
    logging.getLogger("pymodbus").setLevel(level)


def shorten_read_answer(frame: bytes, registers: int, *, rtu: bool) -> bytes:
    """A read-registers answer with its last ``registers`` registers cut off, still well-formed.

    Anything that is not a normal FC3/FC4 answer (an exception, a write echo) is returned unchanged.
    """
    pdu_at = 1 if rtu else MBAP_BYTES
    if len(frame) < pdu_at + 2 or frame[pdu_at] not in READ_FUNCTION_CODES:
        return frame
    byte_count = frame[pdu_at + 1]
    kept = max(0, byte_count - 2 * registers)
    data_at = pdu_at + 2
    pdu = frame[pdu_at:pdu_at + 1] + bytes([kept]) + frame[data_at:data_at + kept]
    if rtu:
        head = frame[:1] + pdu
        return head + FramerRTU.compute_CRC(head).to_bytes(CRC_BYTES, "big")
    mbap = frame[:MBAP_LENGTH_AT] + (1 + len(pdu)).to_bytes(2, "big") + frame[MBAP_LENGTH_AT + 2:MBAP_BYTES]
    return mbap + pdu


def invert_crc(frame: bytes) -> bytes:
    """An RTU frame with both CRC bytes inverted: same length, guaranteed-wrong CRC."""
    if len(frame) <= CRC_BYTES:
        return frame
    return frame[:-CRC_BYTES] + bytes(b ^ 0xFF for b in frame[-CRC_BYTES:])


async def _foreign_unit(  # noqa: PLR0917 - the signature pymodbus's SimAction calls
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    """Hook of the catch-all unit: every request for a unit we are not is refused."""
    return ExcCodes.GATEWAY_NO_RESPONSE


class SimulatedBms:
    """One rack: a :class:`BatteryModel`, its :class:`FaultState`, and the servers that expose them.

    Several transports may run at once (e.g. Modbus TCP and CAN); all show the same model. A
    background task steps the model every ``update_period_s`` by the monotonic clock.
    """

    def __init__(
        self,
        config: SimRackConfig | None = None,
        *,
        device_id: int = 1,
        update_period_s: float = 0.1,
    ) -> None:
        if not 1 <= device_id <= 247:
            raise ValueError(f"device_id must be a Modbus unit 1..247 (got {device_id})")
        if not 0.001 <= update_period_s <= 60.0:
            raise ValueError(f"update_period_s must be within 0.001..60 (got {update_period_s})")
        self.config = config or SimRackConfig()
        self.device_id = device_id
        self.update_period_s = update_period_s
        self.faults = FaultState()
        self.model = BatteryModel(self.config, self.faults)
        self.identity = Identity(serial_number=self.config.serial_number, device_address=device_id)
        self.endpoints: list[str] = []
        self.can_frames_sent = 0
        self.can_send_errors = 0
        # Register reads that reached this device's registers (a witness of how often a client asks).
        self.register_reads = 0
        self._servers: list[ModbusBaseServer] = []
        self._buses: list[can.BusABC] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # pymodbus runs each request in a task of its own; we only know the ones our hook holds up.
        self._held_requests: set[asyncio.Task[Any]] = set()
        self._image_key: tuple[int, int] | None = None
        self._flat_key: tuple[int, int] | None = None
        self._flat: list[int] = []
        self._sunspec: list[int] = []

    # -- public API -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._servers or self._buses)

    def set_current(self, amps: float) -> None:
        """Load current asked of the rack (positive = charging); the BMS clamps it to its limits."""
        self.model.set_current(amps)

    async def start_tcp(self, host: str, port: int) -> None:
        """Serve Modbus TCP on (host, port); port 0 picks a free one (see :attr:`endpoints`)."""
        server = ModbusTcpServer(
            self._devices(),
            address=(host, port),
            trace_packet=functools.partial(self._trace_packet, False),
        )
        await self._listen(server, "modbus tcp", f"{host}:{port}")
        sockets = getattr(server.transport, "sockets", None) or ()
        bound = sockets[0].getsockname()[1] if sockets else port
        self.endpoints.append(f"modbus tcp {host}:{bound} unit {self.device_id}")

    async def start_rtu(
        self, device: str, *, baudrate: int = 9600, parity: str = "N", stopbits: int = 1
    ) -> None:
        """Serve Modbus RTU on a serial device (a pty path or a pyserial URL such as ``socket://``)."""
        server = ModbusSerialServer(
            self._devices(),
            framer=FramerType.RTU,
            port=device,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            trace_packet=functools.partial(self._trace_packet, True),
        )
        await self._listen(server, "modbus rtu", device)
        self.endpoints.append(f"modbus rtu {device} {baudrate} {parity}{stopbits} unit {self.device_id}")

    async def start_can(
        self, *, interface: str, channel: str, period_s: float = 1.0, **bus_kwargs: Any
    ) -> None:
        """Broadcast the Pylon frame set every ``period_s`` on a python-can bus."""
        if not 0.01 <= period_s <= 60.0:
            raise ValueError(f"period_s must be within 0.01..60 (got {period_s})")
        try:
            bus = can.Bus(interface=interface, channel=channel, **bus_kwargs)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise SimStartError("can", f"{interface}:{channel}", str(exc)) from exc
        self._buses.append(bus)
        self._spawn(self._broadcast(bus, period_s), f"sim-bms-{self.device_id}-can-{channel}")
        self._ensure_model_task()
        self.endpoints.append(f"can {interface} {channel} every {period_s} s")

    async def stop(self) -> None:
        """Stop every server, bus and task; safe to call more than once."""
        tasks = [*self._tasks, *self._held_requests]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("simulator task %s failed", task.get_name(), exc_info=task.exception())
        self._tasks.clear()
        self._held_requests.clear()
        servers, self._servers = self._servers, []
        for server in servers:
            listener = server.transport
            await server.shutdown()  # type: ignore[no-untyped-call]
            if isinstance(listener, asyncio.AbstractServer):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.wait_closed(), STOP_DEADLINE_S)
        buses, self._buses = self._buses, []
        for bus in buses:
            bus.shutdown()
        self.endpoints.clear()
        # Let the transports' close callbacks run before the caller checks for leftovers.
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- servers ----------------------------------------------------------------------------------
    def _devices(self) -> list[SimDevice]:
        flat, sunspec = self._images()

        def layout() -> list[SimData]:
            # readonly: a write is refused with ILLEGAL_ADDRESS (the image is the model's, not the client's).
            return [
                SimData(address, values=list(values), datatype=DataType.REGISTERS, readonly=True)
                for address, values in ((FLAT_BASE_ADDRESS, flat), (SUNSPEC_BASE_ADDRESS, sunspec))
            ]

        # id 0 is pymodbus's catch-all: without it a request for another unit raises KeyError inside
        # pymodbus (logged with a traceback, answered DEVICE_FAILURE). With it, other units get
        # GATEWAY_NO_RESPONSE, what a TCP gateway says for a silent unit; on RTU _trace_packet
        # then drops the answer, because an RS-485 device stays silent when another unit is addressed.
        return [
            SimDevice(id=self.device_id, simdata=layout(), action=self._action),
            SimDevice(id=0, simdata=layout(), action=_foreign_unit),
        ]

    async def _listen(self, server: ModbusBaseServer, transport: str, address: str) -> None:
        try:
            await server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            await server.shutdown()  # type: ignore[no-untyped-call]
            raise SimStartError(transport, address, str(exc)) from exc
        self._servers.append(server)
        self._ensure_model_task()

    def _images(self) -> tuple[list[int], list[int]]:
        """Both register images (each rebuilt only when the model or the faults changed)."""
        return self._flat_image(), self._sunspec_image()

    def _flat_image(self) -> list[int]:
        key = (self.model.revision, self.faults.version)
        if key != self._flat_key:
            self._flat = flat_image(self.model.snapshot())
            self._flat_key = key
        return self._flat

    def _sunspec_image(self) -> list[int]:
        # Built apart from the flat map: a SunSpec image costs ~8x more, and a client reads one map.
        key = (self.model.revision, self.faults.version)
        if key != self._image_key:
            self._sunspec = sunspec_image(
                self.model.snapshot(), self.config, self.identity, self.faults.snapshot().sunspec_layout
            )
            self._image_key = key
        return self._sunspec

    async def _action(  # noqa: PLR0917 - the signature pymodbus's SimAction calls
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """SimDevice hook, run by pymodbus before it answers any request for this device."""
        faults = self.faults.snapshot()
        if function_code in READ_FUNCTION_CODES:
            self.register_reads += 1
        if faults.delay_ms > 0:
            task = asyncio.current_task()
            if task is not None:
                self._held_requests.add(task)
            try:
                await asyncio.sleep(faults.delay_ms / 1000.0)
            finally:
                if task is not None:
                    self._held_requests.discard(task)
        if faults.exception_code is not None:
            return ExcCodes(faults.exception_code)
        # Refresh only the map this request reads (the other keeps its last image).
        if address < SUNSPEC_BASE_ADDRESS:
            base, image = FLAT_BASE_ADDRESS, self._flat_image()
        else:
            base, image = SUNSPEC_BASE_ADDRESS, self._sunspec_image()
        offset = base - start_address
        registers[offset:offset + len(image)] = image
        return None

    def _trace_packet(self, rtu: bool, sending: bool, data: bytes) -> bytes:
        """pymodbus ``trace_packet`` hook: sees every raw chunk; what it returns is what gets sent."""
        if not sending:
            return data
        faults = self.faults.snapshot()
        if faults.no_answer or (rtu and data[:1] != bytes([self.device_id])):
            return b""
        if faults.short_read_registers:
            data = shorten_read_answer(data, faults.short_read_registers, rtu=rtu)
        if rtu and faults.corrupt_crc:
            return invert_crc(data)
        return data

    # -- tasks ------------------------------------------------------------------------------------
    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

    def _ensure_model_task(self) -> None:
        name = f"sim-bms-{self.device_id}-model"
        if not any(t.get_name() == name and not t.done() for t in self._tasks):
            self._spawn(self._run_model(), name)

    async def _run_model(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.update_period_s)
            now = time.monotonic()
            self.model.step(now - last)
            last = now

    async def _broadcast(self, bus: can.BusABC, period_s: float) -> None:
        # Scheduled on a fixed grid so the period does not drift by the send time.
        next_at = time.monotonic()
        while True:
            if not self.faults.snapshot().no_answer:
                self._send_burst(bus)
            next_at += period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _send_burst(self, bus: can.BusABC) -> None:
        for frame in pylon_frames(self.model.snapshot(), name=self.config.can_name):
            message = can.Message(arbitration_id=frame.arbitration_id, data=frame.data, is_extended_id=False)
            try:
                bus.send(message, timeout=CAN_SEND_TIMEOUT_S)
            except can.CanError as exc:
                # No ACK / bus-off fills the TX queue (ENOBUFS): count it and keep the cycle going.
                self.can_send_errors += 1
                log.debug("CAN send of %#x failed: %s", frame.arbitration_id, exc)
            else:
                self.can_frames_sent += 1
