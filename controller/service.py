"""The controller service: its parts, wired together, and their lifecycle.

Where each job lives:

* :mod:`controller.ingest` — MQTT messages in: rack telemetry to the rack table, urgent payloads
  to an immediate cycle, leader records to the failover link;
* :mod:`controller.control_loop` — when a cycle runs (ticks, urgent cycles, heartbeats on absolute
  deadlines, the SMA inhibit), the fail-safe set, what is sent to the inverter and published;
* :mod:`controller.failover_link` — the role machine's pulse, the heartbeat frames, the leader
  record, the controller status and the foreign-transmitter alarm;
* :mod:`controller.core` — the pure core: :class:`~controller.core.engine.Engine` computes each
  cycle incrementally, exactly as the reference :func:`~controller.core.step.step` would;
* :mod:`controller.metrics` — the Prometheus endpoint, reading
  :class:`~controller.metrics.ControllerReadings`, which this service provides;
* :mod:`controller.modbus_server` — the optional read-only Modbus view of the consolidated state;
* :mod:`controller.commands` — operator commands: authenticated, executed on the active, answered.

What stays here: the one place the core is called (:meth:`ControllerService._compute`, the control
loop's ``compute``: the rack table's new inputs handed to the engine, then its cycle), because that is
where the table and the engine meet; what the operator commands do (clear of latched alarms, reload);
start and stop.

Wiring order: the CAN port and the MQTT session take their handlers when they are made, and the
parts take the port and session they use. The MQTT message handler, the hot path, is the ingest's
own method, so the session is made last; the few calls that cannot follow that order (a CAN frame
from another node, the bus reopened, a publish, a takeover) are rare and go through the small
forwarding methods under "wiring".
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import can

from controller.can_port import CanPort
from controller.command_store import CommandStore
from controller.commands import ClearReport, CommandDesk, MaintenanceReport, command_keys
from controller.control_loop import STATE_PUBLISH_MIN_GAP_S, ControlLoop, HeartbeatSchedule, must_send_now
from controller.core.engine import Engine
from controller.core.faults import Latch
from controller.core.memory import with_latches
from controller.failover import ForeignTransmitterWatch, Role, RoleMachine
from controller.failover_link import FailoverLink
from controller.frames import FrameEncoder
from controller.ingest import MqttIngest
from controller.journal import Journal
from controller.latch_share import LatchShare
from controller.latch_store import LatchStore, restored_memory
from controller.maintenance_store import MaintenanceStore
from controller.metrics import ControllerMetrics
from controller.modbus_server import ConsolidatedModbusServer
from controller.rack_table import RackTable
from controller.state_db import StateDb, state_db_path
from controller.stats import ControllerStats
from controller.warm_standby import WarmStandby
from shared.cluster import ConsolidatedState, RackState
from shared.commands import LatchNote
from shared.controller_config import ControllerConfig
from shared.mqtt import MqttSession, MqttStats, Will
from shared.sd_notify import LoopWatchdog, Notifier
from shared.topics import STATUS_OFFLINE, Topics

if TYPE_CHECKING:
    from controller.web import WebPage

# Defined in controller.control_loop; imported from here by code and tests that predate the split.
__all__ = ["STATE_PUBLISH_MIN_GAP_S", "ControllerService", "HeartbeatSchedule", "must_send_now"]

log = logging.getLogger(__name__)
_DIGITS = re.compile(r"[0-9.]+")


class ControllerService:
    """One cluster controller: rack telemetry in over MQTT, the consolidated battery out on CAN."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._monotonic = monotonic
        self._wall = wall_clock
        self.topics = Topics(config.mqtt.topic_prefix, config.site_id)
        self.table = RackTable(self.topics, tuple(r.rack_id for r in config.roster), config.site_id,
                               config.max_payload_bytes, max_clock_ahead_s=config.max_clock_ahead_s,
                               wall_clock=wall_clock)
        self.stats = ControllerStats()
        # What outlives a restart: the replay memory of commands and the latched alarms.
        self.state_db = StateDb(state_db_path(config.state_dir, config.node_id), wall_clock=wall_clock())
        self.latch_store = LatchStore(self.state_db)
        self._latched: dict[str, frozenset[str]] = self.latch_store.load()
        self.engine = Engine(config, restored_memory(self._latched, self.table.roster, monotonic()))
        self.maintenance_store = MaintenanceStore(self.state_db)
        # Rack id → why it is in maintenance (controller/core/maintenance.py); ended only by a command.
        self._maintenance: dict[str, str] = self.maintenance_store.load()
        self._maintenance_set: frozenset[str] = frozenset(self._maintenance)
        self.warm = WarmStandby(config)
        self.journal = Journal(self.state_db, site_id=config.site_id, node_id=config.node_id,
                               publish=self._publish_event, wall_clock=wall_clock)
        self._reported: ConsolidatedState | None = None  # the last state compared for the journal
        self._unreported: ConsolidatedState | None = None  # the newest state, not reported yet
        self._report_scheduled = False
        self._limit_reasons = ("", "")
        self._clear_commands_s: Mapping[str, float] = MappingProxyType({})
        self._force_charge_until_s: float | None = None  # monotonic; never carried over a restart
        failover = config.failover
        self.can = CanPort(
            config.can, on_frame=self._on_can_frame, on_reopened=self._on_can_reopened,
            failures_before_fault=failover.send_failures_before_fence if failover.enabled else None,
        )
        self.link = FailoverLink(config, self.topics, self.can, self.stats, publish=self._publish,
                                 took_over=self._took_over, last_state=self._last_state,
                                 role_changed=self._role_changed, limits_heard=self._limits_heard,
                                 monotonic=monotonic, wall_clock=wall_clock)
        self.modbus: ConsolidatedModbusServer | None = (
            ConsolidatedModbusServer(config.modbus_server) if config.modbus_server.enabled else None
        )
        self.loop = ControlLoop(config, self.can, self.link, self.stats, compute=self._compute,
                                publish=self._publish, cluster_state_topic=self.topics.cluster_state,
                                on_state=self.modbus.update if self.modbus is not None else None,
                                monotonic=monotonic, wall_clock=wall_clock)
        self.commands = CommandDesk(
            site_id=config.site_id, node_id=config.node_id, keys=command_keys(config),
            store=CommandStore(self.state_db), window_s=config.commands.window_s,
            roster=lambda: self.table.roster, is_active=lambda: self.link.role is Role.ACTIVE,
            clear_latches=self.clear_latched_alarms, force_charge=self.request_force_charge,
            set_maintenance=self.set_maintenance, publish_reply=self._publish_reply, journal=self.journal,
            wall_clock=wall_clock,
        )
        self.latch_share = LatchShare(
            site_id=config.site_id, node_id=config.node_id, topics=self.topics,
            publish=self._publish_retained, epoch=lambda: self.roles.epoch if self.roles is not None else 0,
            adopt=self._adopt_latches, adopt_maintenance=self._adopt_maintenance, wall_clock=wall_clock,
        )
        self.ingest = MqttIngest(self.topics, self.table, loop=self.loop, link=self.link, stats=self.stats,
                                 commands=self.commands, latch_share=self.latch_share, warm=self.warm)
        client_id = (
            config.mqtt.client_id
            or f"bmslink-controller-{config.site_id}-{config.node_id}-{uuid.uuid4().hex[:8]}"
        )
        # Messages are handled as they are read, on the loop (no queue): see controller.ingest.
        self.mqtt = MqttSession(config.mqtt, client_id, will=Will(self.link.status_topic, STATUS_OFFLINE),
                                on_connected=self._on_mqtt_connected, on_message=self.ingest.on_message)
        self.mqtt.subscribe(self.topics.all_rack_telemetry, qos=0)
        self.mqtt.subscribe(self.topics.leader, qos=1)
        self.mqtt.subscribe(self.topics.command_request, qos=1)
        self.mqtt.subscribe(self.topics.latches, qos=1)
        self.mqtt.subscribe(self.topics.cluster_state, qos=0)
        self.mqtt.subscribe(self.topics.all_command_replies, qos=1)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = ControllerMetrics(self)
        # The read-only web page (controller/web/), off by default: aiohttp is loaded only when it is on.
        self.web: WebPage | None = None
        if config.web.enabled:
            from controller.web import WebPage  # noqa: PLC0415

            self.web = WebPage(config, self, events_db=self.state_db.path, monotonic=monotonic,
                               wall_clock=wall_clock)
        # systemd (Type=notify, WatchdogSec=): READY once started, then pings while the control loop cycles.
        self.watchdog = LoopWatchdog(Notifier.from_environ(), progress=lambda: self.stats.cycles,
                                     status=self._status_line)

    def _status_line(self) -> str:
        state = self.loop.state
        racks = f"{state.eligible_racks} of {state.roster_size} rack(s) eligible" if state else "no cycle yet"
        return (f"{self.role.value}, {racks}, broker {'connected' if self.mqtt.is_connected else 'away'}, "
                f"CAN {'healthy' if self.can.healthy else 'failing'}")

    # -- commands ----------------------------------------------------------------------------

    def clear_latched_alarms(self, racks: Sequence[str] = ()) -> ClearReport | None:
        """An accepted clear of ``racks`` (none: every rack): their latched alarms whose condition has
        cleared are released, in a cycle run now. Returns what was released and what still holds and
        why; None (nothing done) while the control loop is not running yet."""
        if not self.loop.controlling:
            return None
        targets = tuple(racks) or self.table.roster
        before = {rack_id: self._latches(rack_id) for rack_id in targets}
        now = self._monotonic()
        self._clear_commands_s = MappingProxyType({**self._clear_commands_s, **dict.fromkeys(targets, now)})
        self.loop.run_due_cycle()
        views = {view.rack_id: view for view in (self.loop.state.racks if self.loop.state else ())}
        released, held = [], []
        for rack_id in targets:
            after = self._latches(rack_id)
            released += [LatchNote(rack_id=rack_id, flag=flag)
                         for flag in before[rack_id] if flag not in after]
            view = views.get(rack_id)
            state = view.state if view is not None else None
            held += [LatchNote(rack_id=rack_id, flag=flag, why=_why_held(latch, state))
                     for flag, latch in after.items()]
        return ClearReport(tuple(released), tuple(held))

    def request_force_charge(self, duration_s: float) -> float | None:
        """An accepted force-charge request: the dialect's request flag for ``duration_s`` (while charging
        is enabled), then dropped by itself. Returns its end on the wall clock; None while the control
        loop is not running yet."""
        if not self.loop.controlling:
            return None
        self._force_charge_until_s = self._monotonic() + duration_s
        self.loop.wake()
        return self._wall() + duration_s

    def set_maintenance(self, racks: Sequence[str], on: bool, why: str) -> MaintenanceReport | None:
        """An accepted maintenance command: ``racks`` put in maintenance (``on``) or returned to the bank,
        effective in a cycle run now. None (nothing done) while the control loop is not running yet."""
        if not self.loop.controlling:
            return None
        changed = self._change_maintenance(list(racks) if on else [], [] if on else list(racks), why)
        self.loop.run_due_cycle()
        state = self.loop.state
        note = ""
        if state is not None and state.eligible_racks < self.config.aggregation.min_racks:
            note = (f"the bank has {state.eligible_racks} eligible rack(s), fewer than min_racks "
                    f"{self.config.aggregation.min_racks}: zero current until enough are admitted")
        return MaintenanceReport(tuple(sorted(self._maintenance)), tuple(changed), note)

    def _adopt_maintenance(self, add: list[str], end: list[str], why: str) -> None:
        """Racks another controller has in maintenance, or returned by its accepted command."""
        if self._change_maintenance(add, end, why):
            self.loop.wake()

    def _change_maintenance(self, add: list[str], end: list[str], why: str) -> list[str]:
        """Put ``add`` in maintenance and end ``end`` (roster racks only); journal, save and share the
        change. Returns the racks that changed."""
        roster = set(self.table.roster)
        added = [r for r in dict.fromkeys(add) if r in roster and r not in self._maintenance]
        ended = [r for r in dict.fromkeys(end) if r in self._maintenance]
        if not added and not ended:
            return []
        for rack_id in added:
            self._maintenance[rack_id] = why
            self.journal.record("maintenance", f"in maintenance ({why}): adds no capacity; its limits bind "
                                "while its contactor may be closed", rack_id=rack_id, level=logging.WARNING)
        for rack_id in ended:
            del self._maintenance[rack_id]
            self.journal.record("maintenance", f"out of maintenance ({why}): back through the re-admission "
                                "hold and ramp", rack_id=rack_id, level=logging.WARNING)
        self._maintenance_set = frozenset(self._maintenance)
        self.maintenance_store.save(self._maintenance, self._wall())
        self._share_latches()
        return added + ended

    @property
    def maintenance(self) -> frozenset[str]:
        """The racks in maintenance."""
        return self._maintenance_set

    def _latches(self, rack_id: str) -> Mapping[str, Latch]:
        memory = self.engine.memory.racks.get(rack_id)
        return memory.latches if memory is not None else {}

    def reload(self, config: ControllerConfig) -> None:
        """Adopt a new roster and aggregation settings (SIGHUP); transport settings need a restart."""
        ignored = [
            name for name in ("mqtt", "can", "site_id", "node_id")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if ignored:
            log.warning("reload: changes to %s need a restart and were not applied", ignored)
            config = config.model_copy(update={name: getattr(self.config, name) for name in ignored})
        self.config = config
        self.table.set_roster(tuple(r.rack_id for r in config.roster))
        self.engine.reconfigure(config)
        self.link.config = config
        self.loop.reload(config)
        log.info("reload: roster now %s", list(self.table.roster))

    # -- the core, on the rack table ---------------------------------------------------------

    def _compute(self, now: float, full: bool) -> ConsolidatedState:
        """The control loop's ``compute``: the rack table's new inputs to the engine, then its cycle.

        ``full`` = False: an urgent cycle, which takes the inputs of urgent payloads only. Raises what
        the core raises (the loop fails safe); the inputs handed over stay with the engine.
        """
        for rack_input in self.table.take(full=full):
            self.engine.put(rack_input)
        state = self.engine.cycle(now, self._wall(), clear_commands_s=self._clear_commands_s,
                                  maintenance=self._maintenance_set, unknown_racks=self.table.unknown_ids())
        if self._force_charge_until_s is not None:
            if now < self._force_charge_until_s:
                state = state.model_copy(update={"force_charge_request": True})
            else:
                self._force_charge_until_s = None
                self.journal.record("command", "force-charge request expired", level=logging.WARNING)
        self._report_after_send(state)
        return state

    def _report_after_send(self, state: ConsolidatedState) -> None:
        """Latch and journal bookkeeping for ``state``, after the current callback: the cycle's frames
        (an urgent one's included) go out first. Cycles run in one callback are reported once, on the
        last of them."""
        self._unreported = state
        if self._report_scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self._report)
            self._report_scheduled = True
        except RuntimeError:  # no loop (a cycle run by hand): at once
            self._report()

    def _report(self) -> None:
        self._report_scheduled = False
        state, self._unreported = self._unreported, None
        if state is not None:
            self._note_latches()
            self._journal_changes(state)

    def _journal_changes(self, state: ConsolidatedState) -> None:
        """Rack state changes, and changes of what limits the bank (its reasons without the figures)."""
        before = self._reported
        self._reported = state
        if before is not None and len(before.racks) == len(state.racks):
            for old, new in zip(before.racks, state.racks, strict=True):
                if old.state is not new.state and old.rack_id == new.rack_id:
                    self.journal.record("rack_state", f"{old.state} -> {new.state}: {new.reason}",
                                        rack_id=new.rack_id, log_key=("rack_state", new.rack_id))
        reasons = (_DIGITS.sub("#", state.ccl_reason), _DIGITS.sub("#", state.dcl_reason))
        if reasons != self._limit_reasons:
            self._limit_reasons = reasons
            self.journal.record("limit", f"{state.ccl_reason} | {state.dcl_reason}", log_key=("limit",))

    def _note_latches(self) -> None:
        """When the latched set changed: say what latched and what was released (WARNING: an installer
        must see it), and write the new set to the state database once the frames are out. (The racks
        holding latches are few, usually none: comparing them every cycle costs next to nothing.)"""
        latched = {rack_id: frozenset(latches) for rack_id, latches in self.engine.latches_by_rack}
        if latched == self._latched:
            return
        for rack_id in sorted(latched.keys() | self._latched.keys()):
            now, before = latched.get(rack_id, frozenset()), self._latched.get(rack_id, frozenset())
            for flag in sorted(now - before):
                self.journal.record("latch", f"{flag} latched (held until its condition clears and an "
                                    "operator's clear is accepted)", rack_id=rack_id, level=logging.WARNING)
            for flag in sorted(before - now):
                self.journal.record("release", f"{flag} released by an operator's clear", rack_id=rack_id,
                                    level=logging.WARNING)
        self._latched = latched
        self._share_latches()
        self._schedule_latch_save()

    def _schedule_latch_save(self) -> None:
        # On the state database's writer thread, in order: the frames of this cycle are not held up.
        self.latch_store.save(dict(self._latched), self._wall())

    def _share_latches(self) -> None:
        """The active publishes its latches (controller/latch_share.py); a standby never does."""
        if self.link.role is Role.ACTIVE:
            self.latch_share.publish(self._latched, self._maintenance_set)

    def _adopt_latches(self, add: list[tuple[str, str]], release: list[tuple[str, str]], why: str) -> None:
        """Latches another controller holds, or released by its accepted clear, become ours too."""
        memory = self.engine.memory
        held = {rack_id: rack.latches for rack_id, rack in memory.racks.items()}
        roster = set(self.table.roster)
        add = [(r, f) for r, f in add if r in roster and f not in held.get(r, {})]
        release = [(r, f) for r, f in release if f in held.get(r, {})]
        if not add and not release:
            return
        latched = {rack_id: set(flags) for rack_id, flags in self._latched.items()}
        for rack_id, flag in add:
            self.journal.record("latch", f"{flag} latched, {why}", rack_id=rack_id, level=logging.WARNING)
            latched.setdefault(rack_id, set()).add(flag)
        for rack_id, flag in release:
            self.journal.record("release", f"{flag} {why}", rack_id=rack_id, level=logging.WARNING)
            latched.get(rack_id, set()).discard(flag)
        self.engine.replace_memory(with_latches(memory, add=add, release=release, now_s=self._monotonic()))
        # Said and written here, with why; the next cycle finds the same set and adds nothing.
        self._latched = {rack_id: frozenset(flags) for rack_id, flags in latched.items() if flags}
        self._share_latches()
        self._schedule_latch_save()
        self.loop.wake()

    def _on_can_frame(self, msg: can.Message, now_s: float) -> None:
        self.link.on_can_frame(msg, now_s)

    def _on_can_reopened(self) -> None:
        self.loop.on_can_reopened()

    def _publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                 expiry_s: int | None = None) -> bool:
        return self.mqtt.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def _publish_event(self, payload: bytes) -> None:
        self.mqtt.publish(self.topics.controller_events(self.config.node_id), payload, qos=1)
        if self.web is not None:
            self.web.on_event(payload)

    def _role_changed(self, role: Role, epoch: int, reason: str) -> None:
        self.journal.record("role", f"{role.value} (epoch {epoch}): {reason}", level=logging.WARNING)

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        self.mqtt.publish(topic, payload, qos=1, retain=True)

    def _on_mqtt_connected(self) -> None:
        self.link.on_mqtt_connected()
        self._share_latches()  # a broker that restarted without persistence lost the retained set

    def _publish_reply(self, command_id: str, payload: bytes) -> None:
        self.mqtt.publish(self.topics.command_reply(command_id), payload, qos=1)

    def _limits_heard(self, data: bytes, now_s: float) -> None:
        self.warm.on_limits_frame(data, now_s)

    def _took_over(self, now_s: float) -> None:
        memory = self.warm.takeover_memory(self.engine.memory, self.loop.state, now_s)
        if memory is not None:
            self.engine.replace_memory(memory)
            heard, followed = self.warm.limits, self.warm.followed
            assert heard is not None and followed is not None
            self.journal.record("role", f"taking over warm from {followed.node_id}: continuing from CCL "
                                f"{heard.charge_a:g} A, DCL {heard.discharge_a:g} A with "
                                f"{len(followed.admitted)} rack(s) admitted", level=logging.WARNING)
        self.loop.took_over(now_s)
        self._share_latches()

    def _last_state(self) -> ConsolidatedState | None:
        return self.loop.state

    # -- the parts' state, as tests and the metrics (ControllerReadings) read it -------------

    @property
    def roles(self) -> RoleMachine | None:
        return self.link.roles

    @property
    def role(self) -> Role:
        return self.link.role

    @property
    def foreign(self) -> ForeignTransmitterWatch:
        return self.link.foreign

    @property
    def foreign_transmitter(self) -> bool:
        """The foreign-transmitter alarm is raised (limits frames no bmslink controller accounts for)."""
        return self.link.foreign_transmitter

    @property
    def foreign_transmitter_detections(self) -> int:
        return self.link.foreign.detections

    @property
    def state(self) -> ConsolidatedState | None:
        """The last cycle's consolidated state."""
        return self.loop.state

    @property
    def last_sent(self) -> ConsolidatedState | None:
        return self.loop.last_sent

    @property
    def heartbeat(self) -> HeartbeatSchedule:
        return self.loop.heartbeat

    @property
    def encoder(self) -> FrameEncoder:
        return self.loop.encoder

    @property
    def payload_outcomes(self) -> Mapping[str, int]:
        return self.table.counters

    @property
    def unknown_racks(self) -> Mapping[str, int]:
        return self.table.unknown

    @property
    def can_events(self) -> Mapping[str, int]:
        return self.can.counters

    @property
    def command_outcomes(self) -> Mapping[str, int]:
        return self.commands.counters

    @property
    def journal_counts(self) -> Mapping[str, int]:
        j = self.journal
        return {"recorded": j.recorded, "suppressed": j.suppressed,
                "state_write_errors": self.state_db.write_errors}

    @property
    def can_healthy(self) -> bool:
        return self.can.healthy

    @property
    def mqtt_stats(self) -> MqttStats:
        return self.mqtt.stats

    @property
    def mqtt_connected(self) -> bool:
        return self.mqtt.is_connected

    def cycle(self, *, heartbeat_due: bool, full: bool = True) -> ConsolidatedState:
        """One control cycle now (:meth:`ControlLoop.cycle`)."""
        return self.loop.cycle(heartbeat_due=heartbeat_due, full=full)

    def run_due_cycle(self) -> None:
        """The cycle due now, failing safe (:meth:`ControlLoop.run_due_cycle`)."""
        self.loop.run_due_cycle()

    def may_transmit(self) -> bool:
        """Single mode: always. Failover: only the active, and never after an unnoticed stall."""
        return self.link.may_transmit()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.commands.keys:
            log.warning("no operator command keys (commands.keys_file or the systemd credential %s): every "
                        "command, a clear of latched alarms included, is refused", "bmslink-command-keys")
        if self.state_db.note:
            log_state = log.error if self.state_db.lost else log.warning
            log_state("%s", self.state_db.note)
        if self.state_db.lost:
            log.error("the latched alarms held before are not known: only those the racks show again "
                      "will latch; check the racks before clearing anything")
            log.error("the racks in maintenance before are not known: only those another controller "
                      "shares are kept; put any rack still under service in maintenance again")
        if self._latched:
            pairs = [f"{rack_id}/{flag}" for rack_id, flags in sorted(self._latched.items())
                     for flag in sorted(flags)]
            log.warning("latched alarms restored from %s: %s (an operator's clear releases them)",
                        self.state_db.path or "memory", ", ".join(pairs))
        for rack_id, why in sorted(self._maintenance.items()):
            log.warning("rack %s is in maintenance (%s), restored from %s; `bmslink cmd maintenance off %s` "
                        "returns it", rack_id, why, self.state_db.path or "memory", rack_id)
        self.metrics.serve(self.config.metrics)
        await self.can.start()
        self.link.started(self._monotonic())
        if self.modbus is not None:
            await self.modbus.start()
        if self.web is not None:
            await self.web.start()
        await self.mqtt.start()
        self._tasks = [
            asyncio.create_task(self.loop.run(), name="controller-control"),
        ]
        if self.link.roles is not None:
            self._tasks.append(asyncio.create_task(self.link.pulse(), name="controller-pulse"))
        if self.watchdog.enabled:
            self._tasks.append(asyncio.create_task(self.watchdog.run(), name="controller-watchdog"))

    async def stop(self) -> None:
        self.watchdog.stopping()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.web is not None:
            await self.web.stop()
        await self.mqtt.stop(final=(self.link.status_topic, STATUS_OFFLINE, True))
        await self.can.stop()
        if self.modbus is not None:
            await self.modbus.stop()
        self.metrics.close()
        self._report()  # what the last cycles latched or changed, before the database closes
        self.journal.flush()
        self.state_db.close()  # the writes given so far are finished first

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def _why_held(latch: Latch, state: RackState | None) -> str:
    """Why a clear left ``latch`` in place, for the operator."""
    if not latch.active:
        return "cleared, but the cycle that should release it failed; give the command again"
    if state in (RackState.STALE, RackState.COMM_LOST, RackState.INVALID):
        return f"the rack is {state}: its condition cannot be seen to clear"
    return "the condition is still present"
