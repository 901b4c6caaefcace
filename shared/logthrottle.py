"""Rate-limited logging: a flood of one kind of warning costs a few lines, with a count of the rest.

A hostile or broken publisher can send thousands of bad payloads a second, and a dead CAN interface
fails every send; a line for each would fill the gateway's disk and bury the line that matters. The
counters (metrics) keep the full count; the log keeps a sample: the first ``burst`` lines of a kind
in each ``interval_s`` window, then one line when the window ends that says how many were suppressed.

A *kind* is a key the caller chooses (e.g. ``("rejected", rack_id, reason)``): distinct problems are
limited separately. The number of kinds tracked is bounded, so keys made of attacker-chosen strings
cannot grow memory either; beyond the bound, kinds share one overflow budget.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 10.0
DEFAULT_BURST = 3
MAX_KINDS = 256
_OVERFLOW_KIND = ("<other kinds>",)


@dataclass(slots=True)
class _Window:
    started_s: float
    emitted: int = 0
    suppressed: int = 0


class ThrottledLog:
    """Logs through ``logger`` at most ``burst`` lines per kind and ``interval_s``; counts the rest.

    The count of suppressed lines is appended to the next line of that kind that is let through
    (``"... [12 similar suppressed in 10 s]"``), so nothing is silently lost from the log's story.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        burst: int = DEFAULT_BURST,
        max_kinds: int = MAX_KINDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or burst < 1 or max_kinds < 1:
            raise ValueError("interval_s > 0, burst >= 1 and max_kinds >= 1 are required")
        self.logger = logger
        self.interval_s = interval_s
        self.burst = burst
        self.max_kinds = max_kinds
        self._clock = clock
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()
        self.suppressed_total = 0

    def warning(self, kind: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, kind, msg, *args)

    def info(self, kind: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def exception(self, kind: Hashable, msg: str, *args: object) -> bool:
        """An ERROR with the traceback being handled, under the same limit."""
        return self.log(logging.ERROR, kind, msg, *args, exc_info=True)

    def log(self, level: int, kind: Hashable, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log unless this kind used its burst in the current window; True if the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._window(kind, now)
        if now - window.started_s >= self.interval_s:
            suppressed = window.suppressed
            window.started_s, window.emitted, window.suppressed = now, 0, 0
            if suppressed:
                msg = f"{msg} [%d similar suppressed in the last %.0f s]"
                args = (*args, suppressed, self.interval_s)
        if window.emitted >= self.burst:
            window.suppressed += 1
            self.suppressed_total += 1
            return False
        window.emitted += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def allow(self, kind: Hashable) -> bool:
        """Whether one more event of ``kind`` is within its burst now, counted as :meth:`log` counts,
        whatever the log level (for records kept beside the log, such as the journal)."""
        now = self._clock()
        window = self._window(kind, now)
        if now - window.started_s >= self.interval_s:
            window.started_s, window.emitted, window.suppressed = now, 0, 0
        if window.emitted >= self.burst:
            window.suppressed += 1
            self.suppressed_total += 1
            return False
        window.emitted += 1
        return True

    def _window(self, kind: Hashable, now: float) -> _Window:
        window = self._windows.get(kind)
        if window is not None:
            self._windows.move_to_end(kind)
            return window
        if len(self._windows) >= self.max_kinds:
            # Too many distinct kinds (keys built from what a publisher sent): they share one budget.
            overflow = self._windows.get(_OVERFLOW_KIND)
            if overflow is None:
                self._windows.popitem(last=False)
                overflow = self._windows[_OVERFLOW_KIND] = _Window(now)
            return overflow
        window = self._windows[kind] = _Window(now)
        return window
