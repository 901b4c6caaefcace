"""The sustained-rate sweep: rising offered totals over a fixed roster, to the floor and to the controller.

A rate is kept up ("sustained") when every probe (a lowering, as in the reaction phase) comes back, the
broker drops nothing, the floor counts every message sent, the publisher keeps its schedule, and no
queue builds: the probes' median neither grows through the window nor starts long, and their p99 stays
below ``BACKLOG_P99_MS``. The sweep also reports the highest rate whose probes' p99 stays below
``SUSTAIN_P99_S``. A rate is judged not kept up only when two windows in a row say so (one window can be
the machine's noise); after a failed rate one bisection step below it is measured.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.reaction.reaction import CONTROLLER, FLOOR
from bench.reaction.rig import (
    Ladder,
    Rig,
    Trials,
    cpu_seconds,
    percentile,
    react,
    start_controller,
    start_floor,
    start_publisher,
    stat,
)
from bmslink.processes import ManagedProcess

SUSTAIN_P99_S = 0.05  # the sweep also reports the highest rate with the probes' p99 below this
BACKLOG_GROWTH_MS = 20.0
BACKLOG_P50_MS = 100.0
BACKLOG_P99_MS = 1000.0
SETTLE_S = 2.0  # at a new rate before measuring: let a backlog show
SYS_INTERVAL_WAIT_S = 1.1  # the broker's $SYS drop counter is published every second
PROBE_GAP_S = (0.06, 0.12)
RECEIVED_SHARE = 0.995  # the floor must count at least this share of what was sent
SENT_SHARE = 0.97  # the publisher must send at least this share of the offered rate
BISECT_ABOVE = 250.0  # msg/s: a failed rate this far above the last kept one gets a step between


@dataclass
class RateStep:
    offered: float
    sent_per_s: float
    received_per_s: float | None
    p50_ms: float
    p99_ms: float
    missed: int
    dropped: int
    cpu: float
    growth_ms: float  # probes' median, last third minus first third of the window: a queue grows
    sustained: bool  # keeps up: nothing lost, nothing queueing up
    within_p99: bool  # and the probes' p99 below SUSTAIN_P99_S


def rate_step(rig: Rig, pub: ManagedProcess, sub: ManagedProcess | None, pid: int, ladder: Ladder,
              rate: float, seconds: float, rnd: random.Random, *, controller: bool) -> RateStep:
    pub.lines.ask(f"rate {rate:g}", "rate")
    time.sleep(SETTLE_S)
    sent0 = stat(pub)
    got0 = stat(sub) if sub else 0
    drop0, c0, t0 = rig.drops.dropped, cpu_seconds(pid), time.monotonic()
    probes = Trials()
    while time.monotonic() - t0 < seconds:
        probes.add(react(rig, pub, ladder, rnd, controller=controller))
        time.sleep(rnd.uniform(*PROBE_GAP_S))
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - c0) / elapsed
    sent = (stat(pub) - sent0) / elapsed
    received = (stat(sub) - got0) / elapsed if sub else None
    time.sleep(SYS_INTERVAL_WAIT_S)
    dropped = rig.drops.dropped - drop0
    latencies = probes.latencies_s
    p50 = percentile(latencies, 50) * 1000 if latencies else float("inf")
    p99 = percentile(latencies, 99) * 1000 if latencies else float("inf")
    third = max(1, len(latencies) // 3)
    growth = (percentile(latencies[-third:], 50) - percentile(latencies[:third], 50)) * 1000 if latencies \
        else float("inf")
    received_all = received is None or received >= RECEIVED_SHARE * sent
    # A backlog shows as lost probes, broker drops, messages not counted, or a queue: growing
    # through the window, or already long when it starts.
    sustained = (probes.missed == 0 and dropped == 0 and received_all and sent >= SENT_SHARE * rate
                 and growth <= BACKLOG_GROWTH_MS and p50 < BACKLOG_P50_MS and p99 < BACKLOG_P99_MS)
    within = sustained and p99 < SUSTAIN_P99_S * 1000
    return RateStep(rate, sent, received, p50, p99, probes.missed, dropped, cpu, growth, sustained, within)


def sweep(rig: Rig, n: int, rates: Sequence[float], seconds: float, rnd: random.Random, *,
          controller: bool, warmup_s: float) -> list[RateStep]:
    """Rising offered rates until one is not kept up with twice in a row, then one bisection step below."""
    pub = start_publisher(rig, n, rates[0])
    sub: ManagedProcess | None = None
    try:
        if controller:
            proc = start_controller(rig, n)
            time.sleep(warmup_s)
        else:
            proc = sub = start_floor(rig, n)
        ladder = Ladder(n)
        steps: list[RateStep] = []

        def measure(rate: float) -> RateStep:
            steps.append(rate_step(rig, pub, sub, proc.pid, ladder, rate, seconds, rnd,
                                   controller=controller))
            return steps[-1]

        for rate in rates:
            kept = measure(rate).sustained or measure(rate).sustained  # a failed window gets a second
            if kept:
                continue
            passed = [s.offered for s in steps if s.sustained]
            if passed and rate - passed[-1] > BISECT_ABOVE:
                measure((rate + passed[-1]) / 2)
            break
        rig.stop_child(proc)
        return steps
    finally:
        rig.stop_child(pub)


def ceiling(steps: Sequence[RateStep], *, within_p99: bool) -> float:
    """The highest offered rate kept up (with the probes' p99 below SUSTAIN_P99_S if asked); 0 if none."""
    return max((s.offered for s in steps if (s.within_p99 if within_p99 else s.sustained)), default=0.0)


def print_sweep(system: str, racks: int, steps: Sequence[RateStep]) -> None:
    print(f"sustained rate, {system}, {racks} racks: offered msg/s, probes (lowerings) p50/p99 ms")
    print(f"{'offered':>8} {'sent/s':>8} {'recv/s':>8} {'p50':>8} {'p99':>8} {'growth':>7} {'miss':>5}"
          f" {'dropped':>8} {'CPU %':>6}  keeps up  p99<{SUSTAIN_P99_S * 1000:.0f}ms")
    for s in steps:
        recv = f"{s.received_per_s:.0f}" if s.received_per_s is not None else "-"
        print(f"{s.offered:>8.0f} {s.sent_per_s:>8.0f} {recv:>8} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f}"
              f" {s.growth_ms:>7.1f} {s.missed:>5} {s.dropped:>8} {s.cpu * 100:>6.1f}"
              f"  {'yes' if s.sustained else 'NO':>8}  {'yes' if s.within_p99 else 'no'}")


def print_ceilings(sweeps: dict[str, list[RateStep]]) -> None:
    floor_c, ctl_c = ceiling(sweeps[FLOOR], within_p99=False), ceiling(sweeps[CONTROLLER], within_p99=False)
    share = ctl_c / floor_c if floor_c else float("nan")
    print(f"ceilings (keeps up, no backlog): gmqtt floor {floor_c:.0f} msg/s, controller {ctl_c:.0f} msg/s"
          f" ({share:.2f}x of the floor)")
    floor_p, ctl_p = ceiling(sweeps[FLOOR], within_p99=True), ceiling(sweeps[CONTROLLER], within_p99=True)
    print(f"with the probes' p99 < {SUSTAIN_P99_S * 1000:.0f} ms: gmqtt floor {floor_p:.0f} msg/s,"
          f" controller {ctl_p:.0f} msg/s")


def sweeps_json(racks: int, sweeps: dict[str, list[RateStep]]) -> dict[str, Any]:
    """Every window of each sweep, and each system's ceilings."""
    return {
        "racks": racks,
        "steps": {system: [asdict(s) for s in steps] for system, steps in sweeps.items()},
        "ceilings_msg_per_s": {system: {"kept_up": ceiling(steps, within_p99=False),
                                        "p99_within": ceiling(steps, within_p99=True)}
                               for system, steps in sweeps.items()},
        "sustain_p99_ms": SUSTAIN_P99_S * 1000,
    }
