"""Controller-side derates, applied **per rack** to the rack's own limits before they combine.

Per rack rather than on the bank result, because current splits evenly-ish between parallel
racks: the rack that heats up or whose cells approach their limit must cap *its* share, and
N×min then passes that cap to the bank. A bank-level factor on the hottest temperature would
multiply the weakest rack's limit by another rack's factor (double counting), and a bank-wide
temperature history jumps whenever the hottest rack joins or leaves, which a slope would read
as a steep rise.

**Rate-of-rise thermal derate** (``ThermalDerateConfig``), factor on both CCL and DCL (the
heat comes from current in either direction). Each reporting rack keeps the
(arrival time, ``temperature_max_c``) of its payloads within the last ``window_s``; one
sample per payload, so a cycle faster than the rack's poll adds no flat steps. The slope is
the least-squares fit over the window (0 with fewer than two distinct times). The table is
read at::

    projected = T_now + max(0, slope) × horizon_s

so a rack that warms quickly is derated while it is still cool, before its own
over-temperature alarm; a cooling rack is judged on its present temperature. With the
defaults (horizon 60 s, table 40 → 1, 55 → 0) a steady 0.2 °C/s rise projects 12 °C ahead.

**Cell-voltage taper** (``CellTaperConfig``): CCL × ``charge_table(cell_voltage_max_v)``,
DCL × ``discharge_table(cell_voltage_min_v)``.

Both carry hysteresis (``hysteresis_c``, ``hysteresis_v``) as a play operator on the table's
input (``tables.py``): a worse reading derates at once, a better one only beyond the band.
The held inputs are in the memory; a rack that is not reporting keeps its held values and
loses samples as they leave the window.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from controller.core.tables import Harmful, interpolate, play
from shared.controller_config import AggregationConfig, CellTaperConfig, ThermalDerateConfig
from shared.models import RackMeasurements

# Below this spread of sample times (s²) a slope is noise; treat the temperature as flat.
MIN_TIME_SPREAD_S2 = 1e-6


@dataclass(frozen=True, slots=True)
class DerateMemory:
    """What the derates of one rack carry between cycles."""

    # (received_s, temperature_max_c), times strictly increasing (a sample is only appended when newer).
    samples: tuple[tuple[float, float], ...] = ()
    thermal_held_c: float | None = None
    charge_cell_held_v: float | None = None
    discharge_cell_held_v: float | None = None


@dataclass(frozen=True, slots=True)
class Derate:
    """Factors (0..1) on one rack's CCL and DCL, with a note per factor below 1."""

    charge_factor: float = 1.0
    discharge_factor: float = 1.0
    charge_notes: tuple[str, ...] = ()
    discharge_notes: tuple[str, ...] = ()


def slope_per_s(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) samples; 0 when the times do not spread.

    Two passes (means first, then centred sums): the time values are large (monotonic
    seconds), so running sums of t² would cancel. Written with lists and ``map`` for speed;
    every sum adds the same terms in the same order as the plain formula, so the result is
    bit for bit the same.
    """
    n = len(samples)
    if n < 2:
        return 0.0
    times = [t for t, _ in samples]
    values = [v for _, v in samples]
    t_mean = sum(times) / n
    v_mean = sum(values) / n
    t_dev = [t - t_mean for t in times]
    spread = sum([d**2 for d in t_dev])
    if spread < MIN_TIME_SPREAD_S2:
        return 0.0
    return sum(map(operator.mul, t_dev, [v - v_mean for v in values])) / spread


def derate_rack(
    memory: DerateMemory,
    measurements: RackMeasurements | None,
    received_s: float | None,
    now_s: float,
    config: AggregationConfig,
) -> tuple[Derate, DerateMemory]:
    """This cycle's factors for one rack (all 1 when it is not reporting) and its next memory."""
    thermal = config.thermal_derate
    samples = _window(memory.samples, now_s, thermal.window_s)
    if measurements is None or received_s is None:
        return Derate(), DerateMemory(
            samples, memory.thermal_held_c, memory.charge_cell_held_v, memory.discharge_cell_held_v
        )
    if thermal.enabled and (not samples or received_s > samples[-1][0]):
        samples = (*samples, (received_s, measurements.temperature_max_c))
    thermal_factor, thermal_held, thermal_note = _thermal(
        thermal, samples, measurements, memory.thermal_held_c
    )
    charge_factor, charge_held, charge_note, discharge_factor, discharge_held, discharge_note = _taper(
        config.cell_taper, measurements, memory
    )
    notes_c = tuple(n for n in (charge_note, thermal_note) if n)
    notes_d = tuple(n for n in (discharge_note, thermal_note) if n)
    derate = Derate(thermal_factor * charge_factor, thermal_factor * discharge_factor, notes_c, notes_d)
    return derate, DerateMemory(samples if thermal.enabled else (), thermal_held, charge_held, discharge_held)


Samples = tuple[tuple[float, float], ...]


def _window(samples: Samples, now_s: float, window_s: float) -> Samples:
    oldest_s = now_s - window_s
    if not samples or samples[0][0] >= oldest_s:
        return samples  # oldest first (times strictly increase): nothing has left the window
    return tuple(s for s in samples if s[0] >= oldest_s)


def _thermal(
    config: ThermalDerateConfig,
    samples: Sequence[tuple[float, float]],
    m: RackMeasurements,
    held_c: float | None,
) -> tuple[float, float | None, str]:
    if not config.enabled:
        return 1.0, None, ""
    slope = slope_per_s(samples)
    projected = m.temperature_max_c + max(0.0, slope) * config.horizon_s
    held = play(held_c, projected, config.hysteresis_c, Harmful.HIGH)
    factor = interpolate(config.table, held)
    if factor >= 1.0:
        return factor, held, ""
    if slope > 0.0:
        ahead = f"{projected:.1f} °C in {config.horizon_s:g} s"
        how = f"{m.temperature_max_c:.1f} °C rising {slope:.2f} °C/s → {ahead}"
    else:
        how = f"{m.temperature_max_c:.1f} °C"
    held_note = f" held at {held:.1f} °C" if held != projected else ""
    return factor, held, f"{how}{held_note} thermal ×{factor:.2f}"


def _taper(
    config: CellTaperConfig, m: RackMeasurements, memory: DerateMemory
) -> tuple[float, float | None, str, float, float | None, str]:
    if not config.enabled:
        return 1.0, None, "", 1.0, None, ""
    high = play(memory.charge_cell_held_v, m.cell_voltage_max_v, config.hysteresis_v, Harmful.HIGH)
    low = play(memory.discharge_cell_held_v, m.cell_voltage_min_v, config.hysteresis_v, Harmful.LOW)
    charge = interpolate(config.charge_table, high)
    discharge = interpolate(config.discharge_table, low)
    return (
        charge,
        high,
        _taper_note("cell max", m.cell_voltage_max_v, high, charge),
        discharge,
        low,
        _taper_note("cell min", m.cell_voltage_min_v, low, discharge),
    )


def _taper_note(what: str, measured_v: float, held_v: float, factor: float) -> str:
    if factor >= 1.0:
        return ""
    held = f" held at {held_v:.3f} V" if held_v != measured_v else ""
    return f"{what} {measured_v:.3f} V{held} taper ×{factor:.2f}"
