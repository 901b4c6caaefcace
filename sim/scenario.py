"""Scenario files: timed fault and load events applied to running simulated racks.

A scenario is TOML::

    description = "rack 0 overheats under load"

    [[events]]
    at_s = 5.0
    action = "over_temperature"
    rate_c_per_s = 0.5
    rack = 0            # optional: without it the event applies to every rack

Actions and their parameters are the :data:`Event` models below; the file is validated once
into frozen models, and an unknown action is an error that lists the known ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal, Protocol, get_args

from pydantic import AfterValidator, Field, ValidationError, field_validator

from shared.config import ConfigError, Frozen, format_validation_error, load_toml
from sim.faults import (
    MAX_DELAY_MS,
    MAX_IMBALANCE_MV,
    MAX_OVER_TEMPERATURE_C_PER_S,
    MAX_SHORT_READ_REGISTERS,
    FaultError,
    SunSpecLayout,
    check_exception_code,
    check_flag,
)

log = logging.getLogger(__name__)

MAX_SCENARIO_S = 7 * 24 * 3600.0


class ScenarioError(ConfigError):
    """A scenario file cannot be used (the message names the file and each problem)."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        super().__init__(path, problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (f"invalid scenario {self.path}:\n{lines}",)


class Target(Protocol):
    """What an event acts on: :class:`sim.bms_server.SimulatedBms` satisfies it."""

    @property
    def faults(self) -> _FaultSink: ...

    def set_current(self, amps: float) -> None: ...


class _FaultSink(Protocol):
    def set_over_temperature(self, rate_c_per_s: float) -> None: ...
    def set_imbalance(self, mv: float) -> None: ...
    def raise_alarm(self, name: str) -> None: ...
    def raise_warning(self, name: str) -> None: ...
    def open_contactor(self) -> None: ...
    def close_contactor(self) -> None: ...
    def set_delay(self, ms: int) -> None: ...
    def set_no_answer(self, enabled: bool = True) -> None: ...
    def set_corrupt_crc(self, enabled: bool = True) -> None: ...
    def set_exception(self, code: int | None) -> None: ...
    def set_short_read(self, registers: int) -> None: ...
    def set_sunspec_layout(self, layout: str) -> None: ...
    def clear(self) -> None: ...


class EventBase(Frozen):
    """Fields every event has; each subclass narrows ``action`` to its own name and implements apply()."""

    action: str
    at_s: Annotated[float, Field(ge=0, le=MAX_SCENARIO_S, allow_inf_nan=False)]
    rack: Annotated[int, Field(ge=0, le=255)] | None = None

    def apply(self, target: Target) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        params = self.model_dump(exclude={"at_s", "rack", "action"})
        return " ".join([self.action, *(f"{k}={v}" for k, v in params.items())])


class Clear(EventBase):
    """Remove every fault (the load current stays as it is)."""

    action: Literal["clear"]

    def apply(self, target: Target) -> None:
        target.faults.clear()


class OverTemperature(EventBase):
    action: Literal["over_temperature"]
    # 0 stops the ramp (the module then cools by itself) without clearing other faults.
    rate_c_per_s: Annotated[float, Field(ge=0, le=MAX_OVER_TEMPERATURE_C_PER_S, allow_inf_nan=False)]

    def apply(self, target: Target) -> None:
        target.faults.set_over_temperature(self.rate_c_per_s)


class Imbalance(EventBase):
    action: Literal["imbalance"]
    mv: Annotated[float, Field(ge=0, le=MAX_IMBALANCE_MV, allow_inf_nan=False)]

    def apply(self, target: Target) -> None:
        target.faults.set_imbalance(self.mv)


def _flag(name: str) -> str:
    try:
        return check_flag(name)
    except FaultError as exc:
        raise ValueError(str(exc)) from None


FlagName = Annotated[str, AfterValidator(_flag)]


class Alarm(EventBase):
    action: Literal["alarm"]
    flag: FlagName

    def apply(self, target: Target) -> None:
        target.faults.raise_alarm(self.flag)


class WarningFlag(EventBase):
    action: Literal["warning"]
    flag: FlagName

    def apply(self, target: Target) -> None:
        target.faults.raise_warning(self.flag)


class ContactorOpen(EventBase):
    action: Literal["contactor_open"]

    def apply(self, target: Target) -> None:
        target.faults.open_contactor()


