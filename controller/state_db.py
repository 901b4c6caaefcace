"""The controller's state database: what must outlive a restart, in one SQLite file (WAL).

``{state_dir}/controller-{node_id}.sqlite3`` holds the operators' command ids (the replay memory,
``command_store``), the latched alarms (``latch_store``), the racks in maintenance
(``maintenance_store``) and the journal (``journal``). Without a
``state_dir`` the same tables live in memory, and the controller says so at every start.

**Writes never run on the event loop.** A commit with ``synchronous=FULL`` waits for the disk, and a
gateway's SD card or eMMC can take well over 100 ms for one fsync; on the event loop that would be a
stall of the control loop, long enough to fence an active controller (its stall limit is half the
silence window, 150 ms by default). So every write goes to one writer thread, with its own connection,
in the order given (:meth:`StateDb.write`); what must wait for the disk (the reply to an accepted
command) is passed as ``then`` and runs back on the loop once the write is done. Reads (a command id
seen?) stay on the loop's connection: in WAL mode they never wait for the writer.

A file that cannot be read as a database is put aside (renamed ``….corrupt-<time>``, for a person to
look at) and a new one is started; :attr:`StateDb.note` then says what was lost, and
:attr:`StateDb.lost` is True. Every store decides what "lost" means for it, never "nothing happened":
the replay memory refuses commands issued before the new start (its **horizon**), the latches keep
what the racks still show and raise the alarm that the older ones are unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
CREATE TABLE IF NOT EXISTS maintenance (
    rack_id TEXT PRIMARY KEY,
    since_wall_s REAL NOT NULL,
    why TEXT NOT NULL
);
"""


class StateDb:
    """One connection to the state database; ``path`` None keeps it in memory."""

    def __init__(self, path: Path | None, *, wall_clock: float | None = None,
                 background: bool = True) -> None:
        """``background`` False writes on the caller's thread (tools and tests without an event loop; a
        database in memory, which waits for no disk, always does)."""
        self.path = path
        self._writer_db: sqlite3.Connection | None = None
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="bmslink-state")
                          if background and path is not None else None)
        self.write_errors = 0
        now = time.time() if wall_clock is None else wall_clock
        self.note = ""  # what an operator should know about this database (logged at start)
        self.lost = False  # a file existed and could not be read: what it held is gone
        self.db = self._open(path, now)
        row = self.db.execute("SELECT value FROM meta WHERE name = 'created_s'").fetchone()
        self.created_s = float(row[0])

    def _open(self, path: Path | None, now: float) -> sqlite3.Connection:
        if path is None:
            self.note = "no state_dir: the replay memory and the latched alarms are kept in RAM only"
            return self._init(self._connect(), now)
        db = self._connect()
        try:
            self._init(db, now)
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            aside = path.with_name(f"{path.name}.corrupt-{int(now)}")
            with contextlib.suppress(OSError):
                path.rename(aside)
            self.lost = True
            self.note = f"state database {path} was unreadable ({exc}); moved to {aside.name}, started anew"
            return self._init(self._connect(), now)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path or ":memory:", timeout=5.0, isolation_level=None)

    @staticmethod
    def _init(db: sqlite3.Connection, now: float) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        # A latch or an accepted command is on disk before anyone is told about it.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('created_s', ?)", (now,))
        return db

    def write(self, change: Callable[[sqlite3.Connection], object], *, what: str,
              then: Callable[[], None] | None = None) -> None:
        """Run ``change`` in one transaction on the writer thread, after every write given before it;
        then ``then`` on the caller's event loop (also when the write failed: counted and logged)."""
        if self._executor is None:
            self._apply(change, self.db, what)
            if then is not None:
                then()
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        future = self._executor.submit(self._in_writer, change, what)
        if then is not None:
            if loop is None:
                future.result()
                then()
            else:
                def done(_future: Future[None]) -> None:
                    loop.call_soon_threadsafe(then)

                future.add_done_callback(done)

    def _in_writer(self, change: Callable[[sqlite3.Connection], object], what: str) -> None:
        if self._writer_db is None:
            self._writer_db = self._connect()
            self._writer_db.execute("PRAGMA synchronous=FULL")
        self._apply(change, self._writer_db, what)

    def _apply(self, change: Callable[[sqlite3.Connection], object], db: sqlite3.Connection,
               what: str) -> None:
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                change(db)
        except sqlite3.Error:
            self.write_errors += 1
            log.exception("state database %s: could not write %s", self.path or "(memory)", what)

    def close(self) -> None:
        """Finish the writes given so far, then close both connections."""
        if self._executor is not None:
            self._executor.submit(self._close_writer).result()
            self._executor.shutdown(wait=True)
        self.db.close()

    def _close_writer(self) -> None:
        if self._writer_db is not None:
            self._writer_db.close()
            self._writer_db = None


def state_db_path(state_dir: Path | None, node_id: str) -> Path | None:
    return None if state_dir is None else state_dir / f"controller-{node_id}.sqlite3"
