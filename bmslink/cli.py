"""The ``bmslink`` command and its subcommands.

Exit status: 0 on a clean stop, 2 on a configuration error (with a message
naming the file, the key path and what was expected), 1 on a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bmslink import __version__
from rack_agent.errors import ProfileError
from shared.config import ConfigError, is_loopback

if TYPE_CHECKING:
    from shared.config import MqttConfig
    from shared.controller_config import ControllerConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("bmslink")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pymodbus logs every timeout at ERROR with hex dumps; our own lines classify them.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("can").setLevel(logging.WARNING)


def _warn_exposed(listeners: Sequence[tuple[str, str]]) -> None:
    """A listener beyond loopback exists only because the config says so: say it at every start."""
    for what, host in listeners:
        if not is_loopback(host):
            log.warning("%s listens on %s, beyond this machine: make sure a firewall or the network "
                        "limits who reaches it", what, host)


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run ``main(stop)`` on a fresh loop; SIGINT/SIGTERM set ``stop`` for a clean shutdown."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            result = await main(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return EXIT_OK if result is None else result

    return asyncio.run(runner())


# -- agent ------------------------------------------------------------------------------------


def _cmd_agent(args: argparse.Namespace) -> int:
    from rack_agent.agent import RackAgent, line_warnings, load_unit_profiles  # noqa: PLC0415
    from shared.agent_config import AgentConfig  # noqa: PLC0415
    from shared.config import load_config  # noqa: PLC0415

    config = load_config(args.config, AgentConfig)
    try:
        units = load_unit_profiles(config)
    except ProfileError as exc:
        raise ConfigError(args.config, [str(exc)]) from exc
    if args.check_config:
        for warning in line_warnings(config, units):  # the agent itself logs them at start
            print(f"bmslink: warning: {args.config}: {warning}", file=sys.stderr)
        print(
            f"{args.config}: ok (site {config.site_id}, rack {config.rack_id}, {len(config.units)} unit(s))"
        )
        return EXIT_OK
    _warn_exposed(config.listeners())

    async def main(stop: asyncio.Event) -> None:
        agent = RackAgent(config)
        await agent.run(stop)

    return run_until_signalled(main)


# -- controller -------------------------------------------------------------------------------


def _load_controller_config(path: Path) -> ControllerConfig:
    from shared.config import load_config  # noqa: PLC0415
    from shared.controller_config import ControllerConfig  # noqa: PLC0415

    return load_config(path, ControllerConfig)


def _cmd_controller(args: argparse.Namespace) -> int:
    from controller.commands import command_keys  # noqa: PLC0415
    from controller.service import ControllerService  # noqa: PLC0415

    config = _load_controller_config(args.config)
    command_keys(config, source=args.config)  # a key file that cannot be used is a config error too
    if args.check_config:
        print(
            f"{args.config}: ok (site {config.site_id}, node {config.node_id}, {len(config.roster)} rack(s))"
        )
        return EXIT_OK
    _warn_exposed(config.listeners())

    async def main(stop: asyncio.Event) -> None:
        service = ControllerService(config)
        _settle_heap_for_control()

        def reload() -> None:
            try:
                service.reload(_load_controller_config(args.config))
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            await service.run(stop)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    return run_until_signalled(main)


def _settle_heap_for_control() -> None:
    """Collector settings for a long-running control process (this process only, never a library's).

    What exists after start-up (config, DBC, tables) lives as long as the process: frozen, the
    collector stops re-scanning it. The cycle allocates many short-lived objects; with the default
    gen-0 threshold (700) the young collections, and the full collections they cascade into, were
    the p99 of a cycle at 1000 racks (docs/performance.md). Reference cycles are still collected,
    only less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


# -- broker access for the operator's commands ------------------------------------------------

PASSWORD_ENV = "BMSLINK_MQTT_PASSWORD"  # noqa: S105 - the variable's name, not a password


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="bmslink")
    parser.add_argument("--site", required=True)
    parser.add_argument("--username", help="broker user")
    parser.add_argument("--password-file", type=Path,
                        help=f"file holding the broker password (else ${PASSWORD_ENV}, if set)")
    parser.add_argument("--tls-ca", type=Path, help="CA file: connect with TLS, verifying the broker")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="client key (with --tls-cert)")


def _broker_config(args: argparse.Namespace) -> MqttConfig:
    """The broker settings of the command line, validated as the config files' are (ConfigError)."""
    from pydantic import ValidationError  # noqa: PLC0415

    from shared.config import MqttConfig, TlsConfig  # noqa: PLC0415

    password = os.environ.get(PASSWORD_ENV)
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(args.password_file, [f"cannot read the password file: {exc}"]) from None
    try:
        tls = None
        if args.tls_ca or args.tls_cert or args.tls_key:
            tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
        return MqttConfig(host=args.host, port=args.port, topic_prefix=args.prefix, username=args.username,
                          password=password, tls=tls, protocol="3.1.1")
    except ValidationError as exc:
        raise ConfigError("<command line>", [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]) from None


