"""The aggregation table: how each consolidated quantity is made from the racks.

Every quantity of the consolidated battery is one row of ``table()``: the population of
racks it reads and one combining function. Populations:

- ``parallel``: racks in state ``ok`` (current, valid telemetry, BMS link up, no rack fault,
  contactor closed or unknown), whether already eligible or still in their re-admission
  hold. These are physically in parallel, so their limits bind the bank; each carries a
  ``share`` (0 in the hold, ramping to 1, see ``admission.py``).
- ``reporting``: every rack whose telemetry is current (``ok``, ``faulted``,
  ``disconnected``), for the alarm and warning sets: an alarm anywhere must be visible.

The physics behind the rows:

- **CCL/DCL**, by ``AggregationConfig.ccl_policy`` / ``dcl_policy`` (``CURRENT_POLICIES``):

  - ``n_times_min`` (default): ``min(limit_i) × Σ share_i``. Parallel racks cannot be
    steered: the bank current splits by their internal impedance, roughly evenly, so the
    weakest rack reaches its own limit when the bank carries about N × its limit. With all
    racks fully admitted this is min × N; a rack ramping in adds its share (0..1) to N
    instead of 1, so its return never steps the limit up, while its own limit is in the
    minimum from its first ``ok`` cycle (it is in parallel from then on).
  - ``sum``: ``Σ share_i × limit_i``; right only if the racks share current in proportion to
    their limits (identical racks, or an active current-sharing device). Opt-in.
  - ``min``: ``min(limit_i) × min(1, Σ share_i)``; the bank never exceeds what one rack may
    carry ("capacity adds up, power does not"). The most conservative choice.

  **Whatever the policy**, a rack in parallel whose (derated) limit is 0 makes the bank limit
  0: it is in the current path and allows no current in that direction (DAB#160: a summed
  limit kept charging a pack that had asked for 0).

  **Held racks** (``isolation.py``: lost from sight while in parallel, not yet known out). Any
  subset H of them may still be in parallel, at their last limits and shares, so the safe bank
  limit is the lowest of the policy over ``parallel ∪ H`` for every H, the empty one included.
  For these three policies that lowest is always reached with at most one held rack
  (``lowest_with_held``): write P(H) for the policy over ``parallel ∪ H`` and w for the weakest
  rack of ``parallel ∪ H``.

  - ``n_times_min``: P(H) = L_w × (Σ_parallel share + Σ_H share). If w is in ``parallel``,
    P(H) ≥ P(∅); if w is held, P(H) ≥ L_w × (Σ_parallel share + share_w) = P({w}), since
    every other member only adds share. Adding *all* held racks at once is not enough: with
    a 100 A rack in parallel and two held ones at 40 A and 100 A, P(∅) = 100 A and the union
    gives 40 × 3 = 120 A, while the 40 A rack alone still in parallel allows 40 × 2 = 80 A.
  - ``sum``: P(H) = P(∅) + Σ_H share × limit ≥ P(∅): a held rack never lowers the sum (if it
    is still in parallel, the current splits over more racks), except by the zero-limit
    rule, which holds for it as for any rack in parallel (a held rack last at 0 A keeps the
    bank at 0 A in that direction).
  - ``min``: P(H) = L_w × min(1, Σ share); as for ``n_times_min``, P(H) ≥ P(∅) or ≥ P({w}).

  For CVL and DVL (below) the worst case is every held rack at once: a lowest ceiling only falls
  and a highest floor only rises as racks are added, so the lowest ceiling over ``parallel ∪
  held`` is at most the one over ``parallel ∪ H`` for every H (``held_voltages``).
- **CVL** = lowest ceiling: the bank is one voltage, so no rack may be taken above its own.
  Held racks count at their last ceiling (``held_voltages``).
- **DVL** = highest floor, for the same reason downward; held racks count at their last floor.
- **SOC** weighted by the roster capacity (a 200 Ah rack at 50 % holds twice the charge of a
  100 Ah one); **SOH** the lowest (the bank ages with its weakest rack).
- **Voltage** mean (one bus, small differences are sensor and cable); **current** sum (the
  rack currents add up at the bus); **capacity** the roster capacities summed.
- **Average temperature** mean of each rack's (max + min) / 2; **cell V and T** extremes
  with their place as ``"rack-id: location"``.
- **Alarms, warnings** OR over ``reporting``. The engine adds the latched alarms
  (``faults.py``) to the alarm set.

An empty population gives no value (None); the engine then applies its own fallback.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain
from operator import attrgetter
from types import MappingProxyType
from typing import Final, NamedTuple

from shared.controller_config import AggregationConfig, CurrentPolicy
from shared.models import ProtectionFlags
from shared.records import MeasurementsRecord

# shared.models.Location allows 64 characters; "rack-id: location" is cut to fit.
LOCATION_MAX_LEN = 64


class Population(StrEnum):
    PARALLEL = "parallel"
    REPORTING = "reporting"


# The numbers the rows read, one column each (see ``Members.column``). A member derives its
# row once, when it is made; a cycle then reads a thousand racks' values without touching them.
COLUMNS: Final[tuple[str, ...]] = (
    "charge_limit_a",
    "discharge_limit_a",
    "share",
    "capacity_ah",
    "charge_voltage_limit_v",
    "discharge_voltage_limit_v",
    "soc_pct",
    "soh_pct",
    "pack_voltage_v",
    "current_a",
    "temperature_avg_c",  # (max + min) / 2 of the rack
    "cell_voltage_max_v",
    "cell_voltage_min_v",
    "temperature_max_c",
    "temperature_min_c",
)
_COLUMN_INDEX: Final[Mapping[str, int]] = MappingProxyType({name: i for i, name in enumerate(COLUMNS)})


class Member(NamedTuple):
    """One rack as the table sees it: its telemetry, its roster capacity, share and derated limits.

    Made with :func:`member`, which derives the last three fields. (A NamedTuple: one is made per
    rack per payload; docs/performance.md, "Per-rack values".)
    """

    rack_id: str
    measurements: MeasurementsRecord
    capacity_ah: float
    share: float
    charge_limit_a: float
    discharge_limit_a: float
    charge_notes: tuple[str, ...]
    discharge_notes: tuple[str, ...]
    # Derived once per member: its value of every ``COLUMNS`` entry, and the names of its raised
    # alarms and warnings, read by every cycle's table.
    numbers: tuple[float, ...]
    alarm_names: tuple[str, ...]
    warning_names: tuple[str, ...]


def member(
    rack_id: str,
    measurements: MeasurementsRecord,
    capacity_ah: float,
    *,
    share: float,
    charge_limit_a: float,
    discharge_limit_a: float,
    charge_notes: tuple[str, ...],
    discharge_notes: tuple[str, ...],
) -> Member:
    m = measurements
    numbers = (
        charge_limit_a,
        discharge_limit_a,
        share,
        capacity_ah,
        m.charge_voltage_limit_v,
        m.discharge_voltage_limit_v,
        m.soc_pct,
        m.soh_pct,
        m.pack_voltage_v,
        m.current_a,
        (m.temperature_max_c + m.temperature_min_c) / 2,
        m.cell_voltage_max_v,
        m.cell_voltage_min_v,
        m.temperature_max_c,
        m.temperature_min_c,
    )
    return Member(rack_id, measurements, capacity_ah, share, charge_limit_a, discharge_limit_a, charge_notes,
                  discharge_notes, numbers, m.alarms.raised(), m.warnings.raised())


_NUMBERS = attrgetter("numbers")


class Members:
    """One population of one cycle: its members in roster order, and their values by column.

    The columns are made on first use, all at once (one transposition in C), and shared by
    every row that reads this population. They are arrays of doubles: a row reads one
    contiguous block instead of a thousand float objects spread over the heap, and a cycle in
    which few racks changed patches last cycle's columns (:meth:`patched`) instead of reading
    every member again.
    """

    __slots__ = ("_columns", "members")

    def __init__(self, members: Sequence[Member], columns: tuple[array[float], ...] | None = None) -> None:
        self.members = members
        self._columns = columns

    def __len__(self) -> int:
        return len(self.members)

    def _all_columns(self) -> tuple[array[float], ...]:
        if self._columns is None:
            self._columns = tuple(
                array("d", column) for column in zip(*map(_NUMBERS, self.members), strict=True)
            ) if self.members else ()
        return self._columns

    def column(self, name: str) -> Sequence[float]:
        """``name`` (one of ``COLUMNS``) of every member, in roster order."""
        columns = self._all_columns()
        if not columns:
            return ()
        return columns[_COLUMN_INDEX[name]]

    def plus(self, member: Member) -> Members:
        """These members and ``member`` after them (a held rack added to the racks in parallel, see
        :func:`lowest_with_held`); the columns, if made, are copied with its values appended."""
        members = [*self.members, member]
        if self._columns is None or not self.members:
            return Members(members)
        columns = tuple(array("d", column) for column in self._columns)
        for column, value in zip(columns, member.numbers, strict=True):
            column.append(value)
        return Members(members, columns)

    def patched(self, changes: Sequence[tuple[int, Member]]) -> Members:
        """These members with the one at each index replaced (same population, same order)."""
        if not changes:
            return self
        members = list(self.members)
        for index, new in changes:
            members[index] = new
        if self._columns is None:
            return Members(members)
        columns = tuple(array("d", column) for column in self._columns)  # copies of the blocks
        for index, new in changes:
            for column, value in zip(columns, new.numbers, strict=True):
                column[index] = value
        return Members(members, columns)


NO_FLAGS: Final = ProtectionFlags()  # immutable: one instance serves every empty set


class Pick(NamedTuple):
    """The outcome of one row: a number (or ``flags`` for the flag rows) and how it came about.

    ``rack_id`` names the deciding rack when one decides; ``detail`` is the formula for the
    provenance string; ``forced_zero`` says a zeroing rule, not arithmetic, made it 0. (A
    NamedTuple: every cycle makes one per row, urgent cycles included.)
    """

    value: float = 0.0
    rack_id: str = ""
    location: str = ""
    detail: str = ""
    forced_zero: bool = False
    flags: ProtectionFlags = NO_FLAGS


Combine = Callable[[Members], Pick | None]


@dataclass(frozen=True, slots=True)
class Rule:
    population: Population
    combine: Combine


@dataclass(frozen=True, slots=True)
class Side:
    """One current direction: which limit (and its column), notes and reported value of a member it reads."""

    label: str
    column: str
    limit: Callable[[Member], float]
    notes: Callable[[Member], tuple[str, ...]]
    reported: Callable[[Member], float]


CHARGE: Final = Side(
    "charge",
    "charge_limit_a",
    lambda m: m.charge_limit_a,
    lambda m: m.charge_notes,
    lambda m: m.measurements.charge_current_limit_a,
)
DISCHARGE: Final = Side(
    "discharge",
    "discharge_limit_a",
    lambda m: m.discharge_limit_a,
    lambda m: m.discharge_notes,
    lambda m: m.measurements.discharge_current_limit_a,
)

# The extremes take the first member (roster order) among equals, as min()/max() with a key
# would. Values are finite (the contract rejects NaN), so index(min(values)) is that member.


def _first_lowest(values: Sequence[float]) -> int:
    return values.index(min(values))


def _first_highest(values: Sequence[float]) -> int:
    return values.index(max(values))


def rack_term(member: Member, side: Side) -> str:
    """``"r3 112.0 A (cell max 3.430 V taper ×0.80, reports 140.0 A)"``."""
    notes = side.notes(member)
    extra = f" ({', '.join(notes)}, reports {side.reported(member):.1f} A)" if notes else ""
    return f"{member.rack_id} {side.limit(member):.1f} A{extra}"


def _shares_term(population: Members) -> str:
    """How Σ share came about: ``"4 eligible"`` or ``"2.40 (2 full, r3 ramping 0.40, r4 in hold)"``."""
    shares = population.column("share")
    if min(shares) >= 1.0:
        return f"{len(shares)} eligible"
    partial = [m for m in population.members if m.share < 1.0]
    parts = [f"{len(shares) - len(partial)} full"] + [
        f"{m.rack_id} ramping {m.share:.2f}" if m.share > 0.0 else f"{m.rack_id} in hold" for m in partial
    ]
    return f"{sum(shares):.2f} ({', '.join(parts)})"


def _n_times_min(side: Side, population: Members) -> Pick:
    limits = population.column(side.column)
    i = _first_lowest(limits)
    weakest = population.members[i]
    shares = sum(population.column("share"))
    detail = f"{rack_term(weakest, side)} × {_shares_term(population)}"
    return Pick(limits[i] * shares, weakest.rack_id, detail=detail)


def _sum(side: Side, population: Members) -> Pick:
    members = population.members
    terms = [rack_term(m, side) + (f" × {m.share:.2f}" if m.share < 1.0 else "") for m in members]
    value = sum(map(operator.mul, population.column(side.column), population.column("share")))
    return Pick(value, detail="sum of " + " + ".join(terms))


def _min(side: Side, population: Members) -> Pick:
    limits = population.column(side.column)
    i = _first_lowest(limits)
    weakest = population.members[i]
    scale = min(1.0, sum(population.column("share")))
    scaled = f" × {_shares_term(population)}" if scale < 1.0 else ""
    detail = f"min {rack_term(weakest, side)}{scaled}"
    return Pick(limits[i] * scale, weakest.rack_id, detail=detail)


CURRENT_POLICIES: Final[Mapping[CurrentPolicy, Callable[[Side, Members], Pick]]] = MappingProxyType(
    {
        CurrentPolicy.N_TIMES_MIN: _n_times_min,
        CurrentPolicy.SUM: _sum,
        CurrentPolicy.MIN: _min,
    }
)


def current_limit(policy: CurrentPolicy, side: Side) -> Combine:
    """The CCL or DCL row: the zero-limit rule first, whatever the policy, then the policy."""

    def combine(population: Members) -> Pick | None:
        if not population:
            return None
        limits = population.column(side.column)
        if min(limits) <= 0.0:
            m = population.members[next(i for i, limit in enumerate(limits) if limit <= 0.0)]
            contactor = m.measurements.contactor.value
            return Pick(
                0.0,
                m.rack_id,
                detail=f"{rack_term(m, side)} with contactor {contactor}",
                forced_zero=True,
            )
        return CURRENT_POLICIES[policy](side, population)

    return combine


def lowest_with_held(
    combine: Combine, column: str, population: Members, held: Sequence[Member], pick: Pick | None
) -> tuple[Pick | None, Member | None]:
    """The CCL or DCL row (``combine``, reading ``column``) with racks held at their last limits
    (``isolation``): the lowest of ``pick`` (the row over ``population``, the racks in parallel)
    and the row over ``population`` with each held member added alone, and the held member that
    gave it (None: ``pick`` stands).

    One held rack at a time is the worst case over every subset of them that may still be in
    parallel, for each policy (see the module docstring); with no rack in parallel there is
    nothing to add to (``pick`` None: the bank is 0 A anyway). A held rack whose limit is above
    0 and not below the weakest in parallel cannot lower any of the three policies (it leaves
    the minimum alone and adds share or current), so only the others are tried: a thousand racks
    losing sight of a few hundred do not cost a thousand-member pass each.
    """
    if pick is None or pick.forced_zero:
        return pick, None
    binding = None
    weakest = min(population.column(column))
    at = _COLUMN_INDEX[column]
    for extra in held:
        limit = extra.numbers[at]
        if limit > 0.0 and limit >= weakest:
            continue
        alternative = combine(population.plus(extra))
        if alternative is not None and (alternative.value < pick.value or alternative.forced_zero):
            pick, binding = alternative, extra
            if pick.forced_zero:
                break  # nothing is lower than a rack in the current path at 0 A
    return pick, binding


class HeldVoltages(NamedTuple):
    """The voltage limits of racks held at their last limits (``isolation``), as the CVL and DVL rows
    read them: the lowest usable ceiling, the first held rack whose ceiling is not usable (a BMS
    saying 0 V means "do not charge") and the highest floor; None where no held rack gives one."""

    ceiling: Pick | None = None
    unusable: Pick | None = None
    floor: Pick | None = None


NO_HELD_VOLTAGES: Final = HeldVoltages()


def held_voltages(held: Sequence[Member], usable_min_v: float) -> HeldVoltages:
    """The CVL and DVL rows' view of the held racks (roster order; the first among equals decides).

    Any subset of them may still be in parallel, so each may lower the bank's ceiling or raise its
    floor; all of them at once is the worst case (see the module docstring). A ceiling below
    ``usable_min_v`` is not a ceiling but a stop: it is returned apart (``unusable``) for the
    engine to stop charging, as it does for a rack in parallel reporting it.
    """
    if not held:
        return NO_HELD_VOLTAGES
    cvl_at, dvl_at = _COLUMN_INDEX["charge_voltage_limit_v"], _COLUMN_INDEX["discharge_voltage_limit_v"]
    ceiling = unusable = floor = None
    for m in held:
        cvl, dvl = m.numbers[cvl_at], m.numbers[dvl_at]
        if cvl < usable_min_v:
            if unusable is None:
                unusable = m
        elif ceiling is None or cvl < ceiling.numbers[cvl_at]:
            ceiling = m
        if floor is None or dvl > floor.numbers[dvl_at]:
            floor = m
    return HeldVoltages(
        None if ceiling is None else Pick(ceiling.numbers[cvl_at], ceiling.rack_id),
        None if unusable is None else Pick(unusable.numbers[cvl_at], unusable.rack_id),
        None if floor is None else Pick(floor.numbers[dvl_at], floor.rack_id),
    )


Location = Callable[[MeasurementsRecord], str]


def _place(member: Member, location: str) -> str:
    text = f"{member.rack_id}: {location}" if location else member.rack_id
    return text[:LOCATION_MAX_LEN]


def lowest(column: str, location: Location | None = None) -> Combine:
    def combine(population: Members) -> Pick | None:
        if not population:
            return None
        values = population.column(column)
        i = _first_lowest(values)
        m = population.members[i]
        where = _place(m, location(m.measurements)) if location else ""
        return Pick(values[i], m.rack_id, where)

    return combine


def highest(column: str, location: Location | None = None) -> Combine:
    def combine(population: Members) -> Pick | None:
        if not population:
            return None
        values = population.column(column)
        i = _first_highest(values)
        m = population.members[i]
        where = _place(m, location(m.measurements)) if location else ""
        return Pick(values[i], m.rack_id, where)

    return combine


def mean(column: str) -> Combine:
    def combine(population: Members) -> Pick | None:
        if not population:
            return None
        return Pick(sum(population.column(column)) / len(population))

    return combine


def total(column: str) -> Combine:
    def combine(population: Members) -> Pick | None:
        if not population:
            return None
        return Pick(sum(population.column(column)))

    return combine


def capacity_weighted(column: str) -> Combine:
    def combine(population: Members) -> Pick | None:
        capacities = population.column("capacity_ah")
        capacity = sum(capacities)
        if not population or capacity <= 0.0:
            return None
        return Pick(sum(map(operator.mul, population.column(column), capacities)) / capacity)

    return combine


def any_of(names: Callable[[Member], tuple[str, ...]]) -> Combine:
    """OR of a flag set over the members; ``names`` gives a member's raised flag names."""

    def combine(population: Members) -> Pick | None:
        raised = set(chain.from_iterable(map(names, population.members)))
        return Pick(flags=ProtectionFlags(**dict.fromkeys(raised, True)) if raised else NO_FLAGS)

    return combine


