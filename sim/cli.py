"""``bmslink sim bms``: run simulated rack BMS units until SIGINT/SIGTERM.

Prints one ``sim rack N ready: ...`` line per rack (flushed) once every transport of that rack is
up, so tests and launchers can wait for it. Without ``--profile`` each rack serves the acme_flat map
and the SunSpec chain; ``--profile NAME`` serves a named make's map instead (seplos_v3, jk_pb, pace,
byd_hvs: sim/registers.py MAKES), with that make's battery, serial speed and TCP framing as defaults.
Exit status: 0 after a clean stop, 2 for a bad
scenario file or bad arguments, 1 when a transport cannot be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from shared.config import ConfigError
from shared.models import PROTECTION_FLAG_NAMES
from sim.battery import SimRackConfig
from sim.bms_server import SimStartError, SimulatedBms, quiet_pymodbus_logging
from sim.faults import EXCEPTION_CODES, LAYOUTS, FaultError, SunSpecLayout, apply_rack_faults
from sim.registers import MAKES
from sim.scenario import Scenario, load_scenario, run_scenario

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2
DEFAULT_BAUDRATE = 9600
TRANSPORTS = ("tcp", "rtu", "can", "pylontech")  # pylontech: packs on one RS-485 line


def add_bms_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bms`` subcommand (mounted as ``bmslink sim bms``)."""
    parser = subparsers.add_parser(
        "bms",
        help="simulate rack BMS units (Modbus TCP/RTU or Pylon CAN)",
        description="Serve simulated rack BMS units. Rack i uses port+i (TCP), the i-th --device (RTU) "
        "or the i-th --can-channel (CAN). Faults given here apply to every rack; use --scenario for "
        "timed, per-rack faults.",
    )
    parser.add_argument("--racks", type=int, default=1, help="number of racks (default 1)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="tcp", help="default tcp")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=15020,
                        help="TCP port of rack 0; rack i uses port+i; 0 = each rack takes a free port")
    parser.add_argument("--device", action="append", default=[], metavar="PATH",
                        help="RTU serial device or pyserial URL, one per rack (repeat)")
    parser.add_argument("--profile", choices=sorted(MAKES), metavar="NAME",
                        help="serve this make's register map instead of acme_flat + SunSpec; one of: "
                        f"{', '.join(sorted(MAKES))}")
    parser.add_argument("--framer", choices=("socket", "rtu"),
                        help="TCP framing: socket (Modbus TCP) or rtu (RTU frames over TCP); default: the "
                        "make's (rtu for byd_hvs), else socket")
    parser.add_argument("--baudrate", type=int,
                        help="RTU baud rate (default: the make's, e.g. 19200 for seplos_v3; else 9600)")
    parser.add_argument("--parity", choices=("N", "E", "O"), default="N", help="RTU parity (default N)")
    parser.add_argument("--can-interface", default="socketcan",
                        help="python-can interface (default socketcan)")
    parser.add_argument("--can-channel", action="append", default=[], metavar="CHANNEL",
                        help="python-can channel, one per rack (repeat)")
    parser.add_argument("--can-period", type=float, default=1.0, metavar="S",
                        help="seconds between Pylon frame bursts (default 1.0)")
    parser.add_argument("--current", type=float, default=0.0, metavar="A",
                        help="initial load current of every rack, positive = charging (default 0)")
    parser.add_argument("--scenario", metavar="FILE", help="TOML scenario of timed events")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cell spread; rack i uses seed+i")
    faults = parser.add_argument_group("faults (every rack, from the start)")
    faults.add_argument("--over-temperature", type=float, metavar="C_PER_S", help="heating ramp in °C/s")
    faults.add_argument("--imbalance", type=float, metavar="MV", help="extra cell-voltage spread in mV")
    faults.add_argument("--alarm", action="append", default=[], choices=PROTECTION_FLAG_NAMES, metavar="NAME",
                        help=f"raise an alarm flag (repeat); one of: {', '.join(PROTECTION_FLAG_NAMES)}")
    faults.add_argument("--contactor-open", action="store_true", help="report the contactor open")
    faults.add_argument("--delay-ms", type=int, metavar="MS", help="answer Modbus requests MS late")
    faults.add_argument("--no-answer", action="store_true",
                        help="never answer (silent Modbus, no CAN frames)")
    faults.add_argument("--corrupt-crc", action="store_true", help="send RTU answers with a wrong CRC")
    faults.add_argument("--exception-code", type=int, choices=EXCEPTION_CODES, metavar="CODE",
                        help="answer every Modbus request with this exception code")
    faults.add_argument("--rtn", type=int, metavar="CODE",
                        help="--transport pylontech: refuse every request with this return code (144 = 0x90)")
    faults.add_argument("--short-read", type=int, default=0, metavar="N",
                        help="answer register reads with N registers fewer than asked")
    faults.add_argument("--sunspec-layout", choices=LAYOUTS, default=SunSpecLayout.STANDARD.value,
                        help=f"serve this SunSpec map (default standard); one of: {', '.join(LAYOUTS)}")
    parser.set_defaults(handler=run_bms)


