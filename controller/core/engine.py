"""The incremental engine: the reference cycle's result, recomputing only what changed.

The controller runs this; ``step`` (``controller/core/step.py``) is its specification, and the
property tests in ``tests/controller/core/test_engine.py`` drive random event sequences through both
and compare every output and every memory.

What the engine is told, explicitly: a rack's new input (:meth:`Engine.put`), a new config
(:meth:`Engine.reconfigure`), and each cycle's time and clear commands (:meth:`Engine.cycle`). It
keeps every roster rack's last outcome (``rack_outcome``), and a cycle recomputes a rack only

- when it was given a new input or a new clear command since its outcome, or
- when its outcome's validity time (``RackOutcome.valid_until_s``, kept in a heap) has passed;

every rack is recomputed after a new config, a clock that stepped back, and a cycle that raised.
The bank's inputs (``bank.BankInputs``) are patched with the recomputed outcomes while no rack joins
or leaves a population or holds a latch, else made again from every outcome; the consolidation
itself (``bank.consolidate``) runs in full every cycle.

Why that is the reference's result: a rack's outcome is a function of its input, its memory, its
roster entry, the config, the clear command and the time; with all but the time unchanged it stands
until ``valid_until_s`` (see ``rack_outcome``), and the next cycle computed from the memory it
returned gives the same outcome again — which is what the reference computes for the racks the
engine leaves alone.

An urgent cycle (a payload that may lower a limit, run the moment it arrives) is the same call: it
equals the reference at its instant, over the inputs the engine was given.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controller.core.bank import BankInputs, consolidate
from controller.core.faults import Latch
from controller.core.memory import CoreMemory, RackMemory
from controller.core.policies import Member
from controller.core.rack_outcome import RackOutcome, rack_outcome
from controller.core.snapshot import RackInput
from shared.cluster import ConsolidatedState
from shared.controller_config import ControllerConfig

# A rack is recomputed once ``now`` is within this of its validity time: far more than the rounding
# of ``received + limit`` against ``now - received > limit`` (classify.read_rack). Recomputing early
# is exact, only a little slower.
DUE_MARGIN_S = 1e-3


@dataclass(frozen=True, slots=True)
class _Bank:
    """The bank's inputs, and where each rack sits in their populations (to patch them)."""

    inputs: BankInputs
    parallel_at: Mapping[str, int]  # rack id → index in inputs.parallel.members
    reporting_at: Mapping[str, int]
    held_at: Mapping[str, int]

    @classmethod
    def of(cls, outcomes: Sequence[RackOutcome]) -> _Bank:
        def indexes(members: Sequence[Member]) -> Mapping[str, int]:
            return {m.rack_id: i for i, m in enumerate(members)}

        inputs = BankInputs.of(outcomes)
        return cls(inputs, indexes(inputs.parallel.members), indexes(inputs.reporting.members),
                   indexes(inputs.held))

    def patched(self, changes: Sequence[tuple[int, RackOutcome, RackOutcome]]) -> _Bank | None:
        """These inputs with each (roster index, old outcome, new outcome) applied, or None when a
        change alters their shape (a rack joins or leaves a population, or holds or held a latch):
        then they are made again from every outcome."""
        parallel: list[tuple[int, Member]] = []
        reporting: list[tuple[int, Member]] = []
        held = list(self.inputs.held)
        held_notes = list(self.inputs.held_notes)
        eligible = self.inputs.eligible
        views = list(self.inputs.views)
        memories = dict(self.inputs.memories)
        for at, old, new in changes:
            if (
                (old.parallel_member is None) != (new.parallel_member is None)
                or (old.member is None) != (new.member is None)
                or (old.held_member is None) != (new.held_member is None)
                or old.memory.latches
                or new.memory.latches
            ):
                return None
            rack_id = new.rack_id
            if new.parallel_member is not None:
                parallel.append((self.parallel_at[rack_id], new.parallel_member))
            if new.member is not None:
                reporting.append((self.reporting_at[rack_id], new.member))
            if new.held_member is not None:
                index = self.held_at[rack_id]
                held[index], held_notes[index] = new.held_member, new.isolation.note
            eligible += new.admission.eligible - old.admission.eligible
            views[at] = new.view
            memories[rack_id] = new.memory
        inputs = BankInputs(
            parallel=self.inputs.parallel.patched(parallel),
            reporting=self.inputs.reporting.patched(reporting),
            held=tuple(held),
            held_notes=tuple(held_notes),
            eligible=eligible,
            latches_by_rack=self.inputs.latches_by_rack,  # no changed rack holds or held a latch
            kept_latches=self.inputs.kept_latches,
            charge_blocks=self.inputs.charge_blocks,  # (blocks come from latches only)
            discharge_blocks=self.inputs.discharge_blocks,
            views=tuple(views),
            memories=MappingProxyType(memories),
        )
        return _Bank(inputs, self.parallel_at, self.reporting_at, self.held_at)


