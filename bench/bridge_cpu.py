"""CPU cost of ``bmslink bridge`` at 100 racks × 2 Hz of telemetry, beside the controller alone.

The rig is ``bench/chaos_rig.py``'s: Mosquitto on a free 127.0.0.1 port, the python-can-remote CAN
bridge, the real ``bmslink controller`` (roster of ``--racks``, Pylon, ``can.period_ms`` 1000 and the
consolidated state published every 1000 ms, both as shipped) and a genuine paho publisher sending valid
``RackTelemetry`` for every rack at ``--hz``, evenly spread.

Phases, each ``--window-s`` long after ``--settle-s`` of warm-up:

1. the controller alone;
2. the controller and ``python -m bmslink bridge`` with ``publish.rack_interval_ms`` 1000 (shipped);
3. the same with ``rack_interval_ms`` 0 (a JSON state for every reading).

For each: CPU seconds per wall second (user + system, from /proc/PID/stat; 1.0 = one core busy) of the
controller and of the bridge, the bridge's RSS, and the JSON messages per second a plain subscriber
counts on ``{prefix}/{site}/json/#``. Home Assistant discovery is on (the configs go once, at the
start of each bridge phase, inside the warm-up).

Run: ``.venv/bin/python bench/bridge_cpu.py [--racks 100] [--hz 2] [--window-s 60] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos_rig import (  # noqa: E402  (after the path set-up above)
    PREFIX,
    SITE,
    ChaosRig,
    ControllerSettings,
    GenuineRack,
    cpu_seconds,
    rss_bytes,
    stream_id_for,
)

MIB = 1024 * 1024
BRIDGE_TOML = """\
site_id = "{site}"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{prefix}"

[publish]
rack_interval_ms = {interval_ms}
stats_interval_s = 10

[discovery]
enabled = true
"""


@dataclass
class Phase:
    name: str
    window_s: float
    controller_cpu: float  # CPU seconds per wall second
    bridge_cpu: float | None
    bridge_rss_mib: float | None
    json_per_s: float


class JsonCounter:
    """A plain paho subscriber counting the bridge's JSON messages (its own thread)."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self.count = 0
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-json-counter",
                                   protocol=paho.MQTTv5)
        self._client.on_connect = lambda client, *_: client.subscribe(topic)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=30)
        self._client.loop_start()

    def _on_message(self, *_: object) -> None:
        with self._lock:
            self.count += 1

    def take(self) -> int:
        with self._lock:
            return self.count

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def measure(rig: ChaosRig, name: str, counter: JsonCounter, window_s: float) -> Phase:
    ctl_pid = rig.controller_pid
    bridge_pid = rig.procs.get("bridge").pid if rig.procs.running("bridge") else None
    c0, j0, t0 = cpu_seconds(ctl_pid), counter.take(), time.monotonic()
    b0 = cpu_seconds(bridge_pid) if bridge_pid is not None else 0.0
    time.sleep(window_s)
    wall = time.monotonic() - t0
    c1, j1 = cpu_seconds(ctl_pid), counter.take()
    bridge_cpu = rss = None
    if bridge_pid is not None:
        bridge_cpu = (cpu_seconds(bridge_pid) - b0) / wall
        rss = rss_bytes(bridge_pid) / MIB
    return Phase(name, round(wall, 1), (c1 - c0) / wall, bridge_cpu, rss, (j1 - j0) / wall)


def start_bridge(rig: ChaosRig, work: Path, interval_ms: int) -> None:
    config = work / f"bridge-{interval_ms}.toml"
    config.write_text(BRIDGE_TOML.format(site=SITE, port=rig.broker.port, prefix=PREFIX,
                                         interval_ms=interval_ms))
    rig.procs.start("bridge", [sys.executable, "-m", "bmslink", "bridge", "--config", str(config)], cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--racks", type=int, default=100)
    parser.add_argument("--hz", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None, help="write the phases here as JSON")
    args = parser.parse_args()

    racks = [GenuineRack(f"rack-{i:03d}", 100.0, 120.0, stream_id_for(7, f"rack-{i:03d}"))
             for i in range(1, args.racks + 1)]
    work = Path(tempfile.mkdtemp(prefix="bmslink-bridge-cpu-"))
    rig = ChaosRig(work, racks, settings=ControllerSettings(period_ms=1000), publisher_hz=args.hz)
    phases: list[Phase] = []
    counter = None
    try:
        rig.start()
        rig.wait_granted()
        counter = JsonCounter(rig.broker.port, f"{PREFIX}/{SITE}/json/#")
        time.sleep(args.settle_s)
        phases.append(measure(rig, "controller alone", counter, args.window_s))
        for interval_ms in (1000, 0):
            start_bridge(rig, work, interval_ms)
            rig.procs.wait_for_output("bridge", "connected to", 30.0)
            time.sleep(args.settle_s)
            phases.append(measure(rig, f"controller + bridge (rack_interval_ms {interval_ms})", counter,
                                  args.window_s))
            if rig.procs.stop("bridge") != 0:
                raise RuntimeError(f"the bridge did not stop cleanly:\n{rig.procs.stderr('bridge')[-2000:]}")
        if "Traceback" in rig.procs.stderr("bridge"):
            raise RuntimeError(f"the bridge logged a traceback:\n{rig.procs.stderr('bridge')[-4000:]}")
    finally:
        if counter is not None:
            counter.close()
        rig.stop()

    print(f"\n{args.racks} racks × {args.hz:g} Hz of telemetry, consolidated state every 1000 ms; "
          f"CPU = CPU seconds per wall second (1.0 = one core)")
    print(f"{'phase':<44} {'window s':>8} {'controller':>10} {'bridge':>8} {'bridge RSS':>11} {'JSON/s':>8}")
    for p in phases:
        bridge = "-" if p.bridge_cpu is None else f"{p.bridge_cpu:.3f}"
        rss = "-" if p.bridge_rss_mib is None else f"{p.bridge_rss_mib:.1f} MiB"
        print(f"{p.name:<44} {p.window_s:>8} {p.controller_cpu:>10.3f} {bridge:>8} {rss:>11} "
              f"{p.json_per_s:>8.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in phases], indent=2))


if __name__ == "__main__":
    main()
