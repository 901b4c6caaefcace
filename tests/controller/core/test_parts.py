"""The small pure pieces of the core, each as a table."""

from __future__ import annotations

import math

import pytest

from controller.core.admission import admit, quorum_shortfall
from controller.core.bounds import amps_down, current_down_da, voltage_limits_dv
from controller.core.classify import stale_after_s
from controller.core.derates import slope_per_s
from controller.core.faults import FLAG_DIRECTION, Direction, Latch, direction_of, update_latches
from controller.core.memory import CoreMemory
from controller.core.policies import FIXED_ROWS, table
from controller.core.slew import slew
from controller.core.tables import Harmful, interpolate, play
from shared.cluster import ConsolidatedState
from shared.controller_config import AggregationConfig, Breakpoint, RosterRack
from shared.models import PROTECTION_FLAG_NAMES
from shared.records import FlagsRecord
from tests.controller.core.builders import telemetry

TABLE = (Breakpoint(x=40.0, factor=1.0), Breakpoint(x=45.0, factor=0.5), Breakpoint(x=55.0, factor=0.0))


@pytest.mark.parametrize(
    ("x", "factor"),
    [(-10.0, 1.0), (40.0, 1.0), (42.5, 0.75), (45.0, 0.5), (50.0, 0.25), (55.0, 0.0), (80.0, 0.0)],
)
def test_interpolate(x: float, factor: float) -> None:
    assert interpolate(TABLE, x) == pytest.approx(factor)


@pytest.mark.parametrize(
    ("held", "x", "harmful", "expected"),
    [
        (None, 3.0, Harmful.HIGH, 3.0),
        (50.0, 51.0, Harmful.HIGH, 51.0),  # worse: at once
        (50.0, 49.5, Harmful.HIGH, 50.0),  # better, inside the band: held
        (50.0, 49.0, Harmful.HIGH, 50.0),  # exactly the band: held
        (50.0, 48.0, Harmful.HIGH, 49.0),  # beyond the band: follows, one width behind
        (3.0, 2.9, Harmful.LOW, 2.9),
        (3.0, 3.5, Harmful.LOW, 3.0),
        (3.0, 4.5, Harmful.LOW, 3.5),
    ],
)
def test_play_operator(held: float | None, x: float, harmful: Harmful, expected: float) -> None:
    assert play(held, x, 1.0, harmful) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("samples", "slope"),
    [
        ((), 0.0),
        (((1.0, 40.0),), 0.0),
        (((1e6, 40.0), (1e6 + 1, 40.2), (1e6 + 2, 40.4)), 0.2),
        (((0.0, 40.0), (1.0, 40.0), (2.0, 40.0)), 0.0),
        (((0.0, 50.0), (10.0, 40.0)), -1.0),
        (((5.0, 40.0), (5.0, 45.0)), 0.0),  # no spread in time: no slope
    ],
)
def test_least_squares_slope(samples: tuple[tuple[float, float], ...], slope: float) -> None:
    assert slope_per_s(samples) == pytest.approx(slope)


@pytest.mark.parametrize(
    ("previous", "target", "elapsed", "expected"),
    [(0.0, 100.0, 0.0, 0.0), (0.0, 100.0, 1.0, 10.0), (50.0, 20.0, 0.1, 20.0), (95.0, 100.0, 1.0, 100.0),
     (10.0, 100.0, -5.0, 10.0)],
)
def test_slew(previous: float, target: float, elapsed: float, expected: float) -> None:
    assert slew(previous, target, elapsed, 10.0) == expected


@pytest.mark.parametrize(
    ("amps", "tenths"),
    [(112.0, 1120), (111.99999999, 1120), (0.06, 0), (33.33 * 3, 999), (5000.0, 32767), (-3.0, 0),
     (math.nan, 0), (math.inf, 0)],
)
def test_current_rounds_down_onto_the_frame_grid(amps: float, tenths: int) -> None:
    assert current_down_da(amps) == tenths


def test_rack_view_rounding_has_no_frame_ceiling() -> None:
    assert amps_down(5000.04) == 5000.0


@pytest.mark.parametrize(
    ("limits_v", "expected"),
    [
        ((56.04, 44.01), (560, 441, False)),  # CVL down, DVL up
        ((50.0, 50.0), (500, 499, True)),
        ((50.0, 51.0), (500, 499, True)),
        ((0.0, 0.0), (1, 0, False)),  # CVL never 0
        ((0.04, 0.1), (1, 0, True)),
        ((1200.0, 10.0), (10000, 100, False)),
    ],
)
def test_voltage_invariants(limits_v: tuple[float, float], expected: tuple[int, int, bool]) -> None:
    assert voltage_limits_dv(*limits_v) == expected


@pytest.mark.parametrize(
    ("poll_ms", "override_ms", "expected_s"),
    [(1000, None, 3.0), (100, None, 1.0), (200, None, 1.0), (500, None, 1.5), (5000, None, 10.0),
     (60_000, None, 10.0), (100, 2500, 2.5)],
)
def test_stale_after(poll_ms: int, override_ms: int | None, expected_s: float) -> None:
    roster = RosterRack(rack_id="r1", capacity_ah=100.0, stale_after_ms=override_ms)
    assert stale_after_s(roster, telemetry("r1", poll_ms=poll_ms)) == expected_s


