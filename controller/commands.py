"""Operator commands at the controller: authenticate, execute on the active, reply.

Requests arrive on ``Topics.command_request`` (format: ``shared/commands.py``). Only the active
controller acts and answers; a standby counts the request and stays silent, so the operator's CLI,
which resends the same signed bytes until it has an answer, gets it from whichever node is active.

A request is refused, counted by reason, logged (a sample per reason and minute) and answered when it
names an id to answer to, for any of: not a signed command (``malformed``, ``unsupported_version``),
an unknown key (``unknown_key``), a signature that does not verify (``bad_signature``), another site
(``wrong_site``), a timestamp outside the window (``stale``, ``future``) or before this controller's
replay memory began (``before_horizon``), an id seen with other bytes (``replay``), a rack not on the
roster (``unknown_rack``), or no cycle to run it in (``not_ready``). A retransmission of an answered
command gets the same reply again (``retransmitted``). The commands: a clear of latched alarms, a
time-bounded force-charge request, and maintenance on/off for named racks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from controller.command_store import CommandStore
from controller.journal import Journal
from shared.codec import encode
from shared.commands import (
    MAINTENANCE_ACTIONS,
    CommandAction,
    CommandReply,
    KeyFileError,
    LatchNote,
    OperatorCommand,
    SignedRequest,
    credential_path,
    decode_request,
    load_keys,
)
from shared.commands import (
    CommandRefusedError as Refused,
)
from shared.config import ConfigError
from shared.controller_config import ControllerConfig

log = logging.getLogger(__name__)


def command_keys(config: ControllerConfig, environ: Mapping[str, str] = os.environ, *,
                 source: Path | str | None = None) -> Mapping[str, bytes]:
    """The operators' keys: ``commands.keys_file``, else systemd's credential, else none (every command
    is then refused). ConfigError when the file cannot be used, naming ``source`` (the config file)
    when given, else the key file."""
    path = config.commands.keys_file or credential_path(environ)
    if path is None:
        return {}
    try:
        return load_keys(path)
    except KeyFileError as exc:
        raise ConfigError(source or path, [f"commands.keys_file: {exc}"]) from None


# The body hash stored for a command another controller answered (its bytes were not seen here).
ANSWERED_ELSEWHERE = b""


class ClearReport(NamedTuple):
    """What a clear did: the latches it released, and those it left with why."""

    released: tuple[LatchNote, ...]
    held: tuple[LatchNote, ...]


class MaintenanceReport(NamedTuple):
    """What a maintenance command did: the racks in maintenance now, those it changed, and what the
    operator should know about the bank (e.g. fewer racks than ``min_racks`` left: zero current)."""

    in_maintenance: tuple[str, ...]
    changed: tuple[str, ...]
    note: str = ""


class CommandDesk:
    """Takes the command topic's messages (:meth:`on_request`); answers through ``publish``."""

    def __init__(
        self,
        *,
        site_id: str,
        node_id: str,
        keys: Mapping[str, bytes],
        store: CommandStore,
        window_s: float,
        roster: Callable[[], Sequence[str]],
        is_active: Callable[[], bool],
        clear_latches: Callable[[tuple[str, ...]], ClearReport | None],
        force_charge: Callable[[float], float | None],
        set_maintenance: Callable[[tuple[str, ...], bool, str], MaintenanceReport | None],
        publish_reply: Callable[[str, bytes], None],
        journal: Journal,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self.site_id = site_id
        self.node_id = node_id
        self.keys = keys
        self.store = store
        self.window_s = window_s
        self._roster = roster
        self._is_active = is_active
        self._clear_latches = clear_latches
        self._force_charge = force_charge
        self._set_maintenance = set_maintenance
        self._publish_reply = publish_reply
        self._wall = wall_clock
        self.counters: Counter[str] = Counter()  # "accepted", "refused_<reason>", "retransmitted", ...

    def on_request(self, payload: bytes) -> None:
        """One message on the command topic. Never raises."""
        if not self._is_active():
            self.counters["ignored_standby"] += 1
            return
        try:
            request = decode_request(payload)
        except Refused as exc:
            self._refused(None, exc.reason, str(exc))
            return
        reply_to = request.claimed_id()
        try:
            command, body_sha256 = self._authenticate(request)
        except Refused as exc:
            self._refused(reply_to, exc.reason, str(exc))
            return
        seen = self.store.seen(command.id)
        if seen is not None:
            if seen.body_sha256 in (body_sha256, ANSWERED_ELSEWHERE):
                self.counters["retransmitted"] += 1
                self._journal.record("command", f"{command.id} from key {command.key_id} seen before: its "
                                     "first reply sent again, not run again", log_key=("retransmitted",))
                self._publish_reply(command.id, seen.reply)
            else:
                self._refused(None, "replay", f"command id {command.id} was used before for another command")
            return
        reply, final = self._execute(command)
        encoded = encode(reply)
        if not final:  # a transient refusal (not_ready) is not remembered: the sender's retry may run
            self._publish_reply(command.id, encoded)
            return
        # The reply goes out once the command is on disk: a restart never forgets an answered one.
        self.store.remember(command.id, command.issued_s, body_sha256, encoded,
                            forget_before_s=self._wall() - 2 * self.window_s,
                            then=lambda: self._publish_reply(command.id, encoded))

    def note_answered(self, command_id: str, reply: bytes) -> None:
        """Another controller accepted this command (we were standby): after a takeover, the same id
        gets that reply again and is never run here."""
        if self.store.seen(command_id) is None:
            self.store.remember(command_id, self._wall(), ANSWERED_ELSEWHERE, reply,
                                forget_before_s=self._wall() - 2 * self.window_s)

    def _authenticate(self, request: SignedRequest) -> tuple[OperatorCommand, bytes]:
        key = self.keys.get(request.key_id)
        if key is None:
            raise Refused("unknown_key", f"unknown key id {request.key_id!r}" + (
                "" if self.keys else " (no command keys are configured on this controller)"))
        if not request.verify(key):
            raise Refused("bad_signature", f"signature does not verify with key {request.key_id!r}")
        command = request.command()
        if command.site_id != self.site_id:
            raise Refused("wrong_site", f"command is for site {command.site_id!r}, this is {self.site_id!r}")
        age_s = self._wall() - command.issued_s
        if age_s > self.window_s:
            raise Refused("stale", f"issued {age_s:.1f} s ago, beyond the {self.window_s:g} s window")
        if age_s < -self.window_s:
            raise Refused("future", f"issued {-age_s:.1f} s ahead of this controller's clock "
                                    f"(window {self.window_s:g} s)")
        if command.issued_s < self.store.horizon_s:
            raise Refused("before_horizon", "issued before this controller's replay memory began "
                                            "(it restarted without one): give the command again")
        return command, hashlib.sha256(request.body).digest()

    def _execute(self, command: OperatorCommand) -> tuple[CommandReply, bool]:
        """The reply, and whether it is final (else the same command may be tried again)."""
        roster = list(self._roster())
        unknown = [rack for rack in command.racks if rack not in roster]
        if unknown:
            why = f"not on the roster: {', '.join(unknown)}"
            return self._refusal_reply(command, "unknown_rack", why), True
        racks = tuple(dict.fromkeys(command.racks)) or tuple(roster)
        if command.action is CommandAction.CLEAR_LATCHES:
            report = self._clear_latches(racks)
            if report is None:
                why = "the control loop is not running yet; retry"
                return self._refusal_reply(command, "not_ready", why, retry=True), False
            self.counters["accepted"] += 1
            released = ", ".join(f"{n.rack_id}/{n.flag}" for n in report.released) or "none"
            held = ", ".join(f"{n.rack_id}/{n.flag} ({n.why})" for n in report.held) or "none"
            self._journal.record(
                "command", f"{command.id} from key {command.key_id}: clear of latched alarms of "
                f"{'every rack' if not command.racks else ', '.join(racks)} accepted; released {released}; "
                f"held {held}", level=logging.WARNING)
            what = f"released {len(report.released)} latch(es), {len(report.held)} still held"
            return CommandReply(id=command.id, node_id=self.node_id, accepted=True, reason=what,
                                released=report.released, held=report.held, replied_s=self._wall()), True
        if command.action is CommandAction.FORCE_CHARGE and command.duration_s is not None:
            until = self._force_charge(command.duration_s)
            if until is None:
                why = "the control loop is not running yet; retry"
                return self._refusal_reply(command, "not_ready", why, retry=True), False
            self.counters["accepted"] += 1
            what = (f"force-charge request set for {command.duration_s:g} s (until {until:.0f}, wall clock); "
                    "it asks the inverter to charge within the racks' limits and expires by itself")
            self._journal.record("command", f"{command.id} from key {command.key_id}: {what}",
                                 level=logging.WARNING)
            return CommandReply(id=command.id, node_id=self.node_id, accepted=True, reason=what,
                                replied_s=self._wall()), True
        if command.action in MAINTENANCE_ACTIONS:
            return self._maintenance(command, racks)
        return self._refusal_reply(command, "unknown_command", f"unknown command {command.action!r}"), True

    def _maintenance(self, command: OperatorCommand, racks: tuple[str, ...]) -> tuple[CommandReply, bool]:
        on = command.action is CommandAction.MAINTENANCE_ON
        report = self._set_maintenance(racks, on, f"command {command.id} from key {command.key_id}")
        if report is None:
            why = "the control loop is not running yet; retry"
            return self._refusal_reply(command, "not_ready", why, retry=True), False
        self.counters["accepted"] += 1
        verb = "put in maintenance" if on else "returned to the bank"
        unchanged = [rack for rack in racks if rack not in report.changed]
        what = (f"{', '.join(report.changed) or 'no rack'} {verb}"
                + (f" ({', '.join(unchanged)} already {'in maintenance' if on else 'in the bank'})"
                   if unchanged else "")
                + f"; in maintenance now: {', '.join(report.in_maintenance) or 'none'}"
                + (f"; {report.note}" if report.note else ""))
        self._journal.record("command", f"{command.id} from key {command.key_id}: {what}",
                             level=logging.WARNING)
        return CommandReply(
            id=command.id, node_id=self.node_id, accepted=True, reason=what,
            maintenance=report.in_maintenance, maintenance_ended=() if on else report.changed,
            replied_s=self._wall()), True

    def _refusal_reply(self, command: OperatorCommand, reason: str, detail: str, *,
                       retry: bool = False) -> CommandReply:
        self._count_refusal(reason, f"command {command.id} from key {command.key_id}: {detail}")
        return CommandReply(id=command.id, node_id=self.node_id, accepted=False, reason=f"{reason}: {detail}",
                            retry=retry, replied_s=self._wall())

    def _refused(self, reply_to: str | None, reason: str, detail: str) -> None:
        self._count_refusal(reason, detail)
        if reply_to is not None:
            reply = CommandReply(id=reply_to, node_id=self.node_id, accepted=False,
                                 reason=f"{reason}: {detail}", replied_s=self._wall())
            self._publish_reply(reply_to, encode(reply))

    def _count_refusal(self, reason: str, detail: str) -> None:
        """Counted always; logged and journaled at most a few times per reason and 10 s (a flood of
        refusals must not rotate the journal's history out)."""
        self.counters[f"refused_{reason}"] += 1
        self._journal.record("command", f"refused ({reason}): {detail}", level=logging.WARNING,
                             log_key=("refused", reason))

