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
- **CVL** = lowest ceiling: the bank is one voltage, so no rack may be taken above its own.
- **DVL** = highest floor, for the same reason downward.
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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from controller.core.faults import raised_names
from shared.controller_config import AggregationConfig, CurrentPolicy
from shared.models import ProtectionFlags, RackMeasurements

# shared.models.Location allows 64 characters; "rack-id: location" is cut to fit.
LOCATION_MAX_LEN = 64


class Population(StrEnum):
    PARALLEL = "parallel"
    REPORTING = "reporting"


@dataclass(frozen=True, slots=True)
class Member:
    """One rack as the table sees it: its telemetry, its roster capacity, share and derated limits."""

    rack_id: str
    measurements: RackMeasurements
    capacity_ah: float
    share: float = 0.0
    charge_limit_a: float = 0.0
    discharge_limit_a: float = 0.0
    charge_notes: tuple[str, ...] = ()
    discharge_notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pick:
    """The outcome of one row: a number (or ``flags`` for the flag rows) and how it came about.

    ``rack_id`` names the deciding rack when one decides; ``detail`` is the formula for the
    provenance string; ``forced_zero`` says a zeroing rule, not arithmetic, made it 0.
    """

    value: float = 0.0
    rack_id: str = ""
    location: str = ""
    detail: str = ""
    forced_zero: bool = False
    flags: ProtectionFlags = field(default_factory=ProtectionFlags)


Combine = Callable[[Sequence[Member]], Pick | None]


@dataclass(frozen=True, slots=True)
class Rule:
    population: Population
    combine: Combine


@dataclass(frozen=True, slots=True)
class Side:
    """One current direction: which limit, notes and reported value of a member it reads."""

    label: str
    limit: Callable[[Member], float]
    notes: Callable[[Member], tuple[str, ...]]
    reported: Callable[[Member], float]


CHARGE: Final = Side(
    "charge",
    lambda m: m.charge_limit_a,
    lambda m: m.charge_notes,
    lambda m: m.measurements.charge_current_limit_a,
)
DISCHARGE: Final = Side(
    "discharge",
    lambda m: m.discharge_limit_a,
    lambda m: m.discharge_notes,
    lambda m: m.measurements.discharge_current_limit_a,
)


def rack_term(member: Member, side: Side) -> str:
    """``"r3 112.0 A (cell max 3.430 V taper ×0.80, reports 140.0 A)"``."""
    notes = side.notes(member)
    extra = f" ({', '.join(notes)}, reports {side.reported(member):.1f} A)" if notes else ""
    return f"{member.rack_id} {side.limit(member):.1f} A{extra}"


def _shares_term(members: Sequence[Member]) -> str:
    """How Σ share came about: ``"4 eligible"`` or ``"2.40 (2 full, r3 ramping 0.40, r4 in hold)"``."""
    full = sum(1 for m in members if m.share >= 1.0)
    partial = [m for m in members if m.share < 1.0]
    if not partial:
        return f"{full} eligible"
    parts = [f"{full} full"] + [
        f"{m.rack_id} ramping {m.share:.2f}" if m.share > 0.0 else f"{m.rack_id} in hold" for m in partial
    ]
    return f"{sum(m.share for m in members):.2f} ({', '.join(parts)})"


def _n_times_min(side: Side, members: Sequence[Member]) -> Pick:
    weakest = min(members, key=side.limit)
    shares = sum(m.share for m in members)
    detail = f"{rack_term(weakest, side)} × {_shares_term(members)}"
    return Pick(side.limit(weakest) * shares, weakest.rack_id, detail=detail)


def _sum(side: Side, members: Sequence[Member]) -> Pick:
    terms = [rack_term(m, side) + (f" × {m.share:.2f}" if m.share < 1.0 else "") for m in members]
    return Pick(sum(side.limit(m) * m.share for m in members), detail="sum of " + " + ".join(terms))


def _min(side: Side, members: Sequence[Member]) -> Pick:
    weakest = min(members, key=side.limit)
    scale = min(1.0, sum(m.share for m in members))
    scaled = f" × {_shares_term(members)}" if scale < 1.0 else ""
    detail = f"min {rack_term(weakest, side)}{scaled}"
    return Pick(side.limit(weakest) * scale, weakest.rack_id, detail=detail)


