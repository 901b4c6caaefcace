"""Cycle tables: rack telemetry in at each time, consolidated limits and states out.

Unless a table says otherwise the config has no re-admission hold or ramp and a slew fast enough
to reach any target in one second, so the first row (t=0, slew starting from 0) gives 0 A and the
next rows show the policy itself.
"""

from __future__ import annotations

import itertools

from controller.core.snapshot import RackInput
from shared.controller_config import CurrentPolicy
from shared.models import ContactorState
from tests.controller.core.builders import Cycle, RackSpec, all_racks, config, run_table, telemetry

OPEN, UNKNOWN = ContactorState.OPEN, ContactorState.UNKNOWN


def four(**overrides: RackSpec) -> dict[str, RackSpec]:
    """r1..r4 at 100 A both ways, with per-rack telemetry replaced by ``overrides``."""
    racks = all_racks(4)
    racks.update(overrides)
    return racks


def test_default_policy_is_n_times_min() -> None:
    weak = four(r2=telemetry("r2", ccl=80.0, dcl=60.0), r3=telemetry("r3", ccl=120.0))
    run_table(
        config(4),
        [
            Cycle(0, weak, ccl=0.0, dcl=0.0, note="slew starts from 0"),
            Cycle(1, weak, ccl=320.0, dcl=240.0, states="ok ok ok ok", eligible=4,
                  ccl_reason=["CCL 320.0 A = r2 80.0 A × 4 eligible"], dcl_reason=["r2 60.0 A × 4 eligible"]),
        ],
    )


def test_sum_and_min_policies() -> None:
    weak = four(r2=telemetry("r2", ccl=80.0, dcl=60.0), r3=telemetry("r3", ccl=120.0))
    run_table(
        config(4, ccl_policy=CurrentPolicy.SUM, dcl_policy=CurrentPolicy.MIN),
        [
            Cycle(0, weak),
            Cycle(1, weak, ccl=400.0, dcl=60.0, ccl_reason=["sum of r1 100.0 A + r2 80.0 A"],
                  dcl_reason=["DCL 60.0 A = min r2 60.0 A"]),
        ],
    )


def test_a_rack_in_parallel_at_zero_zeroes_the_bank_whatever_the_policy() -> None:
    for policy in CurrentPolicy:
        zero = four(r3=telemetry("r3", ccl=0.0))
        unknown_zero = four(r4=telemetry("r4", dcl=0.0, contactor=UNKNOWN))
        run_table(
            config(4, ccl_policy=policy, dcl_policy=policy),
            [
                Cycle(0, four()),
                Cycle(1, zero, ccl=0.0, ccl_reason=["CCL 0 A: r3 0.0 A with contactor closed"], note=policy),
                Cycle(2, unknown_zero, dcl=0.0, dcl_reason=["r4 0.0 A with contactor unknown"], note=policy),
                Cycle(3, four(), states="ok ok ok ok", note=policy),
            ],
        )


def test_open_contactor_is_excluded_and_unknown_is_counted() -> None:
    run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r2=telemetry("r2", ccl=10.0, contactor=OPEN)), ccl=300.0, dcl=300.0,
                  states="ok disconnected ok ok", eligible=3, ccl_reason=["× 3 eligible"]),
            Cycle(2, four(r2=telemetry("r2", ccl=10.0, contactor=UNKNOWN)), ccl=40.0, dcl=400.0,
                  states="ok ok ok ok", eligible=4, ccl_reason=["r2 10.0 A × 4 eligible"]),
        ],
    )


def test_stale_after_three_polls_of_the_racks_own_interval() -> None:
    # r2 is heard at t=0 only; its poll is 1 s, so it is stale once its telemetry is older than 3 s.
    cfg = config(4)
    heard = RackInput("r2", telemetry=telemetry("r2", ccl=50.0), received_s=0.0)
    rows = [Cycle(0, four(r2=heard))]
    rows += [Cycle(t, four(r2=heard), ccl=200.0, states="ok ok ok ok") for t in (1, 2, 3)]
    rows += [
        Cycle(3.5, four(r2=heard), ccl=300.0, states="ok stale ok ok", eligible=3),
        Cycle(4, four(r2=None), ccl=300.0, states="ok stale ok ok", note="nothing at all is stale too"),
    ]
    states = run_table(cfg, rows)
    assert "stale: no valid telemetry for 3.5 s (limit 3.0 s)" in states[4].racks[1].reason


