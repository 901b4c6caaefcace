"""Scenario files: validation with clear errors, each action's effect, and the timed runner."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from sim.bms_server import SimulatedBms
from sim.faults import Faults, SunSpecLayout
from sim.scenario import ACTIONS, Scenario, ScenarioError, load_scenario, parse_scenario, run_scenario


def _one(**event: Any) -> Scenario:
    return parse_scenario({"events": [{"at_s": 0.0, **event}]})


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"action": "over_temperature", "rate_c_per_s": 0.5}, Faults(over_temperature_c_per_s=0.5)),
        ({"action": "imbalance", "mv": 60}, Faults(imbalance_mv=60.0)),
        ({"action": "alarm", "flag": "internal_fault"}, Faults(alarms=frozenset({"internal_fault"}))),
        ({"action": "warning", "flag": "cell_imbalance"}, Faults(warnings=frozenset({"cell_imbalance"}))),
        ({"action": "contactor_open"}, Faults(contactor_open=True)),
        ({"action": "delay", "ms": 250}, Faults(delay_ms=250)),
        ({"action": "no_answer"}, Faults(no_answer=True)),
        ({"action": "corrupt_crc"}, Faults(corrupt_crc=True)),
        ({"action": "exception", "code": 6}, Faults(exception_code=6)),
        ({"action": "short_read", "registers": 2}, Faults(short_read_registers=2)),
        ({"action": "sunspec_layout", "layout": "no_803"}, Faults(sunspec_layout=SunSpecLayout.NO_803)),
    ],
)
def test_each_fault_action_sets_exactly_its_fault(event: dict[str, Any], expected: Faults) -> None:
    bms = SimulatedBms()
    (action,) = _one(**event).events
    action.apply(bms)
    assert bms.faults.snapshot() == expected


@pytest.mark.parametrize(
    ("undo", "before"),
    [
        ({"action": "clear"}, Faults(no_answer=True, delay_ms=5, alarms=frozenset({"internal_fault"}))),
        ({"action": "contactor_close"}, Faults(contactor_open=True)),
        ({"action": "no_answer", "enabled": False}, Faults(no_answer=True)),
        ({"action": "exception", "code": 0}, Faults(exception_code=4)),
        ({"action": "over_temperature", "rate_c_per_s": 0}, Faults(over_temperature_c_per_s=1.0)),
        ({"action": "short_read", "registers": 0}, Faults(short_read_registers=5)),
        ({"action": "sunspec_layout", "layout": "standard"}, Faults(sunspec_layout=SunSpecLayout.NO_END)),
    ],
)
def test_undo_actions(undo: dict[str, Any], before: Faults) -> None:
    bms = SimulatedBms()
    bms.faults.replace(before)
    (action,) = _one(**undo).events
    action.apply(bms)
    assert bms.faults.snapshot().healthy


def test_current_action_sets_the_load() -> None:
    bms = SimulatedBms()
    (action,) = _one(action="current", amps=-55.5).events
    action.apply(bms)
    assert bms.model.measurements().current_a == -55.5


def test_unknown_action_lists_the_choices() -> None:
    with pytest.raises(ScenarioError) as caught:
        _one(action="explode")
    message = str(caught.value)
    assert "explode" in message
    for action in ACTIONS:
        assert f"'{action}'" in message


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        ({"action": "alarm", "flag": "on_fire"},
         "unknown protection flag 'on_fire'; choices: cell_over_voltage"),
        ({"action": "exception", "code": 9}, "choices: 1 (ILLEGAL_FUNCTION)"),
        ({"action": "delay", "ms": -1}, "events[0].delay.ms"),
        ({"action": "current"}, "events[0].current.amps: Field required"),
        ({"action": "clear", "typo": 1}, "events[0].clear.typo: Extra inputs are not permitted"),
    ],
)
def test_bad_events_name_the_problem(event: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ScenarioError, match="invalid scenario") as caught:
        _one(**event)
    assert fragment in str(caught.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[events]\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)


def test_rack_index_is_checked_against_the_racks() -> None:
    scenario = _one(action="no_answer", rack=2)
    scenario.check_racks(3)
    with pytest.raises(ScenarioError, match=r"rack 2 does not exist \(racks: 0..1\)"):
        scenario.check_racks(2)


def test_shipped_example_is_valid() -> None:
    path = Path(str(resources.files("sim") / "scenarios" / "overheat.toml"))
    scenario = load_scenario(path)
    assert [e.action for e in scenario.ordered()] == ["current", "over_temperature", "over_temperature"]
    scenario.check_racks(1)


async def test_runner_applies_events_in_time_order() -> None:
    scenario = parse_scenario({"events": [
        {"at_s": 0.10, "action": "contactor_close", "rack": 1},
        {"at_s": 0.0, "action": "contactor_open"},
        {"at_s": 0.05, "action": "current", "amps": 10.0, "rack": 0},
    ]})
    racks = [SimulatedBms(), SimulatedBms()]
    seen: list[tuple[float, str, int | None]] = []
    started = time.monotonic()
    await run_scenario(scenario, racks, on_event=lambda t, e: seen.append((t, e.action, e.rack)))
    assert time.monotonic() - started == pytest.approx(0.10, abs=0.05)
    assert [(a, r) for _, a, r in seen] == [("contactor_open", None), ("current", 0), ("contactor_close", 1)]
    assert [t for t, _, _ in seen] == sorted(t for t, _, _ in seen)
    assert seen[1][0] >= 0.05
    assert racks[0].faults.snapshot().contactor_open  # rack 0 stays open
    assert not racks[1].faults.snapshot().contactor_open  # rack 1 closed again at 0.1 s
    assert racks[0].model.requested_current_a == 10.0
    assert racks[1].model.requested_current_a == 0.0


async def test_runner_refuses_a_missing_rack_before_applying_anything() -> None:
    bms = SimulatedBms()
    scenario = parse_scenario({"events": [{"at_s": 0.0, "action": "no_answer"},
                                          {"at_s": 0.0, "action": "no_answer", "rack": 1}]})
    with pytest.raises(ScenarioError):
        await run_scenario(scenario, [bms])
    assert bms.faults.snapshot().healthy
