"""The thermal window's samples: an immutable sequence whose append and drop-oldest cost O(1).

A rack's window holds every (arrival time, temperature) sample of the last ``window_s``: 60
samples at 2 Hz, 300 at 10 Hz. As a tuple it was copied on every payload (drop the oldest,
append the newest), a cost that grew with the publish rate. A :class:`Window` is a view
``[start, end)`` of a list that the successive windows of one rack share:

- dropping the oldest samples moves ``start`` (no copy);
- appending to the newest view appends to the list; appending to an older view (a memory used
  twice: the core is a pure function, and tests replay memories) copies its samples first, so
  no view ever sees its samples change;
- once the dropped prefix outgrows the view, the next drop copies the view into a fresh list
  (each sample is copied a bounded number of times: O(1) amortised).

Equality and hashing are by content, like the tuple it replaces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import overload

Sample = tuple[float, float]  # (received_s, temperature_max_c)

COMPACT_AFTER = 64  # dropped samples kept in the shared list before a drop may copy


class Window(Sequence[Sample]):
    """Samples oldest first, times strictly increasing (the core only appends newer ones)."""

    __slots__ = ("_end", "_items", "_start")

    def __init__(self, samples: Sequence[Sample] = ()) -> None:
        self._items: list[Sample] = list(samples)
        self._start = 0
        self._end = len(self._items)

    @classmethod
    def _view(cls, items: list[Sample], start: int, end: int) -> Window:
        window = cls.__new__(cls)
        window._items, window._start, window._end = items, start, end
        return window

    def __len__(self) -> int:
        return self._end - self._start

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Sample, ...]: ...

    def __getitem__(self, index: int | slice) -> Sample | tuple[Sample, ...]:
        if isinstance(index, slice):
            first, stop, step = index.indices(self._end - self._start)
            if step == 1:
                return tuple(self._items[self._start + first:self._start + max(first, stop)])
            return tuple(self._items[self._start:self._end][index])
        size = self._end - self._start
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("window index out of range")
        return self._items[self._start + index]

    def __iter__(self) -> Iterator[Sample]:
        return islice(self._items, self._start, self._end)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return self._items[self._start:self._end] == other._items[other._start:other._end]

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Window({list(self)!r})"

    def count_before(self, time_s: float) -> int:
        """How many of the oldest samples are older than ``time_s`` (times increase)."""
        items, first, end = self._items, self._start, self._end
        while first < end and items[first][0] < time_s:
            first += 1
        return first - self._start

    def oldest(self, count: int) -> list[Sample]:
        """The ``count`` oldest samples."""
        return self._items[self._start:self._start + max(0, min(count, self._end - self._start))]

    def dropped(self, count: int) -> Window:
        """Without the ``count`` oldest samples (all of them when there are fewer)."""
        if count <= 0:
            return self
        start = min(self._start + count, self._end)
        if start >= COMPACT_AFTER and start > self._end - start:
            items = self._items[start:self._end]
            return Window._view(items, 0, len(items))
        return Window._view(self._items, start, self._end)

    def appended(self, sample: Sample) -> Window:
        """With ``sample`` as the newest."""
        items = self._items
        if self._end != len(items) or self._end == self._start:
            # An older view (the list has grown past it), or an empty one (which may be shared):
            # its own list, so that no other view changes.
            items = items[self._start:self._end]
            items.append(sample)
            return Window._view(items, 0, len(items))
        items.append(sample)
        return Window._view(items, self._start, self._end + 1)


EMPTY_WINDOW = Window()
