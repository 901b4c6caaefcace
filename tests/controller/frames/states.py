"""ConsolidatedState builders for the frame tests: one plain state, and a hypothesis strategy."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from shared.cluster import ClusterFlags, ConsolidatedState, RackState, RackView
from shared.models import PROTECTION_FLAG_NAMES, ProtectionFlags

# The SETFIRE Pylontech trace: 53.2 V / 370.0 A / 370.0 A / 46.0 V.
TRACE_0X351 = bytes.fromhex("14 02 74 0E 74 0E CC 01")


def flags(*names: str) -> ProtectionFlags:
    return ProtectionFlags(**dict.fromkeys(names, True))


def state(**overrides: Any) -> ConsolidatedState:
    """A healthy 4-rack bank (3 eligible) with the trace's limits; override any field."""
    values: dict[str, Any] = {
        "site_id": "site-t",
        "node_id": "ctl-1",
        "timestamp_s": 1_700_000_000.0,
        "charge_current_limit_a": 370.0,
        "discharge_current_limit_a": 370.0,
        "charge_voltage_limit_v": 53.2,
        "discharge_voltage_limit_v": 46.0,
        "charge_enabled": True,
        "discharge_enabled": True,
        "soc_pct": 56.3,
        "soh_pct": 98.0,
        "pack_voltage_v": 52.13,
        "current_a": -12.3,
        "temperature_avg_c": 24.5,
        "cell_voltage_max_v": 3.312,
        "cell_voltage_min_v": 3.251,
        "temperature_max_c": 27.0,
        "temperature_min_c": 21.0,
        "capacity_ah": 400.0,
        "roster_size": 4,
        "eligible_racks": 3,
        "racks": tuple(
            RackView(rack_id=f"r{i}", state=RackState.OK if i < 4 else RackState.STALE, eligible=i < 4,
                     share=1.0 if i < 4 else 0.0, charge_current_limit_a=100.0 if i < 4 else 0.0,
                     discharge_current_limit_a=100.0 if i < 4 else 0.0)
            for i in range(1, 5)
        ),
    }
    values.update(overrides)
    return ConsolidatedState(**values)


def _floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


def _limit() -> st.SearchStrategy[float]:
    # Mostly ordinary limits, sometimes 0, sometimes beyond what 0x351 can carry (3276.7 A).
    return st.one_of(st.just(0.0), _floats(0.0, 500.0), _floats(0.0, 10_000.0))


_flag_sets = st.sets(st.sampled_from(PROTECTION_FLAG_NAMES), max_size=3).map(lambda s: flags(*s))


@st.composite
def consolidated_states(draw: st.DrawFn) -> ConsolidatedState:
    """Any state the contract allows, with the core's own consistency (DVL below a non-zero CVL
    mostly, racks matching the counts) but not its policies: alarms may come with granted limits,
    CVL may be 0, values may exceed what the frames can carry."""
    pack_v = draw(st.one_of(_floats(40.0, 60.0), _floats(0.0, 1000.0)))
    cvl = draw(st.one_of(st.just(0.0), _floats(0.0, 0.2), _floats(40.0, 62.0), _floats(0.0, 1000.0)))
    dvl = draw(st.one_of(_floats(0.0, 48.0), _floats(0.0, 1000.0)))
    roster = draw(st.integers(min_value=0, max_value=300))
    eligible = draw(st.integers(min_value=0, max_value=roster))
    racks = tuple(
        RackView(rack_id=f"r{i}", state=RackState.OK if i < eligible else RackState.FAULTED,
                 eligible=i < eligible, share=1.0 if i < eligible else 0.0,
                 charge_current_limit_a=draw(st.sampled_from((0.0, 0.04, 50.0))) if i < eligible else 0.0,
                 discharge_current_limit_a=draw(st.sampled_from((0.0, 50.0))) if i < eligible else 0.0)
        for i in range(min(roster, 8))
    )
    t_a, t_b = draw(_floats(-40.0, 125.0)), draw(_floats(-40.0, 125.0))
    c_a, c_b = draw(_floats(0.0, 10.0)), draw(_floats(0.0, 10.0))
    return ConsolidatedState(
        site_id="site-t",
        node_id="ctl-1",
        timestamp_s=draw(_floats(0.0, 2e9)),
        charge_current_limit_a=draw(_limit()),
        discharge_current_limit_a=draw(_limit()),
        charge_voltage_limit_v=cvl,
        discharge_voltage_limit_v=dvl,
        charge_enabled=draw(st.booleans()),
        discharge_enabled=draw(st.booleans()),
        soc_pct=draw(_floats(0.0, 100.0)),
        soh_pct=draw(_floats(0.0, 100.0)),
        pack_voltage_v=pack_v,
        current_a=draw(st.one_of(_floats(-500.0, 500.0), _floats(-10_000.0, 10_000.0))),
        temperature_avg_c=draw(_floats(-40.0, 125.0)),
        cell_voltage_max_v=max(c_a, c_b) if draw(st.booleans()) else c_a,
        cell_voltage_min_v=min(c_a, c_b) if draw(st.booleans()) else c_b,
        temperature_max_c=max(t_a, t_b),
        temperature_min_c=min(t_a, t_b) if draw(st.booleans()) else t_b,
        alarms=draw(st.one_of(st.just(ProtectionFlags()), _flag_sets)),
        warnings=draw(st.one_of(st.just(ProtectionFlags()), _flag_sets)),
        cluster=ClusterFlags(not_enough_racks=draw(st.booleans()) and draw(st.booleans()),
                             latched_alarm=draw(st.booleans()) and draw(st.booleans())),
        capacity_ah=draw(st.one_of(_floats(0.0, 2000.0), _floats(0.0, 200_000.0))),
        roster_size=roster,
        eligible_racks=eligible,
        racks=racks,
    )
