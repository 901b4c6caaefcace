"""The incremental engine (``controller/core/engine.py``) computes exactly what the reference
``step`` computes, and the fast helpers it relies on equal the plain code they replace.

The proof: long seeded scenarios (racks publishing, falling silent and stale, coming back and
being held at their last limits until isolated, hold and ramp, comm loss, invalid payloads, alarms
that latch and are cleared by command, thermal samples leaving a short window, time standing still
or stepping back, a reload, strangers off the roster) driven through an ``Engine`` and through
``step`` side by side. The engine is told only what a shell tells it: each new input once (some held
back for later cycles, as routine payloads wait for the full cycle, some put twice), the clear
commands (of every rack or of some, in a new mapping only when one arrives) and a new config. Every
state and every memory must be equal, cycle by cycle. The fast helpers are
checked against the plain code (hypothesis, derandomized): ``ProtectionFlags.raised`` exactly,
the running thermal slope (``WindowSums``) to rounding.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import controller.core.engine
from controller.core.derates import WindowSums, _window_with, slope_per_s
from controller.core.engine import Engine
from controller.core.memory import CoreMemory
from controller.core.rack_outcome import rack_outcome
from controller.core.snapshot import RackInput, Snapshot
from controller.core.step import step
from controller.core.window import Window
from shared.cluster import ConsolidatedState, RackState
from shared.controller_config import ControllerConfig, CurrentPolicy
from shared.models import PROTECTION_FLAG_NAMES, ContactorState, ProtectionFlags
from tests.controller.core.builders import WALL_OFFSET_S, config, rack_ids, telemetry

DETERMINISTIC = settings(derandomize=True, max_examples=300, deadline=None)


# -- the fast helpers against the plain code ----------------------------------------------------


def test_raised_agrees_with_the_model_iteration_for_every_flag_set() -> None:
    for bits in range(2 ** len(PROTECTION_FLAG_NAMES)):
        flags = ProtectionFlags(
            **{name: bool(bits >> i & 1) for i, name in enumerate(PROTECTION_FLAG_NAMES)}
        )
        assert flags.raised() == tuple(name for name, value in flags if value)


times = st.floats(0.0, 1e7, allow_nan=False)
temperatures = st.floats(-40.0, 125.0, allow_nan=False)


@DETERMINISTIC
@given(
    times,
    st.lists(st.tuples(st.floats(0.01, 2.0), temperatures), min_size=1, max_size=400),
    st.sampled_from([1.0, 5.0, 30.0]),
)
def test_window_sums_give_the_least_squares_slope_over_a_long_run(
    start: float, steps: list[tuple[float, float]], window_s: float
) -> None:
    """Samples come and leave the window as in derate_rack; the running slope stays the two-pass one."""
    samples = Window()
    sums = None
    t = start
    for gap, value in steps:
        t += gap
        samples, sums = _window_with(samples, sums, (t, value), window_s)
        assert sums.n == len(samples)
        expected = slope_per_s(samples)
        # Gaps of 10 ms or more keep the spread of two samples far above the 1e-6 s² cut, where
        # either computation could round to the other side of it.
        assert sums.slope() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@DETERMINISTIC
@given(times, st.integers(2, 200), st.floats(0.01, 1.0), temperatures)
def test_a_flat_temperature_has_no_slope(start: float, n: int, gap: float, value: float) -> None:
    sums = WindowSums.of(tuple((start + i * gap, value) for i in range(n)))
    assert sums is not None
    assert sums.slope() == 0.0


# -- the engine against the reference -------------------------------------------------------------


@dataclass
class Rack:
    """One simulated rack: what it would publish next, and how it behaves."""

    rack_id: str
    poll_s: float
    seq: int = 0
    temperature_c: float = 30.0
    cell_max_v: float = 3.30
    ccl_a: float = 100.0
    cvl_v: float = 56.0
    dvl_v: float = 44.0
    alarms: tuple[str, ...] = ()
    comm_lost: bool = False
    contactor: ContactorState = ContactorState.CLOSED
    silent_until_s: float = -1.0
    next_publish_s: float = 0.0


def configs(n: int) -> list[ControllerConfig]:
    thermal = {"window_s": 2.0, "horizon_s": 20.0}
    # Isolation times shorter than the scenarios' silences and comm losses: lost racks are held
    # at their last limits, and released by time (controller/core/isolation.py).
    return [
        config(n, readmit_hold_s=0.0, readmit_ramp_s=0.0, isolation_s=1.0, thermal_derate=thermal),
        config(n, readmit_hold_s=1.5, readmit_ramp_s=2.0, min_racks=2, ramp_up_a_per_s=50.0,
               isolation_s=3.0, thermal_derate=thermal),
        config(n, stale_after_ms=1000, readmit_hold_s=0.5, readmit_ramp_s=0.0, isolation_s=0.5,
               ccl_policy=CurrentPolicy.SUM, dcl_policy=CurrentPolicy.MIN),
    ]


def _publish(rack: Rack, rnd: random.Random, t: float) -> RackInput:
    rack.seq += 1
    rack.temperature_c = min(60.0, max(20.0, rack.temperature_c + rnd.choice([-0.4, 0.0, 0.3, 0.9])))
    rack.cell_max_v = min(3.56, max(3.25, rack.cell_max_v + rnd.choice([-0.02, 0.0, 0.01, 0.03])))
    if rnd.random() < 0.1:
        rack.ccl_a = rnd.choice([0.0, 40.0, 80.0, 100.0, 120.0])
    if rnd.random() < 0.1:  # (CVL 0 V: no ceiling, charging stops)
        rack.cvl_v, rack.dvl_v = rnd.choice([(56.0, 44.0), (54.0, 44.0), (56.0, 47.0), (52.0, 46.0),
                                             (0.0, 0.0)])
    if rnd.random() < 0.05:
        rack.alarms = rnd.choice([(), (), ("cell_over_voltage",), ("internal_fault",), ("cell_imbalance",),
                                  ("discharge_over_temperature", "cell_imbalance")])
    if rnd.random() < 0.03:
        rack.comm_lost = not rack.comm_lost
    if rnd.random() < 0.03:
        rack.contactor = rnd.choice(list(ContactorState))
    tel = telemetry(
        rack.rack_id,
        seq=rack.seq,
        ccl=rack.ccl_a,
        cvl=rack.cvl_v,
        dvl=rack.dvl_v,
        t_max=rack.temperature_c,
        t_min=rack.temperature_c - 5.0,
        cell_max=rack.cell_max_v,
        cell_min=min(rack.cell_max_v, 3.2),
        alarms=rack.alarms,
        comm_lost=rack.comm_lost,
        contactor=rack.contactor,
        poll_ms=int(rack.poll_s * 1000),
    )
    # Mostly received just before the cycle; now and then stamped ahead of it (the shell's clock).
    received = t - rnd.uniform(0.0, 0.05) if rnd.random() < 0.95 else t + 0.01
    if rnd.random() < 0.04:  # a rejected payload after the good one: the rack is invalid
        return RackInput(rack.rack_id, tel, received, invalid_at_s=t, invalid_reason="bad crc")
    return RackInput(rack.rack_id, tel, received)


def scenario(seed: int, n: int = 6, cycles: int = 400) -> list[tuple[ControllerConfig, float, Snapshot]]:
    """Cycles of (config, now, snapshot); unchanged racks keep their ``RackInput`` object."""
    rnd = random.Random(seed)
    variants = configs(n)
    cfg = variants[seed % len(variants)]
    racks = [Rack(rid, poll_s=rnd.choice([0.2, 0.5, 1.0])) for rid in rack_ids(n)]
    inputs: dict[str, RackInput] = {}
    never_heard = racks[-1].rack_id if seed % 2 else None
    clears: Mapping[str, float] = MappingProxyType({})
    maintenance: frozenset[str] = frozenset()
    t = 0.0
    out = []
    for i in range(cycles):
        step_kind = rnd.random()
        if step_kind < 0.05:
            t -= 0.05  # time stepping back: the core must not assume a monotonic clock
        elif step_kind > 0.15:
            t += rnd.choice([0.01, 0.1, 0.1, 0.1, 0.3, 1.0])  # else: the same now again
        t = round(t, 6)
        for rack in racks:
            if rack.rack_id == never_heard:
                continue
            if rnd.random() < 0.01:
                rack.silent_until_s = t + rnd.choice([0.5, 2.0, 6.0])  # goes quiet, maybe stale
            if t >= rack.next_publish_s and t >= rack.silent_until_s:
                inputs[rack.rack_id] = _publish(rack, rnd, t)
                rack.next_publish_s = t + rack.poll_s
        if rnd.random() < 0.03:  # a clear of every rack, or of some
            named = [r.rack_id for r in racks if rnd.random() < 0.5] if rnd.random() < 0.5 else rack_ids(n)
            clears = MappingProxyType({**clears, **dict.fromkeys(named, t)})
        if rnd.random() < 0.02:  # a rack put in maintenance, or taken out of it
            maintenance ^= {rnd.choice(rack_ids(n))}
        if i == cycles // 2:
            # A reload: a new config object (equal or not) drops the cache once.
            cfg = cfg.model_copy(update={"aggregation": variants[(seed + 1) % len(variants)].aggregation})
        unknown = ("stranger",) if i % 97 == 5 else ()
        out.append((cfg, t, Snapshot(racks=dict(inputs), unknown_racks=unknown, clear_commands_s=clears,
                                     maintenance=maintenance)))
    return out


def tell(engine: Engine, cfg: ControllerConfig, snap: Snapshot,
         previous: dict[str, RackInput]) -> dict[str, RackInput]:
    """Tell ``engine`` what a shell would of this snapshot: a new config, and each input that is not
    the one of the ``previous`` snapshot; returns this snapshot's inputs (the next ``previous``)."""
    if cfg is not engine.config:
        engine.reconfigure(cfg)
    for rid, ri in snap.racks.items():
        if previous.get(rid) is not ri:
            engine.put(ri)
    return dict(snap.racks)


