"""``bmslink probe``: read a live BMS unit and show what it says, decoded and raw.

For an installer writing or checking a profile. Two ways to name the unit:

* ad hoc: ``bmslink probe tcp HOST[:PORT] --device-id N`` or
  ``bmslink probe rtu DEVICE --baudrate B --parity P --device-id N``;
* from an agent config: ``bmslink probe --config agent.toml --unit NAME`` (its link, device id, profile,
  current sign, capacity and plausibility settings).

What to read: ``--profile NAME|PATH`` (that profile's points, decoded as the agent decodes them, and
whether the agent would accept the reading), ``--sunspec`` (the SunSpec model chain, every point
decoded), ``--registers holding:0x1000+32`` (raw ranges; also ``input:``). From a config the unit's
own profile is read unless something else is asked for. A link without registers (a CAN BMS) is read
through its driver, and says so.

Everything goes through the agent's own parts: the link drivers (connect, per-request timeout, the
classification of every failure into the typed errors of :mod:`rack_agent.errors`), SunSpec discovery
and the read plans and decoding of :mod:`rack_agent.profiles`.

Exit status: 0 when everything asked for was read (and a profile's reading would be accepted), 1 when
the unit could not be read or its reading would be refused, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rack_agent.agent import load_unit_profiles
from rack_agent.errors import (
    ConnectionRefusedPollError,
    InvalidDataError,
    PollError,
    PollTimeoutError,
    ProfileError,
)
from rack_agent.links import BmsLink, make_link
from rack_agent.links.modbus import ModbusLink, serial_open_problem
from rack_agent.plausibility import PlausibilityRules
from rack_agent.profiles import FlatProfile, SunSpecProfile, flat_plan, load_profile

# decode_bit, decode_location, decode_numeric: the agent's own per-point decoding, so that each row of
# the probe shows exactly what the agent computes for that point (decode_measurements: the whole reading).
from rack_agent.profiles.plan import (
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    BitPoint,
    RegisterImage,
    RegisterPlan,
    RegRef,
    decode_bit,
    decode_location,
    decode_measurements,
    decode_numeric,
    image_from_blocks,
    read_raw,
)
from rack_agent.profiles.pylontech import PylontechProfile, link_mismatch
from rack_agent.profiles.spec import Table
from rack_agent.profiles.sunspec import SunSpecLayout, discover, sunspec_plan
from rack_agent.serial_access import device_problem
from rack_agent.unit import UnitRuntime
from shared.agent_config import (
    AgentConfig,
    CanLink,
    CurrentSign,
    ModbusRtuLink,
    ModbusTcpLink,
    PlausibilityConfig,
    PollingConfig,
    PylontechConsoleLink,
    UnitConfig,
)
from shared.config import ConfigError, format_validation_error, load_config
from shared.models import RackMeasurements

EXIT_OK = 0
EXIT_UNREAD = 1  # usage and configuration errors are ConfigError: the CLI exits 2
COMMAND_LINE = "<command line>"
PROBE_NAME = "probe"
DEFAULT_TIMEOUT_MS = 1000
DEFAULT_TCP_PORT = 502
# The agent's link waits this many request timeouts for a connection before the probe gives up.
CONNECT_TIMEOUTS = 3
# A CAN BMS broadcasts about once a second: wait this much beyond the link's staleness for a full set.
CAN_EXTRA_WAIT_S = 1.0
DRIVER_RETRY_S = 0.1
REGISTER_SPACE = 0x10000
DEFAULT_SUNSPEC_BASES: tuple[int, ...] = SunSpecProfile.model_fields["base_addresses"].default

LinkConfig = ModbusTcpLink | ModbusRtuLink | CanLink | PylontechConsoleLink
AnyProfile = FlatProfile | SunSpecProfile | PylontechProfile

# Modbus exception codes (Modbus Application Protocol V1.1b3, §7) and what an installer can do.
EXCEPTION_ADVICE: dict[int, str] = {
    0x01: "illegal function: the device does not serve this table; try input instead of holding "
          "(FC 0x04 vs 0x03) or the other way round",
    0x02: "illegal data address: no register there; check the table and whether the map counts from 0 "
          "or from 1 (40001 = holding 0, 30001 = input 0)",
    0x03: "illegal data value: the device refuses this count; read fewer registers at a time",
    0x04: "device failure: the BMS could not answer; see its own display or log",
    0x05: "acknowledge: the device is busy with a long operation; try again",
    0x06: "device busy: try again later",
    0x0A: "gateway path unavailable: the gateway is misconfigured or overloaded",
    0x0B: "gateway target failed to respond: the unit behind the gateway is silent (device id?)",
}
STATUS_ADVICE: dict[str, str] = {
    "timeout": "no answer: check the device id, the wiring (A/B swapped?), baud rate and parity, and that "
               "no other master polls this line",
    "crc_error": "bytes arrived but never a valid frame: baud rate, parity or stop bits differ from the "
                 "device's, or the line is noisy or unterminated",
    "connection_refused": "the link could not be opened",
    "invalid_data": "the device answered, but not with usable data",
}

_UNIT_SUFFIXES = (("_pct", "%"), ("_ah", "Ah"), ("_mv", "mV"), ("_v", "V"), ("_a", "A"), ("_c", "°C"))


def unit_of(field_name: str) -> str:
    """The unit a telemetry field carries in its name (``pack_voltage_v`` -> ``V``)."""
    for suffix, unit in _UNIT_SUFFIXES:
        if field_name.endswith(suffix):
            return unit
    return ""


# -- request -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    """One raw range to dump: ``holding:0x1000+32``."""

    table: Table
    address: int
    count: int
    text: str


_NUMBER = r"0[xX][0-9a-fA-F]+|\d+"
_SPEC = re.compile(rf"^(?P<table>[a-z]+):(?P<address>{_NUMBER})(?:\+(?P<count>{_NUMBER}))?$")
_TABLES = {"holding": Table.HOLDING, "input": Table.INPUT, "coils": Table.COIL, "coil": Table.COIL,
           "discrete": Table.DISCRETE}


def parse_register_spec(text: str) -> RegisterSpec:
    """``TABLE:START[+COUNT]`` (START and COUNT decimal or 0x hex, COUNT default 1; TABLE holding, input,
    coils or discrete); ValueError says why."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(f"--registers {text!r}: expected TABLE:START[+COUNT], e.g. holding:0x1000+32, "
                         f"input:4096+18 or coils:0x1200+144 (TABLE one of {', '.join(_TABLES)})")
    table_name = match["table"]
    if table_name not in _TABLES:
        raise ValueError(f"--registers {text!r}: unknown table {table_name!r}; one of {', '.join(_TABLES)}")
    address = int(match["address"], 0)
    count = int(match["count"], 0) if match["count"] else 1
    if count < 1:
        raise ValueError(f"--registers {text!r}: count must be at least 1")
    if address + count > REGISTER_SPACE:
        raise ValueError(f"--registers {text!r}: runs past register {REGISTER_SPACE - 1}")
    return RegisterSpec(_TABLES[table_name], address, count, text)


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """What to read, from which unit, validated before anything is opened."""

    source: str
    link: LinkConfig
    unit: UnitConfig
    polling: PollingConfig
    plausibility: PlausibilityConfig
    profile: AnyProfile | None = None
    profile_name: str | None = None
    sunspec: bool = False
    registers: tuple[RegisterSpec, ...] = ()


