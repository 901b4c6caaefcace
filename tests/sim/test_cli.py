"""``bmslink sim bms``: argument handling in-process, and the real thing as a subprocess."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from sim.cli import add_bms_parser, run_bms
from tests.sim.helpers import LOOPBACK, free_port, quiet_pymodbus

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bms_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bms", *argv])


def test_parser_defaults_and_handler() -> None:
    args = _parse()
    assert args.handler is run_bms
    assert (args.racks, args.transport, args.host, args.current, args.seed) == (1, "tcp", "127.0.0.1", 0.0, 0)
    args = _parse("--racks", "2", "--transport", "rtu", "--device", "/dev/a", "--device", "/dev/b",
                  "--alarm", "internal_fault", "--alarm", "cell_imbalance", "--exception-code", "4",
                  "--no-answer", "--delay-ms", "30", "--over-temperature", "0.5", "--imbalance", "20")
    assert args.device == ["/dev/a", "/dev/b"]
    assert args.alarm == ["internal_fault", "cell_imbalance"]
    assert (args.exception_code, args.no_answer, args.delay_ms) == (4, True, 30)


def test_unknown_alarm_name_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _parse("--alarm", "on_fire")
    assert caught.value.code == 2
    assert "cell_over_voltage" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--transport", "rtu", "--racks", "2", "--device", "/dev/a"), "one --device per rack (2), got 1"),
        (("--transport", "can",), "one --can-channel per rack (1), got 0"),
        (("--racks", "0",), "--racks must be 1..64"),
        (("--port", "65535", "--racks", "2"), "leaves no room for 2 racks"),
    ],
)
def test_inconsistent_arguments_exit_2(argv: tuple[str, ...], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bms(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_bad_scenario_exits_2_with_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[events]]\nat_s = 1.0\naction = "explode"\n')
    assert run_bms(_parse("--scenario", str(bad))) == 2
    err = capsys.readouterr().err
    assert f"invalid scenario {bad}" in err and "'over_temperature'" in err
    ranged = tmp_path / "rack.toml"
    ranged.write_text('[[events]]\nat_s = 1.0\naction = "no_answer"\nrack = 3\n')
    assert run_bms(_parse("--scenario", str(ranged), "--racks", "2")) == 2
    assert "rack 3 does not exist" in capsys.readouterr().err


@pytest.fixture
async def launch() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Started simulator processes; any still running at teardown is killed and reaped."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _start(launch: list[asyncio.subprocess.Process], *argv: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sim.cli", "bms", *argv, cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    launch.append(proc)
    return proc


async def _line(proc: asyncio.subprocess.Process, startswith: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
        if not raw:
            assert proc.stderr is not None
            raise AssertionError(f"exited before {startswith!r}: {(await proc.stderr.read()).decode()}")
        line = raw.decode().strip()
        if line.startswith(startswith):
            return line


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_tcp_racks_scenario_and_sigterm(
    tmp_path: Path, launch: list[asyncio.subprocess.Process]
) -> None:
    port = free_port(span=2)
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[events]]\nat_s = 0.0\naction = "exception"\ncode = 6\nrack = 1\n')
    proc = await _start(launch, "--racks", "2", "--port", str(port), "--current", "-20",
                        "--alarm", "insulation_fault", "--scenario", str(scenario))
    for rack in (0, 1):
        line = await _line(proc, f"sim rack {rack} ready")
        assert line == f"sim rack {rack} ready: modbus tcp 127.0.0.1:{port + rack} unit 1"
    assert "exception code=6" in await _line(proc, "sim scenario t=")
    rack0 = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=2.0, retries=0, reconnect_delay=0)
    rack1 = AsyncModbusTcpClient(LOOPBACK, port=port + 1, timeout=2.0, retries=0, reconnect_delay=0)
    try:
        assert await rack0.connect() and await rack1.connect()
        flat = await rack0.read_holding_registers(0, count=21, device_id=1)
        assert flat.registers[1] == (-200) & 0xFFFF  # --current -20 A in 0.1 A
        assert flat.registers[18] == 1 << 12  # --alarm insulation_fault: alarm bitmap bit 12
        refused = await rack1.read_holding_registers(0, count=21, device_id=1)
        assert refused.isError() and refused.exception_code == 6  # the scenario's event, rack 1 only
    finally:
        rack0.close()
        rack1.close()
    status, err = await _stop(proc, signal.SIGTERM)
    assert status == 0, err
    assert "Traceback" not in err


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[tuple[str, str]]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat not installed")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5.0
        while not (a.exists() and b.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "socat did not start"
            time.sleep(0.01)
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(5.0)


async def test_rtu_rack_and_sigint(ptys: tuple[str, str], launch: list[asyncio.subprocess.Process]) -> None:
    proc = await _start(launch, "--transport", "rtu", "--device", ptys[0], "--baudrate", "19200",
                        "--contactor-open")
    line = await _line(proc, "sim rack 0 ready")
    assert line == f"sim rack 0 ready: modbus rtu {ptys[0]} 19200 N1 unit 1"
    client = AsyncModbusSerialClient(ptys[1], baudrate=19200, timeout=2.0, retries=0, reconnect_delay=0)
    try:
        assert await client.connect()
        flat = await client.read_holding_registers(0, count=21, device_id=1)
        assert flat.registers[20] & 1 == 0  # --contactor-open: status bit 0 clear
        assert flat.registers[12:14] == [0, 0]  # and no current granted
    finally:
        client.close()
    status, err = await _stop(proc, signal.SIGINT)
    assert status == 0, err


async def test_port_zero_lets_each_rack_pick_a_port(launch: list[asyncio.subprocess.Process]) -> None:
    proc = await _start(launch, "--racks", "2", "--port", "0")
    ports = []
    for rack in (0, 1):
        line = await _line(proc, f"sim rack {rack} ready")
        ports.append(int(line.rsplit(":", 1)[1].split()[0]))
    assert len(set(ports)) == 2 and 0 not in ports
    for port in ports:
        client = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=2.0, retries=0, reconnect_delay=0)
        try:
            assert await client.connect()
            assert not (await client.read_holding_registers(40000, count=2, device_id=1)).isError()
        finally:
            client.close()
    status, err = await _stop(proc, signal.SIGTERM)
    assert status == 0, err


async def test_port_in_use_exits_1(launch: list[asyncio.subprocess.Process]) -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))
        sock.listen()
        proc = await _start(launch, "--port", str(port))
        _, err = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT_S)
    assert proc.returncode == 1
    assert f"cannot start modbus tcp on 127.0.0.1:{port}" in err.decode()


def test_layout_and_short_read_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse()
    assert (args.sunspec_layout, args.short_read) == ("standard", 0)
    args = _parse("--sunspec-layout", "short_802", "--short-read", "3")
    assert (args.sunspec_layout, args.short_read) == ("short_802", 3)
    with pytest.raises(SystemExit) as caught:
        _parse("--sunspec-layout", "upside_down")
    assert caught.value.code == 2
    assert "no_803" in capsys.readouterr().err
