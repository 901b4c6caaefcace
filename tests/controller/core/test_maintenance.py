"""Maintenance mode in the core (controller/core/maintenance.py): a rack in maintenance adds no capacity
and does not count toward min_racks, its limits still bind while it may be in parallel, and once its
contactor is reported open it is left alone (its alarms ignored, its latches kept but suspended).

Three racks at 100 A under n_times_min: 300 A with all three, 200 A with two. Each table runs the reference
cycle and the incremental engine side by side (``run_table``).
"""

from __future__ import annotations

from typing import Any

from shared.models import ContactorState
from tests.controller.core.builders import Cycle, RackSpec, config, run_table, telemetry

OPEN = ContactorState.OPEN
M3 = frozenset({"r3"})


def _racks(**r3: Any) -> dict[str, RackSpec]:
    return {"r1": telemetry("r1"), "r2": telemetry("r2"), "r3": telemetry("r3", **r3)}


def test_a_rack_in_maintenance_adds_nothing_but_its_limits_bind_while_in_parallel() -> None:
    states = run_table(config(3), [
        Cycle(0.0, _racks(), note="the slew starts from 0"),
        Cycle(0.5, _racks(), ccl=300.0, eligible=3),
        Cycle(1.0, _racks(), maintenance=M3, ccl=200.0, eligible=2, states="ok ok ok",
              shares=(1.0, 1.0, 0.0), note="in maintenance, contactor closed: no share"),
        Cycle(2.0, _racks(ccl=40.0), maintenance=M3, ccl=80.0, eligible=2,
              note="its lower limit still binds: 2 × 40"),
        Cycle(3.0, _racks(ccl=40.0, contactor=OPEN), maintenance=M3, ccl=200.0, eligible=2,
              states="ok ok disconnected", note="contactor open: out of the bank"),
        Cycle(4.0, _racks(contactor=OPEN, alarms=("internal_fault", "cell_over_voltage")), maintenance=M3,
              ccl=200.0, dcl=200.0, alarms=(), cluster=(), note="its alarms are not the bank's"),
        Cycle(5.0, _racks(), ccl=300.0, eligible=3, note="out of maintenance (no hold configured here)"),
    ])
    assert [v.maintenance for v in states[2].racks] == [False, False, True]
    assert "in maintenance" in states[2].racks[2].reason
    assert "its alarms ignored" in states[5].racks[2].reason
    assert not states[6].racks[2].maintenance


def test_leaving_maintenance_goes_through_the_hold_and_the_ramp() -> None:
    cfg = config(3, readmit_hold_s=2.0, readmit_ramp_s=2.0)
    run_table(cfg, [
        Cycle(0.0, _racks(), maintenance=M3, ccl=0.0, eligible=0, note="cold start: every rack in its hold"),
        Cycle(2.0, _racks(), maintenance=M3, ccl=0.0, eligible=2, shares=(0.0, 0.0, 0.0)),
        Cycle(4.0, _racks(), maintenance=M3, ccl=200.0, eligible=2, shares=(1.0, 1.0, 0.0)),
        Cycle(100.0, _racks(), maintenance=M3, ccl=200.0, shares=(1.0, 1.0, 0.0),
              note="however long it has been ok, it has not been admitted"),
        Cycle(101.0, _racks(), ccl=200.0, eligible=2, shares=(1.0, 1.0, 0.0), note="out: its hold starts"),
        Cycle(103.0, _racks(), ccl=200.0, eligible=3, shares=(1.0, 1.0, 0.0)),
        Cycle(104.0, _racks(), ccl=250.0, eligible=3, shares=(1.0, 1.0, 0.5)),
        Cycle(105.0, _racks(), ccl=300.0, shares=(1.0, 1.0, 1.0)),
    ])


def test_a_rack_in_maintenance_does_not_count_toward_min_racks() -> None:
    run_table(config(3, min_racks=3), [
        Cycle(0.0, _racks()),
        Cycle(0.5, _racks(), ccl=300.0),
        Cycle(1.0, _racks(contactor=OPEN), maintenance=M3, ccl=0.0, dcl=0.0, eligible=2,
              cluster=("not_enough_racks",), ccl_reason=["not enough racks (2 of min 3; 1 in maintenance)"]),
    ])


def test_latches_are_suspended_only_while_the_rack_is_known_out_and_never_released() -> None:
    run_table(config(3), [
        Cycle(-1.0, _racks()),
        Cycle(0.0, _racks(alarms=("cell_over_voltage",)), ccl=0.0, dcl=300.0,
              cluster=("latched_alarm",), note="latched: charging stops"),
        Cycle(1.0, _racks(), ccl=0.0, cluster=("latched_alarm",), note="condition gone, still latched"),
        Cycle(2.0, _racks(), maintenance=M3, ccl=0.0, cluster=("latched_alarm",),
              note="in maintenance with its contactor closed: the latch binds"),
        Cycle(3.0, _racks(contactor=OPEN), maintenance=M3, ccl=200.0, cluster=(),
              note="contactor open: the latch is suspended, the others charge"),
        Cycle(4.0, _racks(), maintenance=M3, ccl=0.0, cluster=("latched_alarm",),
              note="contactor closed again: it binds again"),
        Cycle(5.0, _racks(contactor=OPEN), maintenance=M3, ccl=200.0),
        Cycle(6.0, _racks(), ccl=0.0, cluster=("latched_alarm",), note="out of maintenance: still latched"),
        Cycle(7.0, _racks(), clear_command_s=7.0, ccl=300.0, cluster=(), note="an operator's clear"),
    ])


def test_an_alarm_seen_while_out_is_not_latched_but_one_present_when_it_closes_is() -> None:
    run_table(config(3), [
        Cycle(-1.0, _racks()),
        Cycle(0.0, _racks(contactor=OPEN, alarms=("charge_over_temperature",)), maintenance=M3, ccl=200.0),
        Cycle(1.0, _racks(alarms=("charge_over_temperature",)), maintenance=M3, ccl=0.0,
              cluster=("latched_alarm",), note="closed with the alarm present: it latches"),
        Cycle(2.0, _racks(), maintenance=M3, ccl=0.0, cluster=("latched_alarm",)),
    ])


def test_a_rack_in_maintenance_lost_while_in_parallel_is_held_until_isolation() -> None:
    lost: dict[str, RackSpec] = {"r1": telemetry("r1"), "r2": telemetry("r2"), "r3": None}
    run_table(config(3, isolation_s=10.0), [
        Cycle(-1.0, _racks()),
        Cycle(0.0, _racks(ccl=40.0), maintenance=M3, ccl=80.0),
        Cycle(1.0, lost, maintenance=M3, ccl=80.0, states="ok ok stale",
              ccl_reason=["held"], note="it may still be in parallel"),
        Cycle(12.0, lost, maintenance=M3, ccl=200.0, note="isolation time passed: out"),
    ])