CURRENT_POLICIES: Final[Mapping[CurrentPolicy, Callable[[Side, Sequence[Member]], Pick]]] = MappingProxyType(
    {
        CurrentPolicy.N_TIMES_MIN: _n_times_min,
        CurrentPolicy.SUM: _sum,
        CurrentPolicy.MIN: _min,
    }
)


def current_limit(policy: CurrentPolicy, side: Side) -> Combine:
    """The CCL or DCL row: the zero-limit rule first, whatever the policy, then the policy."""

    def combine(members: Sequence[Member]) -> Pick | None:
        if not members:
            return None
        for m in members:
            if side.limit(m) <= 0.0:
                contactor = m.measurements.contactor.value
                return Pick(
                    0.0,
                    m.rack_id,
                    detail=f"{rack_term(m, side)} with contactor {contactor}",
                    forced_zero=True,
                )
        return CURRENT_POLICIES[policy](side, members)

    return combine


Number = Callable[[RackMeasurements], float]


def _place(member: Member, location: str) -> str:
    text = f"{member.rack_id}: {location}" if location else member.rack_id
    return text[:LOCATION_MAX_LEN]


def lowest(number: Number, location: Callable[[RackMeasurements], str] | None = None) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        if not members:
            return None
        m = min(members, key=lambda x: number(x.measurements))
        where = _place(m, location(m.measurements)) if location else ""
        return Pick(number(m.measurements), m.rack_id, where)

    return combine


def highest(number: Number, location: Callable[[RackMeasurements], str] | None = None) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        if not members:
            return None
        m = max(members, key=lambda x: number(x.measurements))
        where = _place(m, location(m.measurements)) if location else ""
        return Pick(number(m.measurements), m.rack_id, where)

    return combine


def mean(number: Number) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        if not members:
            return None
        return Pick(sum(number(m.measurements) for m in members) / len(members))

    return combine


def total(number: Callable[[Member], float]) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        if not members:
            return None
        return Pick(sum(number(m) for m in members))

    return combine


def capacity_weighted(number: Number) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        capacity = sum(m.capacity_ah for m in members)
        if not members or capacity <= 0.0:
            return None
        return Pick(sum(number(m.measurements) * m.capacity_ah for m in members) / capacity)

    return combine


def any_of(flags: Callable[[RackMeasurements], ProtectionFlags]) -> Combine:
    def combine(members: Sequence[Member]) -> Pick | None:
        raised = {name for m in members for name in raised_names(flags(m.measurements))}
        return Pick(flags=ProtectionFlags(**dict.fromkeys(raised, True)))

    return combine


PARALLEL, REPORTING = Population.PARALLEL, Population.REPORTING

# Rows that do not depend on the configuration; ``table()`` adds the CCL/DCL rows.
FIXED_ROWS: Final[Mapping[str, Rule]] = MappingProxyType(
    {
        "charge_voltage_limit_v": Rule(PARALLEL, lowest(lambda m: m.charge_voltage_limit_v)),
        "discharge_voltage_limit_v": Rule(PARALLEL, highest(lambda m: m.discharge_voltage_limit_v)),
        "soc_pct": Rule(PARALLEL, capacity_weighted(lambda m: m.soc_pct)),
        "soh_pct": Rule(PARALLEL, lowest(lambda m: m.soh_pct)),
        "pack_voltage_v": Rule(PARALLEL, mean(lambda m: m.pack_voltage_v)),
        "current_a": Rule(PARALLEL, total(lambda m: m.measurements.current_a)),
        "capacity_ah": Rule(PARALLEL, total(lambda m: m.capacity_ah)),
        "temperature_avg_c": Rule(PARALLEL, mean(lambda m: (m.temperature_max_c + m.temperature_min_c) / 2)),
        "cell_voltage_max_v": Rule(
            PARALLEL, highest(lambda m: m.cell_voltage_max_v, lambda m: m.cell_voltage_max_location)
        ),
        "cell_voltage_min_v": Rule(
            PARALLEL, lowest(lambda m: m.cell_voltage_min_v, lambda m: m.cell_voltage_min_location)
        ),
        "temperature_max_c": Rule(
            PARALLEL, highest(lambda m: m.temperature_max_c, lambda m: m.temperature_max_location)
        ),
        "temperature_min_c": Rule(
            PARALLEL, lowest(lambda m: m.temperature_min_c, lambda m: m.temperature_min_location)
        ),
        "alarms": Rule(REPORTING, any_of(lambda m: m.alarms)),
        "warnings": Rule(REPORTING, any_of(lambda m: m.warnings)),
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