class ContactorClose(EventBase):
    action: Literal["contactor_close"]

    def apply(self, target: Target) -> None:
        target.faults.close_contactor()


class Delay(EventBase):
    action: Literal["delay"]
    ms: Annotated[int, Field(ge=0, le=MAX_DELAY_MS)]

    def apply(self, target: Target) -> None:
        target.faults.set_delay(self.ms)


class NoAnswer(EventBase):
    action: Literal["no_answer"]
    enabled: bool = True

    def apply(self, target: Target) -> None:
        target.faults.set_no_answer(self.enabled)


class CorruptCrc(EventBase):
    action: Literal["corrupt_crc"]
    enabled: bool = True

    def apply(self, target: Target) -> None:
        target.faults.set_corrupt_crc(self.enabled)


class ModbusException(EventBase):
    action: Literal["exception"]
    # 0 = stop answering with exceptions.
    code: int

    @field_validator("code")
    @classmethod
    def _known(cls, code: int) -> int:
        if code != 0:
            try:
                check_exception_code(code)
            except FaultError as exc:
                raise ValueError(str(exc)) from None
        return code

    def apply(self, target: Target) -> None:
        target.faults.set_exception(self.code or None)


class ShortRead(EventBase):
    action: Literal["short_read"]
    # 0 = answer with every register asked for again.
    registers: Annotated[int, Field(ge=0, le=MAX_SHORT_READ_REGISTERS)]

    def apply(self, target: Target) -> None:
        target.faults.set_short_read(self.registers)


class Layout(EventBase):
    """Serve a broken SunSpec map (e.g. after a firmware update); "standard" restores it."""

    action: Literal["sunspec_layout"]
    layout: SunSpecLayout

    def apply(self, target: Target) -> None:
        target.faults.set_sunspec_layout(self.layout)


class Current(EventBase):
    action: Literal["current"]
    amps: Annotated[float, Field(ge=-10_000, le=10_000, allow_inf_nan=False)]

    def apply(self, target: Target) -> None:
        target.set_current(self.amps)


Event = Annotated[
    Clear | OverTemperature | Imbalance | Alarm | WarningFlag | ContactorOpen | ContactorClose
    | Delay | NoAnswer | CorruptCrc | ModbusException | ShortRead | Layout | Current,
    Field(discriminator="action"),
]
ACTIONS: tuple[str, ...] = tuple(
    get_args(cls.model_fields["action"].annotation)[0] for cls in get_args(get_args(Event)[0])
)


class Scenario(Frozen):
    description: str = ""
    events: tuple[Event, ...] = ()

    def ordered(self) -> tuple[EventBase, ...]:
        """Events by time; events at the same time keep their order in the file."""
        return tuple(sorted(self.events, key=lambda e: e.at_s))

    def check_racks(self, racks: int, source: Path | str = "<scenario>") -> None:
        """:class:`ScenarioError` if an event names a rack index that does not exist."""
        problems = [
            f"events[{i}].rack: rack {e.rack} does not exist (racks: 0..{racks - 1})"
            for i, e in enumerate(self.events)
            if e.rack is not None and e.rack >= racks
        ]
        if problems:
            raise ScenarioError(source, problems)


def parse_scenario(data: dict[str, object], source: Path | str = "<scenario>") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(source, format_validation_error(exc)) from exc


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario file; any defect raises :class:`ScenarioError`."""
    try:
        data = load_toml(path)
    except ConfigError as exc:
        raise ScenarioError(exc.path, exc.problems) from exc
    return parse_scenario(data, path)


async def run_scenario(
    scenario: Scenario,
    racks: Sequence[Target],
    *,
    on_event: Callable[[float, EventBase], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Apply each event at ``at_s`` seconds after the call; returns after the last one.

    Cancel the task running it to abandon the rest of the scenario.
    """
    scenario.check_racks(len(racks))
    start = clock()
    for event in scenario.ordered():
        delay_s = start + event.at_s - clock()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        targets = racks if event.rack is None else [racks[event.rack]]
        for target in targets:
            event.apply(target)
        log.debug("scenario t=%.1f s rack %s: %s", event.at_s, "all" if event.rack is None else event.rack,
                 event.describe())
        if on_event is not None:
            on_event(clock() - start, event)


__all__ = [
    "ACTIONS",
    "Event",
    "EventBase",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
    "run_scenario",
]
