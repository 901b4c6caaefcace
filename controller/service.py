"""The controller's I/O shell around the pure core.

One control task owns the cycle: take a snapshot of the rack table, step the
core, encode, send. The inverter frame set is sent *from the cycle itself*
every heartbeat period (a fire-and-forget periodic CAN task would keep sending
a stale permission if this loop stalled), and at once when a message may lower
a limit or raise an alarm: the message handler only sets an event, the cycle
runs within milliseconds. Heartbeats keep absolute deadlines
(:class:`HeartbeatSchedule`): neither a late send nor an urgent set in between
moves the next one, so a 1 s period gives 600 sets in 600 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import can
from cantools.database.errors import DecodeError as CanDecodeError

from controller.can_port import CanPort
from controller.core.engine import CoreMemory, Prepared, prepare, step
from controller.failover import ForeignTransmitterWatch, PeerBeat, Role, RoleMachine, WireRole
from controller.frames import FrameEncoder
from controller.metrics import ControllerMetrics
from controller.modbus_server import ConsolidatedModbusServer
from controller.preparer import Preparer
from controller.rack_table import RackTable
from shared.cluster import ConsolidatedState, ControllerStatus, LeaderRecord, RackState
from shared.codec import DecodeError, Decoder, encode
from shared.controller_config import ControllerConfig, Dialect
from shared.dbc import load_dbc, numeric_signals
from shared.logthrottle import ThrottledLog
from shared.mqtt import Message, MqttSession, Will
from shared.topics import STATUS_OFFLINE, Topics

log = logging.getLogger(__name__)

# Full cycles: routine payloads, staleness, ramps and slew advance at this rate even between
# heartbeats. An urgent payload gets its own cycle at once (``inputs_only``, see core.engine.step).
CONTROL_TICK_S = 0.1
SMA_INHIBIT_S = 0.2  # SMA: no ID more often than every 200 ms
PULSE_S = 0.02  # the role machine's clock: stall detection, takeover timing, heartbeat frames
STATUS_PUBLISH_S = 1.0
# A lowered limit is published for monitoring at once, but not more often than this: at a
# thousand racks the consolidated state is ~130 kB and 2.4 ms to encode, and a burst of decreases
# must not turn the monitoring copy into the controller's main load (the CAN frames go first anyway).
STATE_PUBLISH_MIN_GAP_S = 0.1
ID_LIMITS = 0x351
# The foreign-transmitter alarm stays raised this long after the foreign node's last frame, so that a
# short burst is still in the published state and status when an installer looks.
FOREIGN_HOLD_S = 10.0


@dataclass(slots=True)
class ControllerStats:
    cycles: int = 0
    sets_sent: int = 0
    urgent_sets: int = 0
    heartbeat_sets: int = 0
    messages: int = 0
    cycle_errors: int = 0
    failsafe_errors: int = 0  # cycles whose fail-safe set could not be made or sent either
    sends_refused: int = 0  # frames the role machine did not let out (standby, fenced)
    heartbeats_sent: int = 0
    heartbeats_skipped: int = 0  # heartbeat deadlines passed over because a set was more than a period late
    resumed_sets: int = 0  # sets sent at once because the CAN bus was (re)opened
    # Routine payloads' racks computed ahead of their full cycle (controller.preparer), and how
    # many of those the cycle took as they were.
    racks_prepared: int = 0
    racks_prepared_taken: int = 0


@dataclass
class HeartbeatSchedule:
    """Absolute deadlines of the heartbeat set: ``anchor_s + k × period_s``.

    A set sent late (a busy loop, the SMA inhibit) does not move the next deadline; one more than a
    period late skips the deadlines already past (counted in ``skipped``) instead of sending a burst
    of catch-up sets. Urgent sets in between are none of its business. :meth:`restart` anchors a new
    schedule (at start, and when this node becomes the active).
    """

    period_s: float
    anchor_s: float = 0.0
    index: int = 0
    skipped: int = 0
    _next_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ValueError("period_s must be positive")
        self._next_s = self.anchor_s

    @property
    def next_s(self) -> float:
        """The deadline of the next heartbeat (past while one is due)."""
        return self._next_s

    def due(self, now_s: float) -> bool:
        return now_s >= self._next_s

    def restart(self, now_s: float) -> None:
        self.anchor_s, self.index = now_s, 0
        self._next_s = now_s

    def sent(self, now_s: float) -> None:
        """The heartbeat of the current deadline went out (or was refused) at ``now_s``."""
        self.index += 1
        deadline = self.anchor_s + self.index * self.period_s
        if deadline <= now_s:
            missed = math.floor((now_s - deadline) / self.period_s) + 1
            self.skipped += missed
            self.index += missed
            deadline = self.anchor_s + self.index * self.period_s
        self._next_s = deadline


def fail_safe(
    previous: ConsolidatedState | None, config: ControllerConfig, wall_s: float
) -> ConsolidatedState:
    """Zero current, both directions disabled, alarm set; CVL kept at a plausible non-zero value."""
    cvl = previous.charge_voltage_limit_v if previous is not None and previous.charge_voltage_limit_v > 0 \
        else config.aggregation.fallback_voltage_v
    dvl = previous.discharge_voltage_limit_v if previous is not None else 0.0
    base = previous or ConsolidatedState(
        site_id=config.site_id, node_id=config.node_id, timestamp_s=wall_s, charge_current_limit_a=0.0,
        discharge_current_limit_a=0.0, charge_voltage_limit_v=cvl,
        discharge_voltage_limit_v=min(dvl, cvl - 0.1), charge_enabled=False, discharge_enabled=False,
        roster_size=len(config.roster),
    )
    return base.model_copy(update={
        "timestamp_s": wall_s,
        "charge_current_limit_a": 0.0,
        "discharge_current_limit_a": 0.0,
        "charge_voltage_limit_v": cvl,
        "discharge_voltage_limit_v": min(dvl, max(0.0, cvl - 0.1)),
        "charge_enabled": False,
        "discharge_enabled": False,
        "alarms": base.alarms.model_copy(update={"internal_fault": True}),
        "ccl_reason": "CCL 0 A: controller fault (fail-safe)",
        "dcl_reason": "DCL 0 A: controller fault (fail-safe)",
    })


def _limits_key(state: ConsolidatedState) -> tuple[float, float, float, float]:
    return (
        state.charge_current_limit_a,
        state.discharge_current_limit_a,
        state.charge_voltage_limit_v,
        -state.discharge_voltage_limit_v,
    )


def must_send_now(previous: ConsolidatedState | None, current: ConsolidatedState) -> bool:
    """A decrease of any limit or a newly raised alarm goes out at once; increases wait (they ramp)."""
    if previous is None:
        return True
    if any(c < p for c, p in zip(_limits_key(current), _limits_key(previous), strict=True)):
        return True
    if (
        current.charge_enabled < previous.charge_enabled
        or current.discharge_enabled < previous.discharge_enabled
    ):
        return True
    raised = set(current.alarms.raised()) | set(current.cluster.raised())
    before = set(previous.alarms.raised()) | set(previous.cluster.raised())
    return bool(raised - before)


class ControllerService:
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
        self.encoder = FrameEncoder(config.can, module_count=len(config.roster))
        failover = config.failover
        self.can = CanPort(
            config.can, on_frame=self._on_can_frame, on_reopened=self._on_can_reopened,
            failures_before_fault=failover.send_failures_before_fence if failover.enabled else None,
        )
        if not failover.heartbeat_enabled:
            # Without our heartbeat the limits frames are the only sign of an active: time by them.
            failover = failover.model_copy(update={"heartbeat_period_ms": config.can.period_ms})
        self.roles: RoleMachine | None = RoleMachine(failover, monotonic()) if failover.enabled else None
        # A limits frame is foreign when no bmslink heartbeat claims it within the silence window;
        # where no heartbeat can come (single controller, heartbeats off) at once.
        claimable = failover.enabled and failover.heartbeat_enabled
        self.foreign = ForeignTransmitterWatch(grace_s=failover.silence_s if claimable else 0.0,
                                               hold_s=FOREIGN_HOLD_S)
        self._foreign_raised = False
        self._throttled = ThrottledLog(log)
        self._beat_msg = load_dbc("bmslink").get_message_by_name("Controller_Heartbeat")
        self._last_pulse = monotonic()
        self._next_beat = 0.0
        self._last_status_publish = -1e9
        self._last_role: Role | None = None
        self.memory = CoreMemory.initial()
        self.state: ConsolidatedState | None = None
        self.last_sent: ConsolidatedState | None = None
        self._last_sent_at = -1e9
        self.heartbeat = HeartbeatSchedule(config.can.period_ms / 1000.0)
        self._heartbeat_hold_until = -1e9  # a fail-safe set that failed is retried at the tick, not at once
        self._resume_pending = False  # the bus was (re)opened: send the set at once
        self._last_full_cycle = -1e9
        self._last_cycle_failed = False
        self._last_state_publish = -1e9
        self._state_publish_pending = False  # an urgent set went out and its state is not published yet
        self._clear_command_s: float | None = None
        self._urgent = asyncio.Event()
        self._controlling = False  # the control loop runs: an urgent cycle may run where its payload is read
        self.preparer = Preparer(self._prepare_rack)
        self.stats = ControllerStats()
        client_id = (
            config.mqtt.client_id
            or f"bmslink-controller-{config.site_id}-{config.node_id}-{uuid.uuid4().hex[:8]}"
        )
        self._status_topic = self.topics.controller_status(config.node_id)
        # Messages are handled as they are read, on the loop (no queue): an urgent one wakes the cycle.
        self.mqtt = MqttSession(config.mqtt, client_id, will=Will(self._status_topic, STATUS_OFFLINE),
                                on_connected=self._on_mqtt_connected, on_message=self._on_message)
        self.mqtt.subscribe(self.topics.all_rack_telemetry, qos=0)
        self.mqtt.subscribe(self.topics.leader, qos=1)
        self._leader_decoder: Decoder[LeaderRecord] = Decoder(LeaderRecord)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = ControllerMetrics(self)
        self.modbus: ConsolidatedModbusServer | None = (
            ConsolidatedModbusServer(config.modbus_server) if config.modbus_server.enabled else None
        )

    # -- commands ----------------------------------------------------------------------------

    def clear_latched_alarms(self) -> None:
        """Accept a clear command: latched protection alarms whose condition has cleared are released."""
        self._clear_command_s = self._monotonic()
        log.warning("clear of latched alarms accepted")
        self._urgent.set()

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
        self.preparer.consumed()  # prepared for the old config: never taken, no use keeping
        self.table.set_roster(tuple(r.rack_id for r in config.roster))
        self.encoder = FrameEncoder(config.can, module_count=len(config.roster))
        log.info("reload: roster now %s", list(self.table.roster))
        self._urgent.set()

    # -- MQTT side ---------------------------------------------------------------------------

    def _on_mqtt_connected(self) -> None:
        self._publish_status(self._monotonic())

    def _on_message(self, msg: Message) -> bool:
        """Ingest one message; an urgent one gets its cycle at once (True, to the session: act now, when
        that cycle is left to the control loop)."""
        self.stats.messages += 1
        if msg.topic == self.topics.leader:
            self._on_leader_record(msg.payload)
            return False
        ingest = self.table.ingest(msg.topic, msg.payload, msg.received_monotonic_s)
        if ingest.urgent:
            if self._controlling:
                # Run it here, before the rest of the read batch: waking the control task instead
                # cost a loop turn and a task switch (~0.1 ms in the running controller) on the
                # path of every lowering.
                self.run_due_cycle()
                return False
            self._urgent.set()
            return True
        if ingest.accepted and ingest.rack_id is not None:
            self.preparer.note(ingest.rack_id)  # computed in idle time, taken by the next full cycle
        return False

    def _prepare_rack(self, rack_id: str) -> Prepared | None:
        latest = self.table.latest(rack_id)
        if latest is None:
            return None
        return prepare(
            latest, self.config, self._monotonic(), self.memory, clear_command_s=self._clear_command_s
        )

    def _on_leader_record(self, payload: bytes) -> None:
        if self.roles is None or not payload:
            return
        try:
            record = self._leader_decoder.decode(payload, self.topics.leader)
        except DecodeError as exc:
            log.warning("ignoring leader record: %s", exc)
            return
        # Epoch bookkeeping only: MQTT never starts or stops a transmission.
        self.roles.observe_epoch(record.epoch)

    # -- CAN side (frames from others) -------------------------------------------------------

    def _on_can_frame(self, msg: can.Message, now_s: float) -> None:
        if msg.is_extended_id:
            return  # the inverter protocol and our heartbeat use 11-bit IDs only
        failover = self.config.failover
        if msg.arbitration_id == ID_LIMITS:
            self._on_limits_frame(now_s)
        elif (self.roles is not None and failover.heartbeat_enabled
              and msg.arbitration_id == failover.heartbeat_id):
            try:
                v = numeric_signals(self._beat_msg.decode(bytes(msg.data), decode_choices=False))
                beat = PeerBeat(
                    int(v["NodeNumber"]), WireRole(int(v["Role"])), int(v["Rank"]), int(v["Epoch"]),
                    int(v["FreshRacks"]), int(v["ReleaseTo"]),
                )
            except (ValueError, KeyError, CanDecodeError) as exc:
                self.can.counters["bad_heartbeats"] += 1
                log.warning("undecodable controller heartbeat %s: %s", bytes(msg.data).hex(), exc)
                return
            before = self.roles.role
            self.roles.on_beat(beat, now_s)
            self._after_role_input(before)
            if beat.role is not WireRole.STANDBY and beat.node_number != failover.node_number:
                self.foreign.claimed()

    def _on_limits_frame(self, now_s: float) -> None:
        """A limits frame we did not send (our own are not received back): whose is it?

        With heartbeats on, a frame that an active bmslink heartbeat accounts for is that controller's
        (the role machine's claim rules settle two actives); any other is a foreign transmitter's,
        and this controller holds: an alarm, not a reason to stop (docs/failover.md). With heartbeats
        off the frames are the only sign of another active: an active yields, and the alarm says
        that two transmitters were heard.
        """
        roles = self.roles
        if roles is None:
            self._unattributed_limits_frame(now_s)
        elif not self.config.failover.heartbeat_enabled:
            before = roles.role
            roles.on_foreign_inverter_frame(now_s)
            self._after_role_input(before)
            if before is Role.ACTIVE:
                self._unattributed_limits_frame(now_s)
        elif not roles.peer_active_live(now_s):
            self._unattributed_limits_frame(now_s)

    def _unattributed_limits_frame(self, now_s: float) -> None:
        self.can.counters["foreign_limits_frames"] += 1
        self.foreign.unattributed(now_s)
        self._check_foreign(now_s)

    def _check_foreign(self, now_s: float) -> bool:
        """Confirm and expire the foreign-transmitter alarm; log and publish its changes. Returns it."""
        if self.foreign.update(now_s):
            self._throttled.error(
                "foreign_transmitter",
                "foreign transmitter: limits frames (0x%03X) on the inverter bus from a node that is not "
                "a bmslink controller (%d so far); the inverter hears conflicting limits. %s",
                ID_LIMITS, self.foreign.frames, self._foreign_policy(),
            )
        raised = self.foreign.raised(now_s)
        if raised is not self._foreign_raised:
            self._foreign_raised = raised
            if not raised:
                log.warning("foreign transmitter: none heard for %g s (%d limits frames in all); "
                            "alarm cleared", FOREIGN_HOLD_S, self.foreign.frames)
            self._publish_status(now_s)
        return raised

    def _foreign_policy(self) -> str:
        if self.roles is not None and not self.config.failover.heartbeat_enabled:
            return "Heartbeats are off, so it cannot be told from another controller: yielding to it."
        return "This controller keeps sending its limits; find and disconnect the other transmitter."

    def _after_role_input(self, before: Role) -> None:
        assert self.roles is not None
        if self.roles.role is not before:
            self._role_changed()

    # -- the cycle ---------------------------------------------------------------------------

    def cycle(self, *, heartbeat_due: bool, full: bool = True) -> ConsolidatedState:
        """One control cycle: snapshot → core → maybe send. Returns the new consolidated state.

        ``full`` = False: an urgent cycle on the inputs committed by urgent payloads only.
        """
        now = self._monotonic()
        snapshot = self.table.snapshot(self._clear_command_s, full=full)
        if self._last_cycle_failed:
            # The table names what changed since its previous snapshot, which the failed cycle's
            # core never saw: let the core compare every rack.
            snapshot = replace(snapshot, changed=None)
        self._last_cycle_failed = True
        prepared = self.preparer.prepared
        state, self.memory = step(snapshot, self.config, now, self._wall(), self.memory, inputs_only=not full,
                                  prepared=prepared)
        self._last_cycle_failed = False
        if full:
            self._last_full_cycle = now
            self._count_prepared(prepared)
            self.preparer.consumed()
        if self._check_foreign(now):
            state = state.model_copy(update={"cluster": state.cluster.model_copy(
                update={"foreign_transmitter": True})})
        self.state = state
        self.stats.cycles += 1
        if self.modbus is not None:
            self.modbus.update(state)
        urgent = self._resume_pending or must_send_now(self.last_sent, state)
        if heartbeat_due or urgent:
            if now - self._last_sent_at >= self._inhibit_s:
                self._send(state, urgent=urgent and not heartbeat_due)
        elif self._state_publish_pending:
            self._publish_state_if_due(now)
        return state

    def _count_prepared(self, prepared: Mapping[str, Prepared]) -> None:
        cache = self.memory.cache
        if not prepared or cache is None:
            return
        self.stats.racks_prepared += len(prepared)
        self.stats.racks_prepared_taken += sum(
            1 for rack_id, ahead in prepared.items() if cache.entries.get(rack_id) is ahead.entry
        )

    def may_transmit(self) -> bool:
        """Single mode: always. Failover: only the active, and never after an unnoticed stall."""
        if self.roles is None:
            return True
        now = self._monotonic()
        stalled = now - self._last_pulse
        if stalled > self.roles.stall_limit_s and self.roles.role is Role.ACTIVE:
            self.roles.fence(
                now, f"own loop stalled {stalled * 1000:.0f} ms: re-listening before transmitting"
            )
            self._role_changed()
        return self.roles.may_transmit

    @property
    def _inhibit_s(self) -> float:
        return SMA_INHIBIT_S if self.config.can.dialect is Dialect.SMA else 0.0

    def _send(self, state: ConsolidatedState, *, urgent: bool) -> None:
        """Send ``state``: a heartbeat (its deadline is done) or, ``urgent``, a set in between."""
        if not self.may_transmit():
            # Not ours to send (standby, fenced): the deadline is done all the same, so the loop waits
            # for the next one instead of spinning.
            self.stats.sends_refused += 1
            if not urgent:
                self._heartbeat_done(self._monotonic())
            self._resume_pending = False
            return
        now = self._monotonic()
        resumed = self._resume_pending
        self._resume_pending = False
        if self.can.send_all(self.encoder.frames(state)):
            self.stats.sets_sent += 1
            if urgent:
                self.stats.urgent_sets += 1
            else:
                self.stats.heartbeat_sets += 1
            if resumed:
                self.stats.resumed_sets += 1
        # Whether or not the bus took it, this is what we tried to say; the heartbeat retries.
        self.last_sent = state
        self._last_sent_at = now
        if not urgent:
            self._heartbeat_done(now)
        if self.roles is not None and self.roles.role is Role.ACTIVE and now >= self._next_beat:
            self._beat(now)  # the set and the heartbeat go out together: a recorder can attribute them
        self._state_publish_pending |= urgent
        self._publish_state_if_due(now)

    def _heartbeat_done(self, now: float) -> None:
        before = self.heartbeat.skipped
        self.heartbeat.sent(now)
        skipped = self.heartbeat.skipped - before
        if skipped:
            self.stats.heartbeats_skipped += skipped
            self._throttled.warning("heartbeat_skipped", "heartbeat set more than a period late: "
                                    "%d deadline(s) skipped", skipped)

    def _on_can_reopened(self) -> None:
        """The CAN port has a bus again after losing it: the inverter has waited; send at once."""
        self._resume_pending = True
        self._urgent.set()

    def _publish_state_if_due(self, now: float) -> None:
        """The last set sent, on the cluster topic: every publish period, and soon after an urgent set."""
        state = self.last_sent
        since = now - self._last_state_publish
        if state is None or not (
            since >= self.config.state_publish_period_ms / 1000.0
            or (self._state_publish_pending and since >= STATE_PUBLISH_MIN_GAP_S)
        ):
            return
        self._last_state_publish = now
        self._state_publish_pending = False
        self.mqtt.publish(self.topics.cluster_state, encode(state), qos=0, expiry_s=5)

    def _heartbeat_wake_s(self) -> float:
        """When the next heartbeat can go: its deadline, unless the SMA inhibit or a failed fail-safe
        set holds it back (waking earlier would only spin)."""
        return max(self.heartbeat.next_s, self._last_sent_at + self._inhibit_s, self._heartbeat_hold_until)

    async def _control(self) -> None:
        self.heartbeat.restart(self._monotonic())
        self._controlling = True
        try:
            while True:
                now = self._monotonic()
                next_full = min(self._last_full_cycle + CONTROL_TICK_S, self._heartbeat_wake_s())
                try:
                    async with asyncio.timeout(max(0.0, next_full - now)):
                        await self._urgent.wait()
                except TimeoutError:
                    pass
                self._urgent.clear()
                self.run_due_cycle()
        finally:
            self._controlling = False

    def run_due_cycle(self) -> None:
        """The cycle that is due now: full at a tick or heartbeat, else urgent (inputs only).

        Never raises: it runs in the control loop and in the MQTT message handler alike.
        """
        now = self._monotonic()
        heartbeat_due = self.heartbeat.due(now) and now >= self._heartbeat_hold_until
        full = heartbeat_due or now >= self._last_full_cycle + CONTROL_TICK_S
        try:
            self.cycle(heartbeat_due=heartbeat_due, full=full)
        except Exception:
            # A defect in the core must not silence the inverter nor leave a stale permission:
            # say "no current, alarm" and keep the heartbeat going.
            self.stats.cycle_errors += 1
            self._last_full_cycle = now  # retried at the tick, not in a busy loop
            log.exception("control cycle failed; sending zero current with the alarm set")
            if heartbeat_due or self.stats.cycle_errors == 1:
                self._send_fail_safe(heartbeat=heartbeat_due)

    def _send_fail_safe(self, *, heartbeat: bool) -> None:
        """The fail-safe set, as this deadline's heartbeat when one is due (else in between)."""
        try:
            state = fail_safe(self.state or self.last_sent, self.config, self._wall())
            self._send(state, urgent=not heartbeat)
        except Exception:
            # Not even the fail-safe set could be made or sent. Ending the control loop would leave
            # the inverter in silence: count it, and try again at the next tick.
            self.stats.failsafe_errors += 1
            self._heartbeat_hold_until = self._monotonic() + CONTROL_TICK_S
            log.exception("fail-safe set failed; trying again in %g s", CONTROL_TICK_S)

    # -- failover ----------------------------------------------------------------------------

    def _fresh_racks(self) -> int:
        state = self.state
        if state is None:
            return 0
        return sum(1 for r in state.racks if r.state is not RackState.STALE)

    def _beat(self, now: float) -> None:
        roles = self.roles
        assert roles is not None
        failover = self.config.failover
        if not failover.heartbeat_enabled:
            return
        data = self._beat_msg.encode({
            "NodeNumber": failover.node_number, "Role": int(roles.wire_role()), "Rank": failover.rank,
            "Epoch": roles.epoch if roles.role is Role.ACTIVE else roles.epoch_seen,
            "FreshRacks": min(255, self._fresh_racks()), "ReleaseTo": roles.release_to,
        }, strict=False)
        frame = can.Message(arbitration_id=failover.heartbeat_id, data=data, is_extended_id=False)
        if self.can.send_all([frame], kind="heartbeats"):
            self.stats.heartbeats_sent += 1
        period_ms = (
            failover.heartbeat_period_ms if roles.role is Role.ACTIVE
            else failover.standby_heartbeat_period_ms
        )
        self._next_beat = now + period_ms / 1000.0

    async def _pulse(self) -> None:
        """The role machine's clock: stall detection, takeover, heartbeats, handover."""
        roles = self.roles
        assert roles is not None
        self._last_pulse = self._monotonic()
        while True:
            await asyncio.sleep(PULSE_S)
            now = self._monotonic()
            stalled = now - self._last_pulse - PULSE_S
            self._last_pulse = now
            before = roles.role
            roles.tick(now, stalled_s=stalled, can_healthy=self.can.healthy, fresh_racks=self._fresh_racks(),
                       min_fresh_racks=self.config.aggregation.min_racks)
            if roles.role is Role.ACTIVE and roles.release_to:
                # Orderly handover: the successor starts on this frame, after our last set.
                self._beat(now)
                roles.released(now)
            if roles.role is not before:
                self._role_changed()
            if roles.role is not Role.FENCED and now >= self._next_beat:
                self._beat(now)
            if now - self._last_status_publish >= STATUS_PUBLISH_S:
                self._publish_status(now)

    def _role_changed(self) -> None:
        roles = self.roles
        assert roles is not None
        if roles.role is self._last_role:
            return
        self._last_role = roles.role
        log.warning("role %s (epoch %d): %s", roles.role.value, roles.epoch, roles.reason)
        now = self._monotonic()
        self._next_beat = now  # announce the new role at once
        if roles.role is Role.ACTIVE:
            self.last_sent = None  # the first set after a takeover goes out at once, in full
            self.heartbeat.restart(now)  # and the new active's schedule starts with it
            self._urgent.set()
            record = LeaderRecord(site_id=self.config.site_id, node_id=self.config.node_id,
                                  node_number=self.config.failover.node_number, epoch=roles.epoch,
                                  timestamp_s=self._wall())
            expiry = max(1, round(3 * self.config.can.period_ms / 1000.0))
            self.mqtt.publish(self.topics.leader, encode(record), qos=1, retain=True, expiry_s=expiry)
        self._publish_status(now)

    def _publish_status(self, now: float) -> None:
        self._last_status_publish = now
        roles = self.roles
        status = ControllerStatus(
            site_id=self.config.site_id, node_id=self.config.node_id,
            node_number=self.config.failover.node_number if roles else 0,
            role=roles.role.value if roles else Role.ACTIVE.value,
            epoch=roles.epoch if roles else 0,
            since_active_heard_s=roles.since_active_heard_s(now) if roles else 0.0,
            active_node_number=(roles.active_peer.node_number if roles and roles.active_peer else 0),
            last_change_reason=roles.reason if roles else "single controller",
            last_change_timestamp_s=self._wall() - (now - roles.changed_s) if roles else 0.0,
            timestamp_s=self._wall(),
            foreign_transmitter=self.foreign.raised(now),
            foreign_transmitter_last_seen_s=(
                None if self.foreign.last_foreign_s is None
                else self._wall() - (now - self.foreign.last_foreign_s)
            ),
            foreign_limits_frames=self.foreign.frames,
        )
        self.mqtt.publish(self._status_topic, encode(status), qos=1, retain=True)

    @property
    def foreign_transmitter(self) -> bool:
        """The foreign-transmitter alarm is raised (limits frames no bmslink controller accounts for)."""
        return self.foreign.raised(self._monotonic())

    @property
    def role(self) -> Role:
        return self.roles.role if self.roles is not None else Role.ACTIVE

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.metrics.serve(self.config.metrics)
        await self.can.start()
        self._last_pulse = self._monotonic()
        if self.modbus is not None:
            await self.modbus.start()
        await self.mqtt.start()
        self._tasks = [
            asyncio.create_task(self._control(), name="controller-control"),
        ]
        if self.roles is not None:
            self._tasks.append(asyncio.create_task(self._pulse(), name="controller-pulse"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.mqtt.stop(final=(self._status_topic, STATUS_OFFLINE, True))
        await self.can.stop()
        if self.modbus is not None:
            await self.modbus.stop()
        self.metrics.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