@dataclass
class Compared:
    """What a side-by-side run went through (so a test can show the comparison was worth something)."""

    cycles: int = 0
    recomputed: int = 0
    held: int = 0
    held_volts: int = 0
    strangers: int = 0
    maintenance: int = 0
    suspended: int = 0


def side_by_side(seed: int, *, hold_back: float, n: int = 6, cycles: int = 400) -> Compared:
    """Run ``scenario(seed)`` through an engine and through ``step``; assert every output equal."""
    rnd = random.Random(seed * 7919 + int(hold_back * 100))
    engine: Engine | None = None
    memory = CoreMemory.initial()
    given: dict[str, RackInput] = {}  # what the engine was told: the reference's snapshot
    pending: dict[str, RackInput] = {}  # new inputs not told yet (routine payloads between ticks)
    previous: dict[str, RackInput] = {}
    seen = Compared()
    for i, (cfg, t, snap) in enumerate(scenario(seed, n=n, cycles=cycles)):
        if engine is None:
            engine = Engine(cfg)
        elif cfg is not engine.config:
            engine.reconfigure(cfg)
        pending.update({rid: ri for rid, ri in snap.racks.items() if previous.get(rid) is not ri})
        previous = dict(snap.racks)
        if i % 89 == 7:  # a rack id off the roster, heard with a valid payload
            pending["zz-stranger"] = RackInput("zz-stranger", telemetry("zz-stranger"), t)
        for rid in sorted(pending):
            if rnd.random() >= hold_back:
                given[rid] = pending.pop(rid)
                engine.put(given[rid])
        if given and rnd.random() < 0.05:  # the same input told twice changes nothing
            engine.put(given[rnd.choice(sorted(given))])
        wall = WALL_OFFSET_S + t
        expected, memory = step(
            Snapshot(racks=dict(given), unknown_racks=snap.unknown_racks,
                     clear_commands_s=snap.clear_commands_s, maintenance=snap.maintenance),
            cfg, t, wall, memory,
        )
        got = engine.cycle(t, wall, clear_commands_s=snap.clear_commands_s, maintenance=snap.maintenance,
                           unknown_racks=snap.unknown_racks)
        assert got == expected, f"seed {seed} cycle {i} t={t}"
        assert engine.memory == memory, f"seed {seed} cycle {i} t={t}"
        seen.cycles += 1
        seen.held += "held: " in got.ccl_reason
        seen.held_volts += "(counting held" in got.cvl_reason + got.dvl_reason
        seen.strangers += "zz-stranger" in got.unknown_racks
        seen.maintenance += any(view.maintenance for view in got.racks)
        seen.suspended += any("suspended while out" in view.reason for view in got.racks)
    assert engine is not None
    seen.recomputed = engine.racks_recomputed
    return seen