# -- report ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One point as read: its decoded value and where it came from."""

    name: str
    kind: str  # numeric, const, location, alarm, warning, contactor, sunspec, field
    value: float | int | str | bool | list[str] | None
    unit: str = ""
    registers: list[str] = field(default_factory=list)  # where, as a person reads it
    raw: list[int] = field(default_factory=list)
    error: str | None = None
    addresses: list[tuple[str, int]] = field(default_factory=list)  # (table, address) of each raw word


@dataclass(slots=True)
class SunSpecModel:
    model_id: int
    instance: int
    name: str
    address: int
    length: int
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class Dump:
    spec: str
    table: str
    address: int
    count: int
    values: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Verdict:
    """Whether the agent would accept the reading, and the telemetry it would publish."""

    accepted: bool
    status: str = "ok"
    detail: str = ""
    measurements: dict[str, Any] | None = None


@dataclass(slots=True)
class Failure:
    status: str
    label: str
    detail: str
    code: int | None = None
    advice: str = ""


@dataclass(slots=True)
class ProbeReport:
    target: dict[str, Any]
    profile: str | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    points: list[Row] = field(default_factory=list)
    reading: Verdict | None = None
    sunspec_base: int | None = None
    sunspec_models: list[SunSpecModel] = field(default_factory=list)
    dumps: list[Dump] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: Failure | None = None

    @property
    def exit_status(self) -> int:
        if self.error is not None or (self.reading is not None and not self.reading.accepted):
            return EXIT_UNREAD
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def failure_of(exc: PollError) -> Failure:
    """The typed error as the installer reads it: its class, the facts, and what to do."""
    advice = STATUS_ADVICE.get(exc.status.value, "")
    if exc.code is not None and exc.code in EXCEPTION_ADVICE:
        advice = f"exception {exc.code:#04x}: {EXCEPTION_ADVICE[exc.code]}"
    return Failure(exc.status.value, exc.label, exc.detail, exc.code, advice)