PARALLEL, REPORTING = Population.PARALLEL, Population.REPORTING

# Rows that do not depend on the configuration; ``table()`` adds the CCL/DCL rows.
FIXED_ROWS: Final[Mapping[str, Rule]] = MappingProxyType(
    {
        "charge_voltage_limit_v": Rule(PARALLEL, lowest("charge_voltage_limit_v")),
        "discharge_voltage_limit_v": Rule(PARALLEL, highest("discharge_voltage_limit_v")),
        "soc_pct": Rule(PARALLEL, capacity_weighted("soc_pct")),
        "soh_pct": Rule(PARALLEL, lowest("soh_pct")),
        "pack_voltage_v": Rule(PARALLEL, mean("pack_voltage_v")),
        "current_a": Rule(PARALLEL, total("current_a")),
        "capacity_ah": Rule(PARALLEL, total("capacity_ah")),
        "temperature_avg_c": Rule(PARALLEL, mean("temperature_avg_c")),
        "cell_voltage_max_v": Rule(
            PARALLEL, highest("cell_voltage_max_v", lambda m: m.cell_voltage_max_location)
        ),
        "cell_voltage_min_v": Rule(
            PARALLEL, lowest("cell_voltage_min_v", lambda m: m.cell_voltage_min_location)
        ),
        "temperature_max_c": Rule(
            PARALLEL, highest("temperature_max_c", lambda m: m.temperature_max_location)
        ),
        "temperature_min_c": Rule(
            PARALLEL, lowest("temperature_min_c", lambda m: m.temperature_min_location)
        ),
        "alarms": Rule(REPORTING, any_of(attrgetter("alarm_names"))),
        "warnings": Rule(REPORTING, any_of(attrgetter("warning_names"))),
    }
)


def table(config: AggregationConfig) -> Mapping[str, Rule]:
    """The whole aggregation table for this configuration: quantity name → rule."""
    return MappingProxyType(
        {
            "charge_current_limit_a": Rule(PARALLEL, current_limit(config.ccl_policy, CHARGE)),
            "discharge_current_limit_a": Rule(PARALLEL, current_limit(config.dcl_policy, DISCHARGE)),
            **FIXED_ROWS,
        }
    )