class Engine:
    """The controller's core: the inputs it was given, each roster rack's last outcome, and the memory.

    Not thread-safe; one per controller, driven from its event loop.
    """

    def __init__(self, config: ControllerConfig, memory: CoreMemory | None = None) -> None:
        self._config = config
        self._memory = memory if memory is not None else CoreMemory.initial()
        self._inputs: dict[str, RackInput] = {}
        self._roster_at = {roster_rack.rack_id: i for i, roster_rack in enumerate(config.roster)}
        self._strangers: set[str] = set()  # ids put that are not on the roster
        # The last cycle's outcomes in roster order (None: recompute every rack next cycle).
        self._outcomes: list[RackOutcome] | None = None
        self._bank: _Bank | None = None
        self._clear_commands_s: Mapping[str, float] = MappingProxyType({})
        self._maintenance: frozenset[str] = frozenset()
        self._changed: set[str] = set()  # roster racks put since their outcome
        self._due: list[tuple[float, str]] = []  # (validity time, rack id), a heap
        self._due_s: dict[str, float] = {}  # each rack's current validity time (heap entries may be old)
        self.racks_recomputed = 0  # racks whose outcome was computed (all cycles, for the metrics)

    @property
    def config(self) -> ControllerConfig:
        return self._config

    @property
    def latches_by_rack(self) -> tuple[tuple[str, Mapping[str, Latch]], ...]:
        """The last cycle's racks holding latches (roster order), suspended ones included."""
        return self._bank.inputs.kept_latches if self._bank is not None else ()

    @property
    def memory(self) -> CoreMemory:
        """What the last cycle carried forward (the reference's memory after the same cycles)."""
        return self._memory

    def put(self, rack_input: RackInput) -> None:
        """A rack's new input: what the next cycle judges it on."""
        rack_id = rack_input.rack_id
        self._inputs[rack_id] = rack_input
        if rack_id in self._roster_at:
            self._changed.add(rack_id)
        else:
            self._strangers.add(rack_id)

    def replace_memory(self, memory: CoreMemory) -> None:
        """The memory changed outside a cycle (latches another controller knew, or released by its
        clear: ``memory.with_latches``; a warm takeover: ``controller.warm_standby``): the next cycle
        recomputes every rack from it."""
        self._memory = memory
        self._outcomes = None

    def reconfigure(self, config: ControllerConfig) -> None:
        """Adopt a new config (a reload): the next cycle recomputes every rack."""
        self._config = config
        self._roster_at = {roster_rack.rack_id: i for i, roster_rack in enumerate(config.roster)}
        self._strangers = {rack_id for rack_id in self._inputs if rack_id not in self._roster_at}
        self._outcomes = None

    def cycle(
        self, now_s: float, wall_s: float, *, clear_commands_s: Mapping[str, float] | None = None,
        maintenance: frozenset[str] | None = None, unknown_racks: tuple[str, ...] = (),
    ) -> ConsolidatedState:
        """This cycle's consolidated battery: ``step`` on every input put so far, from the memory of the
        cycles before (``clear_commands_s``, ``maintenance``: as in ``Snapshot``, None: the last cycle's;
        ``unknown_racks``: ids heard off the roster, reported before those put)."""
        clears = self._clear_commands_s if clear_commands_s is None else clear_commands_s
        if maintenance is not None and maintenance != self._maintenance:
            self._changed.update((maintenance ^ self._maintenance) & self._roster_at.keys())
            self._maintenance = maintenance
        try:
            return self._cycle(now_s, wall_s, clears, unknown_racks)
        except BaseException:
            self._outcomes = None  # the heap and the outcomes may disagree now: start again in full
            raise

    def _cycle(
        self, now_s: float, wall_s: float, clears: Mapping[str, float], unknown_racks: tuple[str, ...]
    ) -> ConsolidatedState:
        last_now_s = self._memory.last_now_s
        outcomes = self._outcomes
        if clears != self._clear_commands_s:  # a copy of the last cycle's: compared by value
            self._changed.update(
                rack_id for rack_id in self._roster_at
                if clears.get(rack_id) != self._clear_commands_s.get(rack_id)
            )
            clears = MappingProxyType(dict(clears))
        if outcomes is None or (last_now_s is not None and now_s < last_now_s):
            outcomes = [self._outcome(rack_id, now_s, clears) for rack_id in self._roster_at]
            bank = _Bank.of(outcomes)
            self._due, self._due_s = [], {}
            recomputed: Sequence[RackOutcome] = outcomes
        else:
            outcomes = list(outcomes)
            changes = []
            for rack_id in sorted(self._changed | self._due_racks(now_s)):
                at = self._roster_at[rack_id]
                new = self._outcome(rack_id, now_s, clears)
                changes.append((at, outcomes[at], new))
                outcomes[at] = new
            assert self._bank is not None  # made with the outcomes
            bank = self._bank.patched(changes) or _Bank.of(outcomes)
            recomputed = [new for _, _, new in changes]
        stranger_ids = tuple(sorted(self._strangers))
        state, memory = consolidate(
            bank.inputs, config=self._config, memory=self._memory, now_s=now_s, wall_s=wall_s,
            unknown_racks=tuple(dict.fromkeys((*unknown_racks, *stranger_ids))),
        )
        for outcome in recomputed:
            self._schedule(outcome)
        self.racks_recomputed += len(recomputed)
        self._outcomes, self._bank, self._memory = outcomes, bank, memory
        self._clear_commands_s = clears
        self._changed.clear()
        return state

    def _outcome(self, rack_id: str, now_s: float, clears: Mapping[str, float]) -> RackOutcome:
        return rack_outcome(
            roster_rack=self._config.roster[self._roster_at[rack_id]],
            rack_input=self._inputs.get(rack_id) or RackInput(rack_id),
            previous=self._memory.racks.get(rack_id) or RackMemory(),
            config=self._config,
            clear_command_s=clears.get(rack_id),
            now_s=now_s,
            in_maintenance=rack_id in self._maintenance,
        )

    def _due_racks(self, now_s: float) -> set[str]:
        """The racks whose outcome's validity time has passed (popped from the heap)."""
        due: set[str] = set()
        while self._due and self._due[0][0] - DUE_MARGIN_S <= now_s:
            valid_until_s, rack_id = heapq.heappop(self._due)
            if self._due_s.get(rack_id) == valid_until_s:  # else an entry of an older outcome
                del self._due_s[rack_id]
                due.add(rack_id)
        return due

    def _schedule(self, outcome: RackOutcome) -> None:
        if math.isinf(outcome.valid_until_s):
            self._due_s.pop(outcome.rack_id, None)
            return
        self._due_s[outcome.rack_id] = outcome.valid_until_s
        heapq.heappush(self._due, (outcome.valid_until_s, outcome.rack_id))
