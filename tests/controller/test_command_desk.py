"""The controller's command desk (controller/commands.py) and its replay memory (command_store.py, in
the state database): every way a command can be wrong is refused with its reason, counted and
answered; a good one runs once; its retransmission gets the same answer; a replay never runs."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from controller.command_store import CommandStore
from controller.commands import ClearReport, CommandDesk, MaintenanceReport
from controller.journal import Journal
from controller.state_db import StateDb
from shared.codec import Decoder
from shared.commands import (
    CommandAction,
    CommandReply,
    LatchNote,
    OperatorCommand,
    encode_request,
    new_command,
    sign,
)

KEY = bytes(range(32))
NOW = 1_800_000_000.0


class Site:
    """A desk with a clock, a roster of two racks, and what its callbacks were asked."""

    def __init__(self, store: CommandStore, *, active: bool = True, ready: bool = True) -> None:
        self.now = NOW
        self.active = active
        self.ready = ready
        self.cleared: list[tuple[str, ...]] = []
        self.replies: list[tuple[str, CommandReply]] = []
        self.events: list[bytes] = []
        self.forced: list[float] = []
        self.maintenance: set[str] = set()
        self.desk = CommandDesk(
            site_id="site-a", node_id="ctl-a", keys={"alice": KEY}, store=store, window_s=30.0,
            roster=lambda: ("rack-01", "rack-02"), is_active=lambda: self.active,
            clear_latches=self._clear, force_charge=self._force, set_maintenance=self._maintain,
            publish_reply=self._reply,
            wall_clock=lambda: self.now,
            journal=Journal(store.state, site_id="site-a", node_id="ctl-a", publish=self.events.append,
                            wall_clock=lambda: self.now),
        )

    def _clear(self, racks: tuple[str, ...]) -> ClearReport | None:
        if not self.ready:
            return None
        self.cleared.append(racks)
        return ClearReport((LatchNote(rack_id=racks[0], flag="cell_over_voltage"),), ())

    def _force(self, duration_s: float) -> float | None:
        if not self.ready:
            return None
        self.forced.append(duration_s)
        return self.now + duration_s

    def _maintain(self, racks: tuple[str, ...], on: bool, why: str) -> MaintenanceReport | None:
        if not self.ready:
            return None
        changed = tuple(r for r in racks if (r in self.maintenance) != on)
        self.maintenance = self.maintenance | set(racks) if on else self.maintenance - set(racks)
        return MaintenanceReport(tuple(sorted(self.maintenance)), changed, f"why={why}")

    def _reply(self, command_id: str, payload: bytes) -> None:
        self.replies.append((command_id, Decoder(CommandReply).decode(payload)))

    def send(self, payload: bytes) -> CommandReply | None:
        before = len(self.replies)
        self.desk.on_request(payload)
        assert len(self.replies) <= before + 1
        return self.replies[-1][1] if len(self.replies) > before else None


def command(**overrides: object) -> OperatorCommand:
    base = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id="site-a", racks=("rack-01",),
                       issued_s=NOW)
    return base.model_copy(update=overrides)


_OPEN: list[StateDb] = []


def store(path: Path | None, wall_s: float) -> CommandStore:
    state = StateDb(path, wall_clock=wall_s, background=False)
    _OPEN.append(state)
    return CommandStore(state)


@pytest.fixture(autouse=True)
def _close_databases() -> Iterator[None]:
    """Every database a test opened is closed with it (not left to the collector, whose timing would
    move a later test's count of open file descriptors)."""
    yield
    while _OPEN:
        state = _OPEN.pop()
        with contextlib.suppress(sqlite3.ProgrammingError):  # closed by the test already
            state.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(store(tmp_path / "commands.sqlite3", NOW - 100))


def test_a_signed_clear_runs_once_and_is_answered(site: Site) -> None:
    cmd = command()
    reply = site.send(encode_request(cmd, KEY))
    assert reply is not None and reply.accepted and reply.id == cmd.id and reply.node_id == "ctl-a"
    assert reply.released == (LatchNote(rack_id="rack-01", flag="cell_over_voltage"),)
    assert site.cleared == [("rack-01",)]
    assert site.desk.counters["accepted"] == 1


def test_a_clear_of_every_rack_names_the_whole_roster(site: Site) -> None:
    reply = site.send(encode_request(command(racks=()), KEY))
    assert reply is not None and reply.accepted
    assert site.cleared == [("rack-01", "rack-02")]


def test_a_retransmission_gets_the_same_answer_and_does_not_run_again(site: Site) -> None:
    payload = encode_request(command(), KEY)
    first = site.send(payload)
    site.now += 5
    again = site.send(payload)
    assert again == first
    assert site.cleared == [("rack-01",)]
    assert site.desk.counters["retransmitted"] == 1


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: encode_request(command(key_id="mallory"), KEY), "unknown_key"),
    (lambda: encode_request(command(), bytes(32)), "bad_signature"),
    (lambda: encode_request(command(site_id="site-b"), KEY), "wrong_site"),
    (lambda: encode_request(command(issued_s=NOW - 31), KEY), "stale"),
    (lambda: encode_request(command(issued_s=NOW + 31), KEY), "future"),
    (lambda: encode_request(command(racks=("rack-01", "rack-99")), KEY), "unknown_rack"),
])
def test_a_wrong_command_is_refused_answered_and_counted(site: Site, make: object, reason: str) -> None:
    assert callable(make)
    reply = site.send(make())
    assert reply is not None and not reply.accepted
    assert reply.reason.startswith(f"{reason}: ")
    assert site.cleared == []
    assert site.desk.counters[f"refused_{reason}"] == 1