def test_stale_after_from_the_roster_overrides_the_poll_interval() -> None:
    heard = RackInput("r2", telemetry=telemetry("r2", poll_ms=100), received_s=0.0)
    run_table(
        config(2, stale_after_ms=2000),
        [
            Cycle(0, {"r1": telemetry("r1"), "r2": heard}),
            Cycle(2, {"r1": telemetry("r1"), "r2": heard}, states="ok ok"),
            Cycle(2.1, {"r1": telemetry("r1"), "r2": heard}, states="ok stale"),
        ],
    )


def test_comm_lost_and_invalid_racks_are_excluded() -> None:
    invalid = RackInput("r4", telemetry=telemetry("r4"), received_s=0.5, invalid_at_s=0.9,
                        invalid_reason="cell_voltage_min_v exceeds cell_voltage_max_v")
    states = run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r3=telemetry("r3", comm_lost=True), r4=invalid), ccl=200.0, dcl=200.0,
                  states="ok ok comm_lost invalid", eligible=2, ccl_reason=["× 2 eligible"]),
        ],
    )
    assert "cell_voltage_min_v exceeds" in states[1].racks[3].reason
    assert "link lost" in states[1].racks[2].reason


def test_telemetry_for_another_site_or_rack_is_invalid() -> None:
    run_table(
        config(2),
        [
            Cycle(0, {"r1": telemetry("r1"), "r2": telemetry("r2", site="elsewhere")}, states="ok invalid"),
            Cycle(1, {"r1": telemetry("r1"), "r2": telemetry("r1")}, states="ok invalid"),
        ],
    )


def test_unknown_racks_are_reported_and_never_counted() -> None:
    racks = four(x9=telemetry("x9", ccl=1.0, dcl=0.0, alarms=["cell_over_voltage"]))
    states = run_table(
        config(4),
        [
            Cycle(0, racks, unknown=["r7"]),
            Cycle(1, racks, unknown=["r7"], ccl=400.0, dcl=400.0, cluster=("unknown_rack_seen",), alarms=(),
                  eligible=4),
            Cycle(2, four(), cluster=()),
        ],
    )
    assert states[1].unknown_racks == ("r7", "x9")
    assert [v.rack_id for v in states[1].racks] == ["r1", "r2", "r3", "r4"]


def test_quorum() -> None:
    cfg = config(3, min_racks=2)
    ok3 = all_racks(3)
    run_table(
        cfg,
        [
            Cycle(0, ok3),
            Cycle(1, ok3, ccl=300.0, cluster=()),
            Cycle(2, {**ok3, "r3": None}, ccl=200.0, dcl=200.0, cluster=()),
            Cycle(3, {"r1": telemetry("r1"), "r2": None, "r3": None}, ccl=0.0, dcl=0.0,
                  cluster=("not_enough_racks",), ccl_reason=["CCL 0 A: not enough racks (1 of min 2)"],
                  dcl_reason=["DCL 0 A: not enough racks (1 of min 2)"],
                  extra={"charge_enabled": False, "discharge_enabled": False}),
            Cycle(4, {"r1": None, "r2": None, "r3": None}, ccl=0.0, dcl=0.0, eligible=0,
                  cluster=("not_enough_racks",), ccl_reason=["not enough racks (0 of min 2)"]),
            Cycle(5, ok3, ccl=300.0, cluster=(), extra={"charge_enabled": True}),
        ],
    )


def test_faults_block_by_direction() -> None:
    run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r2=telemetry("r2", alarms=["cell_over_voltage"])), ccl=0.0, dcl=400.0,
                  states="ok ok ok ok", eligible=4, alarms=("cell_over_voltage",),
                  ccl_reason=["CCL 0 A: r2 cell_over_voltage (active)"], dcl_reason=["× 4 eligible"]),
        ],
    )
    run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r3=telemetry("r3", alarms=["discharge_over_current"])), ccl=400.0, dcl=0.0,
                  dcl_reason=["DCL 0 A: r3 discharge_over_current (active)"]),
        ],
    )
    states = run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r4=telemetry("r4", alarms=["insulation_fault"], ccl=0.0)), ccl=300.0, dcl=300.0,
                  states="ok ok ok faulted", eligible=3, alarms=()),
        ],
    )
    assert states[1].racks[3].reason == "faulted: insulation_fault (active)"
    # The bank carries on without the faulted rack: its fault is visible, as a warning, not as a bank
    # alarm that an inverter would read as "stop".
    assert states[1].warnings.insulation_fault


