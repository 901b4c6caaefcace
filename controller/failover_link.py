"""The failover link: the role machine wired to the CAN bus and the broker.

The role machine (:mod:`controller.failover`) decides, purely, whether this controller may transmit.
This module gives it what it needs from outside: its clock (the pulse, every ``PULSE_S``: stall
detection, takeover timing, handover), the heartbeat frame (encoded for our beat, decoded from the
peers'), the leader record (published on taking the role; a peer's read for its epoch only — MQTT
never starts or stops a transmission) and the controller status on the broker. Limits frames heard
from another node are judged here too, since whether one is foreign depends on the peers' heartbeats
(the foreign-transmitter alarm, docs/failover.md#foreign-transmitter).

A single controller (failover off) has no role machine: it may always transmit and sends no
heartbeat, and it still publishes its status and watches for foreign limits frames.

:meth:`FailoverLink.on_can_frame` does more than hand off: it updates the role machine where it is
called. It runs on the event loop already (the CAN port's reader thread hands frames over through a
bounded queue), and a peer's heartbeat is what takeover and claim timing, tens of milliseconds, are
measured against; queueing it once more would only add to that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import can
from cantools.database.errors import DecodeError as CanDecodeError

from controller.can_port import CanPort
from controller.failover import ForeignTransmitterWatch, PeerBeat, Role, RoleMachine, WireRole
from controller.frames import DIALECT_LIMITS_ID, EXTENDED_ID_DIALECTS
from controller.stats import ControllerStats
from shared.cluster import ConsolidatedState, ControllerStatus, LeaderRecord, RackState
from shared.codec import DecodeError, Decoder, encode
from shared.controller_config import ControllerConfig
from shared.dbc import load_dbc, numeric_signals
from shared.logthrottle import ThrottledLog
from shared.topics import Topics

log = logging.getLogger(__name__)

PULSE_S = 0.02  # the role machine's clock: stall detection, takeover timing, heartbeat frames
STATUS_PUBLISH_S = 1.0
ID_LIMITS = 0x351
# The foreign-transmitter alarm stays raised this long after the foreign node's last frame, so that a
# short burst is still in the published state and status when an installer looks.
FOREIGN_HOLD_S = 10.0


class Publish(Protocol):
    """Publish on the broker (:meth:`shared.mqtt.MqttSession.publish`)."""

    def __call__(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                 expiry_s: int | None = None) -> object: ...


class FailoverLink:
    """This controller's role among its peers: may it transmit, and what do the others hear of it."""

    def __init__(
        self,
        config: ControllerConfig,
        topics: Topics,
        can_port: CanPort,
        stats: ControllerStats,
        *,
        publish: Publish,
        took_over: Callable[[float], None],
        last_state: Callable[[], ConsolidatedState | None],
        role_changed: Callable[[Role, int, str], None] | None = None,
        limits_heard: Callable[[bytes, float], None] | None = None,
        monotonic: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        """``took_over(now_s)`` is told when this node becomes the active; ``last_state()`` gives the
        latest consolidated state (its fresh racks go into the heartbeat and the handover rules)."""
        self.config = config
        self._topics = topics
        self._can = can_port
        self._stats = stats
        self._publish = publish
        self._took_over = took_over
        self._last_state = last_state
        self._role_changed_to = role_changed
        self._limits_heard = limits_heard
        self._monotonic = monotonic
        self._wall = wall_clock
        failover = config.failover
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
        # Pylon HV: another battery's 29-bit limits answer (0x4220) is a foreign transmitter too.
        self._limits_id = DIALECT_LIMITS_ID[config.can.dialect]
        self._extended_limits = config.can.dialect in EXTENDED_ID_DIALECTS
        self._throttled = ThrottledLog(log)
        self._beat_msg = load_dbc("bmslink").get_message_by_name("Controller_Heartbeat")
        self._last_pulse = monotonic()
        self._next_beat = 0.0
        self._last_status_publish = -1e9
        self._last_role: Role | None = None
        self._leader_decoder: Decoder[LeaderRecord] = Decoder(LeaderRecord)
        self.status_topic = topics.controller_status(config.node_id)

    # -- what the control loop asks ----------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.roles.role if self.roles is not None else Role.ACTIVE

    @property
    def foreign_transmitter(self) -> bool:
        """The foreign-transmitter alarm is raised (limits frames no bmslink controller accounts for)."""
        return self.foreign.raised(self._monotonic())

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

    def set_sent(self, now: float) -> None:
        """A set went out: the active's heartbeat goes with it when due, so a recorder can attribute them."""
        if self.roles is not None and self.roles.role is Role.ACTIVE and now >= self._next_beat:
            self._beat(now)

    def check_foreign(self, now_s: float) -> bool:
        """Confirm and expire the foreign-transmitter alarm; log and publish its changes. Returns it."""
        if self.foreign.update(now_s):
            self._throttled.error(
                "foreign_transmitter",
                "foreign transmitter: limits frames (0x%03X) on the inverter bus from a node that is not "
                "a bmslink controller (%d so far); the inverter hears conflicting limits. %s",
                self._limits_id, self.foreign.frames, self._foreign_policy(),
            )
        raised = self.foreign.raised(now_s)
        if raised is not self._foreign_raised:
            self._foreign_raised = raised
            if not raised:
                log.warning("foreign transmitter: none heard for %g s (%d limits frames in all); "
                            "alarm cleared", FOREIGN_HOLD_S, self.foreign.frames)
            self.publish_status(now_s)
        return raised

    # -- the pulse ---------------------------------------------------------------------------

    def started(self, now_s: float) -> None:
        """The loop runs as of ``now_s``: stall detection counts from here."""
        self._last_pulse = now_s

    async def pulse(self) -> None:
        """The role machine's clock: stall detection, takeover, heartbeats, handover (failover only)."""
        roles = self.roles
        assert roles is not None
        self._last_pulse = self._monotonic()
        while True:
            await asyncio.sleep(PULSE_S)
            now = self._monotonic()
            stalled = now - self._last_pulse - PULSE_S
            self._last_pulse = now
            before = roles.role
            roles.tick(now, stalled_s=stalled, can_healthy=self._can.healthy, fresh_racks=self._fresh_racks(),
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
                self.publish_status(now)

    def _fresh_racks(self) -> int:
        state = self._last_state()
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
        if self._can.send_all([frame], kind="heartbeats"):
            self._stats.heartbeats_sent += 1
        period_ms = (
            failover.heartbeat_period_ms if roles.role is Role.ACTIVE
            else failover.standby_heartbeat_period_ms
        )
        self._next_beat = now + period_ms / 1000.0

    def _role_changed(self) -> None:
        roles = self.roles
        assert roles is not None
        if roles.role is self._last_role:
            return
        self._last_role = roles.role
        if self._role_changed_to is not None:  # it logs and journals
            self._role_changed_to(roles.role, roles.epoch, roles.reason)
        else:
            log.warning("role %s (epoch %d): %s", roles.role.value, roles.epoch, roles.reason)
        now = self._monotonic()
        self._next_beat = now  # announce the new role at once
        if roles.role is Role.ACTIVE:
            self._took_over(now)
            record = LeaderRecord(site_id=self.config.site_id, node_id=self.config.node_id,
                                  node_number=self.config.failover.node_number, epoch=roles.epoch,
                                  timestamp_s=self._wall())
            expiry = max(1, round(3 * self.config.can.period_ms / 1000.0))
            self._publish(self._topics.leader, encode(record), qos=1, retain=True, expiry_s=expiry)
        self.publish_status(now)

    def _after_role_input(self, before: Role) -> None:
        assert self.roles is not None
        if self.roles.role is not before:
            self._role_changed()

    # -- the broker --------------------------------------------------------------------------

    def publish_status(self, now: float) -> None:
        """This controller's status (role, epoch, foreign transmitter), retained on its status topic."""
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
        self._publish(self.status_topic, encode(status), qos=1, retain=True)

    def on_mqtt_connected(self) -> None:
        self.publish_status(self._monotonic())

    def on_leader_record(self, payload: bytes) -> None:
        if self.roles is None or not payload:
            return
        try:
            record = self._leader_decoder.decode(payload, self._topics.leader)
        except DecodeError as exc:
            self._throttled.warning("leader", "ignoring leader record: %s", exc)
            return
        # Epoch bookkeeping only: MQTT never starts or stops a transmission.
        self.roles.observe_epoch(record.epoch)

    # -- the CAN bus: frames from others -----------------------------------------------------

    def on_can_frame(self, msg: can.Message, now_s: float) -> None:
        if msg.is_extended_id:
            # Pylon HV: a 0x4220 we did not send is another battery's answer. (The inverter's requests
            # never reach here: the CAN port hands them to the control loop.) Otherwise the inverter
            # protocol and our heartbeat use 11-bit IDs only.
            if self._extended_limits and msg.arbitration_id == self._limits_id:
                self._on_limits_frame(now_s)
            return
        failover = self.config.failover
        if msg.arbitration_id == ID_LIMITS:
            self._on_limits_frame(now_s)
            listening = self.roles is not None and self.roles.role is not Role.ACTIVE
            if self._limits_heard is not None and listening:
                self._limits_heard(bytes(msg.data), now_s)  # what the inverter is told (warm standby)
        elif (self.roles is not None and failover.heartbeat_enabled
              and msg.arbitration_id == failover.heartbeat_id):
            try:
                v = numeric_signals(self._beat_msg.decode(bytes(msg.data), decode_choices=False))
                beat = PeerBeat(
                    int(v["NodeNumber"]), WireRole(int(v["Role"])), int(v["Rank"]), int(v["Epoch"]),
                    int(v["FreshRacks"]), int(v["ReleaseTo"]),
                )
            except (ValueError, KeyError, CanDecodeError) as exc:
                self._can.counters["bad_heartbeats"] += 1
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
        self._can.counters["foreign_limits_frames"] += 1
        self.foreign.unattributed(now_s)
        self.check_foreign(now_s)

    def _foreign_policy(self) -> str:
        if self.roles is not None and not self.config.failover.heartbeat_enabled:
            return "Heartbeats are off, so it cannot be told from another controller: yielding to it."
        return "This controller keeps sending its limits; find and disconnect the other transmitter."
