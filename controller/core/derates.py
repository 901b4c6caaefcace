"""Controller-side derates, applied **per rack** to the rack's own limits before they combine.

Per rack rather than on the bank result, because current splits evenly-ish between parallel
racks: the rack that heats up or whose cells approach their limit must cap *its* share, and
N×min then passes that cap to the bank. A bank-level factor on the hottest temperature would
multiply the weakest rack's limit by another rack's factor (double counting), and a bank-wide
temperature history jumps whenever the hottest rack joins or leaves, which a slope would read
as a steep rise.

**Rate-of-rise thermal derate** (``ThermalDerateConfig``), factor on both CCL and DCL (the
heat comes from current in either direction). Each reporting rack keeps the
(arrival time, ``temperature_max_c``) of its payloads within ``window_s`` of its newest one; one
sample per payload, so a cycle faster than the rack's poll adds no flat steps. The slope is
the least-squares fit over the window (0 with fewer than two distinct times), kept as running
sums (``WindowSums``) so that a sample added or dropped costs O(1) rather than a pass over the
window (at a thousand racks reporting at 2 Hz, that pass was a third of a control cycle). The
table is read at::

    projected = T_now + max(0, slope) × horizon_s

so a rack that warms quickly is derated while it is still cool, before its own
over-temperature alarm; a cooling rack is judged on its present temperature. With the
defaults (horizon 60 s, table 40 → 1, 55 → 0) a steady 0.2 °C/s rise projects 12 °C ahead.

**Cell-voltage taper** (``CellTaperConfig``): CCL × ``charge_table(cell_voltage_max_v)``,
DCL × ``discharge_table(cell_voltage_min_v)``.

Both carry hysteresis (``hysteresis_c``, ``hysteresis_v``) as a play operator on the table's
input (``tables.py``): a worse reading derates at once, a better one only beyond the band.
The held inputs are in the memory; a rack that is not reporting keeps its held values and its
samples: its next payload drops those more than ``window_s`` older than itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from controller.core.tables import Harmful, interpolate, play
from controller.core.window import EMPTY_WINDOW, Sample, Window
from shared.controller_config import AggregationConfig, CellTaperConfig, ThermalDerateConfig
from shared.records import MeasurementsRecord

# Below this spread of sample times (s²) a slope is noise; treat the temperature as flat.
MIN_TIME_SPREAD_S2 = 1e-6
# A covariance this small relative to the sums it is the difference of is their rounding, not a trend.
ROUNDING_NOISE = 1e-12


class WindowSums(NamedTuple):
    """Running sums over the window's samples: the least-squares slope in O(1) per change.

    Times and values are taken from an origin (a sample of the window), so the sums stay
    small and a flat temperature sums to exactly 0. The origin is renewed, and the sums
    rebuilt from the samples, when it is more than one window older than the oldest sample
    and when fewer than two samples are left: rounding cannot build up over a long run. The
    slope equals ``slope_per_s`` of the same samples to rounding (about 1e-12 relative,
    ``tests/controller/core/test_cache.py``); a covariance at the rounding level of its sums is
    taken as 0, so a flat window never reads as "rising 0.00 °C/s".
    """

    origin_t: float
    origin_v: float
    n: int = 0  # samples in the window
    t: float = 0.0  # Σ (t - origin_t)
    tt: float = 0.0  # Σ (t - origin_t)²
    v: float = 0.0  # Σ (v - origin_v)
    tv: float = 0.0  # Σ (t - origin_t)(v - origin_v)

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> WindowSums | None:
        """The sums of ``samples`` (None when there are none), with the oldest as origin."""
        if not samples:
            return None
        origin_t, origin_v = samples[0]
        st = stt = sv = stv = 0.0
        for t, v in samples:  # the same additions, in the same order, as repeated plus()
            dt, dv = t - origin_t, v - origin_v
            st += dt
            stt += dt * dt
            sv += dv
            stv += dt * dv
        return cls(origin_t, origin_v, len(samples), st, stt, sv, stv)

    def plus(self, t: float, v: float) -> WindowSums:
        dt, dv = t - self.origin_t, v - self.origin_v
        return WindowSums(self.origin_t, self.origin_v, self.n + 1, self.t + dt, self.tt + dt * dt,
                          self.v + dv, self.tv + dt * dv)

    def minus(self, t: float, v: float) -> WindowSums:
        dt, dv = t - self.origin_t, v - self.origin_v
        return WindowSums(self.origin_t, self.origin_v, self.n - 1, self.t - dt, self.tt - dt * dt,
                          self.v - dv, self.tv - dt * dv)

    def slope(self) -> float:
        """Least-squares slope; 0 with fewer than two samples or when the times do not spread."""
        if self.n < 2:
            return 0.0
        mean_t = self.t / self.n
        spread = self.tt - self.t * mean_t  # Σ (t - t_mean)²
        if spread < MIN_TIME_SPREAD_S2:
            return 0.0
        covariance = self.tv - mean_t * self.v  # Σ (t - t_mean)(v - v_mean)
        if abs(covariance) <= ROUNDING_NOISE * (abs(self.tv) + abs(mean_t * self.v)):
            return 0.0  # a flat window up to rounding: no rise, and no note claiming one
        return covariance / spread


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class DerateMemory(NamedTuple):
    """What the derates of one rack carry between cycles."""

    # (received_s, temperature_max_c), times strictly increasing (a sample is only appended when newer).
    samples: Window = EMPTY_WINDOW
    thermal_held_c: float | None = None
    charge_cell_held_v: float | None = None
    discharge_cell_held_v: float | None = None
    sums: WindowSums | None = None  # of ``samples`` (rebuilt from them when absent)


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class Derate(NamedTuple):
    """Factors (0..1) on one rack's CCL and DCL, with a note per factor below 1."""

    charge_factor: float = 1.0
    discharge_factor: float = 1.0
    charge_notes: tuple[str, ...] = ()
    discharge_notes: tuple[str, ...] = ()


