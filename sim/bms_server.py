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

A unit of a named make (``SimulatedBms(make="seplos_v3")``, see :data:`sim.registers.MAKES`) serves
that make's register map instead: exactly the blocks its shipped profile reads, in their own tables
(holding, input, coils), byte-addressed where the make is (the hook fills the registers a request
asks for, two wire addresses apart). Anything else is refused with ILLEGAL_ADDRESS, as the real map
refuses it. :meth:`SimulatedBms.refuse_function` makes one function code answer an exception (a
BMS whose firmware refuses, say, the coil read). Over TCP such a unit can speak RTU framing
(``start_tcp(..., framer="rtu")``, as a BYD BMU does). :class:`SimulatedLine` puts several units,
of any makes, on one serial line or TCP port under their own device ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

import can
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from rack_agent.profiles.spec import Table
from sim.battery import BatteryModel, SimRackConfig
from sim.can_frames import pylon_frames
from sim.faults import FaultState
from sim.registers import (
    FLAT_BASE_ADDRESS,
    MAKES,
    SUNSPEC_BASE_ADDRESS,
    Identity,
    SimImage,
    flat_image,
    make_image,
    make_plan,
    served_addresses,
    sunspec_image,
)

log = logging.getLogger(__name__)

# python-can's send() blocks the loop for at most this long when the TX queue is full.
CAN_SEND_TIMEOUT_S = 0.05
# Bounded waits on the way down: a peer that never lets go must not hang stop().
STOP_DEADLINE_S = 2.0
CRC_BYTES = 2
READ_FUNCTION_CODES = (3, 4)  # read holding / input registers
FUNCTION_TABLES = {1: Table.COIL, 2: Table.DISCRETE, 3: Table.HOLDING, 4: Table.INPUT}
COILS_PER_REGISTER = 16  # pymodbus keeps coils packed 16 to a register, the first as bit 0
# The catch-all unit answers any address (with GATEWAY_NO_RESPONSE from its hook); pymodbus checks
# the address against a layout before the hook runs, so its layout spans the whole space.
CATCH_ALL_REGISTERS = 65535
MBAP_UNIT_AT = 6
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


