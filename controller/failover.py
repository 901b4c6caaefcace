"""Who may transmit to the inverter: the master-role state machine (pure: time is passed in).

The CAN bus is the arbiter and MQTT is advisory (docs/failover.md has the design and its failure
analysis). In short:

* Only an ``active`` controller sends inverter frames, plus a heartbeat frame every period carrying
  (node number, epoch, rank, fresh racks).
* A ``standby`` becomes active only after hearing no active for ``silence`` (3 heartbeat periods)
  plus ``stagger`` for every live standby of better (rank, node number): two standbys never start
  together. It then takes epoch = highest epoch seen + 1.
* An active that hears another active with a better claim (epoch, then rank, then node number)
  stops at once. Limits frames that no bmslink heartbeat accounts for come from a *foreign*
  transmitter: with heartbeats on, that raises an alarm (:class:`ForeignTransmitterWatch`) and
  nobody yields to it, so a foreign node cannot silence the fail-safe authority; with heartbeats
  off the limits frames are the only sign of another active, so an active yields to them.
* A controller that starts is a standby that listens a full window before it may take over (no
  preemption); it announces itself with standby heartbeats so that ranks order simultaneous starts.
* ``fenced``: a controller whose own loop stalled longer than half the silence window (frozen, then
  resumed), or whose CAN sends fail, sends nothing at all; it listens for a full window and only
  then becomes a standby, which in turn needs silence before it takes over. So a resumed process
  never sends a frame before it has heard whether somebody else took over.
* An active whose telemetry is stale while a standby advertises fresh data hands over in order: it
  sends a ``releasing`` heartbeat naming that standby and stops; the standby takes over at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from shared.controller_config import FailoverConfig

# The heartbeat frame carries the epoch in 32 bits (shared/dbc/bmslink.dbc). Real epochs grow by one
# per takeover and never come near it; only a lie (a leader record on MQTT says any epoch up to
# 2**63 - 1) can, and an epoch the frame cannot carry made every cycle of the next active fail.
EPOCH_MAX = 2**32 - 1
STANDBY_LIVE_PERIODS = 3  # a standby heard within this many of its heartbeat periods counts as live


class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    FENCED = "fenced"


class WireRole(IntEnum):
    ACTIVE = 1
    STANDBY = 2
    RELEASING = 3


@dataclass(frozen=True, slots=True)
class PeerBeat:
    """One heartbeat frame heard from another controller."""

    node_number: int
    role: WireRole
    rank: int
    epoch: int
    fresh_racks: int
    release_to: int = 0


def claim(epoch: int, rank: int, node_number: int) -> tuple[int, int, int]:
    """Ordering of competing actives: higher epoch wins, then lower rank, then lower node number."""
    return (epoch, -rank, -node_number)


@dataclass
class RoleMachine:
    config: FailoverConfig
    now_s: float
    role: Role = Role.STANDBY
    epoch: int = 0
    epoch_seen: int = 0
    reason: str = "starting: listening before transmitting"
    changed_s: float = 0.0
    last_active_heard_s: float | None = None
    last_active_beat_s: float | None = None  # an active or releasing heartbeat of another node
    active_peer: PeerBeat | None = None
    standbys: dict[int, tuple[PeerBeat, float]] = field(default_factory=dict)
    fenced_until_s: float = 0.0
    stale_since_s: float | None = None
    release_to: int = 0
    transitions: int = 0

    def __post_init__(self) -> None:
        self.changed_s = self.now_s
        # At start nobody is known yet: the rank's VRRP-like skew orders simultaneous starts.
        self.fenced_until_s = (
            self.now_s + self.listen_window_s + self.config.rank * self.config.stagger_ms / 1000.0
        )
        # Silence is counted from start: a starting node waits a full window (no preemption).
        self.last_active_heard_s = self.now_s

    # -- derived timing ----------------------------------------------------------------------

    @property
    def listen_window_s(self) -> float:
        return self.config.silence_s + self.config.heartbeat_period_ms / 1000.0

    @property
    def stall_limit_s(self) -> float:
        # A loop that stalled this long may have been replaced: half the window leaves margin.
        return self.config.silence_s / 2.0

    def _live_better_standbys(self, now_s: float) -> int:
        live_s = STANDBY_LIVE_PERIODS * self.config.standby_heartbeat_period_ms / 1000.0
        mine = (self.config.rank, self.config.node_number)
        return sum(
            1
            for beat, heard in self.standbys.values()
            if now_s - heard <= live_s and (beat.rank, beat.node_number) < mine
        )

    def takeover_after_s(self, now_s: float) -> float:
        """Silence this node needs before it may take over, given the standbys it hears."""
        return self.config.silence_s + self._live_better_standbys(now_s) * self.config.stagger_ms / 1000.0

    # -- transitions -------------------------------------------------------------------------

    def _become(self, role: Role, now_s: float, reason: str) -> None:
        if role is self.role:
            return
        self.role = role
        self.reason = reason
        self.changed_s = now_s
        self.transitions += 1
        if role is Role.FENCED:
            self.fenced_until_s = now_s + self.listen_window_s
        if role is not Role.ACTIVE:
            self.release_to = 0
            self.stale_since_s = None

    def fence(self, now_s: float, reason: str) -> None:
        """Stop transmitting and listen a full window before anything else."""
        self._become(Role.FENCED, now_s, reason)
        self.fenced_until_s = now_s + self.listen_window_s

    def observe_epoch(self, epoch: int) -> None:
        """An epoch learned elsewhere (the MQTT leader record): new actives must exceed it.

        Bounded by what the heartbeat can carry: at the top, actives tie on epoch and rank and node
        number decide, as they do between equal epochs anyway."""
        self.epoch_seen = max(self.epoch_seen, min(epoch, EPOCH_MAX))

    # -- inputs from the bus -----------------------------------------------------------------

    def on_beat(self, beat: PeerBeat, now_s: float) -> None:
        if beat.node_number == self.config.node_number:
            return  # our own frame echoed back (some buses do): never a competitor
        self.observe_epoch(beat.epoch)
        if beat.role is WireRole.STANDBY:
            self.standbys[beat.node_number] = (beat, now_s)
            return
        self.standbys.pop(beat.node_number, None)
        self.last_active_heard_s = now_s
        self.last_active_beat_s = now_s
        self.active_peer = beat
        if beat.role is WireRole.RELEASING and beat.release_to == self.config.node_number:
            if self.role is Role.STANDBY:
                self._take_over(now_s, f"handover from node {beat.node_number} (epoch {beat.epoch})")
            return
        if self.role is Role.ACTIVE and beat.role is WireRole.ACTIVE:
            theirs = claim(beat.epoch, beat.rank, beat.node_number)
            ours = claim(self.epoch, self.config.rank, self.config.node_number)
            if theirs > ours:
                self._become(
                    Role.STANDBY, now_s,
                    f"heard active node {beat.node_number} with epoch {beat.epoch} > ours {self.epoch}",
                )

    def on_foreign_inverter_frame(self, now_s: float) -> None:
        """A limits frame we did not send, taken as another active's: nobody may talk over it.

        The service calls this only with heartbeats off, where limits frames are the only sign of
        another active. With heartbeats on it asks :meth:`peer_active_live` instead, and a frame no
        heartbeat accounts for is a foreign transmitter's: an alarm, not a reason to yield.
        """
        self.last_active_heard_s = now_s
        if self.role is Role.ACTIVE:
            self._become(Role.STANDBY, now_s, "heard inverter frames from another transmitter")

    def peer_active_live(self, now_s: float) -> bool:
        """Another bmslink controller's active (or releasing) heartbeat was heard within the silence
        window: the limits frames on the bus can be its."""
        heard = self.last_active_beat_s
        return heard is not None and now_s - heard <= self.config.silence_s

    # -- the clock ---------------------------------------------------------------------------

    def tick(self, now_s: float, *, stalled_s: float, can_healthy: bool, fresh_racks: int,
             min_fresh_racks: int) -> None:
        """Advance the machine; call often (every few tens of ms) and before every transmission."""
        if stalled_s > self.stall_limit_s and self.role is not Role.FENCED:
            self.fence(now_s, f"own loop stalled {stalled_s * 1000:.0f} ms: re-listening before transmitting")
            return
        if not can_healthy:
            if self.role is not Role.FENCED:
                self.fence(now_s, "CAN sends failing: letting a standby take over")
            else:
                self.fenced_until_s = max(self.fenced_until_s, now_s + self.listen_window_s)
            return
        if self.role is Role.FENCED:
            if now_s >= self.fenced_until_s:
                self._become(Role.STANDBY, now_s, "listened a full window: standby")
            return
        if self.role is Role.STANDBY:
            if now_s < self.fenced_until_s:
                return  # still listening after start or after a fence: no takeover yet
            silent_s = now_s - (self.last_active_heard_s if self.last_active_heard_s is not None else now_s)
            if silent_s >= self.takeover_after_s(now_s):
                self._take_over(now_s, f"no active heard for {silent_s * 1000:.0f} ms")
                return
            self._describe_standby(now_s)
            return
        self._consider_handover(now_s, fresh_racks, min_fresh_racks)

    def _describe_standby(self, now_s: float) -> None:
        """A standby past its listening window says whom it follows (not how it started)."""
        peer = self.active_peer
        if peer is not None and self.peer_active_live(now_s):
            following = f"standby: following active node {peer.node_number} (epoch {peer.epoch})"
            if self.reason != following:
                self.reason = following

    def _take_over(self, now_s: float, reason: str) -> None:
        self.epoch = min(self.epoch_seen + 1, EPOCH_MAX)
        self.epoch_seen = self.epoch
        self.active_peer = None
        self._become(Role.ACTIVE, now_s, f"{reason}: active with epoch {self.epoch}")

    def _consider_handover(self, now_s: float, fresh_racks: int, min_fresh_racks: int) -> None:
        if self.release_to:
            return
        if fresh_racks >= min_fresh_racks:
            self.stale_since_s = None
            return
        live_s = STANDBY_LIVE_PERIODS * self.config.standby_heartbeat_period_ms / 1000.0
        candidates = sorted(
            (
                beat for beat, heard in self.standbys.values()
                if now_s - heard <= live_s
                and beat.fresh_racks >= min_fresh_racks
                and beat.fresh_racks > fresh_racks
            ),
            key=lambda b: (-b.fresh_racks, b.rank, b.node_number),
        )
        if not candidates:
            self.stale_since_s = None
            return
        if self.stale_since_s is None:
            self.stale_since_s = now_s
        if now_s - self.stale_since_s >= self.config.handover_hold_ms / 1000.0:
            self.release_to = candidates[0].node_number

    def released(self, now_s: float) -> None:
        """The releasing heartbeat went out: stop transmitting; the named standby takes over."""
        target = self.release_to
        self._become(Role.STANDBY, now_s, f"handed over to node {target}: our telemetry is stale")
        # Do not take the role back on the silence before the successor's first beat arrives.
        self.last_active_heard_s = now_s

    # -- output ------------------------------------------------------------------------------

    @property
    def may_transmit(self) -> bool:
        return self.role is Role.ACTIVE and not self.release_to

    def wire_role(self) -> WireRole:
        if self.role is Role.ACTIVE:
            return WireRole.RELEASING if self.release_to else WireRole.ACTIVE
        return WireRole.STANDBY

    def since_active_heard_s(self, now_s: float) -> float | None:
        if self.role is Role.ACTIVE:
            return 0.0
        return None if self.last_active_heard_s is None else now_s - self.last_active_heard_s


@dataclass
class ForeignTransmitterWatch:
    """Limits frames on the inverter bus that no bmslink controller accounts for (pure; time passed in).

    A frame is *unattributed* when no bmslink active heartbeat is live when it arrives. A new
    active's first set leaves just before its first heartbeat, so an unattributed frame becomes
    *foreign* only if no active heartbeat claims it within ``grace_s`` (the silence window; 0 where
    no heartbeat can come: a single controller, or heartbeats off). The alarm stays raised for
    ``hold_s`` after the last foreign frame, so a short burst is still visible in the published state.
    """

    grace_s: float
    hold_s: float
    frames: int = 0  # unattributed limits frames heard
    detections: int = 0  # times the alarm rose
    pending_since_s: float | None = None
    last_frame_s: float | None = None
    last_foreign_s: float | None = None

    def unattributed(self, now_s: float) -> None:
        self.frames += 1
        self.last_frame_s = now_s
        if self.pending_since_s is None:
            self.pending_since_s = now_s

    def claimed(self) -> None:
        """An active bmslink heartbeat arrived: the frames pending so far were that controller's."""
        self.pending_since_s = None

    def update(self, now_s: float) -> bool:
        """Confirm pending frames whose grace has passed; True if this raised the alarm anew."""
        if self.pending_since_s is None or now_s - self.pending_since_s < self.grace_s:
            return False
        rose = not self.raised(now_s)
        self.last_foreign_s = self.last_frame_s
        self.pending_since_s = None
        if rose:
            self.detections += 1
        return rose

    def raised(self, now_s: float) -> bool:
        return self.last_foreign_s is not None and now_s - self.last_foreign_s <= self.hold_s