def test_cell_imbalance_is_reported_but_blocks_nothing() -> None:
    states = run_table(
        config(2),
        [
            Cycle(0, all_racks(2)),
            Cycle(1, {"r1": telemetry("r1", alarms=["cell_imbalance"]), "r2": telemetry("r2")}, ccl=200.0,
                  dcl=200.0, alarms=(), cluster=("latched_alarm",)),
        ],
    )
    assert states[1].warnings.cell_imbalance


def test_latch_holds_until_cleared_in_telemetry_and_then_acknowledged() -> None:
    hot = four(r2=telemetry("r2", alarms=["charge_over_temperature"]))
    run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, hot, ccl=0.0, dcl=400.0, alarms=("charge_over_temperature",), cluster=("latched_alarm",),
                  ccl_reason=["CCL 0 A: r2 charge_over_temperature (active)"]),
            Cycle(2, hot, clear_command_s=1.5, ccl=0.0, note="clear while the condition is present"),
            Cycle(3, four(), clear_command_s=1.5, ccl=0.0, alarms=("charge_over_temperature",),
                  cluster=("latched_alarm",), ccl_reason=["CCL 0 A: r2 charge_over_temperature (latched)"],
                  note="condition gone, the earlier clear does not count"),
            Cycle(4, four(), clear_command_s=1.5, ccl=0.0),
            Cycle(5, four(), clear_command_s=5.0, ccl=400.0, alarms=(), cluster=(),
                  note="clear after the condition cleared releases it"),
            Cycle(6, hot, clear_command_s=5.0, ccl=0.0, note="a new occurrence latches again"),
            Cycle(7, four(), clear_command_s=5.0, ccl=0.0, cluster=("latched_alarm",)),
        ],
    )


def test_latched_rack_fault_keeps_the_rack_out_until_acknowledged() -> None:
    states = run_table(
        config(4),
        [
            Cycle(0, four()),
            Cycle(1, four(r4=telemetry("r4", alarms=["internal_fault"])), ccl=300.0,
                  states="ok ok ok faulted"),
            Cycle(2, four(), ccl=300.0, states="ok ok ok faulted", cluster=("latched_alarm",)),
            Cycle(3, four(), clear_command_s=3.0, ccl=400.0, states="ok ok ok ok", cluster=()),
        ],
    )
    assert states[2].racks[3].reason == "faulted: internal_fault (latched)"


def test_latches_survive_a_stale_rack_and_alarms_stay_visible() -> None:
    states = run_table(
        config(3),
        [
            Cycle(0, all_racks(3)),
            Cycle(1, {**all_racks(3), "r3": telemetry("r3", alarms=["pack_under_voltage"])}, dcl=0.0),
            Cycle(2, {**all_racks(3), "r3": None}, ccl=200.0, dcl=0.0, states="ok ok stale",
                  alarms=("pack_under_voltage",), dcl_reason=["r3 pack_under_voltage (active)"]),
            Cycle(3, {**all_racks(3), "r3": None}, clear_command_s=3.0, dcl=0.0,
                  note="not heard clear, so a command cannot release it"),
        ],
    )
    assert "blocks discharge: pack_under_voltage (active)" in states[2].racks[2].reason


