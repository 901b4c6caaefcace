"""Rack-agent polling benchmark.

One agent (this process) polls N simulated BMS units, each a pymodbus TCP
server on 127.0.0.1 in a separate simulator process, at 10 Hz. Prints, for
N = 1, 8, 32: sustained unit polls/s, p50/p99 poll latency and the agent's CPU
seconds per 1000 polls. Target: 32 units at 10 Hz on one core, p99 < 20 ms.

Run: ``.venv/bin/python bench/agent_poll.py [--seconds 10] [--units 1 8 32]``

``--profile NAME`` with a named make (seplos_v3, jk_pb, pace, byd_hvs) serves that make's simulated
unit (``bmslink sim bms --profile NAME``) and polls it with the shipped profile; ``--transport rtu``
puts each unit on its own Modbus RTU line (a socat pty pair, at the make's baud rate; a pty has no
baud timing, so this measures the agent's RTU path, not the wire). The default run (acme_flat over
Modbus TCP) is unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bmslink.processes import ProcessGroup, free_port
from rack_agent.agent import RackAgent
from rack_agent.links import BmsLink
from rack_agent.unit import UnitRuntime
from shared.agent_config import AgentConfig
from shared.config import validate_config
from sim.registers import MAKES

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fixtures.serial_pair import SerialPair  # noqa: E402 - the pty pairs the RTU tests use

SIM_READY_TIMEOUT_S = 30.0


class TimedAgent(RackAgent):
    """The real agent, with every unit poll timed."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.latencies_s: list[float] = []

    async def _poll_unit(self, link: BmsLink, unit: UnitRuntime) -> None:
        started = time.perf_counter()
        await super()._poll_unit(link, unit)
        self.latencies_s.append(time.perf_counter() - started)


def config_for(n: int, base_port: int, profile: str) -> AgentConfig:
    framer = MAKES[profile].tcp_framer if profile in MAKES else "socket"
    links = [{"type": "modbus_tcp", "name": f"l{i}", "host": "127.0.0.1", "port": base_port + i,
              "framer": framer} for i in range(n)]
    return _config(links, profile)


def config_for_rtu(devices: list[str], profile: str) -> AgentConfig:
    """One Modbus RTU line per unit, at the make's baud rate."""
    links = [{"type": "modbus_rtu", "name": f"l{i}", "device": device, "baudrate": MAKES[profile].baudrate}
             for i, device in enumerate(devices)]
    return _config(links, profile)


def _config(links: list[dict[str, Any]], profile: str) -> AgentConfig:
    # A map without a capacity register (byd_hvs) takes it from the unit config.
    capacity = {"capacity_ah": MAKES[profile].capacity_ah} if profile in MAKES else {}
    data: dict[str, Any] = {
        "site_id": "bench",
        "rack_id": "rack-01",
        # No broker: the publish path still encodes every message; paho just cannot connect.
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min_s": 5, "reconnect_max_s": 5},
        "polling": {"interval_ms": 100, "request_timeout_ms": 50},
        "links": links,
        "units": [{"name": f"u{i}", "link": link["name"], "profile": profile, **capacity}
                  for i, link in enumerate(links)],
    }
    return validate_config(data, AgentConfig, "<bench>")


async def measure(config: AgentConfig, seconds: float) -> dict[str, float]:
    n = len(config.units)
    agent = TimedAgent(config)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    # Warm-up: connections and SunSpec discovery are not what we measure.
    await asyncio.sleep(1.5)
    agent.latencies_s.clear()
    polls0 = agent.stats.polls
    skipped0 = agent.stats.slots_skipped
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    unit_polls = len(agent.latencies_s)
    lat = sorted(agent.latencies_s)
    failures = sum(sum(v for k, v in u.health.counts.items() if k not in ("ok", "skipped_slots"))
                   for u in agent.units.values())
    result = {
        "units": n,
        "cycles_per_s": (agent.stats.polls - polls0) / wall,
        "unit_polls_per_s": unit_polls / wall,
        "p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan"),
        "cpu_s_per_1000_polls": cpu / unit_polls * 1000 if unit_polls else float("nan"),
        "cpu_share_pct": cpu / wall * 100,
        "skipped_slots": agent.stats.slots_skipped - skipped0,
        "failures": failures,
    }
    stop.set()
    await task
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--units", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--profile", default="acme_flat", choices=["acme_flat", "sunspec", *sorted(MAKES)])
    parser.add_argument("--transport", default="tcp", choices=["tcp", "rtu"],
                        help="rtu: one socat pty pair per unit (named makes only)")
    args = parser.parse_args()
    if args.transport == "rtu" and args.profile not in MAKES:
        parser.error(f"--transport rtu needs a named make's --profile ({', '.join(sorted(MAKES))})")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    print(f"agent poll benchmark: 10 Hz schedule, profile {args.profile}, transport {args.transport}, "
          f"{args.seconds:.0f} s per point, {os.cpu_count()} cores")
    header = (f"{'units':>5} {'cycles/s':>9} {'polls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'CPU s/1000':>10} {'CPU %':>6} {'skipped':>7} {'fail':>5}")
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench-agent-poll-") as tmp:
        procs = ProcessGroup(Path(tmp))
        for n in args.units:
            sim = f"sim-{n}"
            command = [sys.executable, "-m", "bmslink", "--log-level", "error", "sim", "bms",
                       "--racks", str(n)]
            if args.profile in MAKES:
                command += ["--profile", args.profile]
            rtu = args.transport == "rtu"
            pairs = [SerialPair(Path(tmp) / f"line-{n}-{i}") for i in range(n)] if rtu else []
            try:
                for pair in pairs:
                    pair.start()
                if pairs:
                    devices = (arg for pair in pairs for arg in ("--device", pair.a))
                    command += ["--transport", "rtu", *devices]
                    config = config_for_rtu([pair.b for pair in pairs], args.profile)
                else:
                    base = free_port(span=n)
                    command += ["--transport", "tcp", "--host", "127.0.0.1", "--port", str(base)]
                    config = config_for(n, base, args.profile)
                procs.start(sim, command, cwd=ROOT)
                # One "sim rack N ready: ..." line per unit.
                procs.wait_for_output(sim, " ready:", SIM_READY_TIMEOUT_S, count=n)
                r = asyncio.run(measure(config, args.seconds))
            finally:
                procs.stop(sim)
                for pair in pairs:
                    pair.stop()
            print(f"{r['units']:>5} {r['cycles_per_s']:>9.2f} {r['unit_polls_per_s']:>8.1f}"
                  f" {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['cpu_s_per_1000_polls']:>10.3f}"
                  f" {r['cpu_share_pct']:>6.1f} {r['skipped_slots']:>7} {r['failures']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
