"""The controller's state database: what must outlive a restart, in one SQLite file (WAL).

``{state_dir}/controller-{node_id}.sqlite3`` holds the operators' command ids (the replay memory,
``command_store``), the latched alarms (``latch_store``) and the journal (``journal``). Without a
``state_dir`` the same tables live in memory, and the controller says so at every start.

A file that cannot be read as a database is put aside (renamed ``….corrupt-<time>``, for a person to
look at) and a new one is started; :attr:`StateDb.note` then says what was lost, and
:attr:`StateDb.lost` is True. Every store decides what "lost" means for it, never "nothing happened":
the replay memory refuses commands issued before the new start (its **horizon**), the latches keep
what the racks still show and raise the alarm that the older ones are unknown.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    issued_s REAL NOT NULL,
    body_sha256 BLOB NOT NULL,
    reply BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_s REAL NOT NULL,
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rack_id TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_wall ON journal (wall_s);
CREATE TABLE IF NOT EXISTS latches (
    rack_id TEXT NOT NULL,
    flag TEXT NOT NULL,
    since_wall_s REAL NOT NULL,
    PRIMARY KEY (rack_id, flag)
);
"""


class StateDb:
    """One connection to the state database; ``path`` None keeps it in memory."""

    def __init__(self, path: Path | None, *, wall_clock: float | None = None) -> None:
        self.path = path
        now = time.time() if wall_clock is None else wall_clock
        self.started_s = now
        self.note = ""  # what an operator should know about this database (logged at start)
        self.lost = False  # a file existed and could not be read: what it held is gone
        self.fresh = True  # no earlier database was found (a first start, or a lost one)
        self.db = self._open(path, now)
        row = self.db.execute("SELECT value FROM meta WHERE name = 'created_s'").fetchone()
        self.created_s = float(row[0])

    def _open(self, path: Path | None, now: float) -> sqlite3.Connection:
        if path is None:
            self.note = "no state_dir: the replay memory and the latched alarms are kept in RAM only"
            return self._init(sqlite3.connect(":memory:", isolation_level=None), now)
        existed = path.exists()
        db = sqlite3.connect(path, timeout=1.0, isolation_level=None)
        try:
            self._init(db, now)
            self.fresh = not existed
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
            with contextlib.suppress(OSError):
                path.rename(aside)
            self.lost = True
            self.note = f"state database {path} was unreadable ({exc}); moved to {aside.name}, started anew"
            return self._init(sqlite3.connect(path, timeout=1.0, isolation_level=None), now)

    @staticmethod
    def _init(db: sqlite3.Connection, now: float) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        # A latch or an accepted command is on disk before anyone is told about it.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('created_s', ?)", (now,))
        return db

    def close(self) -> None:
        self.db.close()


def state_db_path(state_dir: Path | None, node_id: str) -> Path | None:
    return None if state_dir is None else state_dir / f"controller-{node_id}.sqlite3"