def _where(ref: RegRef) -> str:
    addresses = list(ref.addresses)
    span = f"{ref.address}" if len(addresses) == 1 else f"{ref.address}-{addresses[-1]}"
    byte = f" {ref.byte} byte" if ref.byte else ""
    return f"{ref.table.value}:{span} (0x{ref.address:04X}){byte}"


def _bits(mask: int) -> str:
    bits = [str(i) for i in range(mask.bit_length()) if mask >> i & 1]
    return f"bit {bits[0]}" if len(bits) == 1 else f"bits {','.join(bits)}"


def _raw(ref: RegRef, image: RegisterImage) -> list[int]:
    return [image[(ref.table, a)] for a in ref.addresses if (ref.table, a) in image]


def _addresses(refs: list[RegRef], image: RegisterImage) -> list[tuple[str, int]]:
    return [(ref.table.value, a) for ref in refs for a in ref.addresses if (ref.table, a) in image]


def plan_rows(plan: RegisterPlan, image: RegisterImage) -> list[Row]:
    """Every point of a plan decoded on its own, so one bad point does not hide the others."""
    rows: list[Row] = []
    for name, point in plan.numeric.items():
        if point.const is not None:
            rows.append(Row(name, "const", point.const, unit_of(name), ["const"]))
            continue
        refs = [r for r in (point.ref, point.sf_ref) if r is not None] + list(point.members)
        where = [_where(r) for r in refs] if point.reduce is None else \
            [f"{point.reduce} of {_where(refs[0])} .. {_where(refs[-1])}"]
        row = Row(name, "numeric", None, unit_of(name), where,
                  [w for r in refs for w in _raw(r, image)], addresses=_addresses(refs, image))
        try:
            row.value = decode_numeric(name, point, image)
        except InvalidDataError as exc:
            row.error = exc.detail
        rows.append(row)
    for name, loc in plan.locations.items():
        row = Row(name, "location", None, "", [_where(r) for r in loc.refs],
                  [w for r in loc.refs for w in _raw(r, image)], addresses=_addresses(list(loc.refs), image))
        try:
            row.value = decode_location(name, loc, image)
        except InvalidDataError as exc:
            row.error = exc.detail
        rows.append(row)
    for kind, flags in (("alarm", plan.alarms), ("warning", plan.warnings)):
        for name, bit in flags.items():
            row = Row(name, kind, None, "", [f"{_where(bit.ref)} {_bits(bit.mask)}"], _raw(bit.ref, image),
                      addresses=_addresses([bit.ref], image))
            try:
                row.value = decode_bit(bit, image)
            except InvalidDataError as exc:
                row.error = exc.detail
            rows.append(row)
    return rows


