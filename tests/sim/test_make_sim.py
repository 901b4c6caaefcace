"""Simulated units of named makes: each serves its make's map (tables, byte addressing, framing) and
refuses what the real map refuses; ``bmslink sim bms --profile NAME`` runs one from the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from rack_agent.profiles.plan import decode_measurements, image_from_blocks
from sim.bms_server import SimulatedBms, SimulatedLine
from sim.cli import add_bms_parser, run_bms
from sim.registers import MAKES, make_image, make_plan
from tests.fixtures.serial_pair import SerialPair
from tests.sim.helpers import LOOPBACK, free_port, quiet_pymodbus

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 10.0
ILLEGAL_ADDRESS = 2


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


@pytest.mark.parametrize("make", sorted(MAKES))
def test_each_make_image_decodes_through_its_profile_to_the_battery(make: str) -> None:
    sim = SimulatedBms(make=make)
    sim.set_current(-12.0)
    sim.model.step(2.0)
    snap = sim.model.snapshot()
    plan = make_plan(make)
    image = make_image(plan, snap)
    # Only what the plan reads is in the image, and every block the plan reads is there in full.
    reads = [(b, [image[(b.table, b.address + i * b.stride)] for i in range(b.count)]) for b in plan.blocks]
    m = decode_measurements(plan, image_from_blocks(reads), capacity_ah=snap.capacity_ah)
    assert m.current_a == pytest.approx(snap.current_a, abs=0.1)
    assert m.cell_voltage_min_v == pytest.approx(snap.cell_voltage_min_v, abs=0.01)


async def _client(port: int, framer: FramerType) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient(LOOPBACK, port=port, framer=framer, timeout=1.0, retries=0,
                                  reconnect_delay=0)
    assert await client.connect()
    return client


async def test_seplos_unit_answers_input_registers_and_coils_and_refuses_the_rest() -> None:
    async with SimulatedBms(make="seplos_v3") as sim:
        port = free_port()
        await sim.start_tcp(LOOPBACK, port)
        sim.faults.raise_alarm("cell_over_voltage")
        client = await _client(port, FramerType.SOCKET)
        try:
            pia = await client.read_input_registers(0x1000, count=17, device_id=1)
            assert not pia.isError() and pia.registers[0] > 5000  # ~53 V in 10 mV
            coils = await client.read_coils(0x1248, count=8, device_id=1)
            assert coils.bits[:8] == [False, True] + [False] * 6  # coil 0x1249: cell OVP
            holding = await client.read_holding_registers(0x1000, count=17, device_id=1)
            assert holding.isError() and holding.exception_code == ILLEGAL_ADDRESS  # FC3 is no Seplos read
            beyond = await client.read_input_registers(0x1011, count=1, device_id=1)
            assert beyond.isError() and beyond.exception_code == ILLEGAL_ADDRESS
            sim.refuse_function(1, 4)
            refused = await client.read_coils(0x1248, count=8, device_id=1)
            assert refused.isError() and refused.exception_code == 4
        finally:
            client.close()


async def test_jk_unit_answers_a_read_at_a_byte_offset_with_the_words_from_there() -> None:
    async with SimulatedBms(make="jk_pb") as sim:
        port = free_port()
        await sim.start_tcp(LOOPBACK, port)
        client = await _client(port, FramerType.SOCKET)
        try:
            volts = await client.read_holding_registers(0x1290, count=2, device_id=1)  # BatVol u32 mV
            millivolts = (volts.registers[0] << 16) | volts.registers[1]
            assert millivolts == round(sim.model.snapshot().pack_voltage_v * 1000)
            cells = await client.read_holding_registers(0x1202, count=2, device_id=1)  # cells 2 and 3
            assert cells.registers == [round(v * 1000) for v in sim.model.snapshot().cell_voltages_v[1:3]]
        finally:
            client.close()


async def test_byd_unit_speaks_rtu_framing_over_tcp() -> None:
    async with SimulatedBms(make="byd_hvs") as sim:
        port = free_port()
        await sim.start_tcp(LOOPBACK, port, framer="rtu")
        assert sim.endpoints == [f"modbus rtu-over-tcp {LOOPBACK}:{port} unit 1"]
        client = await _client(port, FramerType.RTU)
        try:
            summary = await client.read_holding_registers(0x0500, count=14, device_id=1)
            assert not summary.isError()
            assert summary.registers[5] == round(sim.model.snapshot().pack_voltage_v * 100)
            with pytest.raises(ModbusIOException):  # no such unit: silence, as RTU framing has it
                await client.read_holding_registers(0x0500, count=14, device_id=7)
        finally:
            client.close()


async def test_a_line_serves_units_of_two_makes_under_their_ids(serial_pair: SerialPair) -> None:
    seplos, pace = SimulatedBms(make="seplos_v3", device_id=1), SimulatedBms(make="pace", device_id=2)
    async with SimulatedLine([seplos, pace]) as line:
        await line.start_rtu(serial_pair.a, baudrate=19200)
        client = AsyncModbusSerialClient(serial_pair.b, baudrate=19200, timeout=0.3, retries=0,
                                         reconnect_delay=0)
        try:
            assert await client.connect()
            assert not (await client.read_input_registers(0x1000, count=17, device_id=1)).isError()
            pace_regs = await client.read_holding_registers(0, count=35, device_id=2)
            assert pace_regs.registers[1] == round(pace.model.snapshot().pack_voltage_v * 100)
            pace.faults.set_no_answer(True)  # one unit's fault silences that unit only
            with pytest.raises(ModbusIOException, match="No response"):
                await client.read_holding_registers(0, count=35, device_id=2)
            assert not (await client.read_input_registers(0x1000, count=17, device_id=1)).isError()
            with pytest.raises(ModbusIOException, match="No response"):  # an id nobody has: RS-485 silence
                await client.read_holding_registers(0, count=1, device_id=9)
        finally:
            client.close()


def test_a_line_needs_distinct_ids_and_make_units() -> None:
    with pytest.raises(ValueError, match="distinct device ids"):
        SimulatedLine([SimulatedBms(make="pace"), SimulatedBms(make="jk_pb")])
    with pytest.raises(ValueError, match="named make"):
        SimulatedBms().unit_device()
    with pytest.raises(ValueError, match="no simulated make 'daly'"):
        SimulatedBms(make="daly")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bms_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bms", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (("--profile", "seplos_v3", "--transport", "can", "--can-channel", "x"), "is a Modbus map"),
    (("--framer", "rtu",), "--framer rtu needs --profile"),
])
def test_profile_arguments_that_cannot_work_exit_2(argv: tuple[str, ...], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bms(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_unknown_profile_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--profile", "daly")
    assert "seplos_v3" in capsys.readouterr().err


@pytest.fixture
async def launch() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _ready_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
        if not raw:
            assert proc.stderr is not None
            raise AssertionError(f"exited before ready: {(await proc.stderr.read()).decode()}")
        if raw.startswith(b"sim rack 0 ready"):
            return raw.decode().strip()


async def test_bmslink_sim_bms_profile_serves_the_make_with_its_defaults(
    serial_pair: SerialPair, launch: list[asyncio.subprocess.Process]
) -> None:
    # BYD over TCP: RTU framing by default, as the make has it.
    byd = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bmslink", "--log-level", "error", "sim", "bms", "--profile", "byd_hvs",
        "--port", "0", "--current", "-10", cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    launch.append(byd)
    line = await _ready_line(byd)
    assert line.startswith(f"sim rack 0 ready: modbus rtu-over-tcp {LOOPBACK}:")
    port = int(line.rsplit(":", 1)[1].split()[0])
    client = await _client(port, FramerType.RTU)
    try:
        summary = await client.read_holding_registers(0x0500, count=14, device_id=1)
        assert summary.registers[4] == (-100) & 0xFFFF  # --current -10 A in 0.1 A, signed
    finally:
        client.close()
    # Seplos over RTU: 19200 baud by default.
    seplos = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sim.cli", "bms", "--profile", "seplos_v3", "--transport", "rtu",
        "--device", serial_pair.a, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    launch.append(seplos)
    assert await _ready_line(seplos) == f"sim rack 0 ready: modbus rtu {serial_pair.a} 19200 N1 unit 1"
    serial = AsyncModbusSerialClient(serial_pair.b, baudrate=19200, timeout=2.0, retries=0, reconnect_delay=0)
    try:
        assert await serial.connect()
        assert not (await serial.read_coils(0x1248, count=69, device_id=1)).isError()
    finally:
        serial.close()
    for proc in (byd, seplos):
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S)
        assert proc.returncode == 0, err.decode()
