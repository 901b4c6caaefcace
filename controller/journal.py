"""The journal: what happened, for the people who run the site.

Every latch and release, every operator command (accepted or refused, with the key id and the reason),
every role change, every rack state change and every change of what limits the bank is one
:class:`~shared.cluster.JournalEvent`: logged at once (a latch and a refusal at WARNING, so an installer
sees them), appended to the ``journal`` table of the state database (bounded: the oldest entries are
rotated out beyond ``MAX_ROWS``) and published on ``Topics.events``. Writing and publishing happen
together, after the current callback (``loop.call_soon``): a cycle that latches an alarm sends its
frames first.

``bmslink events`` reads the table (:func:`read_events`), from the file, without a running controller.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

from controller.state_db import StateDb
from shared.cluster import JournalEvent
from shared.codec import encode
from shared.logthrottle import ThrottledLog

log = logging.getLogger("bmslink.journal")

MAX_ROWS = 100_000
TRIM_EVERY = 1_000  # rows appended between trims


class Journal:
    def __init__(self, state: StateDb | None, *, site_id: str, node_id: str,
                 publish: Callable[[bytes], None], wall_clock: Callable[[], float] = time.time,
                 max_rows: int = MAX_ROWS) -> None:
        self._state = state
        self.site_id = site_id
        self.node_id = node_id
        self._publish = publish
        self._wall = wall_clock
        self.max_rows = max_rows
        self._pending: list[JournalEvent] = []
        self._since_trim = 0
        self.recorded = 0
        self.suppressed = 0
        self._throttled = ThrottledLog(log)

    def record(self, kind: str, text: str, *, rack_id: str = "", level: int = logging.INFO,
               log_key: Hashable = None) -> None:
        """One event: logged now, written and published after the current callback. With ``log_key``,
        such events are rate-limited under that key (logged and journaled a few times per 10 s, the
        rest counted in ``suppressed`` and summed up in the log)."""
        event = JournalEvent(site_id=self.site_id, node_id=self.node_id, timestamp_s=self._wall(), kind=kind,
                             rack_id=rack_id, text=text)
        where = f"rack {rack_id} " if rack_id else ""
        # The rate limit decides what is journaled whatever the log level: an installer running at
        # --log-level warning still gets rack-state and limit events in the journal and on MQTT.
        if log_key is not None and not self._throttled.allow(log_key):
            self.suppressed += 1  # counted where it was recorded
            return
        log.log(level, "%s%s: %s", where, kind, text)
        self.recorded += 1
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a tool, a test): write at once
                self._pending.append(event)
                self.flush()
                return
        self._pending.append(event)

    def flush(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        for event in events:
            self._publish(encode(event))
        if self._state is None:
            return
        self._since_trim += len(events)
        trim = self._since_trim >= TRIM_EVERY
        if trim:
            self._since_trim = 0
        rows = [(e.timestamp_s, e.node_id, e.kind, e.rack_id, e.text) for e in events]
        max_rows = self.max_rows

        def change(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO journal (wall_s, node_id, kind, rack_id, text) VALUES (?, ?, ?, ?, ?)", rows)
            if trim:
                db.execute("DELETE FROM journal WHERE seq <= (SELECT MAX(seq) FROM journal) - ?", (max_rows,))

        # On the state database's writer thread: a slow disk never stalls the loop (state_db.py).
        self._state.write(change, what=f"{len(rows)} journal event(s)")


EventRow = tuple[int, float, str, str, str, str]  # seq, wall time, node, kind, rack, text


def read_events(path: Path, *, since_s: float | None = None,
                rack_id: str | None = None) -> Iterator[EventRow]:
    """The journal in ``path``, oldest first, from ``since_s`` (wall time) on, of ``rack_id`` only
    (rack events: latch, release, rack_state) when given. Opens the file read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT seq, wall_s, node_id, kind, rack_id, text FROM journal "
            "WHERE wall_s >= ? AND (? IS NULL OR rack_id = ?) ORDER BY seq",
            (-1.0 if since_s is None else since_s, rack_id, rack_id))
        for row in rows:
            yield int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5])
    finally:
        db.close()