def test_garbage_is_refused_and_counted_without_an_answer(site: Site) -> None:
    for payload in (b"", b"\x00" * 10, b"\x81\xa1v\x01"):
        assert site.send(payload) is None
    assert site.desk.counters["refused_malformed"] == 3
    assert site.cleared == []


def test_a_replay_of_an_id_with_other_bytes_never_runs(site: Site) -> None:
    cmd = command()
    site.send(encode_request(cmd, KEY))
    forged = encode_request(cmd.model_copy(update={"racks": ("rack-02",)}), KEY)
    assert site.send(forged) is None  # no answer under the id the genuine command owns
    assert site.desk.counters["refused_replay"] == 1
    assert site.cleared == [("rack-01",)]


def test_the_replay_memory_outlives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    first = Site(store(path, NOW - 100))
    cmd = command()
    answer = first.send(encode_request(cmd, KEY))
    first.desk.store.state.close()
    second = Site(store(path, NOW + 1))
    assert second.desk.store.horizon_s == NOW - 100  # the memory it had, not a new one
    assert second.send(encode_request(cmd, KEY)) == answer  # answered from the memory, not run again
    assert second.send(encode_request(cmd.model_copy(update={"racks": ()}), KEY)) is None
    assert second.cleared == []
    assert second.desk.counters["refused_replay"] == 1


def test_without_a_memory_commands_from_before_the_start_are_refused() -> None:
    site = Site(store(None, NOW))
    assert site.desk.store.state.note
    reply = site.send(encode_request(command(issued_s=NOW - 1), KEY))
    assert reply is not None and not reply.accepted and reply.reason.startswith("before_horizon")
    reply = site.send(encode_request(command(issued_s=NOW + 1), KEY))
    assert reply is not None and reply.accepted


