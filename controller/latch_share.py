"""Latched alarms shared between controllers, so that a takeover never forgets one.

The active publishes its latched (rack, alarm) pairs, retained, on ``Topics.latches``
(:class:`~shared.cluster.LatchSet`): on every change, when it takes the role and on every (re)connect
to the broker. Every controller adopts the pairs another node publishes that it does not hold itself,
as active latches: a standby therefore holds the union of its own and the active's, and so does a new
active that reads the old one's retained set. A latch is never released because a set left it out.

A release travels with the operator's clear: the active's reply to an accepted clear
(``Topics.command_reply``) lists what it released, and the other controllers release the same pairs.
A controller that missed that reply keeps the latch, which only asks for one more clear.

The racks in maintenance travel the same way and by the same rule (``LatchSet.maintenance``): adopted
as a union, ended only by an accepted ``maintenance off`` reply (``CommandReply.maintenance_ended``).
So neither a takeover nor a restart returns a rack under service to the bank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from shared.cluster import LatchedAlarm, LatchSet
from shared.codec import DecodeError, Decoder, encode
from shared.commands import CommandReply
from shared.logthrottle import ThrottledLog
from shared.models import PROTECTION_FLAG_NAMES
from shared.topics import Topics

log = logging.getLogger(__name__)

Pairs = Iterable[tuple[str, str]]
Adopt = Callable[[list[tuple[str, str]], list[tuple[str, str]], str], None]
"""``adopt(add, release, why)``: the controller latches ``add`` and releases ``release``."""
AdoptMaintenance = Callable[[list[str], list[str], str], None]
"""``adopt_maintenance(add, end, why)``: the controller puts ``add`` in maintenance and ends ``end``."""


class LatchShare:
    def __init__(self, *, site_id: str, node_id: str, topics: Topics,
                 publish: Callable[[str, bytes], None], epoch: Callable[[], int], adopt: Adopt,
                 adopt_maintenance: AdoptMaintenance, wall_clock: Callable[[], float] = time.time) -> None:
        self.site_id = site_id
        self.node_id = node_id
        self.topics = topics
        self._publish = publish
        self._epoch = epoch
        self._adopt = adopt
        self._adopt_maintenance = adopt_maintenance
        self._wall = wall_clock
        self._sets: Decoder[LatchSet] = Decoder(LatchSet)
        self._replies: Decoder[CommandReply] = Decoder(CommandReply)
        self.counters: dict[str, int] = {"sets_published": 0, "sets_adopted": 0, "releases_adopted": 0,
                                         "rejected": 0}
        self._log = ThrottledLog(log)

    def publish(self, latched: Mapping[str, frozenset[str]], maintenance: Iterable[str] = ()) -> None:
        """Publish this (active) controller's latches and racks in maintenance, retained."""
        latch_set = LatchSet(
            site_id=self.site_id, node_id=self.node_id, epoch=self._epoch(), timestamp_s=self._wall(),
            latches=tuple(LatchedAlarm(rack_id=rack_id, flag=flag)
                          for rack_id in sorted(latched) for flag in sorted(latched[rack_id])),
            maintenance=tuple(sorted(maintenance)),
        )
        self._publish(self.topics.latches, encode(latch_set))
        self.counters["sets_published"] += 1

    def on_latch_set(self, payload: bytes) -> None:
        """Another node's set: adopt what this controller does not hold yet. Never raises."""
        if not payload:
            return  # the retained set was cleared on the broker: nothing to adopt
        try:
            latch_set = self._sets.decode(payload, self.topics.latches)
        except DecodeError as exc:
            self._refused(f"latch set refused: {exc}")
            return
        if latch_set.node_id == self.node_id or latch_set.site_id != self.site_id:
            return
        pairs = self._known((latch.rack_id, latch.flag) for latch in latch_set.latches)
        why = f"held by {latch_set.node_id} (epoch {latch_set.epoch})"
        if pairs:
            self.counters["sets_adopted"] += 1
            self._adopt(pairs, [], why)
        if latch_set.maintenance:
            self._adopt_maintenance(list(latch_set.maintenance), [], why)

    def on_reply(self, topic: str, payload: bytes) -> CommandReply | None:
        """A command reply: the releases of another node's accepted clear are ours too. Returns another
        node's reply (None for ours and for what is not one). Never raises."""
        try:
            reply = self._replies.decode(payload, topic)
        except DecodeError as exc:
            self._refused(f"command reply refused: {exc}")
            return None
        if reply.node_id == self.node_id:
            return None
        if reply.accepted and reply.released:
            self.counters["releases_adopted"] += 1
            released = self._known((note.rack_id, note.flag) for note in reply.released)
            why = f"released by an operator's clear on {reply.node_id} (command {reply.id})"
            self._adopt([], released, why)
        if reply.accepted and (reply.maintenance or reply.maintenance_ended):
            why = f"by an operator's command on {reply.node_id} (command {reply.id})"
            self._adopt_maintenance(list(reply.maintenance), list(reply.maintenance_ended), why)
        return reply

    def _known(self, pairs: Pairs) -> list[tuple[str, str]]:
        known: list[tuple[str, str]] = []
        unknown: list[tuple[str, str]] = []
        for rack_id, flag in pairs:
            (known if flag in PROTECTION_FLAG_NAMES else unknown).append((rack_id, flag))
        if unknown:
            self._refused(f"latches of alarms this build does not know, ignored: {unknown}")
        return known

    def _refused(self, why: str) -> None:
        self.counters["rejected"] += 1
        self._log.warning(("latch-share", why[:40]), "%s", why)
