"""Latched alarms that outlive a restart, in the state database (``controller/state_db.py``).

A latch is released only by an operator's accepted clear, so the set of latched (rack, alarm) pairs is
written whenever it changes and read back at start: a restarted controller holds every latch it held
before, each as still active, until the rack's telemetry shows the condition gone and a clear is
accepted. The times of a latch are on the controller's monotonic clock, which a restart does not keep;
only the pairs and the wall time each was first written are stored.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from types import MappingProxyType

from controller.core.faults import Latch
from controller.core.memory import CoreMemory, RackMemory
from controller.state_db import StateDb

Latched = Mapping[str, frozenset[str]]  # rack id → latched alarm names


class LatchStore:
    def __init__(self, state: StateDb) -> None:
        self._state = state
        self._db = state.db  # reads, at start

    def load(self) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        for rack_id, flag in self._db.execute("SELECT rack_id, flag FROM latches ORDER BY rack_id, flag"):
            found.setdefault(str(rack_id), set()).add(str(flag))
        return {rack_id: frozenset(flags) for rack_id, flags in found.items()}

    def save(self, latched: Latched, wall_s: float) -> None:
        """Replace the stored set by ``latched`` (one transaction, on the state database's writer; a
        pair kept keeps its first time)."""
        pairs = {(rack_id, flag) for rack_id, flags in latched.items() for flag in flags}

        def change(db: sqlite3.Connection) -> None:
            stored = {(str(r), str(f)) for r, f in db.execute("SELECT rack_id, flag FROM latches")}
            db.executemany("DELETE FROM latches WHERE rack_id = ? AND flag = ?", sorted(stored - pairs))
            db.executemany("INSERT INTO latches (rack_id, flag, since_wall_s) VALUES (?, ?, ?)",
                           [(r, f, wall_s) for r, f in sorted(pairs - stored)])

        self._state.write(change, what="the latched alarms")


def restored_memory(latched: Latched, roster: tuple[str, ...], now_s: float) -> CoreMemory:
    """The core's memory at start: the stored latches of roster racks, each active from ``now_s``."""
    racks = {
        rack_id: RackMemory(latches=MappingProxyType(
            {flag: Latch(raised_s=now_s) for flag in sorted(latched[rack_id])}))
        for rack_id in roster if latched.get(rack_id)
    }
    return CoreMemory(racks=MappingProxyType(racks)) if racks else CoreMemory.initial()