def test_a_corrupt_memory_is_put_aside_and_guarded_by_a_horizon(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    site = Site(store(path, NOW))
    assert "unreadable" in site.desk.store.state.note
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    reply = site.send(encode_request(command(issued_s=NOW - 1), KEY))
    assert reply is not None and reply.reason.startswith("before_horizon")


def test_a_standby_neither_runs_nor_answers(site: Site) -> None:
    site.active = False
    assert site.send(encode_request(command(), KEY)) is None
    assert site.desk.counters["ignored_standby"] == 1
    site.active = True  # after a takeover, the sender's retry is answered
    reply = site.send(encode_request(command(), KEY))
    assert reply is not None and reply.accepted


def test_a_command_before_the_loop_runs_is_refused_as_not_ready(tmp_path: Path) -> None:
    site = Site(store(tmp_path / "c.sqlite3", NOW - 100), ready=False)
    payload = encode_request(command(), KEY)
    reply = site.send(payload)
    assert reply is not None and not reply.accepted and reply.reason.startswith("not_ready")
    site.ready = True  # the sender's retry of the same bytes runs once the loop does
    reply = site.send(payload)
    assert reply is not None and reply.accepted
    assert site.cleared == [("rack-01",)]


def test_a_force_charge_request_is_set_for_its_duration(site: Site) -> None:
    command = new_command(CommandAction.FORCE_CHARGE, key_id="alice", site_id="site-a", duration_s=600,
                          issued_s=NOW)
    reply = site.send(encode_request(command, KEY))
    assert reply is not None and reply.accepted and "600 s" in reply.reason
    assert site.forced == [600.0] and site.cleared == []


def test_a_force_charge_without_a_duration_or_with_racks_is_malformed(site: Site) -> None:
    body = command().model_dump(mode="json")
    for wrong in ({"action": "force_charge", "racks": []}, {"action": "force_charge", "duration_s": 60.0},
                  {"action": "force_charge", "racks": [], "duration_s": 1e9},
                  {"action": "clear_latches", "duration_s": 60.0}):
        payload = json.dumps({**body, **wrong}).encode()
        request = {"v": 1, "key_id": "alice", "body": payload, "signature": sign(payload, KEY)}
        reply = site.send(msgpack.packb(request))
        assert reply is not None and reply.reason.startswith("malformed"), wrong
    assert site.forced == []


def test_maintenance_names_its_racks_and_the_reply_says_what_changed(site: Site) -> None:
    on = command(action=CommandAction.MAINTENANCE_ON, racks=("rack-02", "rack-02"))
    reply = site.send(encode_request(on, KEY))
    assert reply is not None and reply.accepted, reply
    assert reply.maintenance == ("rack-02",) and reply.maintenance_ended == ()
    assert "rack-02 put in maintenance" in reply.reason and f"command {on.id} from key alice" in reply.reason
    again = command(action=CommandAction.MAINTENANCE_ON, racks=("rack-02",))
    reply = site.send(encode_request(again, KEY))
    assert reply is not None and "rack-02 already in maintenance" in reply.reason
    off = command(action=CommandAction.MAINTENANCE_OFF, racks=("rack-02",))
    reply = site.send(encode_request(off, KEY))
    assert reply is not None and reply.maintenance == () and reply.maintenance_ended == ("rack-02",)
    unknown = command(action=CommandAction.MAINTENANCE_ON, racks=("rack-09",))
    reply = site.send(encode_request(unknown, KEY))
    assert reply is not None and not reply.accepted and reply.reason.startswith("unknown_rack")
    assert site.maintenance == set()


def test_maintenance_without_racks_is_refused_as_malformed(site: Site) -> None:
    body = json.dumps(command().model_dump(mode="json") | {"action": "maintenance_on", "racks": []}).encode()
    reply = site.send(msgpack.packb({"v": 1, "key_id": "alice", "body": body, "signature": sign(body, KEY)}))
    assert reply is not None and not reply.accepted
    assert "maintenance_on needs the racks it applies to" in reply.reason
    assert site.desk.counters["refused_malformed"] == 1


def test_maintenance_is_retried_while_the_loop_is_not_ready(site: Site) -> None:
    site.ready = False
    on = command(action=CommandAction.MAINTENANCE_ON, racks=("rack-01",))
    reply = site.send(encode_request(on, KEY))
    assert reply is not None and not reply.accepted and reply.retry
    site.ready = True
    reply = site.send(encode_request(on, KEY))
    assert reply is not None and reply.accepted and site.maintenance == {"rack-01"}