def slope_per_s(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) samples; 0 when the times do not spread.

    The two-pass formula, the definition: ``derate_rack`` gets this slope, to rounding, from
    ``WindowSums`` without a pass over the window.
    """
    n = len(samples)
    if n < 2:
        return 0.0
    t_mean = sum(t for t, _ in samples) / n
    v_mean = sum(v for _, v in samples) / n
    spread = sum((t - t_mean) ** 2 for t, _ in samples)
    if spread < MIN_TIME_SPREAD_S2:
        return 0.0
    return sum((t - t_mean) * (v - v_mean) for t, v in samples) / spread


def derate_rack(
    memory: DerateMemory,
    measurements: MeasurementsRecord | None,
    received_s: float | None,
    now_s: float,
    config: AggregationConfig,
) -> tuple[Derate, DerateMemory]:
    """This cycle's factors for one rack (all 1 when it is not reporting) and its next memory."""
    thermal = config.thermal_derate
    samples, sums = memory.samples, memory.sums
    if measurements is None or received_s is None:
        return Derate(), DerateMemory(
            samples, memory.thermal_held_c, memory.charge_cell_held_v, memory.discharge_cell_held_v, sums
        )
    if thermal.enabled and (not samples or received_s > samples[-1][0]):
        # The window ends at the newest sample, so it moves only when a payload arrives: the
        # slope never changes with time alone, and a rack's outcome can be reused until its
        # next payload (a window ending at "now" expired a sample between payloads, which
        # doubled the racks to recompute per cycle at a thousand racks).
        samples, sums = _window_with(samples, sums, (received_s, measurements.temperature_max_c),
                                     thermal.window_s)
    thermal_factor, thermal_held, thermal_note = _thermal(
        thermal, sums.slope() if sums is not None else 0.0, measurements, memory.thermal_held_c
    )
    charge_factor, charge_held, charge_note, discharge_factor, discharge_held, discharge_note = _taper(
        config.cell_taper, measurements, memory
    )
    notes_c = _notes(charge_note, thermal_note)
    notes_d = _notes(discharge_note, thermal_note)
    derate = Derate(thermal_factor * charge_factor, thermal_factor * discharge_factor, notes_c, notes_d)
    if not thermal.enabled:
        return derate, DerateMemory(EMPTY_WINDOW, thermal_held, charge_held, discharge_held)
    return derate, DerateMemory(samples, thermal_held, charge_held, discharge_held, sums)


def _notes(cell_note: str, thermal_note: str) -> tuple[str, ...]:
    """The notes that say something, cell first (usually none: no generator per payload for that)."""
    if cell_note:
        return (cell_note, thermal_note) if thermal_note else (cell_note,)
    return (thermal_note,) if thermal_note else ()


def _window_with(
    samples: Window, sums: WindowSums | None, sample: Sample, window_s: float
) -> tuple[Window, WindowSums]:
    """The window ending at ``sample`` (newer than every sample in ``samples``), and its sums."""
    count = len(samples)
    # Oldest first (times strictly increase): what is left is a suffix, usually all of it.
    first = samples.count_before(sample[0] - window_s)
    kept = samples.dropped(first).appended(sample)
    if sums is None or sums.n != count:
        return kept, WindowSums.of(kept)  # type: ignore[return-value]  # kept is never empty
    for t, v in samples.oldest(first):
        sums = sums.minus(t, v)
    if count - first < 2 or kept[0][0] - sums.origin_t > window_s:
        return kept, WindowSums.of(kept)  # type: ignore[return-value]
    return kept, sums.plus(*sample)


def _thermal(
    config: ThermalDerateConfig,
    slope: float,
    m: MeasurementsRecord,
    held_c: float | None,
) -> tuple[float, float | None, str]:
    if not config.enabled:
        return 1.0, None, ""
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
    config: CellTaperConfig, m: MeasurementsRecord, memory: DerateMemory
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
