"""``bmslink demo``: the whole chain on one machine, as separate processes.

Two controllers run with failover: press ``k`` (on a terminal) to kill the active one and watch the
standby take over; a ``--scenario`` file scripts rack events (handed to the simulator) and site
events handled here: ``kill_active``, ``restart_controller``, ``restart_broker`` (see
``sim/scenarios/demo.toml``).

A Mosquitto broker on a free loopback port, a CAN bus shared between processes
(the python-can-remote bridge on 127.0.0.1), simulated rack BMSs (Modbus TCP on
127.0.0.1), one agent per rack, the controllers (each serving its web page on a free
loopback port, printed at start), the JSON + Home Assistant bridge (discovery under
``homeassistant/`` on the demo's broker), the simulated inverter, and a live view of
racks, consolidated limits with their reason and the inverter.
Ctrl-C stops everything and leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from bmslink.monitor import run_monitor
from bmslink.processes import CanBridge, MosquittoBroker, ProcessGroup, free_port
from shared.config import MqttConfig

SITE_ID = "demo"
PROFILES = ("sunspec", "acme_flat")  # alternate, so the demo shows both register maps


def agent_toml(rack_index: int, broker_port: int, bms_port: int) -> str:
    profile = PROFILES[rack_index % len(PROFILES)]
    return f"""\
site_id = "{SITE_ID}"
rack_id = "rack-{rack_index + 1:02d}"

[mqtt]
host = "127.0.0.1"
port = {broker_port}

[polling]
interval_ms = 500
request_timeout_ms = 200

[[links]]
type = "modbus_tcp"
name = "bms-lan"
host = "127.0.0.1"
port = {bms_port}

