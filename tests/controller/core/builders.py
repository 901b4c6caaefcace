"""Builders for the pure-core tests: telemetry of racks r1..rN at site ``site-t``, configs, and cycle runs.

A *cycle table* is a list of ``Cycle`` rows: at time ``t`` the racks say this (``None``: nothing
heard), and the consolidated state must show that. ``run_table`` feeds the rows in order through
``step`` with one memory and checks every expectation, naming the row that failed. ``run`` and
``run_table`` drive the incremental engine beside it, told each input that changed, and require its
output to be the reference's in every cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.core.engine import Engine
from controller.core.memory import CoreMemory
from controller.core.snapshot import RackInput, Snapshot
from controller.core.step import step
from shared.cluster import ConsolidatedState
from shared.controller_config import AggregationConfig, ControllerConfig, RosterRack
from shared.models import (
    ContactorState,
    LinkStatus,
    ProtectionFlags,
    RackCommState,
    RackMeasurements,
    RackTelemetry,
    UnitLink,
)
from shared.records import TelemetryRecord, record_of

SITE = "site-t"
WALL_OFFSET_S = 1_700_000_000.0


def rack_ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(1, n + 1)]


def flags(*names: str) -> ProtectionFlags:
    return ProtectionFlags(**dict.fromkeys(names, True))


def telemetry(
    rack_id: str,
    *,
    ccl: float = 100.0,
    dcl: float = 100.0,
    cvl: float = 56.0,
    dvl: float = 44.0,
    soc: float = 50.0,
    soh: float = 100.0,
    voltage: float = 52.0,
    current: float = 0.0,
    cell_max: float = 3.30,
    cell_max_location: str = "cell 1",
    cell_min: float = 3.25,
    t_max: float = 25.0,
    t_min: float = 20.0,
    alarms: Sequence[str] = (),
    warnings: Sequence[str] = (),
    contactor: ContactorState = ContactorState.CLOSED,
    comm_lost: bool = False,
    poll_ms: int = 1000,
    capacity: float = 100.0,
    seq: int = 0,
    site: str = SITE,
) -> TelemetryRecord:
    """One rack's telemetry with neutral defaults (no derate applies, 100 A both ways): validated by
    the contract's models, as the controller holds it (a record, ``shared.records``)."""
    measurements = RackMeasurements(
        pack_voltage_v=voltage,
        current_a=current,
        soc_pct=soc,
        soh_pct=soh,
        cell_voltage_max_v=cell_max,
        cell_voltage_max_location=cell_max_location,
        cell_voltage_min_v=cell_min,
        cell_voltage_min_location="cell 2",
        temperature_max_c=t_max,
        temperature_max_location="sensor 1",
        temperature_min_c=t_min,
        temperature_min_location="sensor 4",
        charge_current_limit_a=0.0 if comm_lost else ccl,
        discharge_current_limit_a=0.0 if comm_lost else dcl,
        charge_voltage_limit_v=cvl,
        discharge_voltage_limit_v=dvl,
        alarms=flags(*alarms),
        warnings=flags(*warnings),
        contactor=contactor,
        capacity_ah=capacity,
    )
    return record_of(RackTelemetry(
        site_id=site,
        rack_id=rack_id,
        stream_id="5eed0000000000aa",
        seq=seq,
        timestamp_s=WALL_OFFSET_S,
        poll_interval_ms=poll_ms,
        comm_state=RackCommState.COMM_LOST if comm_lost else RackCommState.OK,
        measurements=measurements,
        units=(UnitLink(unit="bms", status=LinkStatus.TIMEOUT if comm_lost else LinkStatus.OK),),
    ))


def config(
    n: int = 4,
    *,
    capacities: Sequence[float] | None = None,
    stale_after_ms: int | None = None,
    **aggregation: Any,
) -> ControllerConfig:
    """A controller for racks r1..rN. Unless overridden: no re-admission hold or ramp, no isolation
    time (a lost rack is out at once; tests/controller/core/test_lost_racks.py sets one) and a slew
    fast enough to reach any target in one second, so that tables show the policy itself."""
    agg: dict[str, Any] = {
        "readmit_hold_s": 0.0, "readmit_ramp_s": 0.0, "isolation_s": 0.0, "ramp_up_a_per_s": 1e6
    }
    agg.update(aggregation)
    caps = capacities or [100.0] * n
    return ControllerConfig(
        site_id=SITE,
        node_id="ctl-a",
        roster=tuple(
            RosterRack(rack_id=rid, capacity_ah=cap, stale_after_ms=stale_after_ms)
            for rid, cap in zip(rack_ids(n), caps, strict=True)
        ),
        aggregation=AggregationConfig(**agg),
    )


RackSpec = TelemetryRecord | RackInput | None


def snapshot(
    t: float,
    racks: Mapping[str, RackSpec],
    *,
    unknown: Sequence[str] = (),
    clear_command_s: float | None = None,
    maintenance: frozenset[str] = frozenset(),
) -> Snapshot:
    """A snapshot at ``t``: telemetry counts as received at ``t``; a ``RackInput`` is taken as is;
    ``clear_command_s``: a clear of every rack given at that time; ``maintenance``: racks in it."""
    inputs: dict[str, RackInput] = {}
    for rid, spec in racks.items():
        if isinstance(spec, RackInput):
            inputs[rid] = spec
        elif spec is None:
            inputs[rid] = RackInput(rid)
        else:
            inputs[rid] = RackInput(rid, telemetry=spec, received_s=t)
    clears = {} if clear_command_s is None else dict.fromkeys(racks, clear_command_s)
    return Snapshot(racks=inputs, unknown_racks=tuple(unknown), clear_commands_s=clears,
                    maintenance=maintenance)


