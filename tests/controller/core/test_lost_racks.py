"""A rack lost from sight while in parallel never raises the bank's limits (controller/core/isolation.py).

Two racks at 40 A and 100 A give 2 × 40 = 80 A (n_times_min). When the 40 A rack goes stale, invalid or
comm-lost it may still be in parallel with its contactor closed, taking its share: the bank holds at what
the racks last known in parallel allow (80 A, not 100 A) until the rack is known out (its agent reports the
contactor open, or its isolation time has passed since it was lost), and then ramps. Decreases still apply
at once. The same for the voltage range: a held rack keeps its last ceiling in CVL and its last floor in DVL
(which are not ramped: they move in the cycle that releases it). Tables first, then the safety invariant as
a hypothesis property over random rack events and time, the incremental engine checked against the
reference cycle.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from controller.core.engine import Engine
from controller.core.memory import CoreMemory
from controller.core.snapshot import RackInput, Snapshot
from controller.core.step import step
from shared.cluster import ConsolidatedState, RackState
from shared.controller_config import ControllerConfig, CurrentPolicy
from shared.models import ContactorState
from shared.records import TelemetryRecord
from tests.controller.core.builders import (
    WALL_OFFSET_S,
    Cycle,
    RackSpec,
    config,
    rack_ids,
    run_table,
    telemetry,
)

OPEN, UNKNOWN = ContactorState.OPEN, ContactorState.UNKNOWN
WEAK = telemetry("r1", ccl=40.0, dcl=40.0)
STRONG = telemetry("r2", ccl=100.0, dcl=100.0)


def heard(tel: TelemetryRecord, at_s: float) -> RackInput:
    """A rack's last valid payload, received at ``at_s`` (and nothing since)."""
    return RackInput(tel.rack_id, telemetry=tel, received_s=at_s)


def rejected(tel: TelemetryRecord, at_s: float) -> RackInput:
    """A valid payload received just before ``at_s``, then a rejected one at ``at_s``: the rack is invalid."""
    return RackInput(tel.rack_id, telemetry=tel, received_s=at_s - 0.25, invalid_at_s=at_s,
                     invalid_reason="cell_voltage_min_v exceeds cell_voltage_max_v")


def pair(r1: RackSpec = WEAK, r2: RackSpec = STRONG) -> dict[str, RackSpec]:
    return {"r1": r1, "r2": r2}


def with_roster(cfg: ControllerConfig, **per_rack: dict[str, Any]) -> ControllerConfig:
    """``cfg`` with roster entries overridden, e.g. ``r1={"isolation_s": 2.0}`` (validated again)."""
    dumped = cfg.model_dump()
    for entry in dumped["roster"]:
        entry.update(per_rack.get(entry["rack_id"], {}))
    return ControllerConfig.model_validate(dumped)


# -- tables --------------------------------------------------------------------------------------


def test_weakest_rack_goes_stale_bank_holds_until_isolation_then_ramps() -> None:
    cfg = config(2, stale_after_ms=1000, isolation_s=5.0, ramp_up_a_per_s=20.0)
    last = pair(heard(WEAK, 5.0))  # r1's payloads stop after t=5: stale once older than 1 s
    states = run_table(cfg, [
        Cycle(0, pair(), ccl=0.0),
        Cycle(4, pair(), ccl=80.0, dcl=80.0, ccl_reason=["CCL 80.0 A = r1 40.0 A × 2 eligible"]),
        Cycle(5, pair(), ccl=80.0),
        Cycle(6, last, ccl=80.0, states="ok ok"),
        Cycle(6.5, last, ccl=80.0, dcl=80.0, states="stale ok", eligible=1,
              ccl_reason=["CCL 80.0 A = r1 40.0 A × 2 eligible (counting held r1 at its last limits)",
                          "; held: r1 lost 0.0 s ago, isolation in 5.0 s"],
              dcl_reason=["held: r1 lost 0.0 s ago, isolation in 5.0 s"], note="lost: held, not 100 A"),
        Cycle(9, last, ccl=80.0, dcl=80.0, ccl_reason=["held: r1 lost 2.5 s ago, isolation in 2.5 s"]),
        Cycle(11.4, last, ccl=80.0, dcl=80.0, note="isolation not yet passed"),
        Cycle(11.5, last, ccl=82.0, dcl=82.0, states="stale ok",
              ccl_reason=["CCL 82.0 A = r2 100.0 A × 1 eligible, rising at 20 A/s toward 100.0 A"],
              note="isolation passed: out of the bank, the limits ramp"),
        Cycle(12.5, last, ccl=100.0, dcl=100.0),
    ])
    assert states[5].racks[0].reason == (
        "stale: no valid telemetry for 4.0 s (limit 1.0 s); held: r1 lost 2.5 s ago, isolation in 2.5 s, "
        "last in parallel at CCL 40.0 A, DCL 40.0 A, CVL 56.0 V, DVL 44.0 V"
    )
    assert (states[5].racks[0].charge_current_limit_a, states[5].racks[0].eligible) == (0.0, False)
    assert "held" not in states[7].ccl_reason + states[7].racks[0].reason