def measurement_rows(measurements: RackMeasurements) -> list[Row]:
    """A reading decoded by a link driver (no registers): one row per telemetry field."""
    rows: list[Row] = []
    for name, value in measurements.model_dump(mode="json").items():
        if isinstance(value, dict):  # alarms / warnings: the flags raised
            raised = sorted(k for k, v in value.items() if v)
            rows.append(Row(name, "field", raised))
        else:
            rows.append(Row(name, "field", value, unit_of(name) if isinstance(value, float | int) else ""))
    return rows


# -- reading -----------------------------------------------------------------------------------


class _Reader:
    """Register reads through the agent's Modbus link, each with a deadline."""

    def __init__(self, link: ModbusLink, device_id: int, timeout_s: float) -> None:
        self._link = link
        self._device_id = device_id
        # The client's own timeout fires first; this only bounds a read that hangs past it.
        self._deadline_s = 2 * timeout_s + 0.5

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await self._link.read_registers(self._device_id, table, address, count)
        except TimeoutError as exc:
            if isinstance(exc, PollError):
                raise
            raise PollTimeoutError(
                f"device {self._device_id} gave no complete answer within {self._deadline_s * 1000:.0f} ms"
            ) from exc

    async def read_span(self, table: Table, address: int, count: int) -> list[int]:
        """Any number of registers (or coils), in reads of at most 125 registers (2000 coils)."""
        most = MAX_BITS_PER_READ if table.holds_bits else MAX_REGISTERS_PER_READ
        words: list[int] = []
        for start in range(address, address + count, most):
            words += await self.read(table, start, min(most, address + count - start))
        return words

    async def holding(self, address: int, count: int) -> list[int]:
        return await self.read(Table.HOLDING, address, count)


async def _why_not_connected(link: LinkConfig, waited_s: float) -> str:
    """The reason a link did not come up, found out as precisely as this machine can say."""
    if isinstance(link, ModbusTcpLink):
        where = f"{link.host}:{link.port}"  # (the same for Modbus TCP and RTU framing over TCP)
        try:
            async with asyncio.timeout(waited_s):
                _, writer = await asyncio.open_connection(link.host, link.port)
        except ConnectionRefusedError:
            return (f"connection refused by {where}: nothing listens there (wrong port, or the "
                    "gateway's Modbus TCP server is off)")
        except TimeoutError:
            return (f"no answer from {where} within {waited_s:.1f} s: host down, wrong address, "
                    "or a firewall drops the connection")
        except OSError as exc:
            return f"cannot reach {where}: {exc.strerror or exc}"
        writer.close()
        return (f"{where} accepts connections, but the Modbus client could not open them within "
                f"{waited_s:.1f} s")
    if isinstance(link, ModbusRtuLink | PylontechConsoleLink):
        problem = device_problem(link)
        if problem is not None:
            return f"serial device {problem.device} {problem.reason}. {problem.advice}"
        return f"cannot open serial device {link.device}: {serial_open_problem(link.device)}"
    return (f"cannot open CAN {link.interface}:{link.channel}: is the interface up "
            f"(ip -details link show {link.channel})?")


async def _open(link: BmsLink, config: LinkConfig, timeout_s: float) -> None:
    await link.start()
    waited_s = max(1.0, CONNECT_TIMEOUTS * timeout_s)
    try:
        async with asyncio.timeout(waited_s):
            await link.wait_connected()
    except TimeoutError:
        raise ConnectionRefusedPollError(await _why_not_connected(config, waited_s)) from None


def _verdict(plan: RegisterPlan, image: RegisterImage, request: ProbeRequest) -> Verdict:
    unit = request.unit
    try:
        measurements = decode_measurements(
            plan, image, capacity_ah=unit.capacity_ah,
            invert_current=unit.current_sign is CurrentSign.POSITIVE_DISCHARGING,
            rules=PlausibilityRules.for_unit(unit, request.plausibility),
        )
    except InvalidDataError as exc:
        return Verdict(False, exc.status.value, exc.detail)
    return Verdict(True, measurements=measurements.model_dump(mode="json"))


