"""FaultState: validated setters, one immutable snapshot at a time, a version for caches."""

from __future__ import annotations

import pytest

from sim.faults import FaultError, Faults, FaultState, SunSpecLayout


def test_setters_replace_the_snapshot_and_bump_the_version() -> None:
    state = FaultState()
    before = state.snapshot()
    version = state.version
    state.set_delay(120)
    state.raise_alarm("internal_fault")
    state.raise_warning("cell_imbalance")
    after = state.snapshot()
    assert before == Faults() and before.healthy  # an earlier snapshot never changes
    assert (after.delay_ms, after.alarms, after.warnings) == (120, {"internal_fault"}, {"cell_imbalance"})
    assert state.version == version + 3
    state.clear_alarm("internal_fault")
    state.clear_warning("cell_imbalance")
    state.set_delay(0)
    assert state.snapshot().healthy


def test_unknown_flag_lists_the_choices() -> None:
    with pytest.raises(FaultError) as caught:
        FaultState().raise_alarm("on_fire")
    assert "cell_over_voltage" in caught.value.choices
    assert "choices: cell_over_voltage" in str(caught.value)


@pytest.mark.parametrize(
    "apply",
    [
        lambda s: s.set_exception(9),
        lambda s: s.set_delay(-1),
        lambda s: s.set_delay(600_000),
        lambda s: s.set_imbalance(float("nan")),
        lambda s: s.set_over_temperature(-0.5),
        lambda s: s.replace(Faults(alarms=frozenset({"nope"}))),
    ],
)
def test_out_of_range_is_refused_and_leaves_the_state_alone(apply: object) -> None:
    state = FaultState()
    with pytest.raises(FaultError):
        apply(state)  # type: ignore[operator]
    assert state.snapshot().healthy and state.version == 0


def test_exception_none_clears_it() -> None:
    state = FaultState(Faults(exception_code=4, no_answer=True))
    state.set_exception(None)
    state.set_no_answer(False)
    assert state.snapshot().healthy


def test_layout_and_short_read_are_validated_and_cleared() -> None:
    state = FaultState()
    state.set_sunspec_layout("no_803")
    state.set_short_read(4)
    snap = state.snapshot()
    assert (snap.sunspec_layout, snap.short_read_registers) == (SunSpecLayout.NO_803, 4)
    assert not snap.healthy
    with pytest.raises(FaultError) as caught:
        state.set_sunspec_layout("no_such_layout")
    assert "short_802" in caught.value.choices
    with pytest.raises(FaultError):
        state.set_short_read(126)
    assert state.snapshot() == snap
    state.clear()
    assert state.snapshot().healthy
