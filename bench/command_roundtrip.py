"""Operator command round trip: ``bmslink cmd clear`` to the active controller's reply.

A real Mosquitto and one ``bmslink controller`` process (virtual CAN, two racks, an operator key, a
state directory: every accepted command is written to SQLite before its reply goes out) on 127.0.0.1.
Two measurements:

* **in-process client**: ``bmslink.command_client.send_command`` (what the CLI runs) ``--count`` times,
  each with its own MQTT session; the round trip is from the first publish of the signed command to
  its reply (connecting and subscribing excluded), and the whole call beside it;
* **CLI**: ``bmslink cmd clear --all`` as a process, ``--cli-count`` times: the wall time an operator
  waits, Python's start-up included.

Run: ``.venv/bin/python bench/command_roundtrip.py [--count 200] [--cli-count 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bmslink.command_client import send_command  # noqa: E402 - after the path set-up
from bmslink.processes import MosquittoBroker, ProcessGroup, free_port  # noqa: E402
from shared.commands import CommandAction, new_command, new_key  # noqa: E402
from shared.config import MqttConfig  # noqa: E402

SITE = "bench"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def controller_toml(port: int, keys: Path, state: Path) -> str:
    return f"""site_id = "{SITE}"
node_id = "ctl-bench"
state_dir = "{state}"

[mqtt]
host = "127.0.0.1"
port = {port}

[can]
interface = "virtual"
channel = "cmd-bench-{free_port()}"

[commands]
keys_file = "{keys}"

[[roster]]
rack_id = "rack-01"
capacity_ah = 280

[[roster]]
rack_id = "rack-02"
capacity_ah = 280
"""


def line(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{label:<34} n {len(ms):>4}  p50 {statistics.median(ms):7.2f} ms  p99 {pct(ms, 0.99):7.2f} ms  "
            f"max {max(ms):7.2f} ms")


async def run(count: int, cli_count: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bmslink-cmd-bench-") as tmp:
        root = Path(tmp)
        key = new_key()
        keys = root / "keys.toml"
        keys.write_text(f'[keys]\nalice = "{key}"\n')
        keys.chmod(0o600)
        state = root / "state"
        state.mkdir()
        broker = MosquittoBroker(root / "broker")
        broker.start()
        procs = ProcessGroup(root / "procs")
        try:
            config = root / "controller.toml"
            config.write_text(controller_toml(broker.port, keys, state))
            procs.start("controller", [sys.executable, "-m", "bmslink", "--log-level", "warning",
                                       "controller", "--config", str(config)])
            mqtt = MqttConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1")
            deadline = time.monotonic() + 20
            while True:  # until the controller answers (its loop runs)
                command = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id=SITE)
                try:
                    answer = await send_command(mqtt, SITE, command, bytes.fromhex(key), timeout_s=2)
                    if answer.reply.accepted:
                        break
                except Exception:  # not up yet
                    if time.monotonic() > deadline:
                        raise
            round_trips, calls = [], []
            for _ in range(count):
                command = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id=SITE)
                started = time.perf_counter()
                answer = await send_command(mqtt, SITE, command, bytes.fromhex(key), timeout_s=10)
                calls.append(time.perf_counter() - started)
                assert answer.reply.accepted, answer.reply.reason
                round_trips.append(answer.round_trip_s)
            cli = []
            for _ in range(cli_count):
                started = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bmslink", "cmd", "clear", "--port", str(broker.port),
                    "--site", SITE, "--key-file", str(keys), "--key-id", "alice", "--all", "--json",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                cli.append(time.perf_counter() - started)
                assert proc.returncode == 0 and json.loads(out)["accepted"], err.decode()
            print("operator command round trip (clear --all, accepted, written to SQLite before the reply), "
                  "Mosquitto and the controller on 127.0.0.1")
            print(line("publish -> reply (in-process client)", round_trips))
            print(line("send_command call (connect incl.)", calls))
            if cli:
                print(line("bmslink cmd clear (process)", cli))
        finally:
            procs.stop_all()
            broker.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--cli-count", type=int, default=10)
    args = parser.parse_args()
    return asyncio.run(run(args.count, args.cli_count))


if __name__ == "__main__":
    sys.exit(main())