def test_contactor_reported_open_releases_the_hold_and_comm_lost_does_not() -> None:
    cfg = config(2, stale_after_ms=1000, isolation_s=30.0, ramp_up_a_per_s=10.0)
    states = run_table(cfg, [
        Cycle(0, pair(), ccl=0.0),
        Cycle(8, pair(), ccl=80.0),
        Cycle(9, pair(heard(WEAK, 7.5)), ccl=80.0, states="stale ok", ccl_reason=["held: r1 lost 0.0 s ago"]),
        # The agent is heard again but says the BMS link is lost (limits 0): still not known out.
        Cycle(9.5, pair(telemetry("r1", comm_lost=True)), ccl=80.0, dcl=80.0, states="comm_lost ok",
              ccl_reason=["held: r1 lost 0.5 s ago, isolation in 29.5 s"]),
        Cycle(10, pair(telemetry("r1", ccl=40.0, dcl=40.0, contactor=OPEN)), ccl=85.0, dcl=85.0,
              states="disconnected ok", ccl_reason=["rising at 10 A/s toward 100.0 A"],
              note="contactor open: released at once, ramping"),
        Cycle(11.5, pair(telemetry("r1", ccl=40.0, dcl=40.0, contactor=OPEN)), ccl=100.0, dcl=100.0),
    ])
    assert states[4].racks[0].reason == "disconnected: contactor open"
    assert "held" not in states[4].ccl_reason


@pytest.mark.parametrize("readmit_s", [0.0, 2.0])
def test_invalid_payloads_mixed_with_valid_never_flap_above_the_held_value(readmit_s: float) -> None:
    """Every other payload of the weakest rack rejected: the bank stays at what it last allowed with the rack
    in parallel (80 A), and with a re-admission hold it only falls (the returning rack binds with share 0)."""
    cfg = config(2, isolation_s=30.0, ramp_up_a_per_s=10.0, readmit_hold_s=readmit_s,
                 readmit_ramp_s=readmit_s)
    rows = [Cycle(t, pair()) for t in range(13)]
    rows.append(Cycle(13, pair(), ccl=80.0, dcl=80.0))
    flapping = [13 + 0.5 * i for i in range(1, 41)]
    rows += [
        Cycle(t, pair(rejected(WEAK, t) if i % 2 == 0 else WEAK), states="invalid ok" if i % 2 == 0 else None)
        for i, t in enumerate(flapping)
    ]
    rows.append(Cycle(40, pair(), ccl=80.0, dcl=80.0, note="steady again: back after the hold and ramp"))
    states = run_table(cfg, rows)
    during = [(s.charge_current_limit_a, s.discharge_current_limit_a) for s in states[14:-1]]
    assert max(c for c, _ in during) <= 80.0 and max(d for _, d in during) <= 80.0
    ccl = [c for c, _ in during]
    assert all(b <= a for a, b in itertools.pairwise(ccl)), ccl  # never rises while it flaps
    if readmit_s == 0.0:
        assert set(ccl) == {80.0}
    else:
        assert ccl[-1] == 40.0  # 40 A × (1 + share 0 of the rack in its re-admission hold)
    assert "held: r1" in states[14].ccl_reason


def test_a_held_rack_last_at_zero_keeps_that_direction_at_zero() -> None:
    zero_charge = telemetry("r1", ccl=0.0, dcl=40.0)
    lost = pair(heard(zero_charge, 0.5))
    run_table(config(2, stale_after_ms=1000, isolation_s=5.0), [
        Cycle(0, pair(zero_charge)),
        Cycle(1, pair(zero_charge), ccl=0.0, dcl=80.0,
              ccl_reason=["CCL 0 A: r1 0.0 A with contactor closed"]),
        Cycle(2, lost, ccl=0.0, dcl=80.0, states="stale ok",
              ccl_reason=["CCL 0 A: r1 0.0 A with contactor closed", "held: r1 lost 0.0 s ago"]),
        Cycle(6.9, lost, ccl=0.0, dcl=80.0),
        Cycle(7, lost, ccl=100.0, dcl=100.0, note="isolation passed"),
    ])


