"""Hypothesis properties of ``step`` over random racks, configs and states.

Each example runs two cycles (t=0 and t=1) from the initial memory with the same rack
descriptions, so that the slew (which starts from 0) has had time to move, and checks the
second cycle's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.faults import FLAG_DIRECTION, Direction
from controller.core.memory import CoreMemory
from controller.core.snapshot import RackInput, Snapshot
from controller.core.step import step
from shared.cluster import ConsolidatedState, RackState
from shared.controller_config import ControllerConfig, CurrentPolicy
from shared.models import PROTECTION_FLAG_NAMES, ContactorState
from tests.controller.core.builders import WALL_OFFSET_S, config, rack_ids, telemetry

CHARGE_FLAGS = tuple(f for f, d in FLAG_DIRECTION.items() if d is Direction.CHARGE)
DISCHARGE_FLAGS = tuple(f for f, d in FLAG_DIRECTION.items() if d is Direction.DISCHARGE)


@dataclass(frozen=True)
class Spec:
    """One rack as an example describes it."""

    kind: str  # fresh | stale | never | invalid | comm_lost
    ccl: float
    dcl: float
    cvl: float
    dvl: float
    alarms: tuple[str, ...]
    contactor: ContactorState
    cell_max: float
    cell_min: float
    t_max: float
    voltage: float


limits = st.one_of(st.just(0.0), st.floats(0.0, 800.0), st.sampled_from([50.0, 100.0, 120.0]))
contactors = st.sampled_from([ContactorState.CLOSED] * 3 + [ContactorState.OPEN, ContactorState.UNKNOWN])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    cell_max = draw(st.floats(3.0, 3.6))
    t_max = draw(st.floats(15.0, 60.0))
    rare_alarms = st.lists(st.sampled_from(PROTECTION_FLAG_NAMES), max_size=2, unique=True)
    return Spec(
        kind=draw(st.sampled_from(["fresh"] * 6 + ["stale", "never", "invalid", "comm_lost"])),
        ccl=draw(limits),
        dcl=draw(limits),
        cvl=draw(st.one_of(st.just(0.0), st.floats(40.0, 60.0))),
        dvl=draw(st.floats(0.0, 58.0)),
        alarms=tuple(draw(st.one_of(st.just([]), st.just([]), rare_alarms))),
        contactor=draw(contactors),
        cell_max=cell_max,
        cell_min=draw(st.floats(2.7, cell_max)),
        t_max=t_max,
        voltage=draw(st.floats(0.0, 60.0)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ControllerConfig, list[Spec]]:
    n = draw(st.integers(1, 5))
    cfg = config(
        n,
        min_racks=draw(st.integers(1, n)),
        ccl_policy=draw(st.sampled_from(CurrentPolicy)),
        dcl_policy=draw(st.sampled_from(CurrentPolicy)),
        readmit_hold_s=draw(st.sampled_from([0.0, 0.5, 5.0])),
        readmit_ramp_s=draw(st.sampled_from([0.0, 2.0])),
        ramp_up_a_per_s=draw(st.sampled_from([1e6, 100.0])),
        max_charge_current_a=draw(st.sampled_from([1000.0, 3276.0, 150.0])),
    )
    return cfg, [draw(specs()) for _ in range(n)]


def rack_input(rid: str, spec: Spec, t: float, ccl: float | None = None) -> RackInput:
    if spec.kind == "never":
        return RackInput(rid)
    tel = telemetry(
        rid,
        ccl=spec.ccl if ccl is None else ccl,
        dcl=spec.dcl,
        cvl=spec.cvl,
        dvl=spec.dvl,
        alarms=spec.alarms,
        contactor=spec.contactor,
        cell_max=spec.cell_max,
        cell_min=spec.cell_min,
        t_max=spec.t_max,
        t_min=spec.t_max - 5.0 if spec.t_max > -35.0 else spec.t_max,
        voltage=spec.voltage,
        comm_lost=spec.kind == "comm_lost",
    )
    received = t - 100.0 if spec.kind == "stale" else t
    invalid_at = t if spec.kind == "invalid" else None
    return RackInput(rid, telemetry=tel, received_s=received, invalid_at_s=invalid_at, invalid_reason="bad")


def snap(specs_: list[Spec], t: float, raise_ccl: tuple[int, float] | None = None) -> Snapshot:
    racks = {}
    for i, (rid, spec) in enumerate(zip(rack_ids(len(specs_)), specs_, strict=True)):
        ccl = None
        if raise_ccl is not None and raise_ccl[0] == i:
            ccl = spec.ccl + raise_ccl[1]
        racks[rid] = rack_input(rid, spec, t, ccl)
    return Snapshot(racks=racks)


def two_cycles(cfg: ControllerConfig, specs_: list[Spec]) -> tuple[ConsolidatedState, CoreMemory]:
    _, memory = step(snap(specs_, 0.0), cfg, 0.0, WALL_OFFSET_S, CoreMemory.initial())
    state, memory = step(snap(specs_, 1.0), cfg, 1.0, WALL_OFFSET_S + 1.0, memory)
    return state, memory


def finite_numbers(state: ConsolidatedState) -> list[float]:
    dumped: dict[str, Any] = state.model_dump()
    values = [v for v in dumped.values() if isinstance(v, float)]
    values += [v for view in dumped["racks"] for v in view.values() if isinstance(v, float)]
    return values


def is_tenth(x: float) -> bool:
    return abs(x * 10 - round(x * 10)) < 1e-6


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


@PROPERTY_SETTINGS
@given(scenarios())
def test_outputs_are_bounded_finite_and_on_the_frame_grid(
    scenario: tuple[ControllerConfig, list[Spec]],
) -> None:
    cfg, specs_ = scenario
    s, _ = two_cycles(cfg, specs_)
    assert all(math.isfinite(v) for v in finite_numbers(s))
    assert 0.0 <= s.charge_current_limit_a <= min(cfg.aggregation.max_charge_current_a, 3276.7)
    assert 0.0 <= s.discharge_current_limit_a <= min(cfg.aggregation.max_discharge_current_a, 3276.7)
    assert all(is_tenth(v) for v in (s.charge_current_limit_a, s.discharge_current_limit_a,
                                     s.charge_voltage_limit_v, s.discharge_voltage_limit_v))
    assert s.charge_voltage_limit_v >= 0.1
    assert 0.0 <= s.discharge_voltage_limit_v < s.charge_voltage_limit_v
    assert s.charge_enabled == (s.charge_current_limit_a > 0)
    assert s.discharge_enabled == (s.discharge_current_limit_a > 0)
    assert [v.rack_id for v in s.racks] == rack_ids(len(specs_))


@PROPERTY_SETTINGS
@given(scenarios())
def test_bank_limit_never_exceeds_the_eligible_racks(scenario: tuple[ControllerConfig, list[Spec]]) -> None:
    cfg, specs_ = scenario
    s, _ = two_cycles(cfg, specs_)
    eligible = [spec for spec, view in zip(specs_, s.racks, strict=True) if view.eligible]
    assert len(eligible) == s.eligible_racks
    if not eligible:
        assert s.charge_current_limit_a == 0.0
        assert s.discharge_current_limit_a == 0.0
        return
    tolerance = 1e-6
    agg = cfg.aggregation
    assert s.charge_current_limit_a <= sum(e.ccl for e in eligible) + tolerance
    assert s.discharge_current_limit_a <= sum(e.dcl for e in eligible) + tolerance
    # N × min bounds every policy except ``sum``, which exceeds it by design (the opt-in).
    if agg.ccl_policy is not CurrentPolicy.SUM:
        assert s.charge_current_limit_a <= len(eligible) * min(e.ccl for e in eligible) + tolerance
    if agg.dcl_policy is not CurrentPolicy.SUM:
        assert s.discharge_current_limit_a <= len(eligible) * min(e.dcl for e in eligible) + tolerance


@PROPERTY_SETTINGS
@given(scenarios())
def test_zeroing_rules_always_zero(scenario: tuple[ControllerConfig, list[Spec]]) -> None:
    cfg, specs_ = scenario
    s, _ = two_cycles(cfg, specs_)
    # Alarms latch from every rack whose telemetry could be judged (current, valid, link up).
    judged = [spec for spec in specs_ if spec.kind == "fresh"]
    in_parallel = [spec for spec, view in zip(specs_, s.racks, strict=True) if view.state is RackState.OK]
    if s.eligible_racks < cfg.aggregation.min_racks:
        assert s.charge_current_limit_a == s.discharge_current_limit_a == 0.0
        assert s.cluster.not_enough_racks
    if any(set(spec.alarms) & set(CHARGE_FLAGS) for spec in judged):
        assert s.charge_current_limit_a == 0.0
    if any(set(spec.alarms) & set(DISCHARGE_FLAGS) for spec in judged):
        assert s.discharge_current_limit_a == 0.0
    if any(spec.ccl == 0.0 for spec in in_parallel):
        assert s.charge_current_limit_a == 0.0
    if any(spec.dcl == 0.0 for spec in in_parallel):
        assert s.discharge_current_limit_a == 0.0
    if any(spec.alarms for spec in judged):
        assert s.cluster.latched_alarm


@PROPERTY_SETTINGS
@given(scenarios(), st.data())
def test_raising_one_racks_limit_never_lowers_the_bank_limit(
    scenario: tuple[ControllerConfig, list[Spec]], data: st.DataObject
) -> None:
    cfg, specs_ = scenario
    index = data.draw(st.integers(0, len(specs_) - 1))
    extra = data.draw(st.floats(0.0, 500.0))
    _, memory = step(snap(specs_, 0.0), cfg, 0.0, WALL_OFFSET_S, CoreMemory.initial())
    base, _ = step(snap(specs_, 1.0), cfg, 1.0, WALL_OFFSET_S + 1.0, memory)
    raised, _ = step(snap(specs_, 1.0, (index, extra)), cfg, 1.0, WALL_OFFSET_S + 1.0, memory)
    assert raised.charge_current_limit_a >= base.charge_current_limit_a
    assert raised.discharge_current_limit_a == base.discharge_current_limit_a


@PROPERTY_SETTINGS
@given(scenarios())
def test_same_inputs_give_the_same_output(scenario: tuple[ControllerConfig, list[Spec]]) -> None:
    cfg, specs_ = scenario
    first_state, first_memory = two_cycles(cfg, specs_)
    second_state, second_memory = two_cycles(cfg, specs_)
    assert first_state == second_state
    assert first_memory == second_memory
    # And a memory can be reused: step does not change what it was given.
    again, _ = step(snap(specs_, 2.0), cfg, 2.0, WALL_OFFSET_S + 2.0, first_memory)
    once_more, _ = step(snap(specs_, 2.0), cfg, 2.0, WALL_OFFSET_S + 2.0, first_memory)
    assert again == once_more


def test_spec_replace_keeps_strategies_honest() -> None:
    # The monotonicity property relies on raising CCL only; a comm_lost rack publishes 0 whatever we ask.
    spec = Spec("comm_lost", 10.0, 10.0, 56.0, 44.0, (), ContactorState.CLOSED, 3.3, 3.2, 25.0, 52.0)
    tel = rack_input("r1", replace(spec, ccl=99.0), 0.0).telemetry
    assert tel is not None and tel.measurements is not None
    assert tel.measurements.charge_current_limit_a == 0.0