[[units]]
name = "bms"
link = "bms-lan"
device_id = 1
profile = "{profile}"
"""


SITE_ACTIONS = ("kill_active", "restart_controller", "restart_broker")
CONTROLLERS = (("ctl-a", 1, 0), ("ctl-b", 2, 1))  # name, node number, rank
KILL_WAIT_S = 5.0  # a SIGKILLed controller is reaped within this
# Every simulated rack reports this current (positive: charging), and the simulated inverter asks for
# their sum: the two are separate simulations with no shared circuit, so they agree by construction
# (while the limits allow it: a limit below the sum clamps the inverter, not the racks' reports).
RACK_CURRENT_A = 40.0


def split_scenario(path: Path, run_dir: Path) -> tuple[Path | None, list[tuple[float, str]]]:
    """Site events stay here; rack events go to a file for the simulator."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    events = data.get("events", [])
    site = sorted((float(e["at_s"]), str(e["action"])) for e in events if e.get("action") in SITE_ACTIONS)
    rack = [e for e in events if e.get("action") not in SITE_ACTIONS]
    if not rack:
        return None, site
    lines = [f"description = {json.dumps(str(data.get('description', 'demo')))}", ""]
    for e in rack:
        lines.append("[[events]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in e.items())
        lines.append("")
    out = run_dir / "sim-scenario.toml"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out, site


def controller_toml(racks: int, broker_port: int, can_port: int, *, node: str = "ctl-a", node_number: int = 1,
                    rank: int = 0, web_port: int | None = None) -> str:
    roster = "\n".join(
        f'[[roster]]\nrack_id = "rack-{i + 1:02d}"\ncapacity_ah = 280\n' for i in range(racks)
    )
    web = "" if web_port is None else f'\n[web]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n'

    return f"""\
site_id = "{SITE_ID}"
node_id = "{node}"

[mqtt]
host = "127.0.0.1"
port = {broker_port}

[can]
interface = "remote"
channel = "127.0.0.1:{can_port}"
dialect = "pylon"
period_ms = 1000

[aggregation]
min_racks = 1
readmit_hold_s = 3
readmit_ramp_s = 5
ramp_up_a_per_s = 20

[failover]
enabled = true
node_number = {node_number}
rank = {rank}
{web}
{roster}"""


def bridge_toml(broker_port: int) -> str:
    """The JSON + Home Assistant bridge of the demo site (bmslink bridge): discovery under homeassistant/."""
    return f"""\
site_id = "{SITE_ID}"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
protocol = "5"
"""


def read_inverter_status(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "waiting for the simulated inverter..."
    limits = data.get("limits") or {}
    told = "no limits yet" if not limits else (
        f"CVL {limits['charge_voltage_limit_v']:.1f} V  CCL {limits['charge_current_limit_a']:.1f} A  "
        f"DCL {limits['discharge_current_limit_a']:.1f} A  "
        f"charge {'on' if limits['charge_enabled'] else 'OFF'}  "
        f"discharge {'on' if limits['discharge_enabled'] else 'OFF'}"
    )
    return (
        f"BMS communication: {data.get('status', '?')}   drawing {data.get('current_a', 0):.1f} A   {told}   "
        f"violations {data.get('violations', 0)}   longest gap {data.get('max_set_gap_s', 0):.2f} s"
    )


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    bmslink = [sys.executable, "-m", "bmslink"]
    # The live view owns the terminal: keep our own log lines to warnings.
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bmslink-demo-") as tmp:
        run_dir = Path(tmp)
        procs = ProcessGroup(run_dir / "procs")
        broker = MosquittoBroker(run_dir / "broker")
        bridge = CanBridge(run_dir / "can")
        try:
            await asyncio.to_thread(broker.start)
            await asyncio.to_thread(bridge.start)
            bms_port = free_port(span=args.racks)
            sim_argv = [*bmslink, "sim", "bms", "--racks", str(args.racks), "--transport", "tcp",
                        "--host", "127.0.0.1", "--port", str(bms_port), "--current", f"{RACK_CURRENT_A:g}"]
            site_events: list[tuple[float, str]] = []
            if args.scenario is not None:
                sim_scenario, site_events = split_scenario(args.scenario, run_dir)
                if sim_scenario is not None:
                    sim_argv += ["--scenario", str(sim_scenario)]
            procs.start("sim", sim_argv)
            await asyncio.to_thread(procs.wait_for_output, "sim", f"sim rack {args.racks - 1} ready", 15.0)
            for i in range(args.racks):
                cfg = run_dir / f"agent-{i + 1:02d}.toml"
                cfg.write_text(agent_toml(i, broker.port, bms_port + i))
                procs.start(f"agent-{i + 1:02d}", [*bmslink, "agent", "--config", str(cfg)])
            pages = []
            for name, number, rank in CONTROLLERS:
                cfg_path = run_dir / f"{name}.toml"
                web_port = free_port()
                pages.append(f"{name}: http://127.0.0.1:{web_port}/")
                cfg_path.write_text(controller_toml(
                    args.racks, broker.port, bridge.port, node=name, node_number=number, rank=rank,
                    web_port=web_port,
                ))
                procs.start(name, [*bmslink, "controller", "--config", str(cfg_path)])
            json_bridge = run_dir / "bridge.toml"
            json_bridge.write_text(bridge_toml(broker.port))
            procs.start("bridge", [*bmslink, "bridge", "--config", str(json_bridge)])
            # Said before the live view takes the terminal, and kept in its event lines.
            print("web pages: " + "   ".join(pages), flush=True)
            print(f"JSON and Home Assistant discovery on mqtt://127.0.0.1:{broker.port} "
                  f"({SITE_ID}: bmslink/{SITE_ID}/json/#, homeassistant/#)", flush=True)
            status_file = run_dir / "inverter.json"
            procs.start("inverter", [*bmslink, "sim", "inverter", "--interface", "remote",
                                     "--channel", bridge.channel, "--dialect", "pylon",
                                     "--ignore-id", "0x6E0", "--status-file", str(status_file),
                                     "--profile", f"{RACK_CURRENT_A * args.racks:g}:3600"])
            view_events: list[str] = ["web pages: " + "   ".join(pages)]
            site = SiteControl(procs, broker, run_dir, bmslink, log=view_events)
            tasks = [asyncio.create_task(site.run_events(site_events), name="demo-site-events")]
            keyboard = KeyboardKill(site)
            keyboard.start()
            if args.duration is not None:
                asyncio.get_running_loop().call_later(args.duration, stop.set)
            mqtt = MqttConfig(host="127.0.0.1", port=broker.port)
            try:
                await run_monitor(mqtt, SITE_ID, stop,
                                  inverter_status=lambda: "\n".join([read_inverter_status(status_file),
                                                                     *view_events[-3:]]))
            finally:
                keyboard.stop()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # Clients first, then the CAN bus and the broker they are connected to.
            await asyncio.to_thread(procs.stop_all)
            await asyncio.to_thread(bridge.stop)
            await asyncio.to_thread(broker.close)
    return 0


class SiteControl:
    """Site events of the demo: kill the active controller, restart a controller or the broker."""

    def __init__(self, procs: ProcessGroup, broker: MosquittoBroker, run_dir: Path, bmslink: list[str], *,
                 log: list[str]) -> None:
        self.procs = procs
        self.broker = broker
        self.run_dir = run_dir
        self.bmslink = bmslink
        self.log = log

    def active_controller(self) -> str | None:
        """The controller whose log says it became active last (the demo reads its own children)."""
        latest: tuple[float, str] | None = None
        for name, _number, _rank in CONTROLLERS:
            if not self.procs.running(name):
                continue
            text = self.procs.stderr(name)  # the controller logs to stderr
            active_at = text.rfind("role active")
            other_at = max(text.rfind("role standby"), text.rfind("role fenced"))
            if active_at > other_at:
                mtime = self.procs.get(name).stderr_path.stat().st_mtime
                if latest is None or mtime > latest[0]:
                    latest = (mtime, name)
        return None if latest is None else latest[1]

    async def kill_active(self) -> None:
        name = self.active_controller()
        if name is None:
            self.log.append("kill: no active controller found")
            return
        self.procs.send_signal(name, signal.SIGKILL)
        await asyncio.to_thread(self.procs.wait, name, KILL_WAIT_S)
        self.log.append(
            f"{time.strftime('%H:%M:%S')} killed the active controller {name}; restarting it in 5 s"
        )
        await asyncio.sleep(5.0)
        await self.restart_controller(name)

    async def restart_controller(self, name: str | None = None) -> None:
        for cname, _number, _rank in CONTROLLERS:
            if (name is None and not self.procs.running(cname)) or cname == name:
                self.procs.start(cname, [*self.bmslink, "controller", "--config",
                                         str(self.run_dir / f"{cname}.toml")])
                self.log.append(f"{time.strftime('%H:%M:%S')} restarted {cname}: it joins as standby")

    async def restart_broker(self) -> None:
        await asyncio.to_thread(self.broker.kill)
        self.log.append(f"{time.strftime('%H:%M:%S')} broker killed; back in 3 s")
        await asyncio.sleep(3.0)
        await asyncio.to_thread(self.broker.restart)  # on the same port: the clients reconnect there
        self.log.append(f"{time.strftime('%H:%M:%S')} broker restarted")

    async def run_events(self, events: list[tuple[float, str]]) -> None:
        started = time.monotonic()
        for at_s, action in events:
            await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
            if action == "kill_active":
                await self.kill_active()
            elif action == "restart_controller":
                await self.restart_controller()
            elif action == "restart_broker":
                await self.restart_broker()


class KeyboardKill:
    """On a terminal, ``k`` kills the active controller (the standby takes over)."""

    def __init__(self, site: SiteControl) -> None:
        self.site = site
        self._saved: list[object] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if not sys.stdin.isatty():
            return
        import termios  # noqa: PLC0415 - POSIX terminals only
        import tty  # noqa: PLC0415

        fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        asyncio.get_running_loop().add_reader(fd, self._key)
        self.site.log.append("press k to kill the active controller")

    def _key(self) -> None:
        if os.read(sys.stdin.fileno(), 1).lower() == b"k":
            task = asyncio.create_task(self.site.kill_active(), name="demo-kill-active")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._saved is None:
            return
        import termios  # noqa: PLC0415

        fd = sys.stdin.fileno()
        asyncio.get_running_loop().remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
        self._saved = None
