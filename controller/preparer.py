"""Routine payloads' racks computed in idle time, ahead of the full cycle that takes them in.

A full cycle recomputes every rack whose routine payload arrived since the previous one: at 100
racks × 2 Hz about 20 racks in one block (docs/performance.md has the time it takes), and a
lowering that arrived during it waited that long before its urgent cycle could start. Here each
routine payload's rack is computed soon after the payload is stored, in short slices on the event
loop, and the full cycle takes those outcomes
(``core.engine.prepare`` and ``step(prepared=...)``): the same work, spread out, so a lowering
waits at most one slice. The core takes a prepared outcome only where it is exactly the one it
would compute itself, so nothing here can change what the inverter is told, only when the work
is done.

Racks are gathered for ``DELAY_S`` and then computed back to back: one rack at a time between the
reads ran cold (the rack code evicted by the receive path each time) and cost more CPU than the
same racks computed in a batch (docs/performance.md, path of a message, point 10).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from controller.core.engine import Prepared

log = logging.getLogger(__name__)

# Work per slice before the loop gets to its other callbacks (a lowering waits at most about this).
SLICE_S = 0.0005
DELAY_S = 0.01  # racks noted within this are computed together (well inside a 100 ms control tick)
ERRORS_LOGGED_EVERY = 1000  # a defect here repeats with every payload: log the first, then a sample


class Preparer:
    """Racks noted as having a new routine input, computed a slice at a time on the running loop."""

    def __init__(
        self, compute: Callable[[str], Prepared | None], *, slice_s: float = SLICE_S, delay_s: float = DELAY_S
    ) -> None:
        self._compute = compute  # the rack's outcome for its latest input, or None (not worth keeping)
        self._slice_s = slice_s
        self._delay_s = delay_s
        self._pending: dict[str, None] = {}  # insertion-ordered: oldest payload first
        self._prepared: dict[str, Prepared] = {}
        self._scheduled = False
        self.computed = 0
        self.errors = 0

    @property
    def prepared(self) -> Mapping[str, Prepared]:
        return self._prepared

    def note(self, rack_id: str) -> None:
        """A routine payload of ``rack_id`` was stored: compute it within the delay, after what is ready.

        A rack computed already since the last full cycle is left to that cycle: a rack publishing
        faster than the cycle runs is then computed once per cycle, as without preparation, not
        once per payload.
        """
        if rack_id in self._prepared:
            return
        self._pending[rack_id] = None
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pending.clear()  # no loop (a synchronous caller): the full cycle computes it
            return
        self._scheduled = True
        if self._delay_s > 0.0:
            loop.call_later(self._delay_s, self._run)
        else:
            loop.call_soon(self._run)

    def consumed(self) -> None:
        """A full cycle took every stored input in: what was prepared or pending is spent."""
        self._pending.clear()
        self._prepared.clear()

    def _run(self) -> None:
        self._scheduled = False
        deadline = time.perf_counter() + self._slice_s
        while self._pending:
            rack_id = next(iter(self._pending))
            del self._pending[rack_id]
            try:
                ahead = self._compute(rack_id)
            except Exception:
                # Only a shortcut is lost: the full cycle computes the rack itself (and if the defect
                # is in the core, that cycle fails safe).
                self.errors += 1
                if self.errors % ERRORS_LOGGED_EVERY == 1:
                    log.exception("computing rack %s ahead of the cycle failed (%d so far); the cycle "
                                  "computes it", rack_id, self.errors)
                ahead = None
            if ahead is None:
                self._prepared.pop(rack_id, None)
            else:
                self._prepared[rack_id] = ahead
                self.computed += 1
            if time.perf_counter() >= deadline:
                break
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)