def test_readmission_hold_then_ramp_without_a_step() -> None:
    cfg = config(4, readmit_hold_s=5.0, readmit_ramp_s=10.0)
    ok = four()
    rows = [
        Cycle(0, ok, ccl=0.0, eligible=0, cluster=("not_enough_racks",), shares=(0, 0, 0, 0),
              note="cold start: every rack goes through the hold"),
        Cycle(4, ok, ccl=0.0, eligible=0, cluster=("not_enough_racks",)),
        Cycle(5, ok, ccl=0.0, eligible=4, shares=(0, 0, 0, 0), cluster=()),
        Cycle(10, ok, ccl=200.0, shares=(0.5, 0.5, 0.5, 0.5), ccl_reason=["ramping 0.50"]),
        Cycle(15, ok, ccl=400.0, shares=(1, 1, 1, 1)),
        Cycle(16, four(r4=None), ccl=300.0, eligible=3, shares=(1, 1, 1, 0)),
        # r4 is back, with a lower limit: it binds at once (it is in parallel), but adds no share yet.
        Cycle(17, four(r4=telemetry("r4", ccl=50.0)), ccl=150.0, eligible=3, states="ok ok ok ok",
              ccl_reason=["r4 50.0 A × 3.00 (3 full, r4 in hold)"]),
        Cycle(21, four(r4=telemetry("r4", ccl=50.0)), ccl=150.0, eligible=3),
        Cycle(22, four(r4=telemetry("r4", ccl=50.0)), ccl=150.0, eligible=4, shares=(1, 1, 1, 0)),
        Cycle(27, four(r4=telemetry("r4", ccl=50.0)), ccl=175.0, shares=(1, 1, 1, 0.5),
              ccl_reason=["r4 50.0 A × 3.50 (3 full, r4 ramping 0.50)"]),
        Cycle(32, four(r4=telemetry("r4", ccl=50.0)), ccl=200.0, shares=(1, 1, 1, 1)),
    ]
    states = run_table(cfg, rows)
    assert "re-admission hold 4.0 of 5.0 s" in states[1].racks[0].reason


def test_readmission_ramp_has_no_step_at_fine_time_steps() -> None:
    cfg = config(2, readmit_hold_s=2.0, readmit_ramp_s=4.0)
    rows = [Cycle(t / 10, all_racks(2)) for t in range(100)]
    states = run_table(cfg, rows)
    ccl = [s.charge_current_limit_a for s in states]
    # 2 racks × 100 A ramp in over 4 s: at most 50 A/s, i.e. 5 A (+ rounding) per 0.1 s cycle.
    assert max(b - a for a, b in itertools.pairwise(ccl)) <= 5.0 + 0.1 + 1e-9
    assert ccl[-1] == 200.0


def test_flapping_rack_restarts_its_hold() -> None:
    cfg = config(2, readmit_hold_s=3.0)
    r1 = telemetry("r1")
    run_table(
        cfg,
        [
            Cycle(0, {"r1": r1, "r2": telemetry("r2")}),
            Cycle(3, {"r1": r1, "r2": telemetry("r2")}, eligible=2, ccl=200.0),
            Cycle(4, {"r1": r1, "r2": None}, eligible=1, ccl=100.0),
            Cycle(5, {"r1": r1, "r2": telemetry("r2")}, eligible=1),
            Cycle(6, {"r1": r1, "r2": None}, eligible=1),
            Cycle(7, {"r1": r1, "r2": telemetry("r2")}, eligible=1),
            Cycle(9, {"r1": r1, "r2": telemetry("r2")}, eligible=1, ccl=100.0),
            Cycle(10, {"r1": r1, "r2": telemetry("r2")}, eligible=2, ccl=200.0),
        ],
    )


def test_a_rack_in_its_hold_at_zero_zeroes_the_bank() -> None:
    cfg = config(2, readmit_hold_s=5.0)
    run_table(
        cfg,
        [
            Cycle(0, {"r1": telemetry("r1"), "r2": None}),
            Cycle(5, {"r1": telemetry("r1"), "r2": None}, ccl=100.0),
            Cycle(6, {"r1": telemetry("r1"), "r2": telemetry("r2", ccl=0.0)}, ccl=0.0, eligible=1,
                  ccl_reason=["r2 0.0 A with contactor closed"]),
        ],
    )


def test_slew_ramps_increases_and_applies_decreases_at_once() -> None:
    cfg = config(4, ramp_up_a_per_s=50.0)
    run_table(
        cfg,
        [
            Cycle(0, four(), ccl=0.0, dcl=0.0),
            Cycle(1, four(), ccl=50.0, dcl=50.0, ccl_reason=["rising at 50 A/s toward 400.0 A"]),
            Cycle(2, four(), ccl=100.0),
            Cycle(3, four(r1=telemetry("r1", ccl=10.0)), ccl=40.0, dcl=150.0, note="decrease at once"),
            Cycle(4, four(), ccl=90.0, dcl=200.0),
            Cycle(5.5, four(), ccl=165.0),
            Cycle(10, four(), ccl=390.0),
            Cycle(11, four(), ccl=400.0, ccl_reason=["CCL 400.0 A = r1 100.0 A × 4 eligible"]),
        ],
    )


def test_slew_accumulates_steps_smaller_than_the_resolution() -> None:
    cfg = config(1, ramp_up_a_per_s=1.0)
    states = run_table(cfg, [Cycle(t / 100, all_racks(1)) for t in range(201)])
    assert states[-1].charge_current_limit_a == 2.0


