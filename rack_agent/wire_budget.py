"""How long one poll of a serial (Modbus RTU) line takes on the wire, against the poll interval.

Units on one RS-485 line are polled in turn, so a line whose read plans need more wire time than
``polling.interval_ms`` overruns every slot: polls are skipped and telemetry ages, however fast the
devices answer. This module computes that time from the configuration alone, so the agent can say so
at start (and ``--check-config`` before anything is wired), naming the line, the total and the
slowest unit. Pure: no I/O, no clock.

Per request (Modbus over Serial Line V1.02, §2.5.1.1; the FC 0x03/0x04 frames of the application
protocol V1.1b3, §6.3/6.4):

* request frame 8 bytes (address, function, start, count, CRC); answer 5 + 2·N bytes for N registers
  (FC3/FC4), 5 + ⌈N/8⌉ for N coils or discrete inputs (FC1/FC2);
* each character is 1 start bit + data bits + a parity bit (unless parity N) + stop bits;
* a silent interval of 3.5 characters ends every frame (fixed at 1.75 ms above 19200 baud), so two
  per request, one after the request and one after the answer;
* plus :data:`TURNAROUND_MS` for the device to start answering. Real BMS take 5–50 ms
  (/work/shared/reference/bms-side.md §2.5); the low end is assumed, so a warning means the line
  cannot keep up even with a fast device.

SunSpec units are resolved only by discovery on the device; their plan is estimated by laying the
profile's models out one after the other in ascending order, as the SunSpec chains we know are,
and grouping registers with the agent's own :func:`plan_blocks`. Discovery itself happens once per
connection and is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rack_agent.profiles import FlatProfile, SunSpecProfile, flat_plan
from rack_agent.profiles.plan import Block
from rack_agent.profiles.pylontech import PylontechProfile
from rack_agent.profiles.spec import Constant, SunSpecRegister
from rack_agent.profiles.sunspec import HEADER_REGISTERS, SunSpecLayout, model_points, sunspec_plan
from shared.agent_config import AgentConfig, ModbusRtuLink

REQUEST_FRAME_BYTES = 8  # address, function, start (2), count (2), CRC (2)
ANSWER_OVERHEAD_BYTES = 5  # address, function, byte count, CRC (2); plus the data bytes
BITS_PER_BYTE = 8
FRAME_GAP_CHARS = 3.5  # the silent interval that ends an RTU frame
# Above 19200 baud the spec fixes the gap instead of scaling it with the character time.
FAST_LINE_BAUD = 19200
FAST_LINE_GAP_MS = 1.75
# Device turnaround per request: the low end of what BMS take, so a warning is never a false alarm.
TURNAROUND_MS = 5.0
START_BITS = 1
# Where the estimated SunSpec chain starts (after SunS and the common model's header, any value works).
_ESTIMATE_BASE_ADDRESS = 40000


@dataclass(frozen=True, slots=True)
class SerialFraming:
    """How characters go over the line."""

    baudrate: int
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @classmethod
    def of(cls, link: ModbusRtuLink) -> SerialFraming:
        return cls(link.baudrate, link.parity, link.stopbits, link.bytesize)

    @property
    def bits_per_char(self) -> int:
        return START_BITS + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def char_ms(self) -> float:
        return 1000.0 * self.bits_per_char / self.baudrate

    @property
    def frame_gap_ms(self) -> float:
        if self.baudrate > FAST_LINE_BAUD:
            return FAST_LINE_GAP_MS
        return FRAME_GAP_CHARS * self.char_ms


def answer_data_bytes(block: Block) -> int:
    """Data bytes of the answer to one read: 2 per register, 1 per 8 coils (rounded up)."""
    if block.table.holds_bits:
        return -(-block.count // BITS_PER_BYTE)
    return 2 * block.count


def request_wire_ms(framing: SerialFraming, data_bytes: int, turnaround_ms: float = TURNAROUND_MS) -> float:
    """Wire time of one read whose answer carries ``data_bytes``: both frames, both gaps, the turnaround."""
    chars = REQUEST_FRAME_BYTES + ANSWER_OVERHEAD_BYTES + data_bytes
    return chars * framing.char_ms + 2 * framing.frame_gap_ms + turnaround_ms


@dataclass(frozen=True, slots=True)
class UnitWireTime:
    unit: str
    requests: int
    registers: int  # registers and coils read per poll
    wire_ms: float
    estimated: bool = False  # a SunSpec plan, estimated before discovery


def unit_wire_time(
    unit: str, blocks: Sequence[Block], framing: SerialFraming, *, estimated: bool = False,
    turnaround_ms: float = TURNAROUND_MS,
) -> UnitWireTime:
    """One unit's poll: one request per block of its read plan."""
    wire_ms = sum(request_wire_ms(framing, answer_data_bytes(b), turnaround_ms) for b in blocks)
    return UnitWireTime(unit, len(blocks), sum(b.count for b in blocks), wire_ms, estimated)