def test_decreases_of_other_racks_apply_at_once_while_a_rack_is_held() -> None:
    lost = heard(WEAK, 0.5)
    run_table(config(2, stale_after_ms=1000, isolation_s=30.0), [
        Cycle(0, pair()),
        Cycle(1, pair(), ccl=80.0, dcl=80.0),
        Cycle(2, pair(lost), ccl=80.0, dcl=80.0, states="stale ok"),
        Cycle(3, pair(lost, telemetry("r2", ccl=30.0)), ccl=30.0, dcl=80.0,
              ccl_reason=["CCL 30.0 A = r2 30.0 A × 1 eligible; held: r1"], note="falls at once"),
        Cycle(4, pair(lost), ccl=80.0, dcl=80.0, note="back up only to what the held rack allows"),
        Cycle(5, pair(lost, telemetry("r2", dcl=20.0)), ccl=80.0, dcl=20.0),
        Cycle(6, pair(lost), ccl=80.0, dcl=80.0),
    ])


def test_each_policy_holds_what_its_racks_last_in_parallel_allow() -> None:
    """n_times_min and min are held at the weak rack's last limit; a sum only falls (the held rack adds
    nothing it could lower). Losing the strong rack lowers every policy at once."""
    expected = {
        # policy: (both in parallel, weak r1 lost, strong r2 lost)
        CurrentPolicy.N_TIMES_MIN: (80.0, 80.0, 40.0),
        CurrentPolicy.SUM: (140.0, 100.0, 40.0),
        CurrentPolicy.MIN: (40.0, 40.0, 40.0),
    }
    for policy, (both, weak_lost, strong_lost) in expected.items():
        cfg = config(2, stale_after_ms=1000, isolation_s=5.0, ccl_policy=policy, dcl_policy=policy)
        run_table(cfg, [
            Cycle(0, pair()),
            Cycle(1, pair(), ccl=both, dcl=both, note=policy),
            Cycle(2, pair(heard(WEAK, 0.5)), ccl=weak_lost, dcl=weak_lost, note=policy),
            Cycle(7, pair(heard(WEAK, 0.5)), ccl=100.0, dcl=100.0, note=f"{policy}: released"),
        ])
        run_table(cfg, [
            Cycle(0, pair()),
            Cycle(1, pair(), ccl=both),
            Cycle(2, pair(r2=heard(STRONG, 0.5)), ccl=strong_lost, dcl=strong_lost, note=policy),
        ])


def test_two_racks_held_at_once_are_judged_one_at_a_time() -> None:
    """A 100 A rack in parallel, a 40 A and a 100 A rack lost together: if only the 40 A one is still in
    parallel the bank may carry 2 × 40 = 80 A. Both added at once would allow 3 × 40 = 120 A."""
    weak, strong = telemetry("r2", ccl=40.0), telemetry("r3")
    racks: dict[str, RackSpec] = {"r1": telemetry("r1"), "r2": weak, "r3": strong}
    lost: dict[str, RackSpec] = {**racks, "r2": heard(weak, 0.5), "r3": heard(strong, 0.5)}
    states = run_table(config(3, stale_after_ms=1000, isolation_s=5.0), [
        Cycle(0, racks),
        Cycle(1, racks, ccl=120.0, dcl=300.0),
        Cycle(2, lost, ccl=80.0, dcl=100.0, states="ok stale stale",
              ccl_reason=["r2 40.0 A × 2 eligible (counting held r2 at its last limits)"]),
    ])
    assert "held: r2" in states[2].ccl_reason and "held: r3" in states[2].ccl_reason


def test_a_bank_reason_names_the_first_held_racks_and_counts_the_others() -> None:
    fresh = {rid: telemetry(rid) for rid in rack_ids(6)}
    lost: dict[str, RackSpec] = {rid: heard(tel, 0.5) for rid, tel in fresh.items() if rid != "r6"}
    states = run_table(config(6, stale_after_ms=1000, isolation_s=30.0), [
        Cycle(0, dict(fresh)),
        Cycle(1, dict(fresh), ccl=600.0),
        Cycle(2, {**lost, "r6": fresh["r6"]}, ccl=100.0, states="stale stale stale stale stale ok",
              note="the others were as strong: their loss lowers the bank at once"),
    ])
    assert states[2].ccl_reason == (
        "CCL 100.0 A = r6 100.0 A × 1 eligible; held: r1 lost 0.0 s ago, isolation in 30.0 s; "
        "held: r2 lost 0.0 s ago, isolation in 30.0 s; held: r3 lost 0.0 s ago, isolation in 30.0 s; "
        "2 more held"
    )
    assert "held: r5 lost" in states[2].racks[4].reason


def test_the_roster_isolation_time_overrides_the_aggregation_default() -> None:
    cfg = with_roster(config(2, stale_after_ms=1000, isolation_s=30.0), r1={"isolation_s": 2.0})
    lost = pair(heard(WEAK, 0.5))
    run_table(cfg, [
        Cycle(0, pair()),
        Cycle(1, pair(), ccl=80.0),
        Cycle(2, lost, ccl=80.0, ccl_reason=["held: r1 lost 0.0 s ago, isolation in 2.0 s"]),
        Cycle(3.9, lost, ccl=80.0),
        Cycle(4, lost, ccl=100.0),
    ])


