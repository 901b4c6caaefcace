"""The controller's core timed in this process: N racks at 2 Hz, full ticks every 0.1 s with the thermal
window full, and an urgent cycle 10 ms after each tick with one rack changed.

The core is the incremental engine (``controller.core.engine.Engine``), given the racks' new inputs as
the service's rack table gives them; one reference ``step`` (every rack, every cycle) is timed beside
each tick for comparison. This process keeps Python's default collector settings (the controller
process raises them).
"""

from __future__ import annotations

import struct
import time
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from bench.reaction.reaction import RATE_PER_RACK_HZ
from bench.reaction.rig import controller_toml, percentile
from bench.reaction.wire import ladder_value, rack_ids, telemetry_template

TICK_S = 0.1
URGENT_AFTER_S = 0.01


@dataclass(frozen=True)
class StepCost:
    """Milliseconds per step at one roster size."""

    racks: int
    tick_p50_ms: float
    tick_p99_ms: float
    urgent_p50_ms: float
    urgent_p99_ms: float
    reference_p50_ms: float


def core_step_costs(n: int, warm_s: float, cycles: int) -> StepCost:
    """``cycles`` ticks and as many urgent cycles, timed after ``warm_s`` of simulated time."""
    from controller.core.engine import Engine  # noqa: PLC0415
    from controller.core.memory import CoreMemory  # noqa: PLC0415
    from controller.core.snapshot import RackInput, Snapshot  # noqa: PLC0415
    from controller.core.step import step  # noqa: PLC0415
    from shared.config import validate_config  # noqa: PLC0415
    from shared.controller_config import ControllerConfig  # noqa: PLC0415
    from shared.records import TelemetryDecoder  # noqa: PLC0415

    cfg = validate_config(tomllib.loads(controller_toml(1883, "127.0.0.1:1", n)), ControllerConfig, "<bench>")
    decoder = TelemetryDecoder()  # the controller's in-process form of the payload
    ids = rack_ids(n)
    telemetry = {}
    for rid in ids:
        payload, seq_off, ccl_off = telemetry_template(rid)
        raw = bytearray(payload)
        struct.pack_into(">Q", raw, seq_off, 1)
        struct.pack_into(">d", raw, ccl_off, ladder_value(n, 0))
        telemetry[rid] = decoder.decode(bytes(raw))
    period_s = 1.0 / RATE_PER_RACK_HZ
    next_s = {rid: i * period_s / n for i, rid in enumerate(ids)}
    inputs: dict[str, RackInput] = {}
    engine = Engine(cfg)
    tick: list[float] = []
    urgent: list[float] = []
    reference: list[float] = []
    k = 0
    while len(tick) < cycles:
        k += 1
        now = round(k * TICK_S, 6)
        for rid in ids:
            if next_s[rid] <= now:
                inputs[rid] = RackInput(rid, telemetry[rid], next_s[rid])
                engine.put(inputs[rid])
                next_s[rid] += period_s
        memory_before: CoreMemory = engine.memory
        t0 = time.perf_counter()
        engine.cycle(now, 1e9 + now)
        t1 = time.perf_counter()
        if now < warm_s:
            continue
        tick.append(t1 - t0)
        t0 = time.perf_counter()
        step(Snapshot(racks=dict(inputs)), cfg, now, 1e9 + now, memory_before)
        reference.append(time.perf_counter() - t0)
        rid = ids[k % n]
        inputs[rid] = RackInput(rid, telemetry[rid], now + URGENT_AFTER_S)
        t0 = time.perf_counter()
        engine.put(inputs[rid])
        engine.cycle(now + URGENT_AFTER_S, 1e9 + now)
        urgent.append(time.perf_counter() - t0)
    ms = [percentile(x, q) * 1000 for x in (tick, urgent) for q in (50, 99)]
    return StepCost(n, ms[0], ms[1], ms[2], ms[3], percentile(reference, 50) * 1000)


def print_step_costs(rows: list[StepCost]) -> None:
    print("core engine in-process, racks at 2 Hz, thermal window full (ms)")
    print(f"{'racks':>6} {'tick p50':>9} {'tick p99':>9} {'urgent p50':>11} {'urgent p99':>11}"
          f" {'step p50':>9}"
          "   (tick: ~0.2·N racks changed; urgent: 1 changed, 10 ms after a tick;"
          " step: the reference cycle, every rack)")
    for r in rows:
        print(f"{r.racks:>6} {r.tick_p50_ms:>9.2f} {r.tick_p99_ms:>9.2f} {r.urgent_p50_ms:>11.2f}"
              f" {r.urgent_p99_ms:>11.2f} {r.reference_p50_ms:>9.2f}")


def step_costs_json(rows: list[StepCost]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
