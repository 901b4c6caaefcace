"""What the inverter frames can carry, and the voltage invariants.

Currents go out in 0.1 A steps from 0 to 3276.7 A (unsigned 16 bit, 0.1 A); voltages in
0.1 V steps. Values are kept as integer tenths here so that rounding is exact and the same on
every run. Rounding is always toward safety: a current limit and CVL round down, DVL rounds
up (never promise more than the racks allow). A tiny tolerance absorbs binary noise so that
112.0 stays 112.0 rather than 111.9.

Voltage invariants: CVL is never 0 (an inverter reads 0 V as over-voltage), so it is at least
0.1 V; DVL is always below CVL, lowered to CVL − 0.1 V when the data says otherwise.
"""

from __future__ import annotations

import math

FRAME_CURRENT_MAX_DA = 32767  # 3276.7 A
FRAME_VOLTAGE_MAX_DV = 10000  # 1000.0 V, the contract's pack-voltage ceiling
# Tenths within this of a whole tenth are that tenth (binary floating-point noise).
ROUNDING_TOLERANCE = 1e-6


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def current_down_da(current_a: float) -> int:
    """A current limit in whole 0.1 A, rounded down, clamped to 0..3276.7 A; non-finite → 0."""
    tenths = math.floor(_finite(current_a) * 10.0 + ROUNDING_TOLERANCE)
    return min(FRAME_CURRENT_MAX_DA, max(0, tenths))


def amps_down(current_a: float) -> float:
    """A current rounded down to 0.1 A, at least 0 (for per-rack views: no frame ceiling)."""
    return max(0, math.floor(_finite(current_a) * 10.0 + ROUNDING_TOLERANCE)) / 10.0


def voltage_down_dv(voltage_v: float) -> int:
    """A voltage in whole 0.1 V, rounded down, clamped to 0..1000 V."""
    tenths = math.floor(_finite(voltage_v) * 10.0 + ROUNDING_TOLERANCE)
    return min(FRAME_VOLTAGE_MAX_DV, max(0, tenths))


def voltage_up_dv(voltage_v: float) -> int:
    """A voltage in whole 0.1 V, rounded up, clamped to 0..1000 V."""
    tenths = math.ceil(_finite(voltage_v) * 10.0 - ROUNDING_TOLERANCE)
    return min(FRAME_VOLTAGE_MAX_DV, max(0, tenths))


def voltage_limits_dv(cvl_v: float, dvl_v: float) -> tuple[int, int, bool]:
    """(CVL, DVL) in 0.1 V with CVL ≥ 0.1 V and DVL < CVL; the flag says DVL had to be lowered."""
    cvl = max(1, voltage_down_dv(cvl_v))
    dvl = voltage_up_dv(dvl_v)
    if dvl >= cvl:
        return cvl, cvl - 1, True
    return cvl, dvl, False
