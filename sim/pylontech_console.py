"""Simulated Pylontech LV packs answering their RS-485 protocol on one serial line (a pty or a URL).

Each pack is a :class:`sim.battery.BatteryModel` (15 cells in 4 temperature groups, 74 Ah like a
US3000, so its capacities take the protocol's 24-bit form) at its own address, 2, 3, ... as packs
behind a master are numbered. Only the addressed pack answers; an address nobody has stays silent,
as on an RS-485 bus. Served: 0x42 analog values, 0x44 alarm info, 0x92 management info, 0x51
manufacturer info. The encoding is rack_agent/pylontech (codec, info), whose tests hold it to frames
recorded from real packs.

What a real pack answers with a return code (RTN), this one does too: a request with a bad checksum
(0x02) or LENGTH checksum (0x03), another protocol version (0x01), an unknown command (0x04), an
INFO that does not name this pack (0x90).

Faults, per pack: the shared :class:`sim.faults.FaultState` (battery faults as for every simulated
BMS; ``no_answer`` silences the pack, ``delay_ms`` delays its answers, ``corrupt_crc`` spoils each
answer's checksum; the Modbus-only ones are ignored), and :class:`ConsoleFaults`: refuse requests
(all, or those of some commands) with an RTN, spoil the LENGTH checksum, and lie (an SOC above
100 %, a pack voltage the cells cannot make).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from rack_agent.errors import CrcError
from rack_agent.pylontech.codec import (
    CHECKSUM_CHARS,
    CID1_BATTERY,
    EOI,
    PROTOCOL_VERSION,
    Command,
    Frame,
    FrameChecksumError,
    LengthChecksumError,
    decode_frame,
    encode_frame,
)
from rack_agent.pylontech.info import (
    STATE_ABOVE,
    STATE_BELOW,
    STATE_NORMAL,
    AlarmInfo,
    AnalogValues,
    ManagementInfo,
    ManagementStatus,
    ManufacturerInfo,
    ProtectionStatus,
    SwitchStatus,
    encode_alarm_info,
    encode_analog_values,
    encode_management_info,
    encode_manufacturer_info,
)
from rack_agent.pylontech.serial_line import SerialLine, SerialLineError
from shared.config import ConfigError
from sim.battery import BatteryModel, BatterySnapshot, SimRackConfig
from sim.faults import FaultError, FaultState, apply_rack_faults
from sim.scenario import load_scenario, run_scenario

log = logging.getLogger(__name__)

FIRST_ADDRESS = 2  # the master pack; the packs behind it count up (Pylon LV RS485 V3.3)
MAX_PACKS = 15
PACK_CELLS = 15
CELLS_PER_SENSOR = 4  # cells 1-4, 5-8, 9-12, 13-15 share a temperature sensor
PACK_CAPACITY_AH = 74.0  # a US3000: above 65.535 Ah, so the 24-bit capacity form is exercised
PACK_MAX_CURRENT_A = 37.0
# The BMS board runs warmer than the cells; reported as sensor 1, which is no cell temperature.
BOARD_ABOVE_CELLS_C = 3.0
CYCLES = 12
OPEN_DEADLINE_S = 3.0
SEND_DEADLINE_S = 1.0  # an answer the line does not take within this is dropped (nobody drains the line)
STOP_DEADLINE_S = 2.0
BAUDRATES = (9600, 115200)
DEVICE_NAME = "US3000C"
SOFTWARE_VERSION = (2, 3)
MANUFACTURER = "PYLON"
# Return codes (RTN) this simulator sends.
RTN_VERSION_ERROR = 0x01
RTN_CHECKSUM_ERROR = 0x02
RTN_LENGTH_CHECKSUM_ERROR = 0x03
RTN_CID2_INVALID = 0x04
RTN_ADDRESS_ERROR = 0x90
RTN_CODES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x90, 0x91)
ADDRESSED_COMMANDS = (Command.ANALOG_VALUES, Command.ALARM_INFO, Command.MANAGEMENT_INFO)
EFFECTIVE_CURRENT_A = 0.1  # status 3 flags a current the BMS sees as flowing
STATUS3_CHARGING = 0x80
STATUS3_DISCHARGING = 0x40


def pack_config(index: int, seed: int = 0) -> SimRackConfig:
    """The battery of the ``index``-th pack on the line."""
    return SimRackConfig(
        cells_in_series=PACK_CELLS, cells_per_module=CELLS_PER_SENSOR, capacity_ah=PACK_CAPACITY_AH,
        max_charge_a=PACK_MAX_CURRENT_A, max_discharge_a=PACK_MAX_CURRENT_A, seed=seed + index,
        serial_number=f"PPTSIM{index:04d}",
    )


@dataclass(frozen=True, slots=True)
class ConsoleFaults:
    """Faults of the Pylontech protocol itself; the default is a healthy pack."""

    rtn: int | None = None  # refuse requests with this return code: those for ``rtn_commands``, or all
    rtn_commands: frozenset[int] | None = None
    bad_length_checksum: bool = False  # answers whose LCHKSUM is wrong (their CHKSUM is right)
    reported_soc_pct: float | None = None  # lie: report this SOC (e.g. 150) through the remaining capacity
    pack_voltage_offset_v: float = 0.0  # lie: a pack voltage this far from the sum of its cells


class SimPack:
    """One pack: its model, its faults and its address (also a :class:`sim.scenario.Target`)."""

    def __init__(self, address: int, config: SimRackConfig) -> None:
        if not 0 <= address <= 0xFF:
            raise ValueError(f"address must be 0..255 (got {address})")
        self.address = address
        self.faults = FaultState()
        self.model = BatteryModel(config, self.faults)
        self.console = ConsoleFaults()

    def set_current(self, amps: float) -> None:
        self.model.set_current(amps)

    def set_console_faults(self, faults: ConsoleFaults) -> None:
        if faults.rtn is not None and not 1 <= faults.rtn <= 0xFF:
            raise FaultError(f"RTN must be 1..255 (0 is a normal answer), got {faults.rtn}")
        self.console = faults


ItemStates = tuple[tuple[int, ...], tuple[int, ...], int, int, int]


def _states(snapshot: BatterySnapshot, flags: frozenset[str]) -> ItemStates:
    """(cell states, sensor states, charge current, pack voltage, discharge current states) of warnings."""
    cells = [STATE_NORMAL] * len(snapshot.cell_voltages_v)
    if "cell_over_voltage" in flags:
        cells[snapshot.cell_max_index - 1] = STATE_ABOVE
    if "cell_under_voltage" in flags:
        cells[snapshot.cell_min_index - 1] = STATE_BELOW
    sensors = [STATE_NORMAL] * (1 + snapshot.modules)  # sensor 1 = the board
    if flags & {"charge_over_temperature", "discharge_over_temperature"}:
        sensors[snapshot.temperature_max_module] = STATE_ABOVE
    if flags & {"charge_under_temperature", "discharge_under_temperature"}:
        sensors[snapshot.temperature_min_module] = STATE_BELOW
    charge = STATE_ABOVE if "charge_over_current" in flags else STATE_NORMAL
    discharge = STATE_ABOVE if "discharge_over_current" in flags else STATE_NORMAL
    pack = STATE_NORMAL
    if "pack_over_voltage" in flags:
        pack = STATE_ABOVE
    elif "pack_under_voltage" in flags:
        pack = STATE_BELOW
    return tuple(cells), tuple(sensors), charge, pack, discharge


_PROTECTION_BITS: dict[str, ProtectionStatus] = {
    "pack_over_voltage": ProtectionStatus.MODULE_OVER_VOLTAGE,
    "cell_under_voltage": ProtectionStatus.CELL_UNDER_VOLTAGE,
    "charge_over_current": ProtectionStatus.CHARGE_OVER_CURRENT,
    "discharge_over_current": ProtectionStatus.DISCHARGE_OVER_CURRENT,
    "discharge_over_temperature": ProtectionStatus.DISCHARGE_OVER_TEMPERATURE,
    "charge_over_temperature": ProtectionStatus.CHARGE_OVER_TEMPERATURE,
    "pack_under_voltage": ProtectionStatus.MODULE_UNDER_VOLTAGE,
}


def analog_values(pack: SimPack) -> AnalogValues:
    s = pack.model.snapshot()
    lie = pack.console
    soc_pct = s.soc_pct if lie.reported_soc_pct is None else lie.reported_soc_pct
    return AnalogValues(
        address=pack.address,
        cell_voltages_v=s.cell_voltages_v,
        temperatures_c=(s.temperature_avg_c + BOARD_ABOVE_CELLS_C, *s.module_temperatures_c),
        current_a=s.current_a,
        pack_voltage_v=max(0.0, s.pack_voltage_v + lie.pack_voltage_offset_v),
        remaining_ah=s.capacity_ah * soc_pct / 100.0,
        total_ah=s.capacity_ah,
        cycles=CYCLES,
    )


def alarm_info(pack: SimPack) -> AlarmInfo:
    """Alarms as status-1 protections (what has no bit there, as the limit state of its item; an
    internal fault as a failed cell 1), warnings as limit states, the contactor as both MOSFETs."""
    s = pack.model.snapshot()
    alarms, warnings = set(s.alarms.raised()), set(s.warnings.raised())
    protection = ProtectionStatus(0)
    for name, bit in _PROTECTION_BITS.items():
        if name in alarms:
            protection |= bit
    as_states = frozenset(warnings | (alarms - _PROTECTION_BITS.keys()))
    cells, sensors, charge, pack_v, discharge = _states(s, as_states)
    switches = (
        SwitchStatus.CHARGE_MOSFET | SwitchStatus.DISCHARGE_MOSFET | SwitchStatus.USING_BATTERY_POWER
        if s.contactor_closed else SwitchStatus(0)
    )
    status3 = 0
    if s.current_a > EFFECTIVE_CURRENT_A:
        status3 |= STATUS3_CHARGING
    elif s.current_a < -EFFECTIVE_CURRENT_A:
        status3 |= STATUS3_DISCHARGING
    return AlarmInfo(
        pack.address, cells, sensors, charge, pack_v, discharge, protection, switches, status3,
        failed_cells=1 if "internal_fault" in alarms else 0,
    )


def management_info(pack: SimPack) -> ManagementInfo:
    s = pack.model.snapshot()
    status = ManagementStatus(0)
    if s.charge_current_limit_a > 0:
        status |= ManagementStatus.CHARGE_ENABLE
    if s.discharge_current_limit_a > 0:
        status |= ManagementStatus.DISCHARGE_ENABLE
    # Packs send the discharge limit negative (python-pylontech tests/test_basic.py, UP2500 capture).
    return ManagementInfo(pack.address, s.charge_voltage_limit_v, s.discharge_voltage_limit_v,
                          s.charge_current_limit_a, -s.discharge_current_limit_a, status)


def _spoil_checksum(wire: bytes) -> bytes:
    """The frame with its CHKSUM inverted: same length, a checksum that cannot match."""
    at = len(wire) - 1 - CHECKSUM_CHARS
    wrong = int(wire[at:-1], 16) ^ 0xFFFF
    return wire[:at] + f"{wrong:04X}".encode("ascii") + bytes([EOI])


def _spoil_length_checksum(wire: bytes) -> bytes:
    """The frame with a wrong LCHKSUM nibble and a CHKSUM made to fit, so only LENGTH is wrong."""
    at = 1 + 8  # SOI, then VER ADR CID1 CID2
    nibble = (int(wire[at:at + 1], 16) + 1) & 0xF
    body = wire[1:at] + f"{nibble:X}".encode("ascii") + wire[at + 1:len(wire) - 1 - CHECKSUM_CHARS]
    return bytes([wire[0]]) + body + f"{(-sum(body)) & 0xFFFF:04X}".encode("ascii") + bytes([EOI])


class PylontechConsoleSim:
    """Packs answering on one serial line until :meth:`stop`; a background task steps their models."""

    def __init__(self, packs: Sequence[SimPack], *, update_period_s: float = 0.1) -> None:
        addresses = [p.address for p in packs]
        if not packs or len(set(addresses)) != len(addresses):
            raise ValueError(f"packs need distinct addresses, got {addresses}")
        self.packs = {p.address: p for p in packs}
        self.update_period_s = update_period_s
        self.endpoints: list[str] = []
        self.requests: Counter[tuple[int, int]] = Counter()  # (address, CID2) of requests received
        self.answers = 0
        self.refused: Counter[int] = Counter()  # RTN sent -> count
        self.undecodable_requests = 0
        self.answers_dropped = 0
        self._line: SerialLine | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def with_packs(
        cls, count: int, *, seed: int = 0, first_address: int = FIRST_ADDRESS
    ) -> PylontechConsoleSim:
        return cls([SimPack(first_address + i, pack_config(i, seed)) for i in range(count)])

    def pack(self, address: int) -> SimPack:
        return self.packs[address]

    async def start(self, device: str, *, baudrate: int = 9600) -> None:
        """Open ``device`` (a pty path or a pyserial URL) and serve; raises :class:`SerialLineError`."""
        if baudrate not in BAUDRATES:
            raise ValueError(f"baudrate must be one of {BAUDRATES} (got {baudrate})")
        line = SerialLine(device, baudrate)
        await line.open(OPEN_DEADLINE_S)
        self._line = line
        self._tasks = [
            asyncio.create_task(self._serve(line), name=f"sim-pylontech-serve-{device}"),
            asyncio.create_task(self._run_models(), name=f"sim-pylontech-models-{device}"),
        ]
        self.endpoints = [f"pylontech rs485 {device} {baudrate} address {a}" for a in self.packs]

    async def stop(self) -> None:
        """Stop serving and close the line; safe to call more than once."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("simulator task %s failed", task.get_name(), exc_info=task.exception())
        if self._line is not None:
            self._line.close()
            self._line = None
        self.endpoints = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- serving ----------------------------------------------------------------------------------

    async def _run_models(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.update_period_s)
            now = time.monotonic()
            for pack in self.packs.values():
                pack.model.step(now - last)
            last = now

    async def _serve(self, line: SerialLine) -> None:
        while True:
            try:
                answer = await self.answer(await line.receive_frame())
                if answer is not None:
                    async with asyncio.timeout(SEND_DEADLINE_S):
                        await line.send(answer)
            except TimeoutError:
                self.answers_dropped += 1
            except SerialLineError as exc:
                log.error("pylontech simulator: %s", exc)
                return

    async def answer(self, raw: bytes) -> bytes | None:
        """The bytes the packs answer to one received frame (None: silence)."""
        try:
            request = decode_frame(raw)
        except (FrameChecksumError, LengthChecksumError) as exc:
            # The header may still name one of us; that pack says what was wrong (V3.3 RTN 02/03).
            address = _header_address(raw)
            if address not in self.packs or self.packs[address].faults.snapshot().no_answer:
                self.undecodable_requests += 1
                return None
            rtn = RTN_CHECKSUM_ERROR if isinstance(exc, FrameChecksumError) else RTN_LENGTH_CHECKSUM_ERROR
            return await self._send(self.packs[address], rtn, b"")
        except CrcError:
            self.undecodable_requests += 1
            return None
        pack = self.packs.get(request.address)
        if pack is None:
            return None  # another device's address: an RS-485 device stays silent
        self.requests[(request.address, request.cid2)] += 1
        faults = pack.faults.snapshot()
        if faults.no_answer:
            return None
        if faults.delay_ms:
            await asyncio.sleep(faults.delay_ms / 1000.0)
        rtn, info = self._reply(pack, request)
        return await self._send(pack, rtn, info)

    def _reply(self, pack: SimPack, request: Frame) -> tuple[int, bytes]:
        refusal = pack.console
        if refusal.rtn is not None and (refusal.rtn_commands is None or request.cid2 in refusal.rtn_commands):
            return refusal.rtn, b""
        if request.version != PROTOCOL_VERSION:
            return RTN_VERSION_ERROR, b""
        if request.cid1 != CID1_BATTERY:
            return RTN_CID2_INVALID, b""
        command = request.cid2
        if command in ADDRESSED_COMMANDS and request.info[:1] != bytes([pack.address]):
            return RTN_ADDRESS_ERROR, b""  # the INFO's command value must name this pack
        if command == Command.ANALOG_VALUES:
            return 0, encode_analog_values(analog_values(pack))
        if command == Command.ALARM_INFO:
            return 0, encode_alarm_info(alarm_info(pack))
        if command == Command.MANAGEMENT_INFO:
            return 0, encode_management_info(management_info(pack))
        if command == Command.MANUFACTURER_INFO:
            return 0, encode_manufacturer_info(ManufacturerInfo(DEVICE_NAME, SOFTWARE_VERSION, MANUFACTURER))
        return RTN_CID2_INVALID, b""

    async def _send(self, pack: SimPack, rtn: int, info: bytes) -> bytes:
        if rtn:
            self.refused[rtn] += 1
        else:
            self.answers += 1
        wire = encode_frame(Frame(pack.address, rtn, info))
        if pack.console.bad_length_checksum and info:
            wire = _spoil_length_checksum(wire)
        if pack.faults.snapshot().corrupt_crc:
            wire = _spoil_checksum(wire)
        return wire


