"""Injectable faults of one simulated rack BMS.

Two families live here:

* **Battery faults** change what the BMS reports: an over-temperature heating ramp,
  a widened cell-voltage spread, injected alarm/warning flags, an open contactor.
  :class:`sim.battery.BatteryModel` reads them.
* **Link faults** change how the Modbus server answers: slow answers, no answer at all,
  corrupted RTU CRC, Modbus exception responses, answers with fewer registers than asked.
  :class:`sim.bms_server.SimulatedBms` reads them.
* **Layout faults** change the SunSpec register map a device shows (:class:`SunSpecLayout`): what
  a device with odd firmware serves. :func:`sim.registers.sunspec_image` reads them.

:class:`Faults` is an immutable value; :class:`FaultState` is the small mutable holder
that tests and scenarios poke at run time. Readers take one :meth:`FaultState.snapshot`
per request or per model step, so a request never sees half of a change.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum

from pymodbus.constants import ExcCodes

from shared.models import PROTECTION_FLAG_NAMES

# A delay longer than any sane client timeout is a "no answer" in disguise; refuse it so that
# scenarios say what they mean (and a stop() never waits minutes for a sleeping hook).
MAX_DELAY_MS = 60_000
MAX_IMBALANCE_MV = 2_000.0
MAX_OVER_TEMPERATURE_C_PER_S = 100.0

MAX_SHORT_READ_REGISTERS = 125  # the most registers one Modbus read can ask for

EXCEPTION_CODES: tuple[int, ...] = tuple(int(code) for code in ExcCodes)


class SunSpecLayout(StrEnum):
    """The SunSpec map a device serves at 40000; every variant keeps the image's length."""

    STANDARD = "standard"  # SunS, common model 1, 802, 803, end marker
    NO_MARKER = "no_marker"  # the SunS marker is missing (zeros)
    SHORT_802 = "short_802"  # an older 802 without its scale factors (L=50 instead of 62)
    NO_803 = "no_803"  # the chain ends after 802: no lithium-ion bank model (no temperatures)
    NO_END = "no_end"  # the end marker is replaced by a model header: the chain runs off the map


LAYOUTS: tuple[str, ...] = tuple(layout.value for layout in SunSpecLayout)


class FaultError(ValueError):
    """A fault parameter is out of range or names something unknown; ``choices`` lists what is valid."""

    def __init__(self, detail: str, *, choices: tuple[str, ...] = ()) -> None:
        self.detail = detail
        self.choices = choices
        suffix = f"; choices: {', '.join(choices)}" if choices else ""
        super().__init__(f"{detail}{suffix}")


@dataclass(frozen=True, slots=True)
class Faults:
    """One consistent view of every injected fault. The default value is "healthy"."""

    over_temperature_c_per_s: float = 0.0
    imbalance_mv: float = 0.0
    alarms: frozenset[str] = field(default_factory=frozenset)
    warnings: frozenset[str] = field(default_factory=frozenset)
    contactor_open: bool = False
    delay_ms: int = 0
    no_answer: bool = False
    corrupt_crc: bool = False
    exception_code: int | None = None
    # Answers to register reads carry this many registers fewer than asked (0 = as many as asked).
    short_read_registers: int = 0
    sunspec_layout: SunSpecLayout = SunSpecLayout.STANDARD

    @property
    def healthy(self) -> bool:
        return self == Faults()


def check_flag(name: str) -> str:
    """``name`` if it is a :class:`shared.models.ProtectionFlags` field, else :class:`FaultError`."""
    if name not in PROTECTION_FLAG_NAMES:
        raise FaultError(f"unknown protection flag {name!r}", choices=PROTECTION_FLAG_NAMES)
    return name


def check_exception_code(code: int) -> ExcCodes:
    """The pymodbus exception code for ``code``, or :class:`FaultError` listing the valid ones."""
    try:
        return ExcCodes(code)
    except ValueError:
        raise FaultError(
            f"Modbus exception code {code} is not one pymodbus can send",
            choices=tuple(f"{int(c)} ({c.name})" for c in ExcCodes),
        ) from None


def check_layout(name: str) -> SunSpecLayout:
    """The :class:`SunSpecLayout` called ``name``, or :class:`FaultError` listing the layouts."""
    try:
        return SunSpecLayout(name)
    except ValueError:
        raise FaultError(f"unknown SunSpec layout {name!r}", choices=LAYOUTS) from None


