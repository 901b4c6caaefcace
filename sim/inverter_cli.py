"""``bmslink sim inverter``: a simulated inverter listening to the BMS CAN feed until SIGINT/SIGTERM.

Prints ``sim inverter ready: <interface> <channel>`` (flushed) once the bus is open. With
``--status-file`` a JSON snapshot (status, limits, current, violations, frames per ID; in a polled
dialect also the requests sent, the answers, the longest answer time and the equipment information)
is rewritten every second and once more at exit; with ``--log-every`` a one-line summary is printed
as often. ``--dialect pylon_hv`` asks for the set (0x4200) every ``--request-period`` seconds.
Exit status: 0 after a clean stop, 2 for bad arguments, 1 when the bus cannot be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controller.frames import ID_HV_MODULES
from shared.controller_config import Dialect
from sim.inverter import ChargeProfile, InverterStartError, SimulatedInverter

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2
STATUS_EVERY_S = 1.0
DEFAULT_PROFILE = "50:30,-50:30"


def add_inverter_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inverter`` subcommand (mounted as ``bmslink sim inverter``)."""
    parser = subparsers.add_parser(
        "inverter",
        help="simulate an inverter that listens to the BMS CAN feed and checks it",
        description="Listen to the Pylon/SMA/Victron frame set (or ask for the Pylon HV one), draw a "
        "current that follows a profile within the received limits, and count protocol violations of "
        "the BMS side.",
    )
    parser.add_argument("--interface", default="socketcan", help="python-can interface (default socketcan)")
    parser.add_argument("--channel", default="vcan0", help="python-can channel (default vcan0)")
    parser.add_argument("--dialect", choices=[d.value for d in Dialect], default=Dialect.PYLON.value,
                        help="frame set to expect (default pylon)")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="S",
                        help="seconds without 0x351 before the inverter disconnects (default 60, as SMA)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, metavar="A:S,...",
                        help=f"requested current as amps:seconds segments, looped; positive charges "
                        f"(default {DEFAULT_PROFILE})")
    parser.add_argument("--status-file", type=Path, metavar="PATH",
                        help="rewrite a JSON snapshot here every second")
    parser.add_argument("--log-every", type=float, default=0.0, metavar="S",
                        help="print a one-line summary every S seconds (default 0: never)")
    parser.add_argument("--ignore-id", type=lambda v: int(v, 0), action="append", default=[], metavar="ID",
                        help="a frame ID tolerated beside the set, e.g. 0x6E0 for the controllers' failover "
                        "heartbeat (repeat)")
    polled = parser.add_argument_group("polled dialects (pylon_hv)")
    polled.add_argument("--request-period", type=float, default=1.0, metavar="S",
                        help="ask for the ensemble information (0x4200) every S seconds (default 1)")
    polled.add_argument("--answer-timeout", type=float, default=1.0, metavar="S",
                        help="a request whose full answer takes longer is a no_answer violation (default 1)")
    polled.add_argument("--equipment-every", type=int, default=10, metavar="N",
                        help="also ask for the system equipment information every N requests (default 10)")
    parser.set_defaults(handler=run_inverter)


def _fail(message: str, status: int) -> int:
    print(f"bmslink sim inverter: {message}", file=sys.stderr, flush=True)
    return status


def snapshot(inverter: SimulatedInverter) -> dict[str, Any]:
    """The JSON-able state written to ``--status-file``."""
    limits = inverter.limits
    return {
        "time_s": time.monotonic(),
        "dialect": inverter.dialect.value,
        "status": inverter.status.value,
        "limits": None if limits is None else asdict(limits),
        "current_a": inverter.current_a,
        "violations": len(inverter.violations),
        "violation_kinds": {kind.value: n for kind, n in inverter.violation_kinds().items()},
        "frames_per_id": {f"{frame_id:#05x}": n for frame_id, n in inverter.frame_counts.items()},
        "dropped_frames": inverter.dropped_frames,
        "max_set_gap_s": inverter.gaps(),
        **(_polled(inverter) if inverter.polled else {}),
    }


