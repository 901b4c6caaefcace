"""The replay memory of operator commands, in the state database (``controller/state_db.py``).

For every authenticated command it holds the id, the SHA-256 of the signed body and the reply that
was given: the same bytes again (the operator's CLI retrying) get the same reply, other bytes under a
seen id are a replay. Entries older than twice the timestamp window are dropped; such commands are
refused for their age anyway.

A memory that had to start empty (no ``state_dir``; a first start; an unreadable file) cannot say what
it saw before, so it sets a **horizon**, the wall time it started: a command issued before it is
refused. A replay across a restart is therefore refused even without a persisted memory, at the price
that a command in flight during such a start has to be given again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import NamedTuple

from controller.state_db import StateDb


class Seen(NamedTuple):
    body_sha256: bytes
    reply: bytes


class CommandStore:
    """Seen command ids, in ``state``'s ``commands`` table."""

    def __init__(self, state: StateDb) -> None:
        self.state = state
        self._db = state.db  # reads, on the loop
        # The memory holds everything since the database was made (the start, for one in RAM).
        self.horizon_s = state.created_s
        self._writing: dict[str, Seen] = {}  # remembered, their write not done yet

    def seen(self, command_id: str) -> Seen | None:
        writing = self._writing.get(command_id)
        if writing is not None:
            return writing
        row = self._db.execute(
            "SELECT body_sha256, reply FROM commands WHERE id = ?", (command_id,)).fetchone()
        return Seen(bytes(row[0]), bytes(row[1])) if row else None

    def remember(self, command_id: str, issued_s: float, body_sha256: bytes, reply: bytes, *,
                 forget_before_s: float, then: Callable[[], None] | None = None) -> None:
        """Remember an answered command (and forget those issued before ``forget_before_s``); ``then``
        runs once it is on disk (the reply goes out after that)."""
        self._writing[command_id] = Seen(body_sha256, reply)

        def change(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO commands (id, issued_s, body_sha256, reply) VALUES (?, ?, ?, ?)",
                (command_id, issued_s, body_sha256, reply))
            db.execute("DELETE FROM commands WHERE issued_s < ?", (forget_before_s,))

        def written() -> None:
            self._writing.pop(command_id, None)
            if then is not None:
                then()

        self.state.write(change, what=f"command {command_id}", then=written)
