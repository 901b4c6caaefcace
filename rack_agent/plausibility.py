"""Plausibility of one reading: fields of the same answer that contradict each other (pure).

The contract (shared/models.py) bounds each field on its own; a reading can keep every bound and
still be impossible as a whole: a pack at 0 V next to cells at 3.3 V, a charge voltage limit at
or below the discharge one. Such a reading says the BMS (or its register map) is wrong, so it is
refused as invalid data, with the contradiction as the reason. Rules, in the order reported:

* cell voltages: ``cell_voltage_min_v`` <= ``cell_voltage_max_v``;
* temperatures: ``temperature_min_c`` <= ``temperature_max_c``;
* voltage limits: ``charge_voltage_limit_v`` > ``discharge_voltage_limit_v`` (a window to work in);
* pack against cells: ``n·cell_min·(1 − tol) − margin`` <= ``pack_voltage_v`` <=
  ``n·cell_max·(1 + tol) + margin`` with ``n`` cells in series; when ``n`` is not configured only the
  lower bound with ``n = 1`` is checked (a pack holds at least one cell);
* pack against the rack's configured nominal range, where one is configured.

A field the reading does not carry (absent, or not a finite number) is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from rack_agent.errors import ImplausibleReadingError
from shared.agent_config import PlausibilityConfig, UnitConfig
from shared.models import RackMeasurements


@dataclass(frozen=True, slots=True)
class PlausibilityRules:
    """The limits one unit's readings are held to (from its unit config and the agent's)."""

    cells_in_series: int | None = None
    pack_tolerance_pct: float = 5.0
    pack_margin_v: float = 2.0
    pack_voltage_min_v: float | None = None
    pack_voltage_max_v: float | None = None

    @classmethod
    def for_unit(cls, unit: UnitConfig, config: PlausibilityConfig) -> PlausibilityRules:
        return cls(
            cells_in_series=unit.cells_in_series,
            pack_tolerance_pct=config.pack_tolerance_pct,
            pack_margin_v=config.pack_margin_v,
            pack_voltage_min_v=config.pack_voltage_min_v,
            pack_voltage_max_v=config.pack_voltage_max_v,
        )


DEFAULT_RULES = PlausibilityRules()


def pack_voltage_bounds(
    cell_min_v: float | None, cell_max_v: float | None, rules: PlausibilityRules
) -> tuple[float | None, float | None]:
    """The lowest and highest pack voltage the cells allow (None: that bound is not checked)."""
    tolerance = rules.pack_tolerance_pct / 100.0
    n = rules.cells_in_series
    low = None if cell_min_v is None else (n or 1) * cell_min_v * (1.0 - tolerance) - rules.pack_margin_v
    high = (
        None if cell_max_v is None or n is None
        else n * cell_max_v * (1.0 + tolerance) + rules.pack_margin_v
    )
    return low, high


def _number(values: Mapping[str, object], name: str) -> float | None:
    value = values.get(name)
    # bool is an int to Python, but a flag is never one of these quantities.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def contradictions(values: Mapping[str, object], rules: PlausibilityRules) -> tuple[str, ...]:
    """What contradicts what in one reading (field name -> value), empty if it is plausible."""
    found: list[str] = []
    cell_min, cell_max = _number(values, "cell_voltage_min_v"), _number(values, "cell_voltage_max_v")
    if cell_min is not None and cell_max is not None and cell_min > cell_max:
        found.append(f"cell_voltage_min_v {cell_min:.3f} V above cell_voltage_max_v {cell_max:.3f} V")
    t_min, t_max = _number(values, "temperature_min_c"), _number(values, "temperature_max_c")
    if t_min is not None and t_max is not None and t_min > t_max:
        found.append(f"temperature_min_c {t_min:.1f} °C above temperature_max_c {t_max:.1f} °C")
    cvl, dvl = _number(values, "charge_voltage_limit_v"), _number(values, "discharge_voltage_limit_v")
    if cvl is not None and dvl is not None and cvl <= dvl:
        found.append(
            f"charge_voltage_limit_v {cvl:.2f} V not above discharge_voltage_limit_v {dvl:.2f} V"
        )
    pack = _number(values, "pack_voltage_v")
    if pack is not None:
        found.extend(_pack_contradictions(pack, cell_min, cell_max, rules))
    return tuple(found)


def _pack_contradictions(
    pack: float, cell_min: float | None, cell_max: float | None, rules: PlausibilityRules
) -> list[str]:
    found: list[str] = []
    low, high = pack_voltage_bounds(cell_min, cell_max, rules)
    cells = (
        f"{rules.cells_in_series} cells" if rules.cells_in_series is not None
        else "1 cell (cells_in_series not configured)"
    )
    if low is not None and cell_min is not None and pack < low:
        found.append(
            f"pack_voltage_v {pack:.2f} V below {cells} at cell_voltage_min_v {cell_min:.3f} V "
            f"(at least {low:.2f} V)"
        )
    if high is not None and cell_max is not None and pack > high:
        found.append(
            f"pack_voltage_v {pack:.2f} V above {cells} at cell_voltage_max_v {cell_max:.3f} V "
            f"(at most {high:.2f} V)"
        )
    if rules.pack_voltage_min_v is not None and pack < rules.pack_voltage_min_v:
        found.append(f"pack_voltage_v {pack:.2f} V below the rack's minimum {rules.pack_voltage_min_v:.2f} V")
    if rules.pack_voltage_max_v is not None and pack > rules.pack_voltage_max_v:
        found.append(f"pack_voltage_v {pack:.2f} V above the rack's maximum {rules.pack_voltage_max_v:.2f} V")
    return found


def validated_measurements(
    values: Mapping[str, object], rules: PlausibilityRules | None
) -> RackMeasurements:
    """A reading's fields as measurements, or :class:`ImplausibleReadingError` saying why not.

    The contradictions under ``rules`` are checked first (None: the contract's bounds only, as for a
    decoder test): the contract refuses some of them too (a minimum above its maximum), but its
    message would quote the whole reading.
    """
    problems = contradictions(values, rules) if rules is not None else ()
    if problems:
        raise ImplausibleReadingError("; ".join(problems))
    try:
        return RackMeasurements.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "measurements"
        raise ImplausibleReadingError(f"{where}: {first['msg']} (got {first.get('input')!r})") from exc