def test_comm_lost_and_unknown_contactor_racks_are_held_too() -> None:
    unknown = telemetry("r1", ccl=40.0, dcl=40.0, contactor=UNKNOWN)
    run_table(config(2, isolation_s=30.0), [
        Cycle(0, pair(None), note="never seen in parallel since the start: nothing to hold"),
        Cycle(1, pair(None), ccl=100.0, states="stale ok"),
        Cycle(2, pair(unknown), ccl=80.0, dcl=80.0, states="ok ok"),
        Cycle(3, pair(telemetry("r1", comm_lost=True)), ccl=80.0, dcl=80.0, states="comm_lost ok",
              note="its agent publishes 0 A, but the rack may still be in parallel at its last limits"),
    ])


def test_a_returning_rack_replaces_its_held_limits_and_goes_through_readmission() -> None:
    cfg = config(2, stale_after_ms=1000, isolation_s=30.0, readmit_hold_s=2.0, readmit_ramp_s=2.0)
    back = telemetry("r1", ccl=60.0, dcl=60.0)
    run_table(cfg, [
        Cycle(0, pair()),
        Cycle(5, pair(), ccl=80.0),
        Cycle(6, pair(heard(WEAK, 4.5)), ccl=80.0, states="stale ok"),
        Cycle(7, pair(back), ccl=60.0, shares=(0.0, 1.0), ccl_reason=["r1 in hold"],
              note="its new limit binds at once, its share waits for the hold"),
        Cycle(10, pair(back), ccl=90.0, shares=(0.5, 1.0)),
        Cycle(11, pair(back), ccl=120.0, shares=(1.0, 1.0)),
    ])


# -- the voltage limits: a held rack keeps its ceiling and floor in the bank's ----------------------

# r1 has the lowest ceiling and r2 the highest floor: the bank is 54.0 V / 46.0 V while both are in parallel.
LOW_CEILING = telemetry("r1", cvl=54.0, dvl=42.0)
HIGH_FLOOR = telemetry("r2", cvl=56.0, dvl=46.0)


def test_lowest_ceiling_rack_goes_stale_cvl_holds_until_isolation_then_rises_at_once() -> None:
    """CVL and DVL are not slewed (controller/core/bank.py): once the rack is out of the bank, CVL rises
    in that cycle."""
    cfg = config(2, stale_after_ms=1000, isolation_s=5.0)
    lost = pair(heard(LOW_CEILING, 1.5), HIGH_FLOOR)
    states = run_table(cfg, [
        Cycle(0, pair(LOW_CEILING, HIGH_FLOOR)),
        Cycle(1, pair(LOW_CEILING, HIGH_FLOOR), cvl=54.0, dvl=46.0),
        Cycle(3, lost, cvl=54.0, dvl=46.0, states="stale ok", note="lost: held at 54.0 V, not 56.0 V"),
        Cycle(7.9, lost, cvl=54.0, dvl=46.0, note="isolation not yet passed"),
        Cycle(8, lost, cvl=56.0, dvl=46.0, states="stale ok", note="isolation passed: CVL rises at once"),
    ])
    assert states[2].cvl_reason == (
        "CVL 54.0 V = lowest ceiling r1 54.0 V (counting held r1 at its last limits); "
        "held: r1 lost 0.0 s ago, isolation in 5.0 s"
    )
    assert states[2].dvl_reason == (
        "DVL 46.0 V = highest floor r2 46.0 V; held: r1 lost 0.0 s ago, isolation in 5.0 s"
    )
    assert "held" not in states[4].cvl_reason + states[4].dvl_reason
    assert states[2].racks[0].reason.endswith(
        "last in parallel at CCL 100.0 A, DCL 100.0 A, CVL 54.0 V, DVL 42.0 V"
    )


def test_highest_floor_rack_goes_stale_dvl_holds_until_isolation_then_falls() -> None:
    cfg = config(2, stale_after_ms=1000, isolation_s=5.0)
    lost = pair(LOW_CEILING, heard(HIGH_FLOOR, 1.5))
    states = run_table(cfg, [
        Cycle(0, pair(LOW_CEILING, HIGH_FLOOR)),
        Cycle(1, pair(LOW_CEILING, HIGH_FLOOR), cvl=54.0, dvl=46.0),
        Cycle(3, lost, cvl=54.0, dvl=46.0, states="ok stale", note="lost: held at 46.0 V, not 42.0 V"),
        Cycle(7.9, lost, cvl=54.0, dvl=46.0),
        Cycle(8, lost, cvl=54.0, dvl=42.0, note="isolation passed"),
    ])
    assert states[2].dvl_reason == (
        "DVL 46.0 V = highest floor r2 46.0 V (counting held r2 at its last limits); "
        "held: r2 lost 0.0 s ago, isolation in 5.0 s"
    )
    assert states[2].cvl_reason == (
        "CVL 54.0 V = lowest ceiling r1 54.0 V; held: r2 lost 0.0 s ago, isolation in 5.0 s"
    )


