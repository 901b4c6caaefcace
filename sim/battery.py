"""A small, deterministic model of one LFP rack and its BMS.

Pure: no clock is read and nothing random happens after construction. Time only moves
through :meth:`BatteryModel.step`, so tests drive it as tables. The per-cell voltage
spread comes from ``seed``.

Physics, kept just detailed enough to exercise the controller:

* SOC integrates the current (positive = charging, the contract's convention).
* Each cell reads OCV(SOC) + I·R plus a fixed per-cell offset; the offsets span exactly
  ``cell_spread_mv`` (+ the injected imbalance), so the spread the BMS measures is known.
* Each module is a lumped thermal mass heated by I²R and cooled toward ambient, solved
  exactly for a step (stable for any ``dt_s``). The over-temperature fault adds a heating
  ramp to the last module.
* The BMS derates CCL/DCL with SB-style piecewise-linear tables (aggregation-anchors (b)),
  applied to the IR-compensated ("rest") cell voltage so the limit does not chatter with
  the load it limits; raises alarms/warnings from thresholds with release hysteresis.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import (
    TEMPERATURE_MAX_C,
    TEMPERATURE_MIN_C,
    ContactorState,
    ProtectionFlags,
    RackMeasurements,
)
from sim.faults import Faults, FaultState

Table = tuple[tuple[float, float], ...]

# LFP open-circuit voltage per cell over SOC (%): the long flat plateau with steep ends.
LFP_OCV_V: Table = (
    (0.0, 2.50), (3.0, 2.90), (6.0, 3.05), (10.0, 3.18), (20.0, 3.24), (30.0, 3.27),
    (40.0, 3.29), (50.0, 3.30), (60.0, 3.31), (70.0, 3.32), (80.0, 3.33), (90.0, 3.34),
    (95.0, 3.35), (98.0, 3.38), (99.0, 3.40), (100.0, 3.45),
)
# Derating factors, SB defaults (aggregation-anchors (b)): x ascending, factor of the nameplate current.
CHARGE_CELL_V_FACTOR: Table = ((3.375, 1.0), (3.400, 0.25), (3.425, 0.05), (3.450, 0.005), (3.500, 0.0))
DISCHARGE_CELL_V_FACTOR: Table = ((2.80, 0.0), (2.90, 0.005), (3.00, 0.05), (3.10, 0.25), (3.19, 1.0))
CHARGE_TEMPERATURE_FACTOR: Table = (
    (0.0, 0.0), (2.0, 0.25), (5.0, 0.5), (10.0, 1.0), (40.0, 1.0), (45.0, 0.5), (50.0, 0.25), (55.0, 0.0),
)
DISCHARGE_TEMPERATURE_FACTOR: Table = (
    (-10.0, 0.0), (0.0, 0.25), (5.0, 0.5), (10.0, 1.0), (40.0, 1.0), (45.0, 0.5), (50.0, 0.25), (55.0, 0.0),
)
NOMINAL_CELL_V = 3.2
# Highest cell voltage a register map must be able to show (the cell over-voltage alarm).
MAX_CELL_V = 3.65
CHARGE_VOLTAGE_PER_CELL_V = 3.45
DISCHARGE_VOLTAGE_PER_CELL_V = 2.90
# Within this many amps of zero the rack counts as idle (SunSpec ChaSt HOLDING).
IDLE_CURRENT_A = 0.5

Quantity = Literal["temperature_max_c", "temperature_min_c", "cell_max_v", "cell_min_v", "cell_spread_mv",
                   "pack_per_cell_v"]


@dataclass(frozen=True, slots=True)
class Threshold:
    """A BMS protection threshold: trips past ``trip``, releases only once back past ``release``."""

    flag: str
    quantity: Quantity
    above: bool
    trip: float
    release: float


# Pack thresholds are per cell (pack voltage / cells) so one table serves any string length.
ALARM_THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("charge_over_temperature", "temperature_max_c", True, 55.0, 50.0),
    Threshold("discharge_over_temperature", "temperature_max_c", True, 55.0, 50.0),
    Threshold("charge_under_temperature", "temperature_min_c", False, 0.0, 2.0),
    Threshold("discharge_under_temperature", "temperature_min_c", False, -20.0, -15.0),
    Threshold("cell_over_voltage", "cell_max_v", True, 3.65, 3.45),
    Threshold("cell_under_voltage", "cell_min_v", False, 2.50, 2.90),
    Threshold("pack_over_voltage", "pack_per_cell_v", True, 3.55, 3.45),
    Threshold("pack_under_voltage", "pack_per_cell_v", False, 2.70, 2.90),
    Threshold("cell_imbalance", "cell_spread_mv", True, 150.0, 100.0),
)
WARNING_THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("charge_over_temperature", "temperature_max_c", True, 50.0, 47.0),
    Threshold("discharge_over_temperature", "temperature_max_c", True, 50.0, 47.0),
    Threshold("charge_under_temperature", "temperature_min_c", False, 5.0, 7.0),
    Threshold("discharge_under_temperature", "temperature_min_c", False, -10.0, -8.0),
    Threshold("cell_over_voltage", "cell_max_v", True, 3.60, 3.45),
    Threshold("cell_under_voltage", "cell_min_v", False, 2.80, 3.00),
    Threshold("pack_over_voltage", "pack_per_cell_v", True, 3.50, 3.45),
    Threshold("pack_under_voltage", "pack_per_cell_v", False, 2.90, 3.00),
    Threshold("cell_imbalance", "cell_spread_mv", True, 50.0, 40.0),
)
# An alarm stops current in the direction it protects (a BMS trip), whatever the tables say.
CHARGE_BLOCKING_ALARMS = frozenset({
    "cell_over_voltage", "pack_over_voltage", "charge_over_current", "charge_over_temperature",
    "charge_under_temperature", "cell_imbalance", "internal_fault", "insulation_fault",
})
DISCHARGE_BLOCKING_ALARMS = frozenset({
    "cell_under_voltage", "pack_under_voltage", "discharge_over_current", "discharge_over_temperature",
    "discharge_under_temperature", "internal_fault", "insulation_fault",
})


def interpolate(table: Table, x: float) -> float:
    """Piecewise-linear lookup in an ascending table, held constant beyond both ends."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(table):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return table[-1][1]