@pytest.mark.parametrize("hold_back", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(12))
def test_the_engine_equals_the_reference_cycle_by_cycle(seed: int, hold_back: float) -> None:
    seen = side_by_side(seed, hold_back=hold_back)
    # Worth something only if the engine left racks alone, and recomputed some, and lost racks were
    # held (and so released by time) along the way, some deciding CVL or DVL.
    assert 0 < seen.recomputed < seen.cycles * 6
    assert seen.held > 0
    assert seen.held_volts > 0
    assert seen.strangers > 0
    assert seen.maintenance > 0


def test_the_comparison_covers_suspended_latches_of_racks_in_maintenance() -> None:
    # Over all seeds together: racks in maintenance with their contactor open and latches held.
    assert sum(side_by_side(seed, hold_back=0.0).suspended for seed in range(12)) > 0


def test_an_unchanged_rack_is_left_alone_and_a_changed_or_aging_one_recomputed() -> None:
    cfg = config(3, thermal_derate={"window_s": 30.0})
    tel = {rid: telemetry(rid, poll_ms=500) for rid in rack_ids(3)}
    engine = Engine(cfg)
    for rid in rack_ids(3):
        engine.put(RackInput(rid, tel[rid], 0.0))
    engine.cycle(0.0, WALL_OFFSET_S)
    assert engine.racks_recomputed == 3
    engine.put(RackInput("r2", tel["r2"], 0.1))
    engine.cycle(0.1, WALL_OFFSET_S + 0.1)
    assert engine.racks_recomputed == 4  # r2 only
    engine.cycle(0.2, WALL_OFFSET_S + 0.2)
    assert engine.racks_recomputed == 4  # nothing new, nothing due
    # Past the stale limit (3 × 500 ms) of r1 and r3 they are recomputed by time alone, and are stale.
    state = engine.cycle(1.55, WALL_OFFSET_S + 1.55)
    assert engine.racks_recomputed == 6
    assert [v.state.value for v in state.racks] == ["stale", "ok", "stale"]


