"""Failover benchmark: takeover time, the inverter's longest gap and overlaps, over repeated trials.

Two controllers (failover enabled, heartbeat 100 ms, inverter period 200 ms) run as processes with
three agents and simulated racks, a real Mosquitto and the python-can-remote bridge; a recorder on the
bus timestamps every frame. Each trial kills (SIGKILL) or freezes (SIGSTOP) the active, measures
  takeover = first heartbeat of the new active - the signal,
  gap      = the longest interval between two 0x351 frames around the trial,
  overlap  = active frames of two nodes within one controller heartbeat period,
then brings the old active back (restart, or SIGCONT) as the standby for the next trial.

Run: ``.venv/bin/python bench/failover_takeover.py [--trials 20]``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bmslink.processes import MosquittoBroker, ProcessGroup  # noqa: E402 - after the path set-up
from tests.e2e.rig import HEARTBEAT_MS, Chain  # noqa: E402 - the same rig the tests use

CONTROLLER_BEAT_S = 0.1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def trial(chain: Chain, sig: signal.Signals) -> tuple[float, float]:
    old = chain.recorder.active_node()
    assert old is not None
    name = f"ctl-{old}"
    sent = time.monotonic()
    chain.procs.send_signal(name, sig)
    await chain.wait_for(lambda: chain.recorder.active_node() not in (None, old), 5.0, "takeover")
    first = next(b for b in chain.recorder.active_beats(sent) if b.node != old)
    await asyncio.sleep(0.8)
    gap = chain.recorder.max_gap(sent - 0.5)
    # Bring the old one back as standby.
    if sig is signal.SIGKILL:
        chain.procs.get(name).popen.wait(5)
        chain.start_controller(name, node_number=old, rank=old - 1)
    else:
        chain.procs.send_signal(name, signal.SIGCONT)
    back = time.monotonic()
    await chain.wait_for(
        lambda: any(b.node == old and b.role == 2 for b in chain.recorder.beats if b.t > back),
        15.0,
        "the old active back as standby",
    )
    await asyncio.sleep(0.5)
    return first.t - sent, gap


async def run(trials: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bmslink-failover-bench-") as tmp:
        root = Path(tmp)
        broker = MosquittoBroker(root / "broker")
        broker.start()
        procs = ProcessGroup(root / "procs")
        chain = Chain(root, broker, "bench", procs, controllers=2, failover=True)
        try:
            await chain.start()
            await chain.wait_for(
                lambda: chain.recorder.active_node() is not None, 10.0, "an active controller"
            )
            await chain.settle()
            print(f"failover benchmark: {trials} trials per signal, controller heartbeat 100 ms, "
                  f"inverter period {HEARTBEAT_MS} ms, silence window 300 ms")
            print(f"{'signal':>8} {'takeover p50':>13} {'p99':>7} {'max':>7} {'gap p50':>8} {'p99':>7} "
                  f"{'max':>7} {'overlaps':>8}")
            for sig in (signal.SIGKILL, signal.SIGSTOP):
                since = time.monotonic()
                takeovers: list[float] = []
                gaps: list[float] = []
                for _ in range(trials):
                    takeover, gap = await trial(chain, sig)
                    takeovers.append(takeover)
                    gaps.append(gap)
                overlaps = len(chain.recorder.overlaps(CONTROLLER_BEAT_S, since))
                print(f"{sig.name:>8} {statistics.median(takeovers) * 1000:>10.0f} ms "
                      f"{pct(takeovers, 0.99) * 1000:>4.0f} ms"
                      f" {max(takeovers) * 1000:>4.0f} ms {statistics.median(gaps) * 1000:>5.0f} ms "
                      f"{pct(gaps, 0.99) * 1000:>4.0f} ms {max(gaps) * 1000:>4.0f} ms {overlaps:>8}")
            status = chain.inverter()
            print(f"inverter: status {status.get('status')}, protocol violations {status.get('violations')}, "
                  f"longest gap seen by the inverter {status.get('max_set_gap_s', 0) * 1000:.0f} ms")
        finally:
            await chain.stop()
            procs.stop_all()
            broker.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    return asyncio.run(run(args.trials))


if __name__ == "__main__":
    sys.exit(main())