def lfp_ocv_v(soc_pct: float) -> float:
    return interpolate(LFP_OCV_V, soc_pct)


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SimRackConfig(BaseModel):
    """Fixed parameters of one simulated rack (validated once; immutable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cells_in_series: Annotated[int, Field(ge=1, le=256)] = 16
    # Module = temperature-sensor granularity and the "module" of SunSpec locations.
    cells_per_module: Annotated[int, Field(ge=1, le=256)] = 4
    capacity_ah: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)] = 280.0
    soh_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 98.0
    initial_soc_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 50.0
    # Spread of the series elements' voltages (each a group of parallel cells), max − min.
    cell_spread_mv: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 10.0
    ambient_c: Annotated[float, Field(ge=-30, le=60, allow_inf_nan=False)] = 25.0
    thermal_mass_j_per_k: Positive = 100_000.0
    cooling_w_per_k: Positive = 5.0
    cell_resistance_ohm: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0003
    max_charge_a: Annotated[float, Field(ge=0, le=3000, allow_inf_nan=False)] = 140.0
    max_discharge_a: Annotated[float, Field(ge=0, le=3000, allow_inf_nan=False)] = 140.0
    seed: int = 0
    serial_number: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[ -~]+$")] = "SIM-0001"
    # 0x35E name; Deye keys its behaviour on the "PYLON" prefix (inverter-can.md 0x35E).
    can_name: Annotated[str, Field(min_length=1, max_length=8, pattern=r"^[ -~]+$")] = "PYLON"

    @property
    def modules(self) -> int:
        return math.ceil(self.cells_in_series / self.cells_per_module)

    @property
    def charge_voltage_limit_v(self) -> float:
        return self.cells_in_series * CHARGE_VOLTAGE_PER_CELL_V

    @property
    def discharge_voltage_limit_v(self) -> float:
        return self.cells_in_series * DISCHARGE_VOLTAGE_PER_CELL_V


@dataclass(frozen=True, slots=True)
class BatterySnapshot:
    """Everything the BMS reports at one instant, with the raw indices the register maps need.

    Cell and module indices are 1-based, as BMS maps number them; the rack is one string.
    """

    elapsed_s: float
    soc_pct: float
    soh_pct: float
    current_a: float
    cell_voltages_v: tuple[float, ...]
    module_temperatures_c: tuple[float, ...]
    cells_per_module: int
    charge_current_limit_a: float
    discharge_current_limit_a: float
    charge_voltage_limit_v: float
    discharge_voltage_limit_v: float
    alarms: ProtectionFlags
    warnings: ProtectionFlags
    contactor_closed: bool
    capacity_ah: float
    string_index: int = 1

    @property
    def pack_voltage_v(self) -> float:
        return sum(self.cell_voltages_v)

    @property
    def modules(self) -> int:
        return len(self.module_temperatures_c)

    @property
    def cell_max_index(self) -> int:
        return _argmax(self.cell_voltages_v) + 1

    @property
    def cell_min_index(self) -> int:
        return _argmin(self.cell_voltages_v) + 1

    @property
    def cell_voltage_max_v(self) -> float:
        return max(self.cell_voltages_v)

    @property
    def cell_voltage_min_v(self) -> float:
        return min(self.cell_voltages_v)

    @property
    def cell_voltage_avg_v(self) -> float:
        return self.pack_voltage_v / len(self.cell_voltages_v)

    def module_of_cell(self, cell_index: int) -> int:
        return (cell_index - 1) // self.cells_per_module + 1

    @property
    def temperature_max_module(self) -> int:
        return _argmax(self.module_temperatures_c) + 1

    @property
    def temperature_min_module(self) -> int:
        return _argmin(self.module_temperatures_c) + 1

    @property
    def temperature_max_c(self) -> float:
        return max(self.module_temperatures_c)

    @property
    def temperature_min_c(self) -> float:
        return min(self.module_temperatures_c)

    @property
    def temperature_avg_c(self) -> float:
        return sum(self.module_temperatures_c) / len(self.module_temperatures_c)

    @property
    def contactor(self) -> ContactorState:
        return ContactorState.CLOSED if self.contactor_closed else ContactorState.OPEN

    def measurements(self) -> RackMeasurements:
        """The snapshot in the wire contract's terms."""
        return RackMeasurements(
            pack_voltage_v=self.pack_voltage_v,
            current_a=self.current_a,
            soc_pct=self.soc_pct,
            soh_pct=self.soh_pct,
            cell_voltage_max_v=self.cell_voltage_max_v,
            cell_voltage_max_location=f"cell {self.cell_max_index}",
            cell_voltage_min_v=self.cell_voltage_min_v,
            cell_voltage_min_location=f"cell {self.cell_min_index}",
            temperature_max_c=self.temperature_max_c,
            temperature_max_location=f"string {self.string_index} module {self.temperature_max_module}",
            temperature_min_c=self.temperature_min_c,
            temperature_min_location=f"string {self.string_index} module {self.temperature_min_module}",
            charge_current_limit_a=self.charge_current_limit_a,
            discharge_current_limit_a=self.discharge_current_limit_a,
            charge_voltage_limit_v=self.charge_voltage_limit_v,
            discharge_voltage_limit_v=self.discharge_voltage_limit_v,
            alarms=self.alarms,
            warnings=self.warnings,
            contactor=self.contactor,
            capacity_ah=self.capacity_ah,
        )


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _unit_offsets(count: int, seed: int) -> tuple[float, ...]:
    """Per-cell offsets in [-0.5, +0.5] whose max − min is exactly 1 (0 for a single cell)."""
    rng = random.Random(seed)
    raw = [rng.random() for _ in range(count)]
    low, high = min(raw), max(raw)
    if count < 2 or high == low:
        return tuple(0.0 for _ in raw)
    return tuple((r - low) / (high - low) - 0.5 for r in raw)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


