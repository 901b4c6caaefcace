"""The plots' history: one sample a second of the bank's limits, SOC and temperatures, in a ring.

The controller runs for months; a list that grows by a sample a second would grow for months too.
The ring is preallocated (one ``array('d')`` per series, ``capacity`` doubles each) and overwrites its
oldest sample, so its memory is fixed when it is made: 7 series × 8 bytes × capacity (3600 samples,
an hour, is 200 KiB).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, fields

SAMPLE_PERIOD_S = 1.0  # one sample per web update (controller/web/server.py: UPDATE_PERIOD_S)


@dataclass(frozen=True, slots=True)
class Sample:
    """The bank at one moment, as the plots show it; ``t_s`` is the wall clock (Unix seconds)."""

    t_s: float
    ccl_a: float
    dcl_a: float
    soc_pct: float
    temperature_max_c: float
    temperature_min_c: float
    temperature_avg_c: float


SERIES: tuple[str, ...] = tuple(f.name for f in fields(Sample))


class History:
    """A ring of at most ``capacity`` samples, oldest overwritten first; memory fixed at creation."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 sample, got {capacity}")
        self.capacity = capacity
        self._columns = {name: array("d", bytes(8 * capacity)) for name in SERIES}
        self._next = 0  # where the next sample goes
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the samples' storage (fixed: it never grows)."""
        return sum(column.itemsize * len(column) for column in self._columns.values())

    def append(self, sample: Sample) -> None:
        """Add ``sample``; when full, the oldest sample is dropped."""
        at = self._next
        for name, column in self._columns.items():
            column[at] = getattr(sample, name)
        self._next = (at + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def _order(self) -> range:
        start = (self._next - self._count) % self.capacity
        return range(start, start + self._count)

    def columns(self, since_s: float | None = None) -> dict[str, list[float | None]]:
        """The samples, oldest first, one list per series (``t_s`` included); with ``since_s`` only
        those taken after it. A value that is not a finite number is None (JSON has no NaN)."""
        cap = self.capacity
        times = self._columns["t_s"]
        picked = [i % cap for i in self._order() if since_s is None or times[i % cap] > since_s]
        return {name: [_finite(column[i]) for i in picked] for name, column in self._columns.items()}

    def latest(self) -> Sample | None:
        if not self._count:
            return None
        at = (self._next - 1) % self.capacity
        return Sample(**{name: column[at] for name, column in self._columns.items()})


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
