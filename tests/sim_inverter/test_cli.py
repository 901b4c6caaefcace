"""``bmslink sim inverter``: arguments and the serve loop in-process, and the real thing as a subprocess."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import can
import pytest

from shared.controller_config import Dialect
from sim.inverter_cli import add_inverter_parser, run_inverter, serve
from tests.fixtures.procs import ProcessGroup
from tests.sim_inverter.helpers import Feeder, encoder, unique_channel, wait_for

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 10.0


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_inverter_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["inverter", *argv])


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_parser_defaults_and_handler() -> None:
    args = _parse()
    assert args.handler is run_inverter
    assert (args.interface, args.channel, args.dialect) == ("socketcan", "vcan0", "pylon")
    assert (args.heartbeat_timeout, args.profile, args.status_file, args.log_every) == (
        60.0, "50:30,-50:30", None, 0.0)
    args = _parse("--dialect", "sma", "--heartbeat-timeout", "5", "--profile", "10:1",
                  "--status-file", "s.json")
    assert (args.dialect, args.heartbeat_timeout, args.profile, args.status_file) == (
        "sma", 5.0, "10:1", Path("s.json"))


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (("--profile", "fifty"), 2, "--profile"),
        (("--heartbeat-timeout", "0"), 2, "--heartbeat-timeout"),
        (("--log-every", "-1"), 2, "--log-every"),
        (("--interface", "no-such-interface"), 1, "cannot open"),
    ],
)
async def test_bad_arguments(argv: tuple[str, ...], status: int, message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--interface", "virtual", "--channel", unique_channel(), *argv)
    assert await serve(args, asyncio.Event()) == status
    assert message in capsys.readouterr().err


async def test_serve_writes_the_status_file_and_logs(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    channel = unique_channel()
    status_file = tmp_path / "inverter.json"
    args = _parse("--interface", "virtual", "--channel", channel, "--profile", "25:10",
                  "--status-file", str(status_file), "--log-every", "0.2")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(args, stop), name="test-inverter-cli")
    bus = can.Bus(interface="virtual", channel=channel)
    feeder = Feeder(bus, encoder(Dialect.PYLON))
    try:
        await wait_for(lambda: "sim inverter ready" in capsys.readouterr().out or task.done(), what="ready")
        feeder.start()
        await wait_for(lambda: status_file.exists() and _read(status_file)["status"] == "Normal",
                       timeout_s=4.0, what="status Normal in the file")
        await wait_for(lambda: _read(status_file)["current_a"] == 25.0, timeout_s=3.0,
                       what="current in the file")
    finally:
        await feeder.pause()
        stop.set()
        assert await asyncio.wait_for(task, timeout=5.0) == 0
        bus.shutdown()
    snapshot = _read(status_file)
    assert snapshot["limits"]["charge_current_limit_a"] == 370.0
    assert snapshot["frames_per_id"]["0x351"] >= 1 and snapshot["violations"] == 0
    summary = "sim inverter: Normal, CVL 53.2 V CCL 370.0 A DCL 370.0 A, current 25.0 A"
    assert summary in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_subprocess_ready_line_and_clean_stop(procs: ProcessGroup, tmp_path: Path,
                                              sig: signal.Signals) -> None:
    status_file = tmp_path / "status.json"
    channel = unique_channel()
    procs.start("inverter", [sys.executable, "-m", "sim.inverter_cli", "inverter", "--interface", "virtual",
                             "--channel", channel, "--status-file", str(status_file)], cwd=ROOT)
    procs.wait_for_output("inverter", f"sim inverter ready: virtual {channel}", READY_TIMEOUT_S)
    procs.send_signal("inverter", sig)
    assert procs.wait("inverter", EXIT_TIMEOUT_S) == 0
    assert _read(status_file)["status"] == "Disconnected"
