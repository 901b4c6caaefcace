"""The master-role state machine as tables of (time, input) -> role."""

from __future__ import annotations

from controller.failover import EPOCH_MAX, PeerBeat, Role, RoleMachine, WireRole
from shared.controller_config import FailoverConfig

CFG = FailoverConfig(enabled=True, node_number=2, rank=1, heartbeat_period_ms=100, silence_periods=3,
                     stagger_ms=150, standby_heartbeat_period_ms=200, handover_hold_ms=500)
SILENCE = 0.3
LISTEN = 0.4
BOOT_SKEW = 0.15  # rank 1 × stagger


def machine(t: float = 0.0, cfg: FailoverConfig = CFG) -> RoleMachine:
    return RoleMachine(cfg, t)


def tick(m: RoleMachine, t: float, *, stalled: float = 0.0, healthy: bool = True, fresh: int = 3) -> Role:
    m.tick(t, stalled_s=stalled, can_healthy=healthy, fresh_racks=fresh, min_fresh_racks=1)
    return m.role


def active(node: int, epoch: int, rank: int = 0, fresh: int = 3) -> PeerBeat:
    return PeerBeat(node, WireRole.ACTIVE, rank, epoch, fresh)


def standby(node: int, rank: int, fresh: int = 3) -> PeerBeat:
    return PeerBeat(node, WireRole.STANDBY, rank, 0, fresh)


def test_a_starting_node_listens_then_takes_over_an_empty_bus() -> None:
    m = machine()
    assert tick(m, 0.1) is Role.STANDBY and not m.may_transmit
    assert tick(m, LISTEN + BOOT_SKEW - 0.01) is Role.STANDBY
    # Silence has been counted since start, and the window (with the rank's skew) is over.
    assert tick(m, LISTEN + BOOT_SKEW) is Role.ACTIVE
    assert m.epoch == 1 and m.may_transmit


def test_a_lying_leader_record_cannot_push_the_epoch_past_what_the_heartbeat_carries() -> None:
    """A leader record may say any epoch up to 2**63 - 1; the heartbeat carries 32 bits."""
    m = machine()
    m.observe_epoch(2**63 - 1)
    assert m.epoch_seen == EPOCH_MAX
    assert tick(m, LISTEN + BOOT_SKEW) is Role.ACTIVE
    assert m.epoch == EPOCH_MAX  # at the top, not beyond it
    m.observe_epoch(EPOCH_MAX - 5)
    assert m.epoch_seen == EPOCH_MAX


def test_a_starting_node_that_hears_an_active_never_transmits() -> None:
    m = machine()
    t = 0.0
    while t < 3.0:
        m.on_beat(active(1, epoch=7), t)
        assert tick(m, t) is Role.STANDBY
        t += 0.1
    assert m.role is Role.STANDBY and m.epoch_seen == 7
    # Past its listening window it says whom it follows, not how it started (it was shown for good).
    assert m.reason == "standby: following active node 1 (epoch 7)"
    assert m.transitions == 0


def test_two_simultaneous_starts_resolve_by_rank() -> None:
    better = machine(cfg=CFG.model_copy(update={"node_number": 1, "rank": 0}))
    worse = machine()
    for i in range(4):
        t = i * 0.1
        better.on_beat(standby(2, rank=1), t)
        worse.on_beat(standby(1, rank=0), t)
        tick(better, t)
        tick(worse, t)
    assert tick(better, LISTEN) is Role.ACTIVE
    assert tick(worse, LISTEN) is Role.STANDBY  # its rank's skew is not over
    worse.on_beat(active(1, epoch=better.epoch), LISTEN + 0.01)
    assert tick(worse, LISTEN + 0.3) is Role.STANDBY


def test_standby_takes_over_after_silence_with_next_epoch() -> None:
    m = machine()
    for i in range(10):
        m.on_beat(active(1, epoch=4), i * 0.1)
        tick(m, i * 0.1)
    last = 0.9
    assert tick(m, last + SILENCE - 0.05) is Role.STANDBY
    assert tick(m, last + SILENCE + 0.001) is Role.ACTIVE
    assert m.epoch == 5
    assert "no active heard" in m.reason