def all_racks(n: int, t: float | None = None, **kwargs: Any) -> dict[str, RackSpec]:
    """The same telemetry for r1..rN (``t`` only documents the row)."""
    del t
    return {rid: telemetry(rid, **kwargs) for rid in rack_ids(n)}


@dataclass(frozen=True)
class Cycle:
    """One row of a cycle table: input at ``t`` and the expected output (None: not checked)."""

    t: float
    racks: Mapping[str, RackSpec]
    ccl: float | None = None
    dcl: float | None = None
    cvl: float | None = None
    dvl: float | None = None
    states: str | None = None  # e.g. "ok ok stale ok", in roster order
    eligible: int | None = None
    shares: tuple[float, ...] | None = None
    cluster: tuple[str, ...] | None = None  # raised ClusterFlags
    alarms: tuple[str, ...] | None = None
    ccl_reason: Sequence[str] = ()  # substrings
    dcl_reason: Sequence[str] = ()
    unknown: Sequence[str] = ()
    clear_command_s: float | None = None
    maintenance: frozenset[str] = frozenset()
    note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # other ConsolidatedState fields


def run(
    cfg: ControllerConfig,
    snapshots: Sequence[tuple[float, Snapshot]],
    memory: CoreMemory | None = None,
) -> tuple[list[ConsolidatedState], CoreMemory]:
    mem = memory or CoreMemory.initial()
    beside = EngineBeside(cfg, mem)
    out: list[ConsolidatedState] = []
    for t, snap in snapshots:
        state, mem = step(snap, cfg, t, WALL_OFFSET_S + t, mem)
        beside.check(snap, t, state, mem)
        out.append(state)
    return out, mem


class EngineBeside:
    """The incremental engine run beside the reference: told each input that differs from the last
    snapshot's, it must give the very state and memory ``step`` gave."""

    def __init__(self, cfg: ControllerConfig, memory: CoreMemory) -> None:
        self.engine = Engine(cfg, memory)
        self._told: dict[str, RackInput] = {}

    def check(self, snap: Snapshot, t: float, state: ConsolidatedState, memory: CoreMemory) -> None:
        for rack_id, rack_input in snap.racks.items():
            if self._told.get(rack_id) != rack_input:
                self._told[rack_id] = rack_input
                self.engine.put(rack_input)
        forgotten = self._told.keys() - snap.racks.keys()
        if forgotten:  # a rack the snapshot no longer carries is never heard again, for both
            for rack_id in forgotten:
                del self._told[rack_id]
            self.engine = Engine(self.engine.config, self.engine.memory)
            for rack_input in self._told.values():
                self.engine.put(rack_input)
        got = self.engine.cycle(t, WALL_OFFSET_S + t, clear_commands_s=snap.clear_commands_s,
                                maintenance=snap.maintenance, unknown_racks=snap.unknown_racks)
        assert got == state, f"engine and reference differ at t={t}"
        assert self.engine.memory == memory, f"engine and reference memories differ at t={t}"


def run_table(cfg: ControllerConfig, rows: Sequence[Cycle]) -> list[ConsolidatedState]:
    mem = CoreMemory.initial()
    beside = EngineBeside(cfg, mem)
    results: list[ConsolidatedState] = []
    for i, row in enumerate(rows):
        snap = snapshot(row.t, row.racks, unknown=row.unknown, clear_command_s=row.clear_command_s,
                        maintenance=row.maintenance)
        state, mem = step(snap, cfg, row.t, WALL_OFFSET_S + row.t, mem)
        beside.check(snap, row.t, state, mem)
        results.append(state)
        _check(f"row {i} (t={row.t}{', ' + row.note if row.note else ''})", row, state)
    return results


def _check(where: str, row: Cycle, s: ConsolidatedState) -> None:
    got: dict[str, Any] = {}
    want: dict[str, Any] = {}

    def expect(name: str, expected: Any, actual: Any) -> None:
        if expected is not None:
            want[name], got[name] = expected, actual

    expect("ccl", row.ccl, s.charge_current_limit_a)
    expect("dcl", row.dcl, s.discharge_current_limit_a)
    expect("cvl", row.cvl, s.charge_voltage_limit_v)
    expect("dvl", row.dvl, s.discharge_voltage_limit_v)
    expect("states", row.states, " ".join(v.state.value for v in s.racks))
    expect("eligible", row.eligible, s.eligible_racks)
    expect("shares", row.shares, tuple(round(v.share, 6) for v in s.racks))
    expect("cluster", row.cluster, s.cluster.raised())
    expect("alarms", row.alarms, s.alarms.raised())
    for name, value in row.extra.items():
        expect(name, value, getattr(s, name))
    reasons = f"ccl_reason={s.ccl_reason!r}\n  dcl_reason={s.dcl_reason!r}"
    assert got == want, f"{where}: expected {want}, got {got}\n  {reasons}"
    for part in row.ccl_reason:
        assert part in s.ccl_reason, f"{where}: {part!r} not in ccl_reason {s.ccl_reason!r}"
    for part in row.dcl_reason:
        assert part in s.dcl_reason, f"{where}: {part!r} not in dcl_reason {s.dcl_reason!r}"