def _runs(addresses: set[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive addresses."""
    runs: list[tuple[int, int]] = []
    for address in sorted(addresses):
        if runs and runs[-1][0] + runs[-1][1] == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((address, 1))
    return runs


class _MakeMap:
    """The registers of a unit of a named make: the served layout, the image, the hook's fill."""

    def __init__(self, make: str, model: BatteryModel, faults: FaultState) -> None:
        self.make = make
        self.plan = make_plan(make)
        self.served = served_addresses(self.plan)
        self.strides = {b.table: b.stride for b in self.plan.blocks}
        self._model = model
        self._faults = faults
        self._key: tuple[int, int] | None = None
        self._image: SimImage = {}

    def image(self) -> SimImage:
        key = (self._model.revision, self._faults.version)
        if key != self._key:
            self._image = make_image(self.plan, self._model.snapshot())
            self._key = key
        return self._image

    def layout(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        """pymodbus's (coils, discrete inputs, holding, input) blocks: exactly the served addresses.

        A table the make does not use gets a placeholder (pymodbus needs one block per table): an
        invalid register, or a coil group the hook refuses."""
        tables: list[list[SimData]] = []
        for table in (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT):
            runs = _runs(self.served.get(table, set()))
            if table.holds_bits:
                blocks = [
                    SimData(a, values=[False] * n, datatype=DataType.BITS, readonly=True) for a, n in runs
                ]
                tables.append(blocks or [SimData(0, values=[False], datatype=DataType.BITS, readonly=True)])
            else:
                blocks = [SimData(a, count=n, datatype=DataType.REGISTERS, readonly=True) for a, n in runs]
                tables.append(blocks or [SimData(0, count=1, datatype=DataType.INVALID)])
        return tables[0], tables[1], tables[2], tables[3]

    def fill(self, function_code: int, start_address: int, address: int, count: int,
             registers: list[int]) -> ExcCodes | None:
        """Put what the request reads into pymodbus's block (it slices the answer from it next)."""
        table = FUNCTION_TABLES.get(function_code)
        if table is None or table not in self.served:
            return ExcCodes.ILLEGAL_ADDRESS
        image = self.image()
        if table.holds_bits:
            # ``count`` is the number of packed registers the request spans.
            first = address // COILS_PER_REGISTER
            for r in range(count):
                coil0 = (first + r) * COILS_PER_REGISTER
                registers[first - start_address + r] = sum(
                    image.get((table, coil0 + j), 0) << j for j in range(COILS_PER_REGISTER)
                )
            return None
        stride = self.strides[table]
        for i in range(count):
            # A byte-addressed map answers the words at a, a+2, ... for a read at a.
            registers[address - start_address + i] = image.get((table, address + i * stride), 0)
        return None


def _catch_all() -> SimDevice:
    return SimDevice(
        id=0,
        simdata=[SimData(0, count=CATCH_ALL_REGISTERS, datatype=DataType.REGISTERS)],
        action=_foreign_unit,
    )


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
        make: str | None = None,
    ) -> None:
        if not 1 <= device_id <= 247:
            raise ValueError(f"device_id must be a Modbus unit 1..247 (got {device_id})")
        if not 0.001 <= update_period_s <= 60.0:
            raise ValueError(f"update_period_s must be within 0.001..60 (got {update_period_s})")
        if make is not None and make not in MAKES:
            raise ValueError(f"no simulated make {make!r}; makes: {', '.join(sorted(MAKES))}")
        self.make = make
        # A make's unit stands for that make's battery (cells, sensors, ratings) unless told otherwise.
        self.config = config or (MAKES[make].rack_config() if make is not None else SimRackConfig())
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
        self._make = _MakeMap(make, self.model, self.faults) if make is not None else None
        # Function code -> exception code this unit answers it with (a firmware that refuses a read).
        self._refused: dict[int, int] = {}

    # -- public API -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._servers or self._buses)

    def set_current(self, amps: float) -> None:
        """Load current asked of the rack (positive = charging); the BMS clamps it to its limits."""
        self.model.set_current(amps)

    def refuse_function(self, function_code: int, exception_code: int | None) -> None:
        """Answer every request of ``function_code`` with ``exception_code`` (None: answer again)."""
        if function_code not in FUNCTION_TABLES:
            raise ValueError(
                f"function code must be a read, one of {sorted(FUNCTION_TABLES)} (got {function_code})"
            )
        if exception_code is None:
            self._refused.pop(function_code, None)
        else:
            self._refused[function_code] = int(ExcCodes(exception_code))

    async def start_tcp(self, host: str, port: int, *, framer: Literal["socket", "rtu"] = "socket") -> None:
        """Serve Modbus TCP on (host, port); port 0 picks a free one (see :attr:`endpoints`).

        ``framer="rtu"``: RTU frames (unit id, PDU, CRC) over the TCP stream instead of MBAP."""
        rtu = framer == "rtu"
        server = ModbusTcpServer(
            self._devices(),
            address=(host, port),
            framer=FramerType.RTU if rtu else FramerType.SOCKET,
            trace_packet=functools.partial(self._trace_packet, rtu),
        )
        what = "modbus rtu-over-tcp" if rtu else "modbus tcp"
        await self._listen(server, what, f"{host}:{port}")
        self.endpoints.append(f"{what} {host}:{_bound_port(server, port)} unit {self.device_id}")

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
    def unit_device(self) -> SimDevice:
        """This unit's pymodbus device (a make's unit only; see :class:`SimulatedLine`)."""
        if self._make is None:
            raise ValueError("a line of several units takes units of a named make")
        return SimDevice(id=self.device_id, simdata=self._make.layout(), action=self._action,
                         use_bit_addressing=True)

    def _devices(self) -> list[SimDevice]:
        if self._make is not None:
            return [self.unit_device(), _catch_all()]
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
        reads = FUNCTION_TABLES if self._make is not None else READ_FUNCTION_CODES
        if function_code in reads:
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
        if function_code in self._refused:
            return ExcCodes(self._refused[function_code])
        if self._make is not None:
            return self._make.fill(function_code, start_address, address, count, registers)
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
        if rtu and data[:1] != bytes([self.device_id]):
            return b""
        return self._shape_answer(rtu, data)

    def _shape_answer(self, rtu: bool, data: bytes) -> bytes:
        """This unit's answer as its link faults make it (silenced, shortened, CRC broken)."""
        faults = self.faults.snapshot()
        if faults.no_answer:
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


def _bound_port(server: ModbusTcpServer, asked: int) -> int:
    sockets = getattr(server.transport, "sockets", None) or ()
    return int(sockets[0].getsockname()[1]) if sockets else asked


class SimulatedLine:
    """Several simulated units of named makes on one serial line or TCP port, each under its own
    device id (an RS-485 bus with a Seplos at id 1 and a Pace at id 2, say).

    A request for an id no unit has goes unanswered on RTU (an RS-485 device stays silent) and is
    answered GATEWAY_NO_RESPONSE over Modbus TCP framing. Each unit's own faults shape its answers.
    """

    def __init__(self, units: Sequence[SimulatedBms]) -> None:
        ids = [u.device_id for u in units]
        if not units or len(set(ids)) != len(ids):
            raise ValueError(f"a line needs units with distinct device ids (got {ids})")
        self.units = tuple(units)
        self._by_id = {u.device_id: u for u in units}
        self.endpoints: list[str] = []
        self._servers: list[ModbusBaseServer] = []

    def _devices(self) -> list[SimDevice]:
        return [*(u.unit_device() for u in self.units), _catch_all()]

    async def start_rtu(
        self, device: str, *, baudrate: int = 9600, parity: str = "N", stopbits: int = 1
    ) -> None:
        """Serve every unit on one serial device (a pty path or a pyserial URL)."""
        server = ModbusSerialServer(
            self._devices(), framer=FramerType.RTU, port=device, baudrate=baudrate, parity=parity,
            stopbits=stopbits, trace_packet=functools.partial(self._trace_packet, True),
        )
        await self._listen(server, "modbus rtu", device)
        units = sorted(self._by_id)
        self.endpoints.append(f"modbus rtu {device} {baudrate} {parity}{stopbits} units {units}")

    async def start_tcp(self, host: str, port: int, *, framer: Literal["socket", "rtu"] = "socket") -> None:
        """Serve every unit on one TCP port (Modbus TCP, or RTU framing with ``framer="rtu"``)."""
        rtu = framer == "rtu"
        server = ModbusTcpServer(
            self._devices(), address=(host, port), framer=FramerType.RTU if rtu else FramerType.SOCKET,
            trace_packet=functools.partial(self._trace_packet, rtu),
        )
        what = "modbus rtu-over-tcp" if rtu else "modbus tcp"
        await self._listen(server, what, f"{host}:{port}")
        self.endpoints.append(f"{what} {host}:{_bound_port(server, port)} units {sorted(self._by_id)}")

    async def _listen(self, server: ModbusBaseServer, transport: str, address: str) -> None:
        try:
            await server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            await server.shutdown()  # type: ignore[no-untyped-call]
            raise SimStartError(transport, address, str(exc)) from exc
        self._servers.append(server)
        for unit in self.units:
            unit._ensure_model_task()

    def _trace_packet(self, rtu: bool, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        at = 0 if rtu else MBAP_UNIT_AT
        unit = self._by_id.get(data[at]) if len(data) > at else None
        if unit is None:
            return b"" if rtu else data
        return unit._shape_answer(rtu, data)

    async def stop(self) -> None:
        """Stop the server and every unit's model; safe to call more than once."""
        servers, self._servers = self._servers, []
        for server in servers:
            listener = server.transport
            await server.shutdown()  # type: ignore[no-untyped-call]
            if isinstance(listener, asyncio.AbstractServer):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.wait_closed(), STOP_DEADLINE_S)
        for unit in self.units:
            await unit.stop()
        self.endpoints.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