def test_better_ranked_live_standby_delays_takeover_by_the_stagger() -> None:
    m = machine()
    for i in range(10):
        t = i * 0.1
        m.on_beat(active(1, epoch=1), t)
        m.on_beat(standby(3, rank=0), t)  # rank 0 beats our rank 1
        tick(m, t)
    assert tick(m, 0.9 + SILENCE + 0.05) is Role.STANDBY
    m.on_beat(active(3, epoch=2), 0.9 + SILENCE + 0.1)  # the better standby took over
    assert tick(m, 0.9 + SILENCE + 0.16) is Role.STANDBY


def test_active_steps_down_for_a_better_claim_only() -> None:
    m = machine()
    tick(m, LISTEN + BOOT_SKEW)
    assert m.role is Role.ACTIVE and m.epoch == 1
    m.on_beat(active(1, epoch=1, rank=0), 1.0)  # same epoch, better rank -> theirs wins
    assert m.role is Role.STANDBY
    m2 = machine()
    tick(m2, LISTEN + BOOT_SKEW)
    m2.on_beat(active(5, epoch=0, rank=0), 1.0)  # older epoch: ours wins, we keep transmitting
    assert m2.role is Role.ACTIVE


def test_foreign_limits_frame_stops_an_active() -> None:
    m = machine()
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    m.on_foreign_inverter_frame(1.0)
    assert m.role is Role.STANDBY and not m.may_transmit


def test_stall_fences_and_a_fenced_node_relistens_before_transmitting() -> None:
    m = machine()
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    assert m.role is Role.ACTIVE
    assert tick(m, 5.0, stalled=2.0) is Role.FENCED  # frozen for 2 s, then resumed
    assert not m.may_transmit
    m.on_beat(active(1, epoch=2), 5.05)  # the standby took over meanwhile
    assert tick(m, 5.5) is Role.STANDBY
    for i in range(20):
        m.on_beat(active(1, epoch=2), 5.5 + i * 0.1)
        assert tick(m, 5.5 + i * 0.1) is Role.STANDBY


def test_can_failure_fences_until_healthy() -> None:
    m = machine()
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    assert tick(m, 1.0, healthy=False) is Role.FENCED
    assert tick(m, 3.0, healthy=False) is Role.FENCED
    assert tick(m, 3.1) is Role.FENCED  # healthy again: still a full listen window first
    assert tick(m, 3.0 + LISTEN + 0.01) is Role.STANDBY


def test_stale_active_hands_over_to_a_fresh_standby_in_order() -> None:
    m = machine(cfg=CFG.model_copy(update={"node_number": 1, "rank": 0}))
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    assert m.role is Role.ACTIVE
    t = 1.0
    for i in range(5):
        m.on_beat(standby(2, rank=1, fresh=3), t + i * 0.1)
        tick(m, t + i * 0.1, fresh=0)
    assert m.may_transmit  # hold time not over yet
    m.on_beat(standby(2, rank=1, fresh=3), 1.5)
    tick(m, 1.51, fresh=0)
    assert m.release_to == 2 and not m.may_transmit
    m.released(1.52)
    assert m.role is Role.STANDBY
    # The successor, on hearing the release, takes over at once.
    s = machine()
    s.on_beat(active(1, epoch=1), LISTEN - 0.1)
    tick(s, LISTEN)
    assert s.role is Role.STANDBY
    s.on_beat(PeerBeat(1, WireRole.RELEASING, 0, 1, 0, release_to=2), 1.52)
    assert s.role is Role.ACTIVE and s.epoch == 2


def test_no_handover_when_nobody_is_fresher() -> None:
    m = machine(cfg=CFG.model_copy(update={"node_number": 1, "rank": 0}))
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    for i in range(30):
        m.on_beat(standby(2, rank=1, fresh=0), 1 + i * 0.1)  # the broker is down for everyone
        tick(m, 1 + i * 0.1, fresh=0)
    assert m.role is Role.ACTIVE and m.may_transmit


def test_our_own_echo_is_never_a_competitor() -> None:
    m = machine()
    tick(m, LISTEN)
    tick(m, LISTEN + SILENCE)
    m.on_beat(active(CFG.node_number, epoch=99), 1.0)
    assert m.role is Role.ACTIVE
