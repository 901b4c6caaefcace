"""Reaction latency, rack publish → first 0x351 with the lowered limit, and the CPU share, per roster size.

For each roster: the publisher sends every rack at 2 Hz; first the two bare floors (gmqtt, the
controller's client stack; and a raw socket), then the controller (after a warm-up as long as the
thermal window, so every rack carries a full window of samples as in steady operation) take the same
number of lowerings, spaced off the 2 Hz grid and the control tick. CPU
(utime + stime from /proc) is read over a quiet window before the lowerings, for the system and for the
rest of the rig in the same window.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from bench.reaction.rig import (
    Ladder,
    Rig,
    Trials,
    cpu_shares,
    percentile,
    react,
    start_controller,
    start_floor,
    start_publisher,
)
from bmslink.processes import ManagedProcess

RATE_PER_RACK_HZ = 2.0
FLOOR_SETTLE_S = 1.0
TRIAL_GAP_S = (0.03, 0.09)  # random pause between lowerings: off the 2 Hz grid and the control tick
FLOOR = "gmqtt floor"  # the controller's p99 is held to this one's
RAW_FLOOR = "raw floor"
CONTROLLER = "controller"


@dataclass
class Reaction:
    """One system's lowerings at one roster size."""

    system: str
    racks: int
    latencies_s: list[float]
    missed: int
    cpu: float | None = None  # share of one core over the quiet window, None when not measured
    others: dict[str, float] = field(default_factory=dict)  # CPU of the rest of the rig, same window

    def p(self, q: float) -> float:
        """Percentile ``q`` of the latencies, ms (NaN without any)."""
        return percentile(self.latencies_s, q) * 1000.0 if self.latencies_s else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system, "racks": self.racks, "n": len(self.latencies_s), "missed": self.missed,
            "p50_ms": self.p(50), "p99_ms": self.p(99), "max_ms": self.p(100),
            "cpu_share": self.cpu, "cpu_share_others": self.others,
            "latencies_ms": [round(s * 1000.0, 4) for s in self.latencies_s],
        }


def trials(rig: Rig, pub: ManagedProcess, ladder: Ladder, count: int, rnd: random.Random, *,
           controller: bool) -> Trials:
    out = Trials()
    for _ in range(count):
        out.add(react(rig, pub, ladder, rnd, controller=controller))
        time.sleep(rnd.uniform(*TRIAL_GAP_S))
    return out


def floor_reaction(rig: Rig, pub: ManagedProcess, ladder: Ladder, n: int, count: int, rnd: random.Random, *,
                   role: str, system: str, cpu_window_s: float) -> Reaction:
    floor = start_floor(rig, n, role)
    time.sleep(FLOOR_SETTLE_S)
    floor_cpu = cpu_shares(rig.pids(floor, pub), cpu_window_s) if cpu_window_s else {}
    got = trials(rig, pub, ladder, count, rnd, controller=False)
    rig.stop_child(floor)
    ladder.restore(pub, rig, controller=False)
    return Reaction(system, n, got.latencies_s, got.missed, floor_cpu.pop("system", None), floor_cpu)


def reaction_phase(rig: Rig, n: int, count: int, rnd: random.Random, *, warmup_s: float,
                   cpu_window_s: float) -> list[Reaction]:
    """[gmqtt floor, raw floor, controller] at ``n`` racks; CPU measured only when ``cpu_window_s`` is
    positive."""
    pub = start_publisher(rig, n, RATE_PER_RACK_HZ * n)
    try:
        ladder = Ladder(n)
        floors = [floor_reaction(rig, pub, ladder, n, count, rnd, role=role, system=system,
                                 cpu_window_s=cpu_window_s)
                  for role, system in (("floor", FLOOR), ("raw-floor", RAW_FLOOR))]
        started = time.monotonic()
        ctl = start_controller(rig, n)
        time.sleep(max(0.0, warmup_s - (time.monotonic() - started)))
        ctl_cpu = cpu_shares(rig.pids(ctl, pub), cpu_window_s) if cpu_window_s else {}
        got = trials(rig, pub, ladder, count, rnd, controller=True)
        rig.stop_child(ctl)
        ctl_share = ctl_cpu.pop("system", None)
        return [*floors, Reaction(CONTROLLER, n, got.latencies_s, got.missed, ctl_share, ctl_cpu)]
    finally:
        rig.stop_child(pub)


def print_reactions(reactions: list[Reaction]) -> None:
    print("reaction: rack publish -> first 0x351 with the lowered CCL (racks at 2 Hz), ms")
    print(f"{'racks':>6} {'system':<12} {'n':>5} {'miss':>5} {'p50':>8} {'p99':>8} {'max':>8}"
          f" {'p99/floor':>10} {'CPU % core':>11}")
    floor_p99 = {r.racks: r.p(99) for r in reactions if r.system == FLOOR}
    for r in reactions:
        ratio = ""
        if r.system == CONTROLLER and r.racks in floor_p99:
            ratio = f"{r.p(99) / floor_p99[r.racks]:.2f}x"
        cpu = f"{r.cpu * 100:.1f}" if r.cpu is not None else "-"
        print(f"{r.racks:>6} {r.system:<12} {len(r.latencies_s):>5} {r.missed:>5} {r.p(50):>8.2f}"
              f" {r.p(99):>8.2f} {r.p(100):>8.2f} {ratio:>10} {cpu:>11}")
    for r in reactions:
        if r.others:
            rest = ", ".join(f"{name} {share * 100:.1f} %" for name, share in r.others.items())
            print(f"  CPU beside the {r.system} ({r.racks} racks, same window): {rest}")


def reactions_json(reactions: list[Reaction]) -> dict[str, Any]:
    """The rows, and per roster size the controller's p99 over the gmqtt floor's (the target's ratio)
    and over the raw floor's."""
    def over(floor: str) -> dict[str, float]:
        floor_p99 = {r.racks: r.p(99) for r in reactions if r.system == floor}
        return {str(r.racks): r.p(99) / floor_p99[r.racks] for r in reactions
                if r.system == CONTROLLER and r.racks in floor_p99}

    return {"rows": [r.to_json() for r in reactions], "p99_over_floor": over(FLOOR),
            "p99_over_raw_floor": over(RAW_FLOOR)}