def test_bank_limits_are_capped_by_config_and_rounded_down_to_0_1_a() -> None:
    racks = all_racks(3, ccl=33.33, dcl=2000.0)
    run_table(
        config(3, max_discharge_current_a=1500.0),
        [
            Cycle(0, racks),
            Cycle(1, racks, ccl=99.9, dcl=1500.0, dcl_reason=["capped at the configured maximum 1500.0 A"]),
        ],
    )


def test_cvl_is_never_zero_when_nothing_is_in_parallel() -> None:
    cfg = config(2, fallback_voltage_v=48.0)
    run_table(
        cfg,
        [
            Cycle(0, {"r1": None, "r2": None}, ccl=0.0, cvl=48.0, dvl=0.0, extra={"charge_enabled": False}),
            Cycle(1, all_racks(2, voltage=53.27), cvl=56.0, dvl=44.0),
            Cycle(2, {"r1": None, "r2": None}, ccl=0.0, cvl=53.2, dvl=44.0),
            Cycle(3, {"r1": telemetry("r1", contactor=OPEN), "r2": None}, ccl=0.0, cvl=53.2),
        ],
    )


def test_cvl_is_the_lowest_ceiling_and_dvl_the_highest_floor() -> None:
    racks = {"r1": telemetry("r1", cvl=56.04, dvl=44.0), "r2": telemetry("r2", cvl=57.0, dvl=45.51)}
    states = run_table(config(2), [Cycle(0, racks, cvl=56.0, dvl=45.6)])
    assert states[0].cvl_reason == "CVL 56.0 V = lowest ceiling r1 56.0 V"
    assert "highest floor r2" in states[0].dvl_reason


def test_dvl_is_lowered_below_cvl_when_the_racks_disagree() -> None:
    racks = {"r1": telemetry("r1", cvl=50.0, dvl=40.0), "r2": telemetry("r2", cvl=56.0, dvl=51.0)}
    states = run_table(config(2), [Cycle(0, racks, cvl=50.0, dvl=49.9)])
    assert "lowered to stay below CVL 50.0 V" in states[0].dvl_reason


def test_a_rack_reporting_cvl_zero_stops_charging_and_cvl_holds() -> None:
    racks = {"r1": telemetry("r1", cvl=0.0, dvl=0.0, voltage=51.0), "r2": telemetry("r2", voltage=52.0)}
    run_table(config(2), [Cycle(0, racks), Cycle(1, racks, ccl=0.0, dcl=200.0, cvl=51.5,
                                                  ccl_reason=["r1 reports CVL 0.0 V"])])


def test_cell_taper_with_hysteresis() -> None:
    def at(v_max: float, v_min: float = 3.25) -> dict[str, RackSpec]:
        return four(r3=telemetry("r3", cell_max=v_max, cell_min=v_min))

    run_table(
        config(4),
        [
            Cycle(0, at(3.30)),
            # 3.425 V is halfway from 3.40 (×1) to 3.45 (×0.1): ×0.55.
            Cycle(1, at(3.425), ccl=220.0, dcl=400.0,
                  ccl_reason=["r3 55.0 A (cell max 3.425 V taper ×0.55, reports 100.0 A) × 4 eligible"]),
            Cycle(2, at(3.42), ccl=220.0, note="inside the 10 mV band: held"),
            Cycle(3, at(3.40), ccl=328.0, note="left the band: follows 10 mV behind (3.41 V, ×0.82)"),
            Cycle(4, at(3.35), ccl=400.0),
            # Discharge: 2.95 V is halfway from 2.90 (×0.1) to 3.00 (×1).
            Cycle(5, at(3.30, 2.95), dcl=220.0, dcl_reason=["r3 55.0 A (cell min 2.950 V taper ×0.55"]),
            Cycle(6, at(3.30, 2.955), dcl=220.0),
        ],
    )