@pytest.mark.parametrize("lost_rack", ["r1", "r2"])
def test_contactor_reported_open_releases_the_voltage_hold_at_once(lost_rack: str) -> None:
    cfg = config(2, stale_after_ms=1000, isolation_s=30.0)
    tel: dict[str, TelemetryRecord | RackInput | None] = {"r1": LOW_CEILING, "r2": HIGH_FLOOR}
    lost = {**tel, lost_rack: heard(LOW_CEILING if lost_rack == "r1" else HIGH_FLOOR, 1.5)}
    last = (LOW_CEILING if lost_rack == "r1" else HIGH_FLOOR).measurements
    assert last is not None
    opened = {**tel, lost_rack: telemetry(lost_rack, contactor=OPEN, cvl=last.charge_voltage_limit_v,
                                          dvl=last.discharge_voltage_limit_v)}
    released = (56.0, 46.0) if lost_rack == "r1" else (54.0, 42.0)
    states = run_table(cfg, [
        Cycle(0, tel),
        Cycle(1, tel, cvl=54.0, dvl=46.0),
        Cycle(3, lost, cvl=54.0, dvl=46.0),
        Cycle(4, lost, cvl=54.0, dvl=46.0),
        Cycle(4.5, opened, cvl=released[0], dvl=released[1], note="contactor open: out of the bank"),
    ])
    assert "held" not in states[4].cvl_reason + states[4].dvl_reason


def test_a_held_rack_last_without_a_usable_ceiling_keeps_charging_stopped() -> None:
    """A rack in parallel reporting CVL 0 V stops charging; held, it keeps doing so until it is known out."""
    no_charge = telemetry("r1", cvl=0.0, dvl=0.0, voltage=51.0)
    lost = pair(heard(no_charge, 0.5))
    run_table(config(2, stale_after_ms=1000, isolation_s=5.0), [
        Cycle(0, pair(no_charge)),
        Cycle(1, pair(no_charge), ccl=0.0, dcl=200.0, cvl=51.5, ccl_reason=["r1 reports CVL 0.0 V"]),
        Cycle(2, lost, ccl=0.0, dcl=100.0, cvl=52.0, dvl=44.0, states="stale ok",
              ccl_reason=["CCL 0 A: held r1 last reported CVL 0.0 V; held: r1 lost 0.0 s ago"]),
        Cycle(6.9, lost, ccl=0.0, cvl=52.0),
        Cycle(7, lost, ccl=100.0, dcl=100.0, cvl=56.0, dvl=44.0, note="isolation passed"),
    ])


def test_a_held_floor_above_the_ceiling_in_parallel_keeps_dvl_below_cvl() -> None:
    high = telemetry("r1", cvl=58.0, dvl=55.0)
    low = telemetry("r2", cvl=54.0, dvl=44.0)
    states = run_table(config(2, stale_after_ms=1000, isolation_s=5.0), [
        Cycle(0, pair(high, low)),
        Cycle(1, pair(high, low), cvl=54.0, dvl=53.9),
        Cycle(2, pair(heard(high, 0.5), low), cvl=54.0, dvl=53.9, states="stale ok"),
        Cycle(7, pair(heard(high, 0.5), low), cvl=54.0, dvl=44.0, note="isolation passed"),
    ])
    assert states[2].dvl_reason == (
        "DVL 53.9 V = highest floor r1 55.0 V (counting held r1 at its last limits); lowered to stay below "
        "CVL 54.0 V; held: r1 lost 0.0 s ago, isolation in 5.0 s"
    )