def _check_range(name: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise FaultError(f"{name} must be within {low}..{high} (got {value!r})")
    return float(value)


def apply_rack_faults(state: FaultState, args: argparse.Namespace) -> None:
    """The faults every simulated rack takes from ``bmslink sim bms``'s options, whatever its protocol
    (the Modbus-only and console-only ones are applied by each transport)."""
    if args.over_temperature is not None:
        state.set_over_temperature(args.over_temperature)
    if args.imbalance is not None:
        state.set_imbalance(args.imbalance)
    for name in args.alarm:
        state.raise_alarm(name)
    if args.contactor_open:
        state.open_contactor()
    if args.delay_ms is not None:
        state.set_delay(args.delay_ms)
    state.set_no_answer(args.no_answer)
    state.set_corrupt_crc(args.corrupt_crc)


class FaultState:
    """The faults currently applied to one rack; every method validates and replaces the snapshot.

    ``version`` increases on every change, so readers can cache anything derived from a snapshot.
    """

    def __init__(self, initial: Faults | None = None) -> None:
        self._faults = Faults()
        self.version = 0
        if initial is not None:
            self.replace(initial)

    def snapshot(self) -> Faults:
        return self._faults

    def replace(self, faults: Faults) -> None:
        """Apply a whole set of faults at once (validated like the individual setters)."""
        _check_range("over_temperature_c_per_s", faults.over_temperature_c_per_s, 0.0,
                     MAX_OVER_TEMPERATURE_C_PER_S)
        _check_range("imbalance_mv", faults.imbalance_mv, 0.0, MAX_IMBALANCE_MV)
        _check_range("delay_ms", faults.delay_ms, 0, MAX_DELAY_MS)
        _check_range("short_read_registers", faults.short_read_registers, 0, MAX_SHORT_READ_REGISTERS)
        faults = dataclasses.replace(faults, sunspec_layout=check_layout(faults.sunspec_layout))
        for name in (*faults.alarms, *faults.warnings):
            check_flag(name)
        if faults.exception_code is not None:
            check_exception_code(faults.exception_code)
        self._faults = faults
        self.version += 1

    def _update(self, **changes: object) -> None:
        self.replace(dataclasses.replace(self._faults, **changes))  # type: ignore[arg-type]

    # -- battery faults ---------------------------------------------------------------------------
    def set_over_temperature(self, rate_c_per_s: float) -> None:
        """Add a heating ramp of ``rate_c_per_s`` to the last module of the rack (0 stops it)."""
        self._update(over_temperature_c_per_s=float(rate_c_per_s))

    def set_imbalance(self, mv: float) -> None:
        """Widen the cell-voltage spread by ``mv`` millivolts (0 restores the configured spread)."""
        self._update(imbalance_mv=float(mv))

    def raise_alarm(self, name: str) -> None:
        self._update(alarms=self._faults.alarms | {check_flag(name)})

    def clear_alarm(self, name: str) -> None:
        self._update(alarms=self._faults.alarms - {check_flag(name)})

    def raise_warning(self, name: str) -> None:
        self._update(warnings=self._faults.warnings | {check_flag(name)})

    def clear_warning(self, name: str) -> None:
        self._update(warnings=self._faults.warnings - {check_flag(name)})

    def open_contactor(self) -> None:
        self._update(contactor_open=True)

    def close_contactor(self) -> None:
        self._update(contactor_open=False)

    # -- link faults ------------------------------------------------------------------------------
    def set_delay(self, ms: int) -> None:
        """Answer every request ``ms`` milliseconds late (0 = on time)."""
        self._update(delay_ms=int(ms))

    def set_no_answer(self, enabled: bool = True) -> None:
        """Process requests but send no byte back."""
        self._update(no_answer=enabled)

    def set_corrupt_crc(self, enabled: bool = True) -> None:
        """Send full-length RTU answers whose CRC is wrong (no effect on Modbus TCP, which has no CRC)."""
        self._update(corrupt_crc=enabled)

    def set_exception(self, code: int | None) -> None:
        """Answer every request with Modbus exception ``code`` (None = answer normally)."""
        if code is not None:
            code = int(check_exception_code(code))
        self._update(exception_code=code)

    def set_short_read(self, registers: int) -> None:
        """Answer register reads with ``registers`` fewer registers than asked (0 = complete answers)."""
        self._update(short_read_registers=int(registers))

    # -- layout faults ----------------------------------------------------------------------------
    def set_sunspec_layout(self, layout: str) -> None:
        """Serve the SunSpec map as ``layout`` (a :class:`SunSpecLayout` value; "standard" restores it)."""
        self._update(sunspec_layout=check_layout(layout))

    def clear(self) -> None:
        """Remove every fault."""
        self.replace(Faults())

    def __repr__(self) -> str:
        return f"FaultState({self._faults!r})"
