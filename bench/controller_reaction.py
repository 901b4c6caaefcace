"""Controller reaction benchmark: rack publish → CAN frame with the lowered limit, next to bare floors.

Everything runs on 127.0.0.1, in separate processes, on one Mosquitto broker and one python-can-remote
CAN bridge (virtual bus): the raw-socket publisher; the bare floors (a gmqtt subscriber, the controller's
own client stack, and a raw-socket one, each sending one 0x351 per lowering) or the real ``bmslink
controller``; and this process recording 0x351 frames.
The parts are in ``bench/reaction/`` (rig, reaction, rates, step cost); the design, the targets and the
latest figures are in ``docs/performance.md``.

Phases, each skippable: ``step`` (the core's step in-process), ``reaction`` (latency and CPU share per
roster size, floors then controller), ``rate`` (the sustained-rate sweep over ``--rate-racks`` racks).
Each prints its table as it ends and a summary at the end; ``--json PATH`` also writes every result (with
the commit, the machine and the arguments) to PATH, at the end or when the run is interrupted.

Run: ``.venv/bin/python bench/controller_reaction.py [--racks 10 100 1000] [--trials 300] [--quick]
[--skip step reaction rate] [--json results.json]``. ``--quick`` is a smoke run. It stops every process
it starts. ``--controller-gc A,B,C`` is a what-if: the same controller with the garbage collector's
thresholds raised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ruff: noqa: E402  (imports after the path set-up above)
from bench.reaction.rates import RateStep, print_ceilings, print_sweep, sweep, sweeps_json
from bench.reaction.reaction import (
    CONTROLLER,
    FLOOR,
    Reaction,
    print_reactions,
    reaction_phase,
    reactions_json,
)
from bench.reaction.rig import Rig
from bench.reaction.step_cost import StepCost, core_step_costs, print_step_costs, step_costs_json

# bench/fuzz_payloads.py builds its packets with these; they live in bench.reaction.wire now.
from bench.reaction.wire import connect_packet, publish_packet

__all__ = ["connect_packet", "main", "publish_packet"]

LINE = "-" * 100
QUICK_WARM_S = 3.0
FULL_WARM_S = 32.0  # the thermal window (30 s) and a margin: every rack carries a full window
STEP_CYCLES = 100
RATE_WARMUP_MAX_S = 10.0


def commit() -> str:
    """The checked-out commit, ``+dirty`` when the tree has changes (``unknown`` outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class Results:
    """Everything measured so far, printed as tables and written as JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.step_costs: list[StepCost] = []
        self.reactions: list[Reaction] = []
        self.sweeps: dict[str, list[RateStep]] = {}
        self.complete = False

    def print_summary(self) -> None:
        print("\n=== summary (same broker, same CAN bridge, one run) ===")
        if self.args.controller_gc:
            print(f"(what-if: the controller ran with gc.set_threshold({self.args.controller_gc}))")
        if self.step_costs:
            print(LINE)
            print_step_costs(self.step_costs)
        if self.reactions:
            print(LINE)
            print_reactions(self.reactions)
        for system, steps in self.sweeps.items():
            print(LINE)
            print_sweep(system, self.args.rate_racks, steps)
        if FLOOR in self.sweeps and CONTROLLER in self.sweeps:
            print(LINE)
            print_ceilings(self.sweeps)
        print(LINE)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = finite({
            "bench": "controller_reaction",
            "complete": self.complete,
            "commit": commit(),
            "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "args": vars(self.args) | {"json": str(self.args.json) if self.args.json else None},
            "step_cost": step_costs_json(self.step_costs),
            "reaction": reactions_json(self.reactions),
            "rate": sweeps_json(self.args.rate_racks, self.sweeps),
        })
        return data

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        print(f"results written to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--racks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--trials", type=int, default=300, help="lowerings per system and roster size")
    parser.add_argument("--warmup-s", type=float, default=FULL_WARM_S,
                        help="controller warm-up (fills the thermal window)")
    parser.add_argument("--cpu-window-s", type=float, default=10.0,
                        help="CPU shares are read over this quiet window, at the largest roster only")
    # At least 1 msg/s per rack: the payload says it polls every 500 ms, stale after 1.5 s.
    parser.add_argument("--rate-racks", type=int, default=1000, help="roster of the sustained-rate test")
    parser.add_argument("--rates", type=float, nargs="+", help="offered to the gmqtt floor, msg/s",
                        default=[2000, 4000, 6000, 7000, 8000, 9000, 10000, 11000, 12000, 14000])
    parser.add_argument("--controller-rates", type=float, nargs="+", help="offered to the controller, msg/s",
                        default=[1000, 2000, 3000, 4000, 6000, 8000, 10000, 11000, 12000, 14000])
    parser.add_argument("--rate-seconds", type=float, default=5.0, help="measured window per offered rate")
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "reaction", "rate"])
    parser.add_argument("--quick", action="store_true", help="fewer trials, short warm-up (a smoke run)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every result to PATH as JSON")
    parser.add_argument("--controller-gc", metavar="A,B,C", default=None,
                        help="what-if: gc.set_threshold(A, B, C) in the controller process")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.warmup_s, args.cpu_window_s, args.rate_seconds = 30, QUICK_WARM_S, 3.0, 2.0
    return args


def run(args: argparse.Namespace, results: Results) -> None:
    rnd = random.Random(args.seed)
    if "step" not in args.skip:
        warm_s = QUICK_WARM_S if args.quick else FULL_WARM_S
        results.step_costs = [core_step_costs(n, warm_s=warm_s, cycles=STEP_CYCLES) for n in args.racks]
        print(LINE)
        print_step_costs(results.step_costs)
    if "reaction" in args.skip and "rate" in args.skip:
        return
    with tempfile.TemporaryDirectory(prefix="bench-reaction-") as tmp:
        rig = Rig(Path(tmp), controller_gc=args.controller_gc)
        try:
            rig.start()
            if "reaction" not in args.skip:
                for n in args.racks:
                    window = args.cpu_window_s if n == max(args.racks) else 0.0
                    phase = reaction_phase(rig, n, args.trials, rnd, warmup_s=args.warmup_s,
                                           cpu_window_s=window)
                    results.reactions.extend(phase)
                    print(LINE)
                    print_reactions(phase)
            if "rate" not in args.skip:
                for system, rates in ((FLOOR, args.rates), (CONTROLLER, args.controller_rates)):
                    results.sweeps[system] = sweep(rig, args.rate_racks, rates, args.rate_seconds, rnd,
                                                   controller=system == CONTROLLER,
                                                   warmup_s=min(args.warmup_s, RATE_WARMUP_MAX_S))
                    print(LINE)
                    print_sweep(system, args.rate_racks, results.sweeps[system])
        finally:
            rig.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(args)
    try:
        run(args, results)
        results.complete = True
        results.print_summary()
    finally:
        if args.json is not None:
            results.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
