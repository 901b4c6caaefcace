"""No chatter: identical (or nearly identical) input gives identical output once the ramps settle."""

from __future__ import annotations

from typing import Any

from controller.core.memory import CoreMemory
from controller.core.step import step
from shared.controller_config import AggregationConfig
from tests.controller.core.builders import WALL_OFFSET_S, config, rack_ids, snapshot, telemetry

DEFAULTS = AggregationConfig()


def _run(cycles: int, cell_noise_v: float = 0.0, temp_noise_c: float = 0.0) -> list[dict[str, Any]]:
    # The product defaults: hold 10 s, ramp 10 s, slew 10 A/s, thermal and taper enabled.
    cfg = config(
        4,
        readmit_hold_s=DEFAULTS.readmit_hold_s,
        readmit_ramp_s=DEFAULTS.readmit_ramp_s,
        ramp_up_a_per_s=DEFAULTS.ramp_up_a_per_s,
    )
    memory = CoreMemory.initial()
    out = []
    for i in range(cycles):
        t = i * 1.0
        sign = 1 if i % 2 else -1
        racks = {
            rid: telemetry(
                rid,
                seq=i,
                ccl=90.0 + 10 * n,
                # In the taper and thermal ranges, so that their hysteresis is what keeps them still.
                cell_max=3.42 + sign * cell_noise_v,
                t_max=43.0 + sign * temp_noise_c,
                t_min=30.0,
            )
            for n, rid in enumerate(rack_ids(4))
        }
        state, memory = step(snapshot(t, racks), cfg, t, WALL_OFFSET_S + t, memory)
        out.append(state.model_dump(exclude={"timestamp_s"}))
    return out


def test_a_thousand_identical_cycles_give_identical_output_after_the_ramp() -> None:
    out = _run(1000)
    assert out[100]["charge_current_limit_a"] > 0
    assert all(o == out[100] for o in out[100:])


def test_noise_inside_the_hysteresis_bands_does_not_move_the_limits() -> None:
    out = _run(300, cell_noise_v=0.004, temp_noise_c=0.3)
    limits = {(o["charge_current_limit_a"], o["discharge_current_limit_a"]) for o in out[100:]}
    assert len(limits) == 1
    assert out[100]["charge_current_limit_a"] > 0