async def _probe_profile(reader: _Reader, request: ProbeRequest, report: ProbeReport) -> None:
    profile = request.profile
    if isinstance(profile, FlatProfile):
        plan = flat_plan(profile)
    elif isinstance(profile, SunSpecProfile):
        layout = await discover(reader.holding, profile.base_addresses)
        plan = sunspec_plan(profile, layout)
    else:  # refused when the request was built: a register link reads register-map profiles only
        raise TypeError(f"no register plan for {type(profile).__name__}")
    report.blocks = [{"table": b.table.value, "address": b.address, "count": b.count, "stride": b.stride}
                     for b in plan.blocks]
    reads = [(b, await reader.read(b.table, b.address, b.count)) for b in plan.blocks]
    image = image_from_blocks(reads)
    report.points = plan_rows(plan, image)
    if plan.contactor is not None:
        report.points.append(_contactor_row(plan, image))
    report.reading = _verdict(plan, image, request)


def _contactor_row(plan: RegisterPlan, image: RegisterImage) -> Row:
    contactor = plan.contactor
    assert contactor is not None
    closed_values = sorted(contactor.closed_values)
    how = _bits(contactor.mask) if contactor.mask is not None else f"closed = {closed_values}"
    row = Row("contactor", "contactor", None, "", [f"{_where(contactor.ref)} {how}"],
              _raw(contactor.ref, image), addresses=_addresses([contactor.ref], image))
    try:
        if contactor.mask is not None:
            closed = decode_bit(BitPoint(contactor.ref, contactor.mask), image)
        else:
            closed = read_raw(contactor.ref, image) in contactor.closed_values
    except InvalidDataError as exc:
        row.error = exc.detail
    else:
        row.value = "closed" if closed else "open"
    return row


async def _scan_sunspec(reader: _Reader, request: ProbeRequest, report: ProbeReport) -> None:
    from bmslink.probe_sunspec import model_rows  # noqa: PLC0415 - pysunspec2 only when asked

    bases = request.profile.base_addresses if isinstance(request.profile, SunSpecProfile) \
        else DEFAULT_SUNSPEC_BASES
    layout: SunSpecLayout = await discover(reader.holding, bases)
    report.sunspec_base = layout.base_address
    for (model_id, instance), address in sorted(layout.models.items(), key=lambda item: item[1]):
        length = layout.lengths[(model_id, instance)]
        words = await reader.read_span(Table.HOLDING, address, length + 2)
        name, rows, error = model_rows(model_id, address, length, words)
        report.sunspec_models.append(SunSpecModel(model_id, instance, name, address, length, rows, error))


async def _dump(reader: _Reader, spec: RegisterSpec) -> Dump:
    values = await reader.read_span(spec.table, spec.address, spec.count)
    return Dump(spec.text, spec.table.value, spec.address, spec.count, values)


