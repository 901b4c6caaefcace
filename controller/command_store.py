"""The controller's replay memory for operator commands, in SQLite (WAL), kept across restarts.

For every authenticated command it holds the id, the SHA-256 of the signed body and the reply that
was given: the same bytes again (the operator's CLI retrying) get the same reply, other bytes under a
seen id are a replay. Entries older than the timestamp window are dropped; such commands are refused
for their age anyway.

A memory that had to start empty (no ``state_dir``; a missing or unreadable file) cannot say what it
saw before, so it also sets a **horizon**, the wall time it started: a command issued before it is
refused. Without a persisted memory a replay across a restart is therefore refused as well, at the
price that a command in flight during the restart has to be given again.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    issued_s REAL NOT NULL,
    body_sha256 BLOB NOT NULL,
    reply BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""


class Seen(NamedTuple):
    body_sha256: bytes
    reply: bytes


class CommandStore:
    """Seen command ids; ``path`` None keeps them in memory only (the horizon then guards restarts)."""

    def __init__(self, path: Path | None, *, wall_clock: float | None = None) -> None:
        self.path = path
        now = time.time() if wall_clock is None else wall_clock
        self.horizon_s = now
        self.note = ""  # what an operator should know about this memory (logged at start)
        self._db = self._open(path, now)

    def _open(self, path: Path | None, now: float) -> sqlite3.Connection:
        if path is None:
            self.note = ("no state_dir: replay memory in RAM only; commands issued before this start "
                         "are refused")
            return self._init(sqlite3.connect(":memory:"), now)
        try:
            db = self._init(sqlite3.connect(path, timeout=1.0, isolation_level=None), now)
            row = db.execute("SELECT value FROM meta WHERE name = 'horizon_s'").fetchone()
            self.horizon_s = float(row[0])
            return db
        except sqlite3.DatabaseError as exc:
            # Unreadable: put it aside (for a person to look at) and start a new one behind a horizon.
            aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
            with contextlib.suppress(OSError):
                path.rename(aside)
            self.note = (f"replay memory {path} was unreadable ({exc}); moved to {aside.name}, started anew: "
                         "commands issued before this start are refused")
            return self._init(sqlite3.connect(path, timeout=1.0, isolation_level=None), now)

    @staticmethod
    def _init(db: sqlite3.Connection, now: float) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an accepted command is on disk before its reply goes out
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('horizon_s', ?)", (now,))
        db.commit()
        return db

    def seen(self, command_id: str) -> Seen | None:
        row = self._db.execute(
            "SELECT body_sha256, reply FROM commands WHERE id = ?", (command_id,)).fetchone()
        return Seen(bytes(row[0]), bytes(row[1])) if row else None

    def remember(self, command_id: str, issued_s: float, body_sha256: bytes, reply: bytes) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO commands (id, issued_s, body_sha256, reply) VALUES (?, ?, ?, ?)",
                (command_id, issued_s, body_sha256, reply))

    def forget_issued_before(self, wall_s: float) -> int:
        with self._db:
            return self._db.execute("DELETE FROM commands WHERE issued_s < ?", (wall_s,)).rowcount

    def close(self) -> None:
        self._db.close()