# -- monitor ----------------------------------------------------------------------------------


def _cmd_monitor(args: argparse.Namespace) -> int:
    from bmslink.monitor import run_monitor  # noqa: PLC0415

    mqtt = _broker_config(args)
    return run_until_signalled(lambda stop: run_monitor(
        mqtt, args.site, stop, once=args.once, as_json=args.json, interval_s=args.interval, width=args.width))


# -- events -------------------------------------------------------------------------------------

_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> float:
    """``--since``: a span back from now (``90s``, ``10m``, ``2h``, ``1d``), an ISO 8601 time (local
    unless it says otherwise) or a Unix time."""
    import datetime  # noqa: PLC0415
    import time  # noqa: PLC0415

    if text[-1:] in _SINCE_UNITS and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * _SINCE_UNITS[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError("<command line>", [
            f"--since {text!r}: give a span (90s, 10m, 2h, 1d), an ISO time (2026-12-03T07:00) or a Unix time"
        ]) from None


def _cmd_events(args: argparse.Namespace) -> int:
    import datetime  # noqa: PLC0415
    import json  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    from controller.journal import read_events  # noqa: PLC0415
    from controller.state_db import state_db_path  # noqa: PLC0415

    if (args.db is None) == (args.config is None):
        raise ConfigError("<command line>", ["give the controller's --config or its state database (--db)"])
    path = args.db
    if path is None:
        config = _load_controller_config(args.config)
        path = state_db_path(config.state_dir, config.node_id)
        if path is None:
            raise ConfigError(args.config, ["no state_dir: this controller keeps its journal in memory only"])
    if not path.is_file():
        raise ConfigError(path, ["no state database here (has the controller run with this state_dir?)"])
    since = None if args.since is None else _since(args.since)
    try:
        for seq, wall_s, node, kind, rack, text in read_events(path, since_s=since, rack_id=args.rack):
            if args.json:
                print(json.dumps({"seq": seq, "timestamp_s": wall_s, "node_id": node, "kind": kind,
                                  "rack_id": rack, "text": text}))
            else:
                when = datetime.datetime.fromtimestamp(wall_s).isoformat(sep=" ", timespec="milliseconds")
                print(f"{when}  {node:<10} {kind:<10} {rack:<10} {text}")
    except sqlite3.Error as exc:
        print(f"bmslink events: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# -- cmd ----------------------------------------------------------------------------------------


def _add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    _add_broker_arguments(parser)
    parser.add_argument("--key-file", type=Path, required=True, help="the operator's key file (TOML [keys])")
    parser.add_argument("--key-id", required=True, help="which key of the file signs the command")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.set_defaults(handler=_cmd_command)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from pydantic import ValidationError  # noqa: PLC0415

    from shared.commands import KeyIdCheck, new_key  # noqa: PLC0415

    try:
        KeyIdCheck(key_id=args.key_id)
    except ValidationError:
        raise ConfigError("<command line>", [
            f"--key-id {args.key_id!r}: 1 to 64 letters, digits, '_', '.' or '-'"]) from None
    print(f"# operator key {args.key_id!r}: add under [keys] in the controllers' key file and in the\n"
          "# operator's own; keep both readable by their owner only (chmod 600)\n"
          f"{args.key_id} = \"{new_key()}\"")
    return EXIT_OK


def _cmd_command(args: argparse.Namespace) -> int:
    from bmslink.command_client import CommandClientError, as_json, describe, send_command  # noqa: PLC0415
    from shared.commands import (  # noqa: PLC0415
        MAX_FORCE_CHARGE_S,
        CommandAction,
        KeyFileError,
        load_keys,
        new_command,
    )

    mqtt = _broker_config(args)
    try:
        keys = load_keys(args.key_file)
    except KeyFileError as exc:
        raise ConfigError(args.key_file, [str(exc)]) from None
    key = keys.get(args.key_id)
    if key is None:
        raise ConfigError(args.key_file, [f"no key {args.key_id!r} in it (it has {', '.join(sorted(keys))})"])
    if args.cmd_command == "force-charge":
        if not 0 < args.duration <= MAX_FORCE_CHARGE_S:
            raise ConfigError("<command line>", [
                f"--duration must be above 0 and at most {MAX_FORCE_CHARGE_S:g} s"])
        command = new_command(CommandAction.FORCE_CHARGE, key_id=args.key_id, site_id=args.site,
                              duration_s=args.duration)
    elif args.cmd_command == "maintenance":
        action = CommandAction.MAINTENANCE_ON if args.switch == "on" else CommandAction.MAINTENANCE_OFF
        command = new_command(action, key_id=args.key_id, site_id=args.site, racks=args.racks)
    else:
        if args.all == bool(args.rack):
            raise ConfigError("<command line>", ["name the racks (--rack ID, repeatable) or give --all, "
                                                 "not both"])
        command = new_command(CommandAction.CLEAR_LATCHES, key_id=args.key_id, site_id=args.site,
                              racks=() if args.all else args.rack)

    async def main(_stop: asyncio.Event) -> int:
        try:
            answer = await send_command(mqtt, args.site, command, key, timeout_s=args.timeout)
        except CommandClientError as exc:
            print(f"bmslink cmd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(as_json(answer) if args.json else describe(answer))
        return EXIT_OK if answer.reply.accepted else EXIT_FAILURE

    return run_until_signalled(main)


# -- demo -------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from bmslink.demo import run_demo  # noqa: PLC0415

    return run_until_signalled(lambda stop: run_demo(args, stop))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmslink", description="Battery cluster controller")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run a rack agent")
    agent.add_argument("--config", type=Path, required=True, help="agent TOML file")
    agent.add_argument("--check-config", action="store_true", help="validate the config and exit")
    agent.set_defaults(handler=_cmd_agent)

    controller = sub.add_parser("controller", help="run a cluster controller")
    controller.add_argument("--config", type=Path, required=True, help="controller TOML file")
    controller.add_argument("--check-config", action="store_true", help="validate the config and exit")
    controller.set_defaults(handler=_cmd_controller)

    from bmslink.monitor import add_monitor_arguments  # noqa: PLC0415

    # conflict_handler: the monitor's --site (repeatable, or '+') replaces the broker arguments' one.
    monitor = sub.add_parser("monitor", help="live view of the telemetry on a broker",
                             conflict_handler="resolve")
    _add_broker_arguments(monitor)
    add_monitor_arguments(monitor)
    monitor.set_defaults(handler=_cmd_monitor)

    cmd = sub.add_parser("cmd", help="send a signed operator command to the active controller")
    cmd_sub = cmd.add_subparsers(dest="cmd_command", required=True)
    clear = cmd_sub.add_parser("clear", help="clear latched alarms whose condition has cleared")
    _add_operator_arguments(clear)
    clear.add_argument("--rack", action="append", default=[], help="a rack to clear (repeatable)")
    clear.add_argument("--all", action="store_true", help="clear every rack on the roster")
    force = cmd_sub.add_parser("force-charge", help="ask the inverter to charge (within the racks' limits) "
                                                    "for a time; the request expires by itself")
    _add_operator_arguments(force)
    force.add_argument("--duration", type=float, required=True, help="seconds the request stands")
    maintenance = cmd_sub.add_parser(
        "maintenance", help="take racks out of the bank for service (on), or return them through the "
                            "re-admission hold and ramp (off)")
    _add_operator_arguments(maintenance)
    maintenance.add_argument("switch", choices=("on", "off"))
    maintenance.add_argument("racks", nargs="+", metavar="RACK", help="the racks (rack ids)")
    events = sub.add_parser("events", help="what a controller journaled: latches, commands, roles, racks")
    events.add_argument("--config", type=Path, help="the controller's TOML file (finds its state_dir)")
    events.add_argument("--db", type=Path, help="or the state database itself")
    events.add_argument("--since", help="from: a span back (90s, 10m, 2h, 1d), an ISO time or a Unix time")
    events.add_argument("--rack", help="only this rack's events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(handler=_cmd_events)

    keygen = cmd_sub.add_parser("keygen", help="print a new operator key as a key-file line")
    keygen.add_argument("--key-id", required=True)
    keygen.set_defaults(handler=_cmd_keygen)

    demo = sub.add_parser("demo", help="start broker, simulated racks and agents on this machine")
    demo.add_argument("--racks", type=int, default=4)
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--scenario", type=Path, default=None, help="simulator scenario file")
    demo.set_defaults(handler=_cmd_demo)

    from bmslink.probe import add_probe_parser  # noqa: PLC0415

    add_probe_parser(sub)

    from bmslink.bridge.cli import add_bridge_parser  # noqa: PLC0415

    add_bridge_parser(sub)

    sim = sub.add_parser("sim", help="simulated peers")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    from sim.cli import add_bms_parser  # noqa: PLC0415
    from sim.inverter_cli import add_inverter_parser  # noqa: PLC0415

    add_bms_parser(sim_sub)
    add_inverter_parser(sim_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"bmslink: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
