"""The racks in maintenance, in the state database (``controller/state_db.py``).

Only an operator's accepted command takes a rack out of maintenance (``controller/core/maintenance.py``),
so the set is written whenever it changes and read back at start: a restart never returns a rack under
service to the bank. Each rack is stored with the wall time it was put in maintenance and by what.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from controller.state_db import StateDb


class MaintenanceStore:
    def __init__(self, state: StateDb) -> None:
        self._state = state
        self._db = state.db  # reads, at start

    def load(self) -> dict[str, str]:
        """Rack id → why it is in maintenance (who put it there, when)."""
        rows = self._db.execute("SELECT rack_id, why FROM maintenance ORDER BY rack_id")
        return {str(rack_id): str(why) for rack_id, why in rows}

    def save(self, racks: Mapping[str, str], wall_s: float) -> None:
        """Replace the stored set by ``racks`` (one transaction, on the writer; a rack kept keeps its
        first time and why)."""
        wanted = dict(racks)

        def change(db: sqlite3.Connection) -> None:
            stored = {str(r) for (r,) in db.execute("SELECT rack_id FROM maintenance")}
            gone = [(rack_id,) for rack_id in sorted(stored - wanted.keys())]
            db.executemany("DELETE FROM maintenance WHERE rack_id = ?", gone)
            db.executemany("INSERT INTO maintenance (rack_id, since_wall_s, why) VALUES (?, ?, ?)",
                           [(r, wall_s, wanted[r]) for r in sorted(wanted.keys() - stored)])

        self._state.write(change, what="the racks in maintenance")
