"""MQTT ingest: each received message to where it belongs, as it is read.

Rack telemetry goes into the rack table (which decodes, validates, orders and counts it); a leader
record to the failover link; an operator command to the command desk; another controller's latches or
command replies to the latch share; the active's consolidated state to the warm standby. What the
table calls urgent (a payload that may lower a limit or raise an alarm) gets its cycle at once; a
routine payload waits in the table for the next full cycle.

The handler does more than hand off, on purpose: it is called by the MQTT session on the event loop
(no queue in between), and while the control loop runs, an urgent payload's cycle runs right here,
before the rest of the read batch. Waking the control task instead cost a loop turn and a task
switch on the path of every lowering (docs/performance.md). The
cycle never raises (:meth:`~controller.control_loop.ControlLoop.run_due_cycle` fails safe), so a
core defect is the control loop's, not the session's.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.commands import CommandDesk
from controller.control_loop import ControlLoop
from controller.failover import Role
from controller.failover_link import FailoverLink
from controller.latch_share import LatchShare
from controller.rack_table import RackTable
from controller.stats import ControllerStats
from controller.warm_standby import WarmStandby
from shared.mqtt import Message
from shared.topics import Topics


class MqttIngest:
    """The MQTT session's message handler (:meth:`on_message`)."""

    def __init__(self, topics: Topics, table: RackTable, *, loop: ControlLoop,
                 link: FailoverLink, stats: ControllerStats, commands: CommandDesk,
                 latch_share: LatchShare, warm: WarmStandby) -> None:
        self._warm = warm
        self._commands = commands
        self._latch_share = latch_share
        # Rack telemetry is nearly every message: one prefix test sends it to the table; the rest is
        # looked up by topic, command replies by their prefix.
        self._rack_head = topics.rack_head
        self._reply_head = topics.command_reply("")
        self._by_topic: dict[str, Callable[[Message], None]] = {
            topics.leader: lambda m: link.on_leader_record(m.payload),
            topics.command_request: lambda m: commands.on_request(m.payload),
            topics.cluster_state: self._on_cluster_state,
            topics.latches: lambda m: latch_share.on_latch_set(m.payload),
        }
        self._table = table
        self._loop = loop
        self._link = link
        self._stats = stats

    def on_message(self, msg: Message) -> bool:
        """Ingest one message; an urgent one gets its cycle at once (True, to the session: act now, when
        that cycle is left to the control loop)."""
        self._stats.messages += 1
        if not msg.topic.startswith(self._rack_head):
            other = self._by_topic.get(msg.topic)
            if other is not None:
                other(msg)
                return False
            if msg.topic.startswith(self._reply_head):
                self._on_reply(msg)
                return False
        ingest = self._table.ingest(msg.topic, msg.payload, msg.received_monotonic_s)
        if ingest.urgent:
            if self._loop.controlling:
                self._loop.run_due_cycle()  # here, not on the control task: see the module docstring
                return False
            self._loop.wake()
            return True
        return False

    def _on_cluster_state(self, msg: Message) -> None:
        if self._link.role is not Role.ACTIVE:  # the active's own copy is not read back
            self._warm.on_cluster_state(msg.payload, msg.topic, msg.received_monotonic_s)

    def _on_reply(self, msg: Message) -> None:
        reply = self._latch_share.on_reply(msg.topic, msg.payload)
        if reply is not None and reply.accepted:  # another controller ran it: never run here too
            self._commands.note_answered(reply.id, msg.payload)