def _fail(message: str, status: int) -> int:
    print(f"bmslink sim bms: {message}", file=sys.stderr, flush=True)
    return status


def _check_args(args: argparse.Namespace) -> str | None:
    """A message for arguments that parse but cannot work together, else None."""
    if not 1 <= args.racks <= 64:
        return f"--racks must be 1..64 (got {args.racks})"
    if args.transport == "tcp" and args.port != 0 and not 1 <= args.port <= 65535 - (args.racks - 1):
        return f"--port {args.port} leaves no room for {args.racks} racks"
    if args.transport == "rtu" and len(args.device) != args.racks:
        return f"--transport rtu needs one --device per rack ({args.racks}), got {len(args.device)}"
    if args.transport == "can" and len(args.can_channel) != args.racks:
        return f"--transport can needs one --can-channel per rack ({args.racks}), got {len(args.can_channel)}"
    if args.profile is not None and args.transport not in ("tcp", "rtu"):
        return f"--profile {args.profile} is a Modbus map; use --transport tcp or rtu"
    if args.profile is None and args.framer == "rtu":
        return "--framer rtu needs --profile (the default acme_flat + SunSpec device speaks Modbus TCP)"
    return None


def _apply_faults(bms: SimulatedBms, args: argparse.Namespace) -> None:
    bms.set_current(args.current)
    f = bms.faults
    apply_rack_faults(f, args)
    f.set_exception(args.exception_code)
    f.set_short_read(args.short_read)
    f.set_sunspec_layout(args.sunspec_layout)


async def _start(bms: SimulatedBms, index: int, args: argparse.Namespace) -> None:
    make = MAKES[args.profile] if args.profile is not None else None
    if args.transport == "tcp":
        # Port 0: the OS picks one per rack; the ready line tells which.
        framer = args.framer or (make.tcp_framer if make is not None else "socket")
        await bms.start_tcp(args.host, args.port + index if args.port else 0, framer=framer)
    elif args.transport == "rtu":
        baudrate = args.baudrate or (make.baudrate if make is not None else DEFAULT_BAUDRATE)
        await bms.start_rtu(args.device[index], baudrate=baudrate, parity=args.parity)
    else:
        await bms.start_can(
            interface=args.can_interface, channel=args.can_channel[index], period_s=args.can_period
        )


def _rack(args: argparse.Namespace, index: int) -> SimulatedBms:
    identity = {"seed": args.seed + index, "serial_number": f"SIM-{index:04d}"}
    if args.profile is None:
        return SimulatedBms(SimRackConfig(**identity))
    return SimulatedBms(MAKES[args.profile].rack_config(**identity), make=args.profile)


async def _serve(args: argparse.Namespace, scenario: Scenario | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    racks = [_rack(args, i) for i in range(args.racks)]
    runner: asyncio.Task[None] | None = None
    try:
        for i, bms in enumerate(racks):
            _apply_faults(bms, args)
            await _start(bms, i, args)
            print(f"sim rack {i} ready: {', '.join(bms.endpoints)}", flush=True)
        if scenario is not None:
            runner = asyncio.create_task(
                run_scenario(scenario, racks, on_event=lambda t, e: print(
                    f"sim scenario t={t:.1f} s rack {'all' if e.rack is None else e.rack}: {e.describe()}",
                    flush=True)),
                name="sim-scenario",
            )
        await stop.wait()
        return EXIT_OK
    except SimStartError as exc:
        return _fail(str(exc), EXIT_START_FAILED)
    except FaultError as exc:
        return _fail(str(exc), EXIT_USAGE)
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])
            if not runner.cancelled() and runner.exception() is not None:
                _fail(f"scenario failed: {runner.exception()}", EXIT_START_FAILED)
        for bms in racks:
            await bms.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_bms(args: argparse.Namespace) -> int:
    """Handler of ``bms``: serve until SIGINT/SIGTERM; see the module docstring for exit statuses."""
    if args.baudrate is None and args.profile is None:
        args.baudrate = DEFAULT_BAUDRATE  # a make's unit takes its make's speed instead (see _start)
    if args.transport == "pylontech":
        from sim.pylontech_console import run_pylontech  # noqa: PLC0415 - only this transport needs it

        return run_pylontech(args)
    problem = _check_args(args)
    if problem is not None:
        return _fail(problem, EXIT_USAGE)
    scenario = None
    if args.scenario is not None:
        try:
            scenario = load_scenario(args.scenario)
            scenario.check_racks(args.racks, args.scenario)
        except ConfigError as exc:
            return _fail(str(exc), EXIT_USAGE)
    quiet_pymodbus_logging()
    return asyncio.run(_serve(args, scenario))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m sim.cli bms ...``), the same parser the bmslink CLI mounts."""
    parser = argparse.ArgumentParser(prog="sim")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_bms_parser(subparsers)
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