def test_every_protection_flag_has_a_direction() -> None:
    assert set(FLAG_DIRECTION) == set(PROTECTION_FLAG_NAMES)
    assert direction_of("some_future_flag") is Direction.RACK


@pytest.mark.parametrize(
    ("previous", "alarms", "clear_s", "expected"),
    [
        ({}, (), None, {}),
        ({}, ("cell_over_voltage",), None, {"cell_over_voltage": Latch(10.0)}),
        ({"cell_over_voltage": Latch(1.0)}, ("cell_over_voltage",), 5.0, {"cell_over_voltage": Latch(1.0)}),
        ({"cell_over_voltage": Latch(1.0)}, (), 5.0, {"cell_over_voltage": Latch(1.0, 10.0)}),
        ({"cell_over_voltage": Latch(1.0)}, (), 10.0, {}),  # cleared and acknowledged in the same cycle
        ({"cell_over_voltage": Latch(1.0, 8.0)}, (), 8.0, {}),
        ({"cell_over_voltage": Latch(1.0, 8.0)}, (), 7.9, {"cell_over_voltage": Latch(1.0, 8.0)}),
        # It came back before the clear: active again, raised now.
        ({"cell_over_voltage": Latch(1.0, 8.0)}, ("cell_over_voltage",), 9.0,
         {"cell_over_voltage": Latch(10.0)}),
        ({"cell_over_voltage": Latch(1.0)}, None, 20.0, {"cell_over_voltage": Latch(1.0)}),  # not reporting
        ({"cell_over_voltage": Latch(1.0, 8.0)}, None, 20.0, {}),
    ],
)
def test_latch_transitions(
    previous: dict[str, Latch],
    alarms: tuple[str, ...] | None,
    clear_s: float | None,
    expected: dict[str, Latch],
) -> None:
    observed = None if alarms is None else FlagsRecord(**dict.fromkeys(alarms, True))
    assert dict(update_latches(previous, observed, 10.0, clear_s)) == expected


@pytest.mark.parametrize(
    ("ok_since", "is_ok", "now", "eligible", "share"),
    [
        (None, False, 5.0, False, 0.0),
        (None, True, 5.0, False, 0.0),
        (0.0, True, 9.9, False, 0.0),
        (0.0, True, 10.0, True, 0.0),
        (0.0, True, 12.5, True, 0.25),
        (0.0, True, 20.0, True, 1.0),
        (0.0, True, 99.0, True, 1.0),
        (0.0, False, 99.0, False, 0.0),
    ],
)
def test_admission(ok_since: float | None, is_ok: bool, now: float, eligible: bool, share: float) -> None:
    a = admit(ok_since, is_ok, now, hold_s=10.0, ramp_s=10.0)
    assert a.eligible == eligible
    assert a.share == pytest.approx(share)
    assert a.ok_since_s == ((ok_since if ok_since is not None else now) if is_ok else None)


def test_quorum_shortfall() -> None:
    assert quorum_shortfall(1, 2) == "not enough racks (1 of min 2)"
    assert quorum_shortfall(0, 1, in_hold=3) == "not enough racks (0 of min 1; 3 in the re-admission hold)"
    assert quorum_shortfall(1, 3, in_hold=1, in_maintenance=1) == (
        "not enough racks (1 of min 3; 1 in the re-admission hold, 1 in maintenance)")
    assert quorum_shortfall(2, 2, in_hold=5) is None
    assert quorum_shortfall(2, 2) is None


def test_table_rows_name_consolidated_fields() -> None:
    rows = table(AggregationConfig())
    assert set(rows) - set(ConsolidatedState.model_fields) == set()
    assert {"charge_current_limit_a", "discharge_current_limit_a"} <= set(rows)
    assert set(FIXED_ROWS) < set(rows)


def test_initial_memory_is_empty() -> None:
    assert CoreMemory.initial() == CoreMemory()
    assert CoreMemory.initial().racks == {}


def test_thermal_window_ends_at_the_newest_sample_and_never_moves_with_time_alone() -> None:
    """The slope (and so the derate) changes only with payloads: a cached rack outcome stays valid."""
    from controller.core.derates import DerateMemory, derate_rack  # noqa: PLC0415

    agg = AggregationConfig.model_validate({"thermal_derate": {"window_s": 10.0, "horizon_s": 60.0}})
    memory = DerateMemory()
    m = None
    for k in range(30):  # 0.5 °C/s for 15 s, one payload every 0.5 s
        m = telemetry("r1", t_max=30.0 + 0.25 * k).measurements
        derate, memory = derate_rack(memory, m, 100.0 + 0.5 * k, 100.0 + 0.5 * k, agg)
    assert [t for t, _ in memory.samples] == [100.0 + 0.5 * k for k in range(9, 30)]  # within 10 s of 114.5
    assert m is not None
    later, same_memory = derate_rack(memory, m, 114.5, 500.0, agg)  # the same payload, much later
    assert later == derate and same_memory.samples == memory.samples
    assert derate.charge_factor < 1.0  # 44.5 °C rising 0.5 °C/s projects far beyond the table
