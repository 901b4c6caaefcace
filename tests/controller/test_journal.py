"""The journal (controller/journal.py) and ``bmslink events``: entries written, published, rotated,
rate-limited under a key, and read back by the CLI as a person would."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import controller.journal
from controller.journal import Journal, read_events
from controller.state_db import StateDb
from shared.cluster import JournalEvent
from shared.codec import Decoder


def journal(path: Path, published: list[bytes], **kwargs: object) -> tuple[StateDb, Journal]:
    state = StateDb(path, background=False)  # writes done when record returns
    clock = iter(float(t) for t in range(1_800_000_000, 1_900_000_000))
    return state, Journal(state, site_id="site-a", node_id="ctl-a", publish=published.append,
                          wall_clock=lambda: next(clock), **kwargs)  # type: ignore[arg-type]


def bmslink_events(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bmslink", "events", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_events_are_written_published_and_read_back(tmp_path: Path) -> None:
    published: list[bytes] = []
    state, j = journal(tmp_path / "s.sqlite3", published)
    j.record("latch", "charge_over_temperature latched", rack_id="rack-01", level=logging.WARNING)
    j.record("command", "refused (bad_signature): …")
    j.record("release", "charge_over_temperature released", rack_id="rack-01")
    state.close()
    rows = list(read_events(tmp_path / "s.sqlite3"))
    assert [(kind, rack) for _, _, _, kind, rack, _ in rows] == [
        ("latch", "rack-01"), ("command", ""), ("release", "rack-01")]
    db = tmp_path / "s.sqlite3"
    assert [r[3] for r in read_events(db, rack_id="rack-01")] == ["latch", "release"]
    assert [r[3] for r in read_events(db, since_s=1_800_000_001)] == ["command", "release"]
    events = [Decoder(JournalEvent).decode(p) for p in published]
    assert [e.kind for e in events] == ["latch", "command", "release"] and events[0].node_id == "ctl-a"


def test_the_journal_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller.journal, "TRIM_EVERY", 10)
    state, j = journal(tmp_path / "s.sqlite3", [], max_rows=50)
    for i in range(500):
        j.record("rack_state", f"change {i}", rack_id="rack-01")
    rows = list(read_events(tmp_path / "s.sqlite3"))
    assert 50 <= len(rows) <= 60
    assert rows[-1][5] == "change 499"
    state.close()


def test_a_flood_under_one_key_is_rate_limited_and_counted(tmp_path: Path) -> None:
    state, j = journal(tmp_path / "s.sqlite3", [])
    for _ in range(1000):
        j.record("command", "refused (malformed): not msgpack", log_key=("refused", "malformed"))
    assert j.recorded < 20 and j.recorded + j.suppressed == 1000
    assert len(list(read_events(tmp_path / "s.sqlite3"))) == j.recorded
    state.close()


def test_bmslink_events_prints_the_story_and_says_what_is_wrong(tmp_path: Path) -> None:
    db = tmp_path / "controller-ctl-a.sqlite3"
    state, j = journal(db, [])
    j.record("latch", "charge_over_temperature latched", rack_id="rack-01")
    j.record("role", "active (epoch 2): took over")
    state.close()
    out = bmslink_events("--db", str(db))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "latch" in lines[0] and "rack-01" in lines[0] and "took over" in lines[1]
    out = bmslink_events("--db", str(db), "--json", "--rack", "rack-01")
    assert [json.loads(line)["kind"] for line in out.stdout.splitlines()] == ["latch"]
    out = bmslink_events("--db", str(db), "--since", "1800000001")  # a Unix time
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    out = bmslink_events("--db", str(db), "--since", "2030-01-01T00:00")  # an ISO time after both
    assert out.returncode == 0 and out.stdout == ""
    for bad, says in ((["--db", str(db), "--since", "yesterday"], "--since"),
                      (["--db", str(tmp_path / "absent.sqlite3")], "no state database"),
                      ([], "--config")):
        out = bmslink_events(*bad)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


async def test_writes_run_off_the_event_loop_and_then_comes_back_to_it(tmp_path: Path) -> None:
    """A slow disk (here a 0.2 s write) never holds up the loop; what waits for it runs on the loop."""
    state = StateDb(tmp_path / "s.sqlite3")
    loop_thread = threading.current_thread()
    ran_on: list[threading.Thread] = []
    done = asyncio.Event()

    def change(_db: sqlite3.Connection) -> None:
        ran_on.append(threading.current_thread())
        time.sleep(0.2)

    def then() -> None:
        ran_on.append(threading.current_thread())
        done.set()

    started = time.monotonic()
    state.write(change, what="a slow write", then=then)
    assert time.monotonic() - started < 0.05
    await asyncio.wait_for(done.wait(), 5)
    assert ran_on[0] is not loop_thread and ran_on[1] is loop_thread
    state.close()


def test_rate_limited_events_are_journaled_whatever_the_log_level(tmp_path: Path) -> None:
    """An installer at --log-level warning still gets rack-state events in the journal (they were
    lost: the rate limit answered "not written" for a log level that was off)."""
    logger = logging.getLogger("bmslink.journal")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        published: list[bytes] = []
        state, j = journal(tmp_path / "s.sqlite3", published)
        j.record("rack_state", "ok -> stale", rack_id="rack-01", log_key=("rack_state", "rack-01"))
        state.close()
    finally:
        logger.setLevel(before)
    assert [r[3] for r in read_events(tmp_path / "s.sqlite3")] == ["rack_state"]
    assert len(published) == 1