async def _read_by_driver(link: BmsLink, request: ProbeRequest, report: ProbeReport) -> None:
    """A link without registers: its driver decodes the reading; raw registers do not apply."""
    unit = UnitRuntime.create(request.unit, request.profile, request.polling, request.plausibility)
    timeout_s = request.polling.request_timeout_ms / 1000.0
    wait_s = 4 * timeout_s
    if isinstance(request.link, CanLink):
        wait_s = request.link.stale_after_ms / 1000.0 + CAN_EXTRA_WAIT_S
    report.notes.append(
        f"a {request.link.type} link has no registers: the values below are decoded by its driver "
        "(raw registers do not apply)"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            measurements = await link.read_unit(unit, timeout_s)
            break
        except PollTimeoutError:
            # A broadcasting BMS needs a moment to send a complete set after we start listening.
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(DRIVER_RETRY_S)
        except InvalidDataError as exc:
            if exc.link_failure:
                raise
            report.reading = Verdict(False, exc.status.value, exc.detail)
            return
    report.points = measurement_rows(measurements)
    report.reading = Verdict(True, measurements=measurements.model_dump(mode="json"))


async def run_probe(request: ProbeRequest) -> ProbeReport:
    """Open the unit's link, read what the request asks for, and close the link; never raises a
    :class:`PollError`: a failure is in the report, with what was read before it."""
    report = ProbeReport(target=describe_target(request), profile=request.profile_name)
    link = make_link(request.link, request.polling)
    timeout_s = request.polling.request_timeout_ms / 1000.0
    try:
        await _open(link, request.link, timeout_s)
        if isinstance(link, ModbusLink):
            reader = _Reader(link, request.unit.device_id, timeout_s)
            if request.profile is not None:
                await _probe_profile(reader, request, report)
            if request.sunspec:
                await _scan_sunspec(reader, request, report)
            for spec in request.registers:
                report.dumps.append(await _dump(reader, spec))
        else:
            await _read_by_driver(link, request, report)
    except PollError as exc:
        report.error = failure_of(exc)
    finally:
        await link.stop()
    return report


def describe_target(request: ProbeRequest) -> dict[str, Any]:
    link = request.link
    target: dict[str, Any] = {"source": request.source, "link": link.type, "unit": request.unit.name}
    if isinstance(link, ModbusTcpLink):
        target.update(address=f"{link.host}:{link.port}", device_id=request.unit.device_id)
        if link.framer == "rtu":
            target.update(framer="rtu")
    elif isinstance(link, ModbusRtuLink):
        target.update(address=link.device, device_id=request.unit.device_id,
                      line=f"{link.baudrate} {link.bytesize}{link.parity}{link.stopbits}")
    elif isinstance(link, PylontechConsoleLink):
        target.update(address=link.device, device_id=request.unit.device_id, line=f"{link.baudrate} 8N1")
    else:
        target.update(address=f"{link.interface}:{link.channel}")
    return target


# -- command line ------------------------------------------------------------------------------


def add_probe_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``probe`` to the ``bmslink`` command."""
    parser = subparsers.add_parser(
        "probe",
        help="read a live BMS unit and show what it says, decoded and raw (commissioning)",
        description="Read a live BMS unit and print its points decoded, with their registers and raw "
                    "words. Name the unit ad hoc (tcp HOST[:PORT] / rtu DEVICE) or from an agent config "
                    "(--config FILE --unit NAME). See docs/profiles.md.",
        epilog="examples:\n"
               "  bmslink probe tcp 192.168.1.50 --device-id 1 --sunspec\n"
               "  bmslink probe rtu /dev/serial/by-id/usb-FTDI-if00-port0 --baudrate 19200 --device-id 1 \\\n"
               "      --profile ./seplos_v3.toml --registers input:0x1000+18\n"
               "  bmslink probe --config /etc/bmslink/agent-rack-01.toml --unit bms-a --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("transport", nargs="?", metavar="{tcp,rtu}", help="ad hoc: how to reach the unit")
    parser.add_argument("target", nargs="?", help="tcp: HOST[:PORT] (port 502); rtu: a serial device or "
                                                  "pyserial URL")
    parser.add_argument("--config", type=Path, help="an agent config: probe one of its units")
    parser.add_argument("--unit", help="with --config: the unit's name")
    parser.add_argument("--device-id", type=int, help="Modbus unit id (ad hoc; default 1)")
    parser.add_argument("--framer", choices=("socket", "rtu"),
                        help="tcp: socket = Modbus TCP (default); rtu = RTU frames over TCP "
                             "(a BYD BMU on 8080)")
    line = parser.add_argument_group("serial line (rtu)")
    line.add_argument("--baudrate", type=int, help="default 9600")
    line.add_argument("--parity", choices=("N", "E", "O"), help="default N")
    line.add_argument("--stopbits", type=int, choices=(1, 2), help="default 1")
    line.add_argument("--bytesize", type=int, choices=(7, 8), help="default 8")
    what = parser.add_argument_group("what to read")
    what.add_argument("--profile", metavar="NAME|PATH", help="read and decode this profile's points")
    what.add_argument("--sunspec", action="store_true",
                      help="walk the SunSpec model chain, decode every point")
    what.add_argument("--registers", action="append", default=[], metavar="TABLE:START[+COUNT]",
                      help="dump a raw range, e.g. holding:0x1000+32, input:4096+18 or coils:0x1200+144 "
                           "(repeatable)")
    unit = parser.add_argument_group("unit settings (ad hoc; from --config the unit's own)")
    unit.add_argument("--current-sign", choices=[s.value for s in CurrentSign],
                      help="how the BMS signs current (default positive_charging)")
    unit.add_argument("--capacity-ah", type=float, help="installed capacity, if the profile has none")
    unit.add_argument("--cells-in-series", type=int,
                      help="lets the pack voltage be checked against the cells")
    parser.add_argument("--timeout-ms", type=int, help=f"per request (default {DEFAULT_TIMEOUT_MS}; "
                                                       "from --config its polling.request_timeout_ms)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=cmd_probe)


def _usage(problem: str) -> ConfigError:
    return ConfigError(COMMAND_LINE, [problem])


def _validated(build: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return build(*args, **kwargs)
    except ValidationError as exc:
        raise ConfigError(COMMAND_LINE, format_validation_error(exc)) from None


def _tcp_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else (text, "", "")
    host = host.strip("[]") or text
    if not port:
        return host, DEFAULT_TCP_PORT
    if not port.isdigit():
        raise _usage(f"tcp target {text!r}: the port must be a number (HOST[:PORT])")
    return host, int(port)


def _ad_hoc_link(args: argparse.Namespace) -> LinkConfig:
    if args.transport == "tcp":
        for name in ("baudrate", "parity", "stopbits", "bytesize"):
            if getattr(args, name) is not None:
                raise _usage(f"--{name} is for rtu, not tcp")
        host, port = _tcp_target(args.target)
        tcp: LinkConfig = _validated(ModbusTcpLink, type="modbus_tcp", name=PROBE_NAME, host=host, port=port,
                                     framer=args.framer or "socket")
        return tcp
    if args.framer is not None:
        raise _usage("--framer is for tcp (a serial line is always RTU)")
    settings = {k: getattr(args, k) for k in ("baudrate", "parity", "stopbits", "bytesize")
                if getattr(args, k) is not None}
    rtu: LinkConfig = _validated(ModbusRtuLink, type="modbus_rtu", name=PROBE_NAME, device=args.target,
                                 **settings)
    return rtu


def _load(name: str, source: str) -> AnyProfile:
    try:
        return load_profile(name)
    except ProfileError as exc:
        raise ConfigError(source, [str(exc)]) from None


def _has_registers(link: LinkConfig) -> bool:
    return isinstance(link, ModbusTcpLink | ModbusRtuLink)


def _request_from_config(args: argparse.Namespace) -> ProbeRequest:
    for name in ("device_id", "baudrate", "parity", "stopbits", "bytesize", "framer", "current_sign",
                 "capacity_ah", "cells_in_series", "timeout_ms"):
        if getattr(args, name) is not None:
            raise _usage(f"--{name.replace('_', '-')} comes from the config with --config; change it there")
    if args.unit is None:
        raise _usage("--config needs --unit NAME")
    config = load_config(args.config, AgentConfig)
    try:
        # As the agent resolves them: a profile the unit's link cannot read is refused here too.
        runtimes = load_unit_profiles(config)
    except ProfileError as exc:
        raise ConfigError(args.config, [str(exc)]) from None
    if args.unit not in runtimes:
        raise ConfigError(args.config, [f"no unit {args.unit!r}; its units: {', '.join(runtimes)}"])
    runtime = runtimes[args.unit]
    unit = runtime.config
    link = config.link(unit.link)
    source = f"{args.config} unit {unit.name}"
    registers = tuple(_specs(args))
    profile, profile_name = runtime.profile, unit.profile if runtime.profile is not None else None
    if args.profile is not None:
        profile, profile_name = _load(args.profile, COMMAND_LINE), args.profile
    elif _has_registers(link) and (args.sunspec or registers):
        profile, profile_name = None, None  # only what was asked for
    return _finish(args, source, link, unit, polling=config.polling, plausibility=config.plausibility,
                   profile=profile, profile_name=profile_name, registers=registers)


def _request_ad_hoc(args: argparse.Namespace) -> ProbeRequest:
    if args.unit is not None:
        raise _usage("--unit goes with --config")
    if args.transport not in ("tcp", "rtu") or not args.target:
        raise _usage("name the unit: 'probe tcp HOST[:PORT]', 'probe rtu DEVICE' or 'probe --config FILE "
                     "--unit NAME'")
    link = _ad_hoc_link(args)
    registers = tuple(_specs(args))
    if args.profile is None and not args.sunspec and not registers:
        raise _usage("say what to read: --profile NAME|PATH, --sunspec and/or --registers TABLE:START+COUNT")
    unit_fields: dict[str, Any] = {"name": PROBE_NAME, "link": PROBE_NAME,
                                   "device_id": 1 if args.device_id is None else args.device_id}
    for name in ("current_sign", "capacity_ah", "cells_in_series"):
        if getattr(args, name) is not None:
            unit_fields[name] = getattr(args, name)
    unit = _validated(UnitConfig, **unit_fields)
    timeout_ms = DEFAULT_TIMEOUT_MS if args.timeout_ms is None else args.timeout_ms
    polling = _validated(PollingConfig, interval_ms=1000, request_timeout_ms=timeout_ms,
                         reconnect_initial_s=0.05, reconnect_max_s=0.5)
    profile = None if args.profile is None else _load(args.profile, COMMAND_LINE)
    return _finish(args, COMMAND_LINE, link, unit, polling=polling, plausibility=PlausibilityConfig(),
                   profile=profile, profile_name=args.profile, registers=registers)


def _specs(args: argparse.Namespace) -> list[RegisterSpec]:
    try:
        return [parse_register_spec(text) for text in args.registers]
    except ValueError as exc:
        raise _usage(str(exc)) from None


def _finish(args: argparse.Namespace, source: str, link: LinkConfig, unit: UnitConfig, *,
            polling: PollingConfig, plausibility: PlausibilityConfig, profile: AnyProfile | None,
            profile_name: str | None, registers: tuple[RegisterSpec, ...]) -> ProbeRequest:
    if not _has_registers(link) and (args.sunspec or registers):
        raise _usage(f"unit {unit.name} is on a {link.type} link: it has no registers, so --sunspec and "
                     "--registers do not apply (its driver decodes what the BMS sends)")
    if profile is not None and profile_name is not None:
        mismatch = link_mismatch(profile, profile_name, link.name, link.type)
        if mismatch is None and isinstance(link, CanLink):
            mismatch = (f"a CAN link is decoded by its driver (Pylon frames); profile {profile_name!r} "
                        "does not apply")
        if mismatch is not None:
            raise _usage(mismatch)
    return ProbeRequest(source, link, unit, polling, plausibility, profile, profile_name, args.sunspec,
                        registers)


def build_request(args: argparse.Namespace) -> ProbeRequest:
    """The request of a command line; :class:`ConfigError` (exit 2) for anything unusable."""
    if args.config is not None:
        if args.transport is not None:
            raise _usage("give either 'tcp|rtu TARGET' or --config FILE --unit NAME, not both")
        return _request_from_config(args)
    return _request_ad_hoc(args)


def cmd_probe(args: argparse.Namespace) -> int:
    """Handler of ``bmslink probe``."""
    from bmslink.probe_output import print_json, print_report  # noqa: PLC0415

    request = build_request(args)
    if args.log_level == "info":
        # The link's "connected" and such are for a service's journal; the report says it all here.
        logging.getLogger("rack_agent").setLevel(logging.WARNING)
    report = asyncio.run(run_probe(request))
    if args.json:
        print_json(report)
    else:
        print_report(report)
    sys.stdout.flush()
    return report.exit_status