class BatteryModel:
    """One rack: state (SOC, module temperatures, latched flags) advanced only by :meth:`step`.

    ``faults`` is shared with the server that owns the model; battery faults act from the
    next :meth:`snapshot` on. ``revision`` increases on every change of state or input, so a
    caller can tell whether anything derived from the last snapshot is stale.
    """

    def __init__(self, config: SimRackConfig | None = None, faults: FaultState | None = None) -> None:
        self.config = config or SimRackConfig()
        self.faults = faults or FaultState()
        cfg = self.config
        self._offsets = _unit_offsets(cfg.cells_in_series, cfg.seed)
        # Cooling differs by ±10 % between modules (airflow), so a loaded rack has a hottest module.
        rng = random.Random(cfg.seed ^ 0x5EED)
        self._cooling_share = tuple(0.9 + 0.2 * rng.random() for _ in range(cfg.modules))
        per_module = cfg.cells_per_module
        self._cells_in_module = tuple(
            min(per_module, cfg.cells_in_series - m * per_module) for m in range(cfg.modules)
        )
        self._soc_pct = cfg.initial_soc_pct
        self._temperatures_c = [cfg.ambient_c] * cfg.modules
        self._requested_a = 0.0
        self._current_a = 0.0
        self._elapsed_s = 0.0
        self._latched_alarms: frozenset[str] = frozenset()
        self._latched_warnings: frozenset[str] = frozenset()
        self.revision = 0
        self._update_latches(self.faults.snapshot())

    # -- inputs -----------------------------------------------------------------------------------
    @property
    def requested_current_a(self) -> float:
        return self._requested_a

    @property
    def elapsed_s(self) -> float:
        return self._elapsed_s

    def set_current(self, amps: float) -> None:
        """Ask for a load current (positive = charging); the BMS clamps it to its own limits."""
        if not math.isfinite(amps):
            raise ValueError(f"current must be a finite number (got {amps!r})")
        self._requested_a = float(amps)
        self._current_a = self._clamped(self._requested_a, self.faults.snapshot())
        self.revision += 1

    def step(self, dt_s: float) -> None:
        """Advance the rack by ``dt_s`` seconds with the requested current (re-clamped first)."""
        if not math.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"dt_s must be a finite number >= 0 (got {dt_s!r})")
        faults = self.faults.snapshot()
        cfg = self.config
        self._current_a = current = self._clamped(self._requested_a, faults)
        self._soc_pct = _clamp(self._soc_pct + current * dt_s / 3600.0 / cfg.capacity_ah * 100.0, 0.0, 100.0)
        module_mass = cfg.thermal_mass_j_per_k / cfg.modules
        for m, cells in enumerate(self._cells_in_module):
            power_w = current * current * cfg.cell_resistance_ohm * cells
            if m == cfg.modules - 1:
                # The ramp is heat the module cannot shed: rate × mass of extra power.
                power_w += faults.over_temperature_c_per_s * module_mass
            cooling = cfg.cooling_w_per_k / cfg.modules * self._cooling_share[m]
            # Exact solution of C·dT/dt = P − k·(T − Ta) for constant P over the step.
            settle_c = cfg.ambient_c + power_w / cooling
            decay = math.exp(-cooling * dt_s / module_mass)
            temperature = settle_c + (self._temperatures_c[m] - settle_c) * decay
            self._temperatures_c[m] = _clamp(temperature, TEMPERATURE_MIN_C, TEMPERATURE_MAX_C)
        self._elapsed_s += dt_s
        self._update_latches(faults)
        self.revision += 1

    # -- outputs ----------------------------------------------------------------------------------
    def snapshot(self) -> BatterySnapshot:
        faults = self.faults.snapshot()
        ccl, dcl = self._limits(faults)
        alarms = self._latched_alarms | faults.alarms
        warnings = self._latched_warnings | faults.warnings
        cfg = self.config
        return BatterySnapshot(
            elapsed_s=self._elapsed_s,
            soc_pct=self._soc_pct,
            soh_pct=cfg.soh_pct,
            current_a=self._current_a,
            cell_voltages_v=self._cell_voltages(self._current_a, faults),
            module_temperatures_c=tuple(self._temperatures_c),
            cells_per_module=cfg.cells_per_module,
            charge_current_limit_a=ccl,
            discharge_current_limit_a=dcl,
            charge_voltage_limit_v=cfg.charge_voltage_limit_v,
            discharge_voltage_limit_v=cfg.discharge_voltage_limit_v,
            alarms=ProtectionFlags(**dict.fromkeys(alarms, True)),
            warnings=ProtectionFlags(**dict.fromkeys(warnings, True)),
            contactor_closed=not faults.contactor_open,
            capacity_ah=cfg.capacity_ah,
        )

    def measurements(self) -> RackMeasurements:
        return self.snapshot().measurements()

    # -- internals --------------------------------------------------------------------------------
    def _spread_mv(self, faults: Faults) -> float:
        return self.config.cell_spread_mv + faults.imbalance_mv

    def _cell_voltages(self, current_a: float, faults: Faults) -> tuple[float, ...]:
        ocv = lfp_ocv_v(self._soc_pct)
        ir_v = current_a * self.config.cell_resistance_ohm
        spread_v = self._spread_mv(faults) / 1000.0
        return tuple(_clamp(ocv + ir_v + spread_v * u, 0.0, 10.0) for u in self._offsets)

    def _limits(self, faults: Faults) -> tuple[float, float]:
        """(CCL, DCL) in A from the state, the derate tables and the alarms; 0 with an open contactor."""
        cfg = self.config
        if faults.contactor_open:
            return 0.0, 0.0
        rest = self._cell_voltages(0.0, faults)
        t_max, t_min = max(self._temperatures_c), min(self._temperatures_c)
        charge = min(
            interpolate(CHARGE_TEMPERATURE_FACTOR, t_min),
            interpolate(CHARGE_TEMPERATURE_FACTOR, t_max),
            interpolate(CHARGE_CELL_V_FACTOR, max(rest)),
        )
        discharge = min(
            interpolate(DISCHARGE_TEMPERATURE_FACTOR, t_min),
            interpolate(DISCHARGE_TEMPERATURE_FACTOR, t_max),
            interpolate(DISCHARGE_CELL_V_FACTOR, min(rest)),
        )
        alarms = self._latched_alarms | faults.alarms
        if self._soc_pct >= 100.0 or alarms & CHARGE_BLOCKING_ALARMS:
            charge = 0.0
        if self._soc_pct <= 0.0 or alarms & DISCHARGE_BLOCKING_ALARMS:
            discharge = 0.0
        return cfg.max_charge_a * charge, cfg.max_discharge_a * discharge

    def _clamped(self, amps: float, faults: Faults) -> float:
        ccl, dcl = self._limits(faults)
        return _clamp(amps, -dcl, ccl)

    def _quantities(self, faults: Faults) -> dict[Quantity, float]:
        cells = self._cell_voltages(self._current_a, faults)
        return {
            "temperature_max_c": max(self._temperatures_c),
            "temperature_min_c": min(self._temperatures_c),
            "cell_max_v": max(cells),
            "cell_min_v": min(cells),
            "cell_spread_mv": (max(cells) - min(cells)) * 1000.0,
            "pack_per_cell_v": sum(cells) / len(cells),
        }

    def _update_latches(self, faults: Faults) -> None:
        values = self._quantities(faults)
        self._latched_alarms = _evaluate(ALARM_THRESHOLDS, values, self._latched_alarms)
        self._latched_warnings = _evaluate(WARNING_THRESHOLDS, values, self._latched_warnings)


def _evaluate(thresholds: tuple[Threshold, ...], values: dict[Quantity, float],
              latched: frozenset[str]) -> frozenset[str]:
    raised: set[str] = set()
    for th in thresholds:
        value = values[th.quantity]
        tripped = value > th.trip if th.above else value < th.trip
        held = th.flag in latched and (value > th.release if th.above else value < th.release)
        if tripped or held:
            raised.add(th.flag)
    return frozenset(raised)
