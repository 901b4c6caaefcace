"""``bmslink demo``: the whole chain on one machine, as separate processes.

A Mosquitto broker on a free loopback port, a CAN bus shared between processes
(the python-can-remote bridge on 127.0.0.1), simulated rack BMSs (Modbus TCP on
127.0.0.1), one agent per rack, the controller, the simulated inverter, and a
live view of racks, consolidated limits with their reason and the inverter.
Ctrl-C stops everything and leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

from bmslink.monitor import run_monitor
from bmslink.processes import Supervisor, find_mosquitto, free_port, wait_port, write_mosquitto_conf
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


def controller_toml(racks: int, broker_port: int, can_port: int, node: str = "ctl-a") -> str:
    roster = "\n".join(
        f'[[roster]]\nrack_id = "rack-{i + 1:02d}"\ncapacity_ah = 280\n' for i in range(racks)
    )
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

{roster}"""


def read_inverter_status(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "waiting for the simulated inverter..."
    limits = data.get("limits") or {}
    told = "no limits yet" if not limits else (
        f"CVL {limits['charge_voltage_limit_v']:.1f} V  CCL {limits['charge_current_limit_a']:.1f} A  "
        f"DCL {limits['discharge_current_limit_a']:.1f} A  charge {'on' if limits['charge_enabled'] else 'OFF'}  "
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
        sup = Supervisor(run_dir)
        try:
            broker_port = free_port()
            conf = write_mosquitto_conf(run_dir, broker_port)
            await sup.start("mosquitto", [find_mosquitto(), "-c", str(conf)])
            await wait_port("127.0.0.1", broker_port, 5.0)
            can_port = free_port()
            await sup.start("can-bridge", [sys.executable, "-m", "can_remote", "-i", "virtual", "-c", "0",
                                           "-H", "127.0.0.1", "-p", str(can_port)])
            await wait_port("127.0.0.1", can_port, 10.0)
            bms_port = free_port()
            sim_argv = [*bmslink, "sim", "bms", "--racks", str(args.racks), "--transport", "tcp",
                        "--host", "127.0.0.1", "--port", str(bms_port), "--current", "40"]
            if args.scenario is not None:
                sim_argv += ["--scenario", str(args.scenario)]
            await sup.start("sim", sim_argv)
            await sup.wait_for_line("sim", f"sim rack {args.racks - 1} ready", 15.0)
            for i in range(args.racks):
                cfg = run_dir / f"agent-{i + 1:02d}.toml"
                cfg.write_text(agent_toml(i, broker_port, bms_port + i))
                await sup.start(f"agent-{i + 1:02d}", [*bmslink, "agent", "--config", str(cfg)])
            ctl_cfg = run_dir / "controller.toml"
            ctl_cfg.write_text(controller_toml(args.racks, broker_port, can_port))
            await sup.start("controller", [*bmslink, "controller", "--config", str(ctl_cfg)])
            status_file = run_dir / "inverter.json"
            await sup.start("inverter", [*bmslink, "sim", "inverter", "--interface", "remote",
                                         "--channel", f"127.0.0.1:{can_port}", "--dialect", "pylon",
                                         "--status-file", str(status_file)])
            if args.duration is not None:
                asyncio.get_running_loop().call_later(args.duration, stop.set)
            mqtt = MqttConfig(host="127.0.0.1", port=broker_port)
            await run_monitor(mqtt, SITE_ID, stop, inverter_status=lambda: read_inverter_status(status_file))
        finally:
            await sup.stop_all()
    return 0