def _header_address(raw: bytes) -> int | None:
    try:
        return int(raw[3:5], 16)
    except ValueError:
        return None


# -- command line (``bmslink sim bms --transport pylontech``) ---------------------------------------


def _baudrate(args: argparse.Namespace) -> int:
    # The shared --baudrate has no default of its own (each make has one); the protocol's is 9600.
    return int(args.baudrate) if args.baudrate is not None else BAUDRATES[0]


def _check_args(args: argparse.Namespace) -> str | None:
    if len(args.device) != 1:
        return (f"--transport pylontech serves every pack on one line: give one --device "
                f"(got {len(args.device)})")
    if not 1 <= args.racks <= MAX_PACKS:
        return f"--transport pylontech serves 1..{MAX_PACKS} packs (--racks {args.racks})"
    if _baudrate(args) not in BAUDRATES:
        rates = " or ".join(map(str, BAUDRATES))
        return f"--transport pylontech runs at {rates} baud (--baudrate {args.baudrate})"
    if getattr(args, "profile", None) is not None:
        return f"--profile {args.profile} is a Modbus register map; --transport pylontech serves Pylontech"
    if args.rtn is not None and args.rtn not in RTN_CODES:
        return f"--rtn {args.rtn} is no Pylontech return code; one of: {', '.join(map(str, RTN_CODES))}"
    modbus_only = [flag for flag, given in (
        ("--exception-code", args.exception_code is not None), ("--short-read", bool(args.short_read)),
        ("--sunspec-layout", args.sunspec_layout != "standard"),
    ) if given]
    if modbus_only:
        return f"{', '.join(modbus_only)}: Modbus faults; --transport pylontech has --rtn and --corrupt-crc"
    return None