def test_thermal_rate_of_rise_derates_before_the_over_temperature_alarm() -> None:
    # 0.2 °C/s from 40 °C: the rack's own 55 °C alarm would come at t=75 s.
    cfg = config(2, cell_taper={"enabled": False})
    rows = [Cycle(0, all_racks(2, t_max=40.0, t_min=35.0), ccl=0.0)]
    rows += [Cycle(t, all_racks(2, t_max=40.0 + 0.2 * t, t_min=35.0)) for t in range(1, 31)]
    states = run_table(cfg, rows)
    ccl = [s.charge_current_limit_a for s in states]
    # At t=1 the rack is at 40.2 °C, where the table itself gives ×0.96; the projection
    # (40.2 + 0.2 × 60 = 52.2 °C) already gives ×0.14.
    assert ccl[1] < 0.2 * 200.0
    assert "rising 0.20 °C/s" in states[1].ccl_reason
    # It keeps falling long before 55 °C and before any alarm.
    first_zero = next(t for t, c in enumerate(ccl) if t > 0 and c == 0.0)
    assert 40.0 + 0.2 * first_zero < 55.0
    assert all(not s.alarms.raised() for s in states)
    # The same temperature, steady, is judged on itself: 41 °C → ×0.9.
    steady = run_table(cfg, [Cycle(t, all_racks(2, t_max=41.0, t_min=35.0)) for t in range(10)])
    assert steady[-1].charge_current_limit_a == 180.0
    assert steady[-1].discharge_current_limit_a == 180.0


def test_thermal_derate_does_not_chatter_on_noise_within_the_band() -> None:
    cfg = config(1, cell_taper={"enabled": False})
    rows = [Cycle(t, all_racks(1, t_max=44.0 + (0.3 if t % 2 else -0.3), t_min=30.0)) for t in range(200)]
    states = run_table(cfg, rows)
    later = {s.charge_current_limit_a for s in states[40:]}
    assert len(later) == 1


def test_thermal_derate_can_be_disabled() -> None:
    cfg = config(1, thermal_derate={"enabled": False})
    rows = [Cycle(t, all_racks(1, t_max=40.0 + 0.5 * t, t_min=30.0)) for t in range(20)]
    assert run_table(cfg, rows)[-1].charge_current_limit_a == 100.0


def test_measured_quantities() -> None:
    cfg = config(3, capacities=[100.0, 300.0, 100.0])
    racks = {
        "r1": telemetry("r1", soc=20.0, soh=90.0, voltage=52.0, current=10.0, cell_max=3.31, cell_min=3.20,
                        t_max=30.0, t_min=20.0, warnings=["cell_imbalance"]),
        "r2": telemetry("r2", soc=60.0, soh=95.0, voltage=53.0, current=-4.0, cell_max=3.35, cell_min=3.22,
                        t_max=28.0, t_min=18.0, cell_max_location="cell 5"),
        "r3": telemetry("r3", alarms=["internal_fault"], warnings=["pack_over_voltage"], soc=0.0, t_max=60.0),
    }
    s = run_table(cfg, [Cycle(0, racks, states="ok ok faulted")])[0]
    assert s.soc_pct == 50.0
    assert s.soh_pct == 90.0
    assert s.pack_voltage_v == 52.5
    assert s.current_a == 6.0
    assert s.temperature_avg_c == 24.0
    assert (s.cell_voltage_max_v, s.cell_voltage_max_location) == (3.35, "r2: cell 5")
    assert (s.cell_voltage_min_v, s.cell_voltage_min_location) == (3.20, "r1: cell 2")
    assert (s.temperature_max_c, s.temperature_max_location) == (30.0, "r1: sensor 1")
    assert (s.temperature_min_c, s.temperature_min_location) == (18.0, "r2: sensor 4")
    assert s.capacity_ah == 400.0
    assert s.warnings.raised() == ("pack_over_voltage", "cell_imbalance")
    assert s.alarms.raised() == ("internal_fault",)
    assert (s.site_id, s.node_id, s.roster_size) == ("site-t", "ctl-a", 3)


def test_provenance_names_the_deciding_rack() -> None:
    racks = four(r3=telemetry("r3", ccl=70.0), r4=telemetry("r4", dcl=30.0, contactor=UNKNOWN))
    states = run_table(config(4), [Cycle(0, racks), Cycle(1, racks)])
    s = states[1]
    assert s.ccl_reason == "CCL 280.0 A = r3 70.0 A × 4 eligible"
    assert s.dcl_reason == "DCL 120.0 A = r4 30.0 A × 4 eligible"
    assert [v.reason for v in s.racks] == ["ok", "ok", "ok", "ok (contactor unknown: counted as closed)"]
    assert [v.charge_current_limit_a for v in s.racks] == [100.0, 100.0, 70.0, 100.0]