def test_held_racks_bound_the_voltages_when_no_rack_is_in_parallel() -> None:
    """With no rack in parallel CVL is held where the bank is (the last pack voltage) and DVL at the last
    floor of the racks in parallel; no held rack's last ceiling is exceeded nor its floor undercut."""
    r1 = telemetry("r1", cvl=51.0, dvl=47.0, voltage=53.0)
    r2 = telemetry("r2", cvl=58.0, dvl=44.0, voltage=53.0)
    both_lost = pair(heard(r1, 0.5), heard(r2, 2.0))
    states = run_table(config(2, stale_after_ms=1000, isolation_s=5.0), [
        Cycle(0, pair(r1, r2)),
        Cycle(1, pair(r1, r2), cvl=51.0, dvl=47.0),
        Cycle(2, pair(heard(r1, 0.5), r2), cvl=51.0, dvl=47.0, states="stale ok"),
        Cycle(3.5, both_lost, ccl=0.0, cvl=51.0, dvl=47.0, states="stale stale",
              note="none in parallel: not the pack voltage 53.0 V nor r2's last floor 44.0 V"),
        Cycle(7, both_lost, ccl=0.0, cvl=53.0, dvl=44.0, note="r1 released, r2 held"),
        Cycle(8.5, both_lost, ccl=0.0, cvl=53.0, dvl=44.0, note="both released"),
    ])
    assert states[3].cvl_reason.startswith("CVL 51.0 V = lowest ceiling r1 51.0 V (counting held r1")
    assert states[3].dvl_reason.startswith("DVL 47.0 V = highest floor r1 47.0 V (counting held r1")
    assert states[4].cvl_reason == (
        "CVL 53.0 V: no rack in parallel, held at the consolidated pack voltage; "
        "held: r2 lost 3.5 s ago, isolation in 1.5 s"
    )


# -- the incremental engine sees a hold expire ---------------------------------------------------


def test_the_engine_told_nothing_new_still_releases_an_expired_hold() -> None:
    """r1's input never changes after it turns invalid (an outcome that time does not otherwise move), so an
    engine told of no new input must still re-judge it when its isolation time passes."""
    cfg = config(2, isolation_s=2.0)
    engine = Engine(cfg)
    memory = CoreMemory.initial()
    racks: dict[str, RackInput] = {}
    for t in (0.0, 0.5):
        racks = {"r1": RackInput("r1", WEAK, t), "r2": RackInput("r2", STRONG, t)}
        engine.put(racks["r1"])
        engine.put(racks["r2"])
        engine.cycle(t, WALL_OFFSET_S + t)
        _, memory = step(Snapshot(racks=racks), cfg, t, WALL_OFFSET_S + t, memory)
    racks = {"r1": rejected(WEAK, 1.0), "r2": racks["r2"]}
    engine.put(racks["r1"])
    state = engine.cycle(1.0, WALL_OFFSET_S + 1.0)
    _, memory = step(Snapshot(racks=racks), cfg, 1.0, WALL_OFFSET_S + 1.0, memory)
    assert state.charge_current_limit_a == 80.0
    for t in (1.5, 2.9, 3.0, 3.1):
        state = engine.cycle(t, WALL_OFFSET_S + t)
        full, memory = step(Snapshot(racks=racks), cfg, t, WALL_OFFSET_S + t, memory)
        assert state == full, t
        assert state.charge_current_limit_a == (80.0 if t < 3.0 else 100.0), t


def test_an_urgent_cycle_after_the_isolation_time_is_the_reference_at_its_instant() -> None:
    """An urgent cycle (a lowering of r2, run the moment it arrives) after r1's isolation time has passed
    releases r1's hold in that very cycle, as the reference does at that instant: no cycle has a second
    semantics (the lowering is in, and r1, known out by now, no longer holds the bank down)."""
    cfg = config(2, isolation_s=2.0)
    engine = Engine(cfg)
    racks: dict[str, RackInput] = {"r1": RackInput("r1", WEAK, 0.0), "r2": RackInput("r2", STRONG, 0.0)}
    for rack_input in racks.values():
        engine.put(rack_input)
    engine.cycle(0.0, WALL_OFFSET_S)
    racks["r1"] = rejected(WEAK, 1.0)
    engine.put(racks["r1"])
    held = engine.cycle(1.0, WALL_OFFSET_S + 1.0)
    assert held.charge_current_limit_a == 80.0
    racks["r2"] = RackInput("r2", telemetry("r2", ccl=100.0, dcl=90.0, seq=1), 3.5)  # a lowering: urgent
    engine.put(racks["r2"])
    urgent = engine.cycle(3.5, WALL_OFFSET_S + 3.5)
    assert (urgent.charge_current_limit_a, urgent.discharge_current_limit_a) == (100.0, 90.0)
    assert "held: r1" not in urgent.ccl_reason


# -- the safety invariant, over random rack events and time --------------------------------------

LOST = {RackState.STALE, RackState.INVALID, RackState.COMM_LOST}
ACTIONS = ["keep"] * 4 + ["ok"] * 5 + ["open", "invalid", "comm_lost", "unknown"]
LIMITS = [0.0, 10.0, 40.0, 70.0, 100.0, 150.0]
# Mostly one ceiling, so that the rack deciding CVL is often lost; 0 V (not a ceiling: charging stops) now
# and then; floors above some ceilings, so that DVL is at times lowered below CVL. The pack is at 52.0 V.
CEILINGS = [56.0, 56.0, 54.0, 50.0, 58.0, 0.0]
FLOORS = [44.0, 44.0, 42.0, 46.0, 53.0, 57.0]
CVL_USABLE_MIN_V = 0.1  # controller/core/bank.py: below it a rack's CVL is a stop, not a ceiling


