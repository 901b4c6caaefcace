"""Failover benchmark: takeover time, the inverter's longest gap and overlaps, over repeated trials.

Two controllers (failover enabled, heartbeat 100 ms, inverter period 200 ms) run as processes with
three agents and simulated racks, a real Mosquitto and the python-can-remote bridge; a recorder on the
bus timestamps every frame. Each trial kills (SIGKILL) or freezes (SIGSTOP) the active, measures
  takeover = first heartbeat of the new active - the signal,
  gap      = the longest interval between two 0x351 frames around the trial,
  overlap  = active frames of two nodes within one controller heartbeat period,
then brings the old active back (restart, or SIGCONT) as the standby for the next trial.

A second rig, with the re-admission hold and ramp at their defaults (10 s each), measures the warm
standby: each trial restarts the standby, kills the active ``--lead-s`` (3 s) later, and compares the
new active's first limits, and the lowest in the next 1.5 s, with the old active's last ones. A cold
standby would send its racks back through the hold (0 A for 10 s, then a 10 s ramp).

Run: ``.venv/bin/python bench/failover_takeover.py [--trials 20] [--warm-trials 5] [--lead-s 3]``
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


async def restart_as_standby(chain: Chain, node: int) -> float:
    """SIGKILL controller ``node`` (if it runs), start it again, and return once it is heard standby."""
    name = f"ctl-{node}"
    proc = chain.procs.get(name)
    if proc.poll() is None:
        chain.procs.send_signal(name, signal.SIGKILL)
        proc.popen.wait(5)
    started = time.monotonic()
    chain.start_controller(name, node_number=node, rank=node - 1)
    await chain.wait_for(lambda: any(b.node == node and b.role == 2 for b in chain.recorder.beats
                                     if b.t > started), 15.0, f"{name} back as standby")
    return started


async def young_standby_trial(chain: Chain, lead_s: float) -> tuple[float, float, float, float]:
    """(takeover s, old active's last CCL, new active's first CCL, lowest CCL in the 1.5 s after)."""
    old = chain.recorder.active_node()
    assert old in (1, 2)
    started = await restart_as_standby(chain, 3 - old)
    await asyncio.sleep(max(0.0, started + lead_s - time.monotonic()))
    before = chain.recorder.ccl()
    sent = time.monotonic()
    chain.procs.send_signal(f"ctl-{old}", signal.SIGKILL)
    await chain.wait_for(lambda: chain.recorder.active_node() not in (None, old), 5.0, "takeover")
    first_beat = next(b for b in chain.recorder.active_beats(sent) if b.node != old)
    await asyncio.sleep(1.5)
    after = [ccl for t, ccl, _, _ in chain.recorder.limits(first_beat.t)]
    chain.procs.get(f"ctl-{old}").popen.wait(5)
    await restart_as_standby(chain, old)
    return first_beat.t - sent, before, after[0] if after else float("nan"), min(after, default=float("nan"))


async def young_standby(root: Path, broker: MosquittoBroker, trials: int, lead_s: float) -> None:
    procs = ProcessGroup(root / "procs-warm")
    chain = Chain(root / "warm", broker, "bench-warm", procs, controllers=2, failover=True,
                  hold_s=10.0, ramp_s=10.0)
    (root / "warm").mkdir()
    try:
        await chain.start(ctl_1_active_first=True)
        await chain.wait_for(lambda: chain.recorder.ccl() > 0, 60.0, "current granted")
        await asyncio.sleep(10.0)  # the racks' share ramps in over readmit_ramp_s
        await chain.settle(3.0)
        rows = [await young_standby_trial(chain, lead_s) for _ in range(trials)]
        same = sum(1 for _, before, first, _ in rows if abs(first - before) <= 0.1)
        kept = min(low / before for _, before, _, low in rows if before > 0)
        takeovers = [t for t, _, _, _ in rows]
        print(f"young standby (started {lead_s:g} s before SIGKILL, hold 10 s + ramp 10 s): takeover p50 "
              f"{statistics.median(takeovers) * 1000:.0f} ms, max {max(takeovers) * 1000:.0f} ms; "
              f"first limits = the old active's in {same}/{len(rows)} trials; lowest CCL in the 1.5 s "
              f"after: {kept * 100:.1f} % of the old active's")
        for takeover, before, first, low in rows:
            print(f"  takeover {takeover * 1000:4.0f} ms  CCL before {before:7.1f} A  first {first:7.1f} A  "
                  f"lowest {low:7.1f} A")
    finally:
        await chain.stop()
        procs.stop_all()


async def run(trials: int, warm_trials: int, lead_s: float) -> int:
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
                pairs = chain.recorder.overlaps(CONTROLLER_BEAT_S, since)
                overlaps = len(pairs)
                for a, b in pairs:  # what an overlap was, to find out why
                    later_ms = (b.t - a.t) * 1000
                    print(f"  overlap: node {a.node} role {a.role} epoch {a.epoch} at {a.t - since:.3f} s, "
                          f"then node {b.node} role {b.role} epoch {b.epoch} {later_ms:.1f} ms later")
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
        try:
            if warm_trials:
                await young_standby(root, broker, warm_trials, lead_s)
        finally:
            broker.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--warm-trials", type=int, default=5, help="young-standby trials (0: none)")
    parser.add_argument("--lead-s", type=float, default=3.0, help="the young standby's start before the kill")
    args = parser.parse_args()
    return asyncio.run(run(args.trials, args.warm_trials, args.lead_s))


if __name__ == "__main__":
    sys.exit(main())
