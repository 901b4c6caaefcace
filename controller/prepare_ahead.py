"""Routine payloads' racks computed ahead, in idle time (:meth:`controller.core.engine.Engine.prepare`).

A routine payload (nothing lowered) waits in the rack table for the next full cycle. At 1000 racks ×
2 Hz a full cycle would then compute ~200 racks in one block (~5 ms), and a lowering arriving
meanwhile would wait for it: the tail of the reaction time at large rosters. So the racks of routine
payloads are gathered for ``GATHER_S`` and computed in slices of at most ``SLICE_S``, each slice one
loop callback, so that a message read in between is handled between two slices. The cycle takes a
prepared outcome only where it is exactly the one it would compute (the engine checks); what could not
be prepared, or no longer stands, the cycle computes itself. A defect here costs only the head start:
it is counted and logged, and the cycle computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controller.core.engine import Engine
from controller.rack_table import RackTable
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

GATHER_S = 0.01
SLICE_S = 0.0005


class PrepareAhead:
    def __init__(self, engine: Callable[[], Engine], table: RackTable, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine  # the service's current engine
        self._table = table
        self._monotonic = monotonic
        self._waiting: dict[str, None] = {}  # rack ids, in arrival order
        self._scheduled = False
        self.errors = 0
        self._log = ThrottledLog(log)

    def note(self, rack_id: str) -> None:
        """A routine payload of ``rack_id`` was stored: compute its outcome soon."""
        self._waiting[rack_id] = None
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(GATHER_S, self._slice)

    def _slice(self) -> None:
        deadline = time.perf_counter() + SLICE_S
        engine = self._engine()
        try:
            while self._waiting and time.perf_counter() < deadline:
                rack_id = next(iter(self._waiting))
                del self._waiting[rack_id]
                rack_input = self._table.untaken(rack_id)
                if rack_input is not None:
                    engine.prepare(rack_input, self._monotonic())
        except Exception:  # the cycle computes what is not prepared: a head start lost, nothing else
            self.errors += 1
            self._log.exception("prepare", "computing a rack ahead failed; the cycle computes it")
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._slice)
        else:
            self._scheduled = False