def policy_value(policy: CurrentPolicy, members: Pairs) -> float:
    """The policy over (limit, share) pairs, written plainly (controller/core/policies.py is under test)."""
    limits = [limit for limit, _ in members]
    shares = [share for _, share in members]
    if min(limits) <= 0.0:
        return 0.0
    if policy is CurrentPolicy.N_TIMES_MIN:
        return min(limits) * sum(shares)
    if policy is CurrentPolicy.SUM:
        return sum(limit * share for limit, share in members)
    return min(limits) * min(1.0, sum(shares))


Pairs = list[tuple[float, float]]  # (limit, share)


def bound(policy: CurrentPolicy, parallel: Pairs, held: Pairs) -> float:
    """The most the bank may carry whichever of the held racks are still in parallel (every subset)."""
    if not parallel:
        return 0.0
    subsets = itertools.chain.from_iterable(itertools.combinations(held, k) for k in range(len(held) + 1))
    return min(policy_value(policy, parallel + list(subset)) for subset in subsets)


# One step of a run: time advance, and per rack (action, CCL, DCL, CVL, DVL).
Step = tuple[float, list[tuple[str, float, float, float, float]]]


@dataclass
class Known:
    """The test's own account of one rack: its last limits and share in parallel, and since when it is
    lost."""

    last: tuple[float, float, float, float, float] | None = None  # (ccl, dcl, share, cvl, dvl)
    lost_s: float | None = None


@st.composite
def runs(draw: st.DrawFn) -> tuple[ControllerConfig, list[Step]]:
    n = draw(st.integers(1, 4))
    readmit = draw(st.sampled_from([0.0, 1.0]))
    cfg = config(
        n,
        stale_after_ms=1000,
        ccl_policy=draw(st.sampled_from(CurrentPolicy)),
        dcl_policy=draw(st.sampled_from(CurrentPolicy)),
        readmit_hold_s=readmit,
        readmit_ramp_s=draw(st.sampled_from([0.0, 1.0])),
        isolation_s=draw(st.sampled_from([0.5, 2.0, 5.0])),
        ramp_up_a_per_s=draw(st.sampled_from([1e6, 30.0])),
    )
    overrides = {rid: {"isolation_s": 1.0} for rid in rack_ids(n) if draw(st.integers(0, 3)) == 0}
    cfg = with_roster(cfg, **overrides)
    action = st.tuples(st.sampled_from(ACTIONS), st.sampled_from(LIMITS), st.sampled_from(LIMITS),
                       st.sampled_from(CEILINGS), st.sampled_from(FLOORS))
    steps = draw(st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.4, 1.0, 2.0]), st.lists(action, min_size=n, max_size=n)),
        min_size=3, max_size=40,
    ))
    return cfg, steps


def _input(rid: str, kind: str, limits: tuple[float, float, float, float], previous: RackInput | None,
           t: float, seq: int) -> RackInput | None:
    if kind == "keep":
        return previous
    if kind == "invalid":
        if previous is None or previous.telemetry is None:
            return previous
        return RackInput(rid, previous.telemetry, previous.received_s, invalid_at_s=t, invalid_reason="bad")
    contactor = {"open": OPEN, "unknown": UNKNOWN}.get(kind, ContactorState.CLOSED)
    ccl, dcl, cvl, dvl = limits
    tel = telemetry(rid, ccl=ccl, dcl=dcl, cvl=cvl, dvl=dvl, contactor=contactor,
                    comm_lost=kind == "comm_lost", seq=seq)
    return RackInput(rid, tel, t)


