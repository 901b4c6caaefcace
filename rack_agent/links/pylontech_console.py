"""An RS-485 line to Pylontech LV packs, read with their own protocol (rack_agent/pylontech), not Modbus.

Each unit on the line is one pack at its address (the unit's ``device_id``). One request at a time
is on the line (the base class polls a link's units in turn, and a unit's requests are awaited one
after the other), each under its own deadline (``polling.request_timeout_ms``):

* before a request, everything received so far is dropped, so a late answer to an earlier request
  is never taken for this one's; a frame for another address arriving meanwhile (a late answer of
  another pack) and the echo of our own request (adapters that hear themselves) are skipped;
* outcomes are classified as for Modbus RTU: no byte before the deadline -> ``timeout``; bytes that
  never made the answer, or an answer whose checksum, LENGTH checksum or length is wrong ->
  ``crc_error``; an answer with a return code (RTN) other than 0 -> ``modbus_exception`` carrying the
  RTN as its code; an answer whose INFO does not decode -> ``invalid_data``; the port failing or
  vanishing -> ``connection_refused`` and a reconnect.

Reading one pack: 0x51 manufacturer info once per connection (logged; profile ``read.identify``),
then at every poll 0x42 analog values, 0x44 alarm info (``read.alarms``) and 0x92 management info.

Wire time (8N1, 10 bits a character): a 15-cell pack costs 320 bytes a poll (three requests of 20,
answers of 140, 82 and 38), 333 ms at 9600 baud and 28 ms at 115200, plus the pack's turnaround
(about 80 ms a request in Tomcat42/pylontech-python's recorded US2000 timings). At 9600 baud one pack
fills half a 1 s poll interval, and ``request_timeout_ms`` must cover the 0x42 answer (~146 ms on the
wire) plus that turnaround.
"""

from __future__ import annotations

import asyncio
import logging

from rack_agent.errors import (
    ConnectionRefusedPollError,
    CrcError,
    InvalidDataError,
    PollTimeoutError,
)
from rack_agent.links.base import BmsLink
from rack_agent.profiles.pylontech import PylontechProfile
from rack_agent.pylontech.codec import Command, ReturnCodeError, answer_info, decode_frame, encode_request
from rack_agent.pylontech.info import (
    decode_alarm_info,
    decode_analog_values,
    decode_management_info,
    decode_manufacturer_info,
)
from rack_agent.pylontech.serial_line import SerialLine, SerialLineError
from rack_agent.pylontech.telemetry import pack_measurements
from rack_agent.unit import UnitRuntime
from shared.agent_config import PylontechConsoleLink
from shared.models import RackMeasurements

log = logging.getLogger(__name__)

# A local tty opens in milliseconds; a socket:// gateway connects within seconds or not at all.
OPEN_DEADLINE_S = 3.0


class PylontechConsoleBmsLink(BmsLink):
    # A new open of a serial port gains nothing while the packs are silent; a port that fails or
    # vanishes is reopened through connection_refused.
    reconnect_on_comm_loss = False

    def __init__(
        self, config: PylontechConsoleLink, *, reconnect_initial_s: float, reconnect_max_s: float
    ) -> None:
        super().__init__(
            config.name, reconnect_initial_s=reconnect_initial_s, reconnect_max_s=reconnect_max_s
        )
        self.config = config
        self._line: SerialLine | None = None
        self._identified: set[str] = set()  # units whose manufacturer info this connection asked
        # One request on the line at a time, whoever asks (the poll loop, or a caller of request()).
        self._on_the_line = asyncio.Lock()
        self.requests = 0
        self.echoes_skipped = 0
        self.foreign_frames_skipped = 0

    @property
    def where(self) -> str:
        return f"pylontech rs485 {self.config.device}@{self.config.baudrate}"

    async def _connect(self) -> None:
        line = SerialLine(self.config.device, self.config.baudrate)
        try:
            await line.open(OPEN_DEADLINE_S)
        except SerialLineError as exc:
            raise ConnectionRefusedPollError(f"link {self.name}: {exc}") from exc
        self._line = line
        self._identified.clear()

    async def _disconnect(self) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None

    async def request(self, address: int, command: Command, info: bytes = b"", *, timeout_s: float) -> bytes:
        """Send one request and return the INFO of the pack's answer within ``timeout_s``; every failure
        typed (see the module docstring)."""
        async with self._on_the_line:
            return await self._transact(address, command, info, timeout_s)

    async def _transact(self, address: int, command: Command, info: bytes, timeout_s: float) -> bytes:
        line = self._line
        if line is None or not line.is_open:
            raise ConnectionRefusedPollError(f"{self.where} is not open")
        request = encode_request(address, command, info)
        self.requests += 1
        line.clear_input()
        explained = 0  # bytes of frames that were not the answer but are no fault (echo, other packs)
        try:
            async with asyncio.timeout(timeout_s):
                await line.send(request)
                while True:
                    raw = await line.receive_frame()
                    if raw == request:
                        self.echoes_skipped += 1
                        explained += len(raw)
                        continue
                    frame = decode_frame(raw)
                    if frame.address != address:
                        self.foreign_frames_skipped += 1
                        explained += len(raw)
                        continue
                    return answer_info(frame, address=address, command=command)
        except TimeoutError:
            unexplained = line.rx_bytes - explained
            what = f"pack {address} on {self.where}, command {command:#04x} ({command.name})"
            if unexplained > 0:
                raise CrcError(
                    f"{unexplained} bytes from {what} within {timeout_s * 1000:.0f} ms never formed "
                    f"its answer (garbled or cut short)"
                ) from None
            raise PollTimeoutError(f"{what}: no answer within {timeout_s * 1000:.0f} ms") from None
        except SerialLineError as exc:
            raise ConnectionRefusedPollError(f"{self.where}: {exc.detail}") from exc

    async def _identify(self, unit: UnitRuntime, address: int, timeout_s: float) -> None:
        try:
            info = decode_manufacturer_info(
                await self.request(address, Command.MANUFACTURER_INFO, timeout_s=timeout_s))
        except ReturnCodeError as exc:
            # A firmware without 0x51 is no reason to stop reading the pack: say so once per connection.
            self._log.info(("identify", unit.name), "unit %s: pack %d gives no manufacturer info (%s)",
                           unit.name, address, exc.detail)
        else:
            self._log.info(("identify", unit.name), "unit %s: pack %d on %s is %s", unit.name, address,
                           self.where, info)
        self._identified.add(unit.name)

    async def _read(self, unit: UnitRuntime, timeout_s: float) -> RackMeasurements:
        profile = unit.profile
        if not isinstance(profile, PylontechProfile):  # load_unit_profiles refuses this pairing
            raise InvalidDataError(f"unit {unit.name} has no pylontech_console profile")
        address = unit.config.device_id
        if profile.read.identify and unit.name not in self._identified:
            await self._identify(unit, address, timeout_s)
        async def ask(command: Command) -> bytes:
            return await self.request(address, command, bytes([address]), timeout_s=timeout_s)

        analog = decode_analog_values(await ask(Command.ANALOG_VALUES), address)
        alarm = decode_alarm_info(await ask(Command.ALARM_INFO), address) if profile.read.alarms else None
        management = decode_management_info(await ask(Command.MANAGEMENT_INFO), address)
        return pack_measurements(
            analog, alarm, management, profile.pack, invert_current=unit.invert_current, rules=unit.rules,
        )