@dataclass(frozen=True, slots=True)
class LineBudget:
    """One serial line's poll against the poll interval."""

    link: str
    framing: SerialFraming
    interval_ms: int
    units: tuple[UnitWireTime, ...]

    @property
    def total_ms(self) -> float:
        return sum(u.wire_ms for u in self.units)

    @property
    def fits(self) -> bool:
        return self.total_ms <= self.interval_ms

    @property
    def slowest(self) -> UnitWireTime | None:
        return max(self.units, key=lambda u: u.wire_ms, default=None)

    def describe(self) -> str:
        """The warning for a line that does not fit (also readable for one that does)."""
        f = self.framing
        parity = f"{f.bytesize}{f.parity}{f.stopbits}"
        requests = sum(u.requests for u in self.units)
        text = (
            f"link {self.link}: one poll needs {self.total_ms:.0f} ms of wire time at {f.baudrate} baud "
            f"{parity} ({len(self.units)} unit(s), {requests} request(s), assuming {TURNAROUND_MS:g} ms "
            f"device turnaround each), but polling.interval_ms is {self.interval_ms}"
        )
        slowest = self.slowest
        if slowest is not None:
            guess = ", estimated before SunSpec discovery" if slowest.estimated else ""
            text += (
                f"; slowest unit {slowest.unit}: {slowest.wire_ms:.0f} ms for {slowest.requests} request(s) "
                f"of {slowest.registers} registers{guess}"
            )
        if not self.fits:
            text += (
                ". Polls will overrun and slots be skipped: raise the baud rate, lengthen "
                "polling.interval_ms, or split the units over more lines"
            )
        return text


def line_budget(
    link: str, framing: SerialFraming, interval_ms: int, units: Iterable[tuple[str, Sequence[Block], bool]],
) -> LineBudget:
    """The budget of one line from its units' (name, blocks, estimated) in polling order."""
    return LineBudget(
        link, framing, interval_ms,
        tuple(unit_wire_time(name, blocks, framing, estimated=est) for name, blocks, est in units),
    )


def _sunspec_registers(profile: SunSpecProfile) -> list[SunSpecRegister]:
    regs: list[SunSpecRegister] = [p for p in profile.points.values() if not isinstance(p, Constant)]
    for loc in profile.locations.values():
        regs.extend(loc.registers)
    regs.extend(profile.alarms.values())
    regs.extend(profile.warnings.values())
    if profile.contactor is not None:
        regs.append(profile.contactor)
    return regs


def estimated_sunspec_blocks(profile: SunSpecProfile) -> tuple[Block, ...]:
    """The read plan a sunspec profile will most likely get: its models back to back, ascending."""
    keys = sorted({(r.model, r.instance) for r in _sunspec_registers(profile)})
    models: dict[tuple[int, int], int] = {}
    lengths: dict[tuple[int, int], int] = {}
    address = _ESTIMATE_BASE_ADDRESS
    for key in keys:
        points = model_points(key[0])
        length = max(p.offset + p.size for p in points.values()) - HEADER_REGISTERS
        models[key] = address
        lengths[key] = length
        address += HEADER_REGISTERS + length
    return sunspec_plan(profile, SunSpecLayout(_ESTIMATE_BASE_ADDRESS, models, lengths)).blocks


UnitProfile = FlatProfile | SunSpecProfile | PylontechProfile


def unit_blocks(profile: FlatProfile | SunSpecProfile) -> tuple[tuple[Block, ...], bool]:
    """(blocks read per poll, whether that is an estimate) of one unit's profile."""
    if isinstance(profile, FlatProfile):
        return flat_plan(profile).blocks, False
    return estimated_sunspec_blocks(profile), True


def config_budgets(config: AgentConfig, profiles: Mapping[str, UnitProfile | None]) -> list[LineBudget]:
    """The budget of every Modbus RTU link of ``config``; ``profiles`` maps unit names to profiles
    (a unit without a register-map profile is not timed)."""
    budgets: list[LineBudget] = []
    for link in config.links:
        if not isinstance(link, ModbusRtuLink):
            continue
        units: list[tuple[str, Sequence[Block], bool]] = []
        for unit in config.units:
            profile = profiles.get(unit.name)
            if unit.link != link.name or not isinstance(profile, FlatProfile | SunSpecProfile):
                continue
            blocks, estimated = unit_blocks(profile)
            units.append((unit.name, blocks, estimated))
        budgets.append(line_budget(link.name, SerialFraming.of(link), config.polling.interval_ms, units))
    return budgets


def budget_warnings(config: AgentConfig, profiles: Mapping[str, UnitProfile | None]) -> list[str]:
    """One message per serial line whose poll cannot fit the poll interval."""
    return [b.describe() for b in config_budgets(config, profiles) if not b.fits]