def _check_bound(cfg: ControllerConfig, state: ConsolidatedState, known: dict[str, Known],
                 inputs: dict[str, RackInput], t: float) -> None:
    """Update the account from the views, then check the bank against it."""
    agg = cfg.aggregation
    parallel_c: list[tuple[float, float]] = []
    parallel_d: list[tuple[float, float]] = []
    parallel_v: list[tuple[float, float]] = []  # (cvl, dvl)
    for rr, view in zip(cfg.roster, state.racks, strict=True):
        k = known[rr.rack_id]
        isolation = rr.isolation_s if rr.isolation_s is not None else agg.isolation_s
        if view.state is RackState.OK:
            tel = inputs[rr.rack_id].telemetry
            assert tel is not None and tel.measurements is not None
            m = tel.measurements
            ccl, dcl = m.charge_current_limit_a, m.discharge_current_limit_a
            assert (view.charge_current_limit_a, view.discharge_current_limit_a) == (ccl, dcl)
            cvl, dvl = m.charge_voltage_limit_v, m.discharge_voltage_limit_v
            k.last, k.lost_s = (ccl, dcl, view.share, cvl, dvl), None
            parallel_c.append((ccl, view.share))
            parallel_d.append((dcl, view.share))
            parallel_v.append((cvl, dvl))
        elif view.state in LOST and k.last is not None:
            k.lost_s = t if k.lost_s is None else k.lost_s
            if t - k.lost_s >= isolation:  # the rule's release; the core may release later, never earlier
                k.last = k.lost_s = None
        else:  # seen out of the bank (contactor open), or never in it
            k.last = k.lost_s = None
    held = [k.last for k in known.values() if k.last is not None and k.lost_s is not None]
    ccl_bound = bound(agg.ccl_policy, parallel_c, [(c, s) for c, _, s, _, _ in held])
    dcl_bound = bound(agg.dcl_policy, parallel_d, [(d, s) for _, d, s, _, _ in held])
    # Shown by --hypothesis-show-statistics: how often a hold is what keeps a limit down.
    binds = parallel_c and ccl_bound < policy_value(agg.ccl_policy, parallel_c)
    event("a held rack keeps CCL down" if binds else "a rack held" if held else "no rack held")
    where = f"t={t} held={held} parallel={parallel_c}\n{state.ccl_reason}\n{state.dcl_reason}"
    assert state.charge_current_limit_a <= ccl_bound + 1e-6, where
    assert state.discharge_current_limit_a <= dcl_bound + 1e-6, where
    _check_voltages(state, parallel_v, [(cvl, dvl) for _, _, _, cvl, dvl in held])


def _check_voltages(state: ConsolidatedState, parallel: Pairs, held: Pairs) -> None:
    """CVL never above the lowest ceiling and DVL never below the highest floor of the racks in parallel and
    any subset of the held racks at their last ones (the whole set is the worst case for a lowest and a
    highest), DVL only lowered to stay below CVL; CVL never 0. A ceiling under 0.1 V is a stop: charging
    stops. (A rack in parallel reporting one holds CVL at the pack voltage, which may be above another rack's
    ceiling in parallel: not asserted here, nothing to do with held racks.)"""
    cvl, dvl = state.charge_voltage_limit_v, state.discharge_voltage_limit_v
    where = f"held={held} parallel={parallel}\n{state.cvl_reason}\n{state.dvl_reason}\n{state.ccl_reason}"
    assert cvl >= 0.1 and dvl < cvl, where
    racks = parallel + held
    if any(c < CVL_USABLE_MIN_V for c, _ in racks):
        assert state.charge_current_limit_a == 0.0, where
    stops_in_parallel = any(c < CVL_USABLE_MIN_V for c, _ in parallel)
    ceilings = [c for c, _ in (held if stops_in_parallel else racks) if c >= CVL_USABLE_MIN_V]
    if ceilings:
        assert cvl <= min(ceilings) + 1e-6, where
    if racks:
        assert dvl >= min(max(d for _, d in racks), round(cvl - 0.1, 1)) - 1e-6, where
    lowest_parallel = min((c for c, _ in parallel), default=None)
    holds_cvl = held and lowest_parallel is not None and min(c for c, _ in held) < lowest_parallel
    event("a held rack keeps CVL down" if holds_cvl else "no held rack below the ceiling in parallel")


@settings(max_examples=300, deadline=None)
@given(runs())
def test_the_bank_never_exceeds_what_the_racks_last_known_in_parallel_allow(
    run: tuple[ControllerConfig, list[Step]],
) -> None:
    """At every cycle of the engine: CCL and DCL are at most the policy over the
    racks in parallel plus any subset of the racks held at their last limits and shares (a held rack may
    or may not still be in parallel), CVL at most their lowest ceiling and DVL at least their highest floor
    (but below CVL). The engine equals the reference cycle, output and memory."""
    cfg, steps = run
    ids = rack_ids(len(cfg.roster))
    known = {rid: Known() for rid in ids}
    inputs: dict[str, RackInput] = {}
    engine = Engine(cfg)
    memory = CoreMemory.initial()
    t = 0.0
    for i, (dt, actions) in enumerate(steps):
        t = round(t + dt, 6)
        for rid, (kind, *limits) in zip(ids, actions, strict=True):
            new = _input(rid, kind, (limits[0], limits[1], limits[2], limits[3]), inputs.get(rid), t, seq=i)
            if new is not None and new is not inputs.get(rid):
                inputs[rid] = new
                engine.put(new)
        state = engine.cycle(t, WALL_OFFSET_S + t)
        full, memory = step(Snapshot(racks=dict(inputs)), cfg, t, WALL_OFFSET_S + t, memory)
        assert state == full and engine.memory == memory, f"step {i} t={t}"
        _check_bound(cfg, state, known, inputs, t)