def test_an_urgent_cycle_is_the_reference_at_its_instant() -> None:
    """A lowering counts at once, and a rack that went stale meanwhile is judged stale in the same
    cycle: an urgent cycle never grants more than the reference (here 40 A, not 2 × 40 A)."""
    cfg = config(2)
    engine = Engine(cfg)
    a, b = telemetry("r1", ccl=100.0, poll_ms=500), telemetry("r2", ccl=100.0, poll_ms=500)
    engine.put(RackInput("r1", a, 10.0))
    engine.put(RackInput("r2", b, 10.0))
    assert engine.cycle(10.0, 0.0).eligible_racks == 2
    # 2 s later r2 (stale after 1.5 s) has gone quiet; r1 reports a lower limit.
    engine.put(RackInput("r1", telemetry("r1", ccl=40.0, poll_ms=500, seq=1), 12.0))
    urgent = engine.cycle(12.0, 0.0)
    assert [v.state for v in urgent.racks] == [RackState.OK, RackState.STALE]
    assert urgent.charge_current_limit_a == 40.0


def test_a_cycle_that_raised_is_followed_by_the_reference_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in one rack's computation fails that cycle (the shell fails safe); the engine then
    starts again in full, and the next cycle equals the reference over the same inputs."""
    cycles = scenario(5, cycles=80)
    engine = Engine(cycles[0][0])
    memory = CoreMemory.initial()
    previous: dict[str, RackInput] = {}
    calls = 0

    def flaky(**kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 150:
            raise RuntimeError("injected")
        return rack_outcome(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(controller.core.engine, "rack_outcome", flaky)
    raised = 0
    for i, (cfg, t, snap) in enumerate(cycles):
        previous = tell(engine, cfg, snap, previous)
        try:
            got = engine.cycle(t, WALL_OFFSET_S + t, clear_commands_s=snap.clear_commands_s,
                               maintenance=snap.maintenance, unknown_racks=snap.unknown_racks)
        except RuntimeError:
            raised += 1
            continue  # the reference did not run this cycle either: the memory stays
        expected, memory = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
        assert got == expected, f"cycle {i}"
        assert engine.memory == memory
    assert raised == 1


def test_the_engine_is_deterministic() -> None:
    def run() -> list[ConsolidatedState]:
        engine: Engine | None = None
        states = []
        previous: dict[str, RackInput] = {}
        for cfg, t, snap in scenario(7, cycles=120):
            engine = engine or Engine(cfg)
            previous = tell(engine, cfg, snap, previous)
            states.append(engine.cycle(t, WALL_OFFSET_S + t, clear_commands_s=snap.clear_commands_s,
                                       maintenance=snap.maintenance))
        return states

    assert run() == run()