def _apply(pack: SimPack, args: argparse.Namespace) -> None:
    pack.set_current(args.current)
    apply_rack_faults(pack.faults, args)
    pack.set_console_faults(dataclasses.replace(pack.console, rtn=args.rtn))


def _fail(message: str, status: int) -> int:
    print(f"bmslink sim bms: {message}", file=sys.stderr, flush=True)
    return status


async def _serve_cli(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = PylontechConsoleSim.with_packs(args.racks, seed=args.seed)
    runner: asyncio.Task[None] | None = None
    try:
        scenario = None
        if args.scenario is not None:
            scenario = load_scenario(args.scenario)
            scenario.check_racks(args.racks, args.scenario)
        for pack in sim.packs.values():
            _apply(pack, args)
        await sim.start(args.device[0], baudrate=_baudrate(args))
        for i, endpoint in enumerate(sim.endpoints):
            print(f"sim rack {i} ready: {endpoint}", flush=True)
        if scenario is not None:
            runner = asyncio.create_task(
                run_scenario(scenario, list(sim.packs.values()), on_event=lambda t, e: print(
                    f"sim scenario t={t:.1f} s rack {'all' if e.rack is None else e.rack}: {e.describe()}",
                    flush=True)),
                name="sim-scenario",
            )
        await stop.wait()
        return 0
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except FaultError as exc:
        return _fail(str(exc), 2)
    except SerialLineError as exc:
        return _fail(str(exc), 1)
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])
            if not runner.cancelled() and runner.exception() is not None:
                _fail(f"scenario failed: {runner.exception()}", 1)
        await sim.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_pylontech(args: argparse.Namespace) -> int:
    """``bmslink sim bms --transport pylontech``: exit 0 after a clean stop, 2 for bad arguments or a bad
    scenario, 1 when the line cannot be opened (the message names it and the OS error)."""
    problem = _check_args(args)
    if problem is not None:
        return _fail(problem, 2)
    return asyncio.run(_serve_cli(args))