def _polled(inverter: SimulatedInverter) -> dict[str, Any]:
    latencies = inverter.answer_latencies
    return {
        "requests_sent": dict(inverter.requests_sent),
        "answers": inverter.answers,
        "max_answer_latency_s": max(latencies, default=None),
        "equipment": inverter.latest(ID_HV_MODULES),
    }


def _write_status(path: Path, data: dict[str, Any]) -> None:
    # Written beside and renamed, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _summary(inverter: SimulatedInverter) -> str:
    limits = inverter.limits
    told = "no limits" if limits is None else (
        f"CVL {limits.charge_voltage_limit_v:.1f} V CCL {limits.charge_current_limit_a:.1f} A "
        f"DCL {limits.discharge_current_limit_a:.1f} A"
    )
    return (f"sim inverter: {inverter.status.value}, {told}, current {inverter.current_a:.1f} A, "
            f"{len(inverter.violations)} violations")


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Run the inverter until ``stop`` is set; the body of the handler, usable in-process by tests."""
    try:
        profile = ChargeProfile.parse(args.profile)
    except ValueError as exc:
        return _fail(f"--profile: {exc}", EXIT_USAGE)
    if not args.heartbeat_timeout > 0:
        return _fail(f"--heartbeat-timeout must be positive (got {args.heartbeat_timeout})", EXIT_USAGE)
    if args.log_every < 0:
        return _fail(f"--log-every must be >= 0 (got {args.log_every})", EXIT_USAGE)
    seconds = (("--request-period", args.request_period), ("--answer-timeout", args.answer_timeout))
    for option, value in seconds:
        if not (math.isfinite(value) and value > 0):
            return _fail(f"{option} must be a positive number of seconds (got {value})", EXIT_USAGE)
    if args.equipment_every < 1:
        return _fail(f"--equipment-every must be >= 1 (got {args.equipment_every})", EXIT_USAGE)
    try:
        inverter = SimulatedInverter(
            dialect=Dialect(args.dialect), heartbeat_timeout_s=args.heartbeat_timeout, profile=profile,
            ignore_ids=tuple(args.ignore_id), request_period_s=args.request_period,
            answer_timeout_s=args.answer_timeout, equipment_every=args.equipment_every,
        )
    except ValueError as exc:  # e.g. --heartbeat-timeout inf
        return _fail(str(exc), EXIT_USAGE)
    try:
        await inverter.start(interface=args.interface, channel=args.channel)
    except InverterStartError as exc:
        return _fail(str(exc), EXIT_START_FAILED)
    try:
        print(f"sim inverter ready: {args.interface} {args.channel}", flush=True)
        next_status = next_log = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if args.status_file is not None and now >= next_status:
                _write_status(args.status_file, snapshot(inverter))
                next_status = now + STATUS_EVERY_S
            if args.log_every > 0 and now >= next_log:
                print(_summary(inverter), flush=True)
                next_log = now + args.log_every
            deadlines = [now + STATUS_EVERY_S]
            if args.status_file is not None:
                deadlines.append(next_status)
            if args.log_every > 0:
                deadlines.append(next_log)
            wake = min(deadlines)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, wake - time.monotonic()))
        return EXIT_OK
    finally:
        if args.status_file is not None:
            _write_status(args.status_file, snapshot(inverter))
        await inverter.stop()


async def _serve_until_signal(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await serve(args, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_inverter(args: argparse.Namespace) -> int:
    """Handler of ``inverter``: run until SIGINT/SIGTERM; see the module docstring for exit statuses."""
    return asyncio.run(_serve_until_signal(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m sim.inverter_cli inverter ...``), the parser the bmslink CLI mounts."""
    parser = argparse.ArgumentParser(prog="sim")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_inverter_parser(subparsers)
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
