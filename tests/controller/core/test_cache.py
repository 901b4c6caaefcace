"""The per-rack cache of ``step`` and the fast paths behind it change nothing but the time taken.

``CoreMemory.cache`` lets a cycle reuse the outcome of every rack whose input object, memory
and time thresholds (staleness, full admission, thermal window) are unchanged. The proof here:
long seeded scenarios, built the way ``RackTable`` builds snapshots (an unchanged rack keeps
its ``RackInput`` object), run twice through the same ``step``: once with the memory as
returned (cached) and once with the cache stripped before every cycle (uncached). Every state
and every memory must be equal, cycle by cycle. The scenarios cover what the cache keys on:
racks falling stale and coming back (held at their last limits, voltages included, until
isolated), hold and ramp, comm loss, invalid payloads, alarms that latch and are cleared by
command, thermal samples leaving a short window, time standing still
or stepping back, a reload to a new config object. The fast helpers are checked against the
plain code they replace (hypothesis, derandomized): ``ProtectionFlags.raised`` and ``fully_admitted``
exactly, the running thermal slope (``WindowSums``) to rounding.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.admission import admit, fully_admitted
from controller.core.derates import WindowSums, _window_with, slope_per_s
from controller.core.engine import CoreMemory, Prepared, prepare, step
from controller.core.snapshot import RackInput, Snapshot
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


@DETERMINISTIC
@given(
    st.floats(0.0, 1e6, allow_nan=False),
    st.floats(0.0, 1e6, allow_nan=False),
    st.sampled_from([0.0, 0.5, 10.0, 3600.0]),
    st.sampled_from([0.0, 2.0, 10.0]),
)
def test_fully_admitted_is_admit_giving_the_full_share(
    since: float, now: float, hold: float, ramp: float
) -> None:
    a = admit(since, True, now, hold, ramp)
    assert fully_admitted(since, now, hold, ramp) == (a.eligible and a.share == 1.0 and not a.note)


# -- cached step == uncached step ---------------------------------------------------------------


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
    clear_s: float | None = None
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
        if rnd.random() < 0.03:
            clear_s = t
        if i == cycles // 2:
            # A reload: a new config object (equal or not) drops the cache once.
            cfg = cfg.model_copy(update={"aggregation": variants[(seed + 1) % len(variants)].aggregation})
        unknown = ("stranger",) if i % 97 == 5 else ()
        out.append((cfg, t, Snapshot(racks=dict(inputs), unknown_racks=unknown, clear_command_s=clear_s)))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_cached_steps_equal_uncached_steps_cycle_by_cycle(seed: int) -> None:
    cached = uncached = CoreMemory.initial()
    reused = computed = held = held_volts = 0
    for i, (cfg, t, snap) in enumerate(scenario(seed)):
        state_c, next_cached = step(snap, cfg, t, WALL_OFFSET_S + t, cached)
        state_u, next_uncached = step(snap, cfg, t, WALL_OFFSET_S + t, replace(uncached, cache=None))
        assert state_c == state_u, f"seed {seed} cycle {i} t={t}"
        held += "held: " in state_c.ccl_reason
        held_volts += "(counting held" in state_c.cvl_reason + state_c.dvl_reason
        assert next_cached == next_uncached, f"seed {seed} cycle {i} t={t}"
        assert next_cached.racks == next_uncached.racks
        if cached.cache is not None and next_cached.cache is not None:
            before, after = cached.cache.entries, next_cached.cache.entries
            same = sum(1 for rid, e in after.items() if before.get(rid) is e)
            reused, computed = reused + same, computed + len(after) - same
        cached, uncached = next_cached, next_uncached
    # The comparison is only worth something if the cache was used, and not for everything, and
    # lost racks were held (and so released by time) along the way, some deciding CVL or DVL.
    assert reused > 0
    assert computed > 0
    assert held > 0
    assert held_volts > 0


def test_a_memory_reused_twice_gives_what_a_fresh_computation_gives() -> None:
    """Branching from one memory (the cache inside it is never mutated)."""
    cycles = scenario(3, cycles=60)
    memory = CoreMemory.initial()
    for cfg, t, snap in cycles[:40]:
        _, memory = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
    for cfg, t, snap in itertools.islice(cycles, 40, 60):
        a, _ = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
        b, _ = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
        c, _ = step(snap, cfg, t, WALL_OFFSET_S + t, replace(memory, cache=None))
        assert a == b == c


def test_an_unchanged_rack_is_reused_and_a_changed_one_recomputed() -> None:
    cfg = config(3, thermal_derate={"window_s": 30.0})
    tel = {rid: telemetry(rid, poll_ms=500) for rid in rack_ids(3)}
    inputs = {rid: RackInput(rid, tel[rid], 0.0) for rid in rack_ids(3)}
    _, memory = step(Snapshot(racks=dict(inputs)), cfg, 0.0, WALL_OFFSET_S, CoreMemory.initial())
    assert memory.cache is not None
    first = memory.cache.entries
    inputs["r2"] = RackInput("r2", tel["r2"], 0.1)
    state, memory = step(Snapshot(racks=dict(inputs)), cfg, 0.1, WALL_OFFSET_S + 0.1, memory)
    assert memory.cache is not None
    second = memory.cache.entries
    assert second["r1"] is first["r1"]
    assert second["r3"] is first["r3"]
    assert second["r2"] is not first["r2"]
    # Past the stale limit (3 × 500 ms) the unchanged racks are recomputed, and are stale.
    state, memory = step(Snapshot(racks=dict(inputs)), cfg, 1.55, WALL_OFFSET_S + 1.55, memory)
    assert memory.cache is not None
    assert memory.cache.entries["r1"] is not second["r1"]
    assert [v.state.value for v in state.racks] == ["stale", "ok", "stale"]


def test_a_cycle_with_the_cache_is_deterministic() -> None:
    def run() -> list[ConsolidatedState]:
        memory = CoreMemory.initial()
        states = []
        for cfg, t, snap in scenario(7, cycles=120):
            state, memory = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
            states.append(state)
        return states

    assert run() == run()


def test_inputs_only_cycle_recomputes_changed_racks_and_leaves_time_to_the_full_cycle() -> None:
    """An urgent cycle: a lowering counts at once; a rack that went stale meanwhile waits for the full
    cycle (it was counted by the last full cycle already), which then equals an uncached step."""
    cfg = config(2)
    a, b = telemetry("r1", ccl=100.0, poll_ms=500), telemetry("r2", ccl=100.0, poll_ms=500)
    racks = {"r1": RackInput("r1", a, 10.0), "r2": RackInput("r2", b, 10.0)}
    state, memory = step(Snapshot(racks=dict(racks)), cfg, 10.0, 0.0, CoreMemory.initial())
    assert state.eligible_racks == 2
    # 2 s later r2 (stale after 1.5 s) has gone quiet; r1 reports a lower limit.
    racks["r1"] = RackInput("r1", telemetry("r1", ccl=40.0, poll_ms=500, seq=1), 12.0)
    urgent, memory_u = step(Snapshot(racks=dict(racks)), cfg, 12.0, 0.0, memory, inputs_only=True)
    assert urgent.charge_current_limit_a == 80.0  # 2 × min(40, 100): the lowering is in
    assert [v.state for v in urgent.racks] == [RackState.OK, RackState.OK]  # r2 judged at the next full
    full, _ = step(Snapshot(racks=dict(racks)), cfg, 12.05, 0.0, memory_u)
    uncached, _ = step(Snapshot(racks=dict(racks)), cfg, 12.05, 0.0, replace(memory_u, cache=None))
    assert [v.state for v in full.racks] == [RackState.OK, RackState.STALE]
    assert full.charge_current_limit_a == 40.0
    assert full == uncached


@pytest.mark.parametrize("seed", range(12))
def test_a_cycle_told_what_changed_equals_one_that_compares_every_rack(seed: int) -> None:
    """``Snapshot.changed`` (the shell naming the racks whose input may differ from the last cycle's)
    is a shortcut only: the cycle it allows, inputs-only or full (which also re-checks what time
    moves: staleness, hold and ramp), is the one that compares every rack's input itself. The
    memories go on told, so the shortcut runs on its own cache from cycle to cycle."""
    rnd = random.Random(seed)
    memory = CoreMemory.initial()
    previous: Snapshot | None = None
    told = {True: 0, False: 0}
    for i, (cfg, t, snap) in enumerate(scenario(seed, cycles=300)):
        inputs_only = previous is not None and rnd.random() < 0.4
        if previous is None:
            _, memory = step(snap, cfg, t, WALL_OFFSET_S + t, memory)
        else:
            changed = frozenset(
                r for r in snap.racks.keys() | previous.racks.keys()
                if previous.racks.get(r) is not snap.racks.get(r)
            )
            told_snap = replace(snap, changed=changed)
            a, memory_a = step(told_snap, cfg, t, WALL_OFFSET_S + t, memory, inputs_only=inputs_only)
            b, memory_b = step(snap, cfg, t, WALL_OFFSET_S + t, memory, inputs_only=inputs_only)
            assert a == b, f"seed {seed} cycle {i} t={t} inputs_only={inputs_only}"
            assert memory_a == memory_b and memory_a.racks == memory_b.racks
            told[inputs_only] += 1
            memory = memory_a
        previous = snap
    assert told[True] > 50 and told[False] > 100


@pytest.mark.parametrize("seed", range(12))
def test_a_cycle_taking_prepared_outcomes_equals_one_that_computes_them(seed: int) -> None:
    """``prepare`` (a rack's outcome computed in idle time, before the cycle that takes its input in)
    is a shortcut only. Outcomes are prepared as the shell would, between two cycles from the memory
    of the last one, and also as it must not be trusted to: from an older memory, for a clear
    command that has changed since, at a time after the cycle's. The cycle taking whatever it will
    of them equals the cycle computing every rack itself, state and memory, inputs-only or full,
    told what changed or not; and the memories go on with the prepared outcomes in their cache."""
    rnd = random.Random(seed)
    memory = older = CoreMemory.initial()
    previous: Snapshot | None = None
    previous_t: float | None = None
    offered = taken = 0
    for i, (cfg, t, full_snap) in enumerate(scenario(seed, cycles=300)):
        snap = full_snap
        prepared: dict[str, Prepared] = {}
        for rid, rack_input in snap.racks.items():
            if previous is not None and previous.racks.get(rid) is rack_input and rnd.random() < 0.8:
                continue  # mostly the racks with a new input, as the shell does
            at = t if previous_t is None or previous_t > t else rnd.uniform(previous_t, t)
            if rnd.random() < 0.05:
                at = t + rnd.choice([0.01, 0.5, 2.0])  # prepared "after" the cycle
            base = older if rnd.random() < 0.1 else memory
            clear = snap.clear_command_s if rnd.random() < 0.95 else t - 0.25
            ahead = prepare(rack_input, cfg, at, base, clear_command_s=clear)
            if ahead is not None:
                prepared[rid] = ahead
        offered += len(prepared)
        inputs_only = previous is not None and rnd.random() < 0.3
        if previous is not None and rnd.random() < 0.5:
            before, now_in = previous.racks, snap.racks
            changed = frozenset(
                r for r in now_in.keys() | before.keys() if before.get(r) is not now_in.get(r)
            )
            snap = replace(snap, changed=changed)
        wall = WALL_OFFSET_S + t
        a, memory_a = step(snap, cfg, t, wall, memory, inputs_only=inputs_only, prepared=prepared)
        b, memory_b = step(snap, cfg, t, wall, memory, inputs_only=inputs_only)
        assert a == b, f"seed {seed} cycle {i} t={t} inputs_only={inputs_only}"
        assert memory_a == memory_b and memory_a.racks == memory_b.racks, f"seed {seed} cycle {i}"
        assert memory_a.cache is not None
        taken += sum(1 for rid, e in memory_a.cache.entries.items()
                     if rid in prepared and prepared[rid].entry is e)
        older, memory, previous, previous_t = memory, memory_a, snap, t
    # Worth something only if outcomes were both taken and refused.
    assert taken > 50 and offered - taken > 25, f"{taken} of {offered} prepared outcomes taken"


def test_a_prepared_outcome_is_taken_by_the_next_full_cycle() -> None:
    """The shell's case: a routine payload prepared between two ticks is taken as is."""
    cfg = config(3, thermal_derate={"window_s": 30.0})
    inputs = {rid: RackInput(rid, telemetry(rid, poll_ms=500), 0.0) for rid in rack_ids(3)}
    _, memory = step(Snapshot(racks=dict(inputs)), cfg, 0.0, WALL_OFFSET_S, CoreMemory.initial())
    inputs["r2"] = RackInput("r2", telemetry("r2", poll_ms=500, seq=1, ccl=90.0), 0.05)
    ahead = prepare(inputs["r2"], cfg, 0.05, memory, clear_command_s=None)
    assert ahead is not None
    told = Snapshot(racks=dict(inputs), changed=frozenset({"r2"}))
    state, after = step(told, cfg, 0.1, WALL_OFFSET_S + 0.1, memory, prepared={"r2": ahead})
    assert after.cache is not None and after.cache.entries["r2"] is ahead.entry
    assert state == step(Snapshot(racks=dict(inputs)), cfg, 0.1, WALL_OFFSET_S + 0.1, memory)[0]
    # Not for another input object, nor past the rack's staleness threshold (3 × 500 ms).
    again = RackInput("r2", inputs["r2"].telemetry, 0.05)
    _, other = step(Snapshot(racks={**inputs, "r2": again}), cfg, 0.1, WALL_OFFSET_S + 0.1, memory,
                    prepared={"r2": ahead})
    assert other.cache is not None and other.cache.entries["r2"] is not ahead.entry
    late_now = 1.6
    _, late = step(Snapshot(racks=dict(inputs)), cfg, late_now, WALL_OFFSET_S + late_now, memory,
                   prepared={"r2": ahead})
    assert late.cache is not None and late.cache.entries["r2"] is not ahead.entry
