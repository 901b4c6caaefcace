"""Modbus TCP and Modbus RTU links (pymodbus 3.16).

Classification of every outcome, because pymodbus does not do it for us:

* an exception response is *returned* (``isError()``) -> ``modbus_exception``
  (code 0x0B "gateway target failed to respond" is a timeout of that unit);
* a bad RTU CRC is dropped silently by the framer and surfaces as the same
  ``ModbusIOException`` as silence. We watch the raw bytes with
  ``trace_packet``: bytes received but no valid frame -> ``crc_error``,
  nothing received -> ``timeout``;
* ``ConnectionException`` -> ``connection_refused``.

Reads use the function code of the block's table: FC3 holding, FC4 input, FC1 coils, FC2 discrete
inputs (coils arrive as bits; each becomes a 0/1 in the register image). A TCP link may frame its
requests as RTU (``framer = "rtu"``: unit id, PDU, CRC over the stream, no MBAP header), as a BYD
Battery-Box BMU does on port 8080; a bad CRC is then told apart from silence as on a serial line.

A serial device that cannot be opened is named in a warning with the operating system's reason
(missing, not permitted, not a terminal, locked by another program): pymodbus only returns False.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import termios
import time
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from rack_agent.errors import (
    ConnectionRefusedPollError,
    CrcError,
    DeviceLayoutError,
    InvalidDataError,
    ModbusExceptionError,
    PollError,
    PollTimeoutError,
    ProfileError,
)
from rack_agent.links.base import BmsLink
from rack_agent.profiles import SunSpecProfile
from rack_agent.profiles.plan import RegisterPlan, decode_measurements, image_from_blocks
from rack_agent.profiles.spec import Table
from rack_agent.profiles.sunspec import discover, sunspec_plan
from rack_agent.unit import UnitRuntime
from shared.agent_config import ModbusRtuLink, ModbusTcpLink
from shared.models import RackMeasurements

log = logging.getLogger(__name__)

GATEWAY_NO_RESPONSE = 0x0B
READ_FUNCTION_NAMES = {
    Table.HOLDING: "holding registers (FC3)",
    Table.INPUT: "input registers (FC4)",
    Table.COIL: "coils (FC1)",
    Table.DISCRETE: "discrete inputs (FC2)",
}
# We decide ourselves when a silent peer deserves a new connection (after comm loss);
# pymodbus would otherwise close a TCP link after a few unanswered requests and make
# the next poll look like "connection refused".
_NEVER_CLOSE_ON_SILENCE = 1_000_000


class _RawTraffic:
    """Counts raw bytes received since the last request (trace_packet hook: it runs on our loop)."""

    def __init__(self) -> None:
        self.rx_bytes = 0

    def __call__(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self.rx_bytes = 0
        else:
            self.rx_bytes += len(data)
        return data


class ModbusLink(BmsLink):
    """Shared Modbus logic; subclasses only build the pymodbus client."""

    framing_error_is_crc = False

    def __init__(self, name: str, *, request_timeout_s: float, reconnect_initial_s: float,
                 reconnect_max_s: float) -> None:
        super().__init__(name, reconnect_initial_s=reconnect_initial_s, reconnect_max_s=reconnect_max_s)
        self._timeout_s = request_timeout_s
        self._traffic = _RawTraffic()
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        raise NotImplementedError

    @property
    def _where(self) -> str:
        raise NotImplementedError

    async def _connect(self) -> None:
        client = self._make_client()
        client.set_max_no_responses(_NEVER_CLOSE_ON_SILENCE)
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:
            client.close()
            raise ConnectionRefusedPollError(f"cannot open {self._where}: {exc}") from exc
        if not ok:
            client.close()
            raise ConnectionRefusedPollError(f"cannot open {self._where}")
        self._client = client

    async def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _deadline_error(self, deadline_s: float) -> PollError:
        if self.framing_error_is_crc and self._traffic.rx_bytes > 0:
            return CrcError(f"{self._traffic.rx_bytes} bytes on {self._where} never formed a valid frame")
        return super()._deadline_error(deadline_s)

    async def read_registers(self, device_id: int, table: Table, address: int, count: int) -> list[int]:
        """One FC1/FC2/FC3/FC4 read with every failure classified into a typed error.

        Registers come back as 16-bit values, coils and discrete inputs as one 0/1 each."""
        client = self._client
        if client is None:
            raise ConnectionRefusedPollError(f"{self._where} is not connected")
        self._traffic.rx_bytes = 0
        readers = {
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
            Table.COIL: client.read_coils,
            Table.DISCRETE: client.read_discrete_inputs,
        }
        reader = readers[table]
        try:
            response: Any = await reader(address, count=count, device_id=device_id)
        except ModbusIOException as exc:
            if self._traffic.rx_bytes > 0:
                if self.framing_error_is_crc:
                    raise CrcError(
                        f"{self._traffic.rx_bytes} bytes from device {device_id} on {self._where} "
                        f"never formed a valid frame (bad CRC or framing)"
                    ) from exc
                raise InvalidDataError(f"malformed Modbus frame from {self._where}") from exc
            raise PollTimeoutError(
                f"device {device_id} on {self._where} did not answer within {self._timeout_s * 1000:.0f} ms"
            ) from exc
        except ConnectionException as exc:
            raise ConnectionRefusedPollError(f"{self._where}: {exc}") from exc
        except ModbusException as exc:
            raise InvalidDataError(f"{self._where}: {exc}") from exc
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            if code == GATEWAY_NO_RESPONSE:
                raise PollTimeoutError(f"gateway {self._where} reports device {device_id} silent", code=code)
            raise ModbusExceptionError(
                f"device {device_id} on {self._where} answered exception code {code:#04x} "
                f"reading {READ_FUNCTION_NAMES[table]} {address}+{count}",
                code=code,
            )
        if table.holds_bits:
            # The answer carries whole bytes: pymodbus pads the bits to a multiple of 8.
            bits = [int(bool(b)) for b in response.bits]
            if len(bits) < count:
                raise InvalidDataError(f"asked {count} {table.value}s at {address}, got {len(bits)}")
            return bits[:count]
        registers = list(response.registers)
        if len(registers) < count:
            raise InvalidDataError(f"asked {count} registers at {address}, got {len(registers)}")
        return registers[:count]

    async def _plan(self, unit: UnitRuntime) -> RegisterPlan:
        """The unit's register plan, discovering the SunSpec layout when there is none yet.

        A layout the profile cannot use is reported as :class:`DeviceLayoutError` (invalid data, with
        the reason) and not asked for again before the unit's discovery backoff has passed: polls in
        between fail at once with the same reason, so the unit stays visible as invalid_data (and
        becomes comm-lost after ``comm_lost_after`` polls) without a burst of requests at every slot.
        Failures of the link itself (silence, refusal) are retried at the next poll, as any poll is.
        """
        if unit.plan is not None:
            return unit.plan
        profile = unit.profile
        if not isinstance(profile, SunSpecProfile):
            raise InvalidDataError(f"unit {unit.name} has no register plan")
        retry = unit.discovery
        now = time.monotonic()
        if not retry.due(now):
            raise retry.waiting_error(now)
        device_id = unit.config.device_id

        async def read_holding(address: int, count: int) -> list[int]:
            return await self.read_registers(device_id, Table.HOLDING, address, count)

        retry.started()
        try:
            layout = await discover(read_holding, profile.base_addresses)
            plan = sunspec_plan(profile, layout)
        except ProfileError as exc:  # load_profile checks the points; kept so nothing can escape
            error = DeviceLayoutError(f"{exc.source}: {'; '.join(exc.problems)}")
            self._refused(unit, error)
            raise error from exc
        except PollError as exc:
            if not exc.transient:
                self._refused(unit, exc)
            raise
        retry.succeeded()
        unit.plan = plan
        self._log.info(("sunspec", unit.name), "unit %s: SunSpec at %d, models %s", unit.name,
                       layout.base_address, sorted(f"{m}" for m, _ in layout.models))
        return plan

    def _refused(self, unit: UnitRuntime, error: PollError) -> None:
        delay_s = unit.discovery.failed(error, time.monotonic())
        error.detail = f"{error.detail} (next discovery in {delay_s:.2f} s)"

    async def _read(self, unit: UnitRuntime, timeout_s: float) -> RackMeasurements:
        device_id = unit.config.device_id
        plan = await self._plan(unit)
        reads = [
            (block, await self.read_registers(device_id, block.table, block.address, block.count))
            for block in plan.blocks
        ]
        image = image_from_blocks(reads)
        return decode_measurements(
            plan, image, capacity_ah=unit.config.capacity_ah, invert_current=unit.invert_current,
            rules=unit.rules,
        )


class ModbusTcpBmsLink(ModbusLink):
    def __init__(self, config: ModbusTcpLink, **kwargs: float) -> None:
        super().__init__(config.name, **kwargs)
        self.config = config
        # RTU frames over TCP carry a CRC that pymodbus checks and drops silently, as on a serial line.
        self.framing_error_is_crc = config.framer == "rtu"

    @property
    def _where(self) -> str:
        framing = "rtu-over-tcp" if self.config.framer == "rtu" else "tcp"
        return f"modbus {framing} {self.config.host}:{self.config.port}"

    def _make_client(self) -> AsyncModbusTcpClient:
        return AsyncModbusTcpClient(
            self.config.host,
            framer=FramerType.RTU if self.config.framer == "rtu" else FramerType.SOCKET,
            port=self.config.port,
            timeout=self._timeout_s,
            retries=0,
            reconnect_delay=0,  # reconnect is ours (BmsLink), with jittered bounded backoff
            trace_packet=self._traffic,
        )


class ModbusRtuBmsLink(ModbusLink):
    framing_error_is_crc = True
    reconnect_on_comm_loss = False

    def __init__(self, config: ModbusRtuLink, **kwargs: float) -> None:
        super().__init__(config.name, **kwargs)
        self.config = config

    @property
    def _where(self) -> str:
        return f"modbus rtu {self.config.device}@{self.config.baudrate}"

    async def _connect(self) -> None:
        try:
            await super()._connect()
        except ConnectionRefusedPollError as exc:
            # pymodbus logs its own reason at debug and only returns False: find out ourselves, so
            # the operator reads which device and why (a missing adapter, permissions, a lock).
            reason = serial_open_problem(self.config.device)
            exc.detail = f"cannot open serial device {self.config.device}: {reason}"
            self._log.warning(
                ("serial-open", self.config.device, reason),
                "link %s: cannot open serial device %s: %s", self.name, self.config.device, reason,
            )
            raise

    def _make_client(self) -> AsyncModbusSerialClient:
        return AsyncModbusSerialClient(
            self.config.device,
            framer=FramerType.RTU,
            baudrate=self.config.baudrate,
            parity=self.config.parity,
            stopbits=self.config.stopbits,
            bytesize=self.config.bytesize,
            timeout=self._timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._traffic,
        )


def serial_open_problem(device: str) -> str:
    """Why a serial device cannot be opened, in the operating system's words (for the operator).

    Opens the path the way pyserial does (read/write, no controlling terminal, exclusive lock) and
    reports the first refusal: the OSError's text and errno name, "not a terminal" for a file that is
    none, or that another program holds the lock. A pyserial URL (``socket://``...) is not a path.
    """
    if "://" in device:
        return "the pyserial URL could not be opened (see the link's debug log)"
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return _os_reason(exc)
    try:
        try:
            termios.tcgetattr(fd)
        except termios.error as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else errno.ENOTTY
            return f"not a serial device: {os.strerror(code)} [{errno.errorcode.get(code, code)}]"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return f"in use: another program holds its lock ({_os_reason(exc)})"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "it opens now (the failure was transient, or in the port settings)"
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    return f"{exc.strerror or exc} [{name}]"
