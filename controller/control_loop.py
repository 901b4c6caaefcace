"""The control loop: when a cycle runs, and what is sent to the inverter after it.

One cycle: the core on a snapshot of the rack table (``compute``, given by the service), then
maybe send. The inverter frame set is sent *from the cycle itself* every heartbeat period (a
fire-and-forget periodic CAN task would keep sending a stale permission if this loop stalled), and
at once when a limit falls or an alarm rises (:func:`must_send_now`). Three kinds of cycle:

* a **full** cycle every ``CONTROL_TICK_S`` and at each heartbeat: every input, and time moves
  staleness, ramps and slew;
* an **urgent** cycle (inputs only) as soon as a payload may lower a limit or raise an alarm: run
  by the MQTT ingest inside its message handler while this loop runs (:mod:`controller.ingest`
  says why), else woken here through :meth:`ControlLoop.wake`;
* the **fail-safe** set (zero current, alarm, a plausible CVL) when a cycle raises: a defect in the
  core must neither silence the inverter nor leave a stale permission.

Heartbeats keep absolute deadlines (:class:`HeartbeatSchedule`): neither a late send nor an urgent
set in between moves the next one, so a 1 s period gives 600 sets in 600 s. The SMA dialect allows
no ID more often than every ``SMA_INHIBIT_S``: a set due within it waits.

A polled dialect (Pylon HV: the inverter sends 0x4200 and the battery answers) adds a fourth kind:
the **answer**. The inverter's request runs a full cycle at once and the set computed in it is the
answer (:meth:`ControlLoop.on_inverter_request`); when that cycle raises, the answer is the fail-safe
set, never a set remembered from before (a request within ``ANSWER_MIN_GAP_S`` of the last answer
gets that answer again: a babbling inverter must not run the loop ragged). Only a node that may
transmit answers (a standby never does). Heartbeat deadlines still run full cycles and publish the
state, but send nothing unasked unless ``can.pylon_hv.broadcast`` is on; a lowered limit or a raised
alarm still goes out at once, unasked (docs/inverter-dialects.md says why).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import can

from controller.can_port import CanPort
from controller.failover_link import FailoverLink, Publish
from controller.frames import FrameEncoder, HvRequest, inverter_request
from controller.stats import ControllerStats
from shared.cluster import ConsolidatedState
from shared.codec import encode
from shared.controller_config import ControllerConfig, Dialect
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

# Full cycles: routine payloads, staleness, ramps and slew advance at this rate even between
# heartbeats. An urgent payload gets its own cycle at once (controller.ingest), over its own input.
CONTROL_TICK_S = 0.1
SMA_INHIBIT_S = 0.2  # SMA: no ID more often than every 200 ms
# A lowered limit is published for monitoring at once, but not more often than this: at a
# thousand racks the consolidated state is large and slow to encode, and a burst of decreases
# must not turn the monitoring copy into the controller's main load (the CAN frames go first anyway).
STATE_PUBLISH_MIN_GAP_S = 0.1
# Requests closer together than this (an inverter that babbles) are answered with the set computed for
# the first of them, not with a cycle each: the answer is at most this old, and the loop keeps its time.
ANSWER_MIN_GAP_S = 0.01

Compute = Callable[[float, bool], ConsolidatedState]
"""``compute(now_s, full)``: the core's consolidated state for ``now_s``; ``full`` = False: an urgent
cycle on the inputs committed by urgent payloads only. May raise (a core defect): the loop fails safe."""


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


class ControlLoop:
    """Schedules the cycles and sends their sets; :meth:`run` is the control task."""

    def __init__(
        self,
        config: ControllerConfig,
        can_port: CanPort,
        link: FailoverLink,
        stats: ControllerStats,
        *,
        compute: Compute,
        publish: Publish,
        cluster_state_topic: str,
        on_state: Callable[[ConsolidatedState], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_state`` sees every cycle's state (the Modbus view); ``publish`` carries the state
        last sent to ``cluster_state_topic`` for monitoring."""
        self.config = config
        self._can = can_port
        self._link = link
        self.stats = stats
        self._compute = compute
        self._publish = publish
        self._cluster_state_topic = cluster_state_topic
        self._on_state = on_state
        self._monotonic = monotonic
        self._wall = wall_clock
        self._throttled = ThrottledLog(log)
        self.encoder = _encoder(config)
        dialect = config.can.dialect
        if self.encoder.polled:
            can_port.set_request_handler(lambda msg: inverter_request(dialect, msg) is not None,
                                         self.on_inverter_request)
        for warning in polled_dialect_warnings(config):
            log.warning("%s", warning)
        self.state: ConsolidatedState | None = None
        self.last_sent: ConsolidatedState | None = None
        self._last_sent_at = -1e9
        self._last_answer_at = -1e9
        self._clamped_before_reload = 0
        self.heartbeat = HeartbeatSchedule(config.can.period_ms / 1000.0)
        self._heartbeat_hold_until = -1e9  # a fail-safe set that failed is retried at the tick, not at once
        self._resume_pending = False  # the bus was (re)opened: send the set at once
        self._last_full_cycle = -1e9
        self._last_state_publish = -1e9
        self._state_publish_pending = False  # an urgent set went out and its state is not published yet
        self._urgent = asyncio.Event()
        self.controlling = False  # run() runs: an urgent cycle may run where its payload is read

    # -- told from outside -------------------------------------------------------------------

    def wake(self) -> None:
        """Run the due cycle soon, on the control task (an urgent payload, a command, a reload)."""
        self._urgent.set()

    def reload(self, config: ControllerConfig) -> None:
        """Adopt a reloaded configuration (a new roster: a new frame encoder), and cycle soon."""
        self.config = config
        self._clamped_before_reload += self.encoder.clamped  # the metric never goes down
        self.encoder = _encoder(config)
        self._urgent.set()

    def took_over(self, now: float) -> None:
        """This node became the active: its first set goes out at once, in full, and starts its
        own heartbeat schedule."""
        self.last_sent = None
        self.heartbeat.restart(now)
        self._urgent.set()

    def on_can_reopened(self) -> None:
        """The CAN port has a bus again after losing it: the inverter has waited; send at once."""
        self._resume_pending = True
        self._urgent.set()

    def on_inverter_request(self, msg: can.Message, _received_s: float) -> None:
        """The inverter asks (Pylon HV 0x4200; the CAN port hands it over on the loop as it is read).

        The ensemble information is answered from a full cycle run now; the equipment information
        is the configuration's. A standby answers neither. Counted in the CAN events by kind.
        """
        kind = inverter_request(self.config.can.dialect, msg)
        counters = self._can.counters
        if kind == HvRequest.ENSEMBLE:
            counters["requests_ensemble"] += 1
            last = self.last_sent
            if last is not None and self._monotonic() - self._last_answer_at < ANSWER_MIN_GAP_S:
                counters["requests_coalesced"] += 1
                if self._link.may_transmit():
                    self._can.send_all(self.encoder.frames(last), kind="answers")
                else:
                    counters["requests_not_active"] += 1
                return
            self.run_due_cycle(answer=True)
        elif kind == HvRequest.EQUIPMENT:
            counters["requests_equipment"] += 1
            if not self._link.may_transmit():
                counters["requests_not_active"] += 1
                return
            self._can.send_all(self.encoder.equipment_frames(), kind="equipment_answers")
        else:
            counters["requests_unsupported"] += 1
            self._throttled.warning("request_unsupported", "inverter request %#x asks for %s: not "
                                    "supported, not answered", msg.arbitration_id, kind)

    # -- the cycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The control task: wake at the next tick or heartbeat, or when woken, and run the due cycle."""
        self.heartbeat.restart(self._monotonic())
        self.controlling = True
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
            self.controlling = False

    def run_due_cycle(self, *, answer: bool = False) -> None:
        """The cycle that is due now: full at a tick or heartbeat, else urgent (inputs only).
        ``answer``: the inverter asked (polled dialects): a full cycle whose set is the answer.

        Never raises: it runs in the control task, the MQTT message handler and the CAN reader alike.
        """
        now = self._monotonic()
        heartbeat_due = self.heartbeat.due(now) and now >= self._heartbeat_hold_until
        full = answer or heartbeat_due or now >= self._last_full_cycle + CONTROL_TICK_S
        try:
            self.cycle(heartbeat_due=heartbeat_due, full=full, answer=answer)
        except Exception:
            # A defect in the core must not silence the inverter nor leave a stale permission:
            # say "no current, alarm" and keep the heartbeat going (and answer with it).
            self.stats.cycle_errors += 1
            self._last_full_cycle = now  # retried at the tick, not in a busy loop
            log.exception("control cycle failed; sending zero current with the alarm set")
            if heartbeat_due or answer or self.stats.cycle_errors == 1:
                if answer:
                    self._can.counters["answers_failsafe"] += 1
                self._send_fail_safe(heartbeat=heartbeat_due, answer=answer)

    def cycle(self, *, heartbeat_due: bool, full: bool = True, answer: bool = False) -> ConsolidatedState:
        """One control cycle: snapshot → core → maybe send. Returns the new consolidated state.

        ``full`` = False: an urgent cycle on the inputs committed by urgent payloads only.
        ``answer``: the set of this cycle answers the inverter's request (polled dialects).
        """
        now = self._monotonic()
        state = self._compute(now, full)
        if full:
            self._last_full_cycle = now
        if self._link.check_foreign(now):
            state = state.model_copy(update={"cluster": state.cluster.model_copy(
                update={"foreign_transmitter": True})})
        self.state = state
        self.stats.cycles += 1
        if self._on_state is not None:
            self._on_state(state)
        urgent = self._resume_pending or must_send_now(self.last_sent, state)
        if heartbeat_due or urgent or answer:
            if answer or now - self._last_sent_at >= self._inhibit_s:
                self._send(state, heartbeat=heartbeat_due, urgent=urgent, answer=answer)
        elif self._state_publish_pending:
            self._publish_state_if_due(now)
        return state

    @property
    def _inhibit_s(self) -> float:
        return SMA_INHIBIT_S if self.config.can.dialect is Dialect.SMA else 0.0

    def _send(self, state: ConsolidatedState, *, heartbeat: bool, urgent: bool, answer: bool = False) -> None:
        """Send ``state``: as this deadline's ``heartbeat`` (the deadline is done), as the ``answer`` to
        the inverter's request, or (``urgent``: a limit fell, an alarm rose) in between.

        A polled dialect sends nothing unasked at a heartbeat (unless it broadcasts): the deadline is
        done and the state published all the same.
        """
        if not self._link.may_transmit():
            # Not ours to send (standby, fenced): the deadline is done all the same, so the loop waits
            # for the next one instead of spinning.
            self.stats.sends_refused += 1
            if answer:
                self._can.counters["requests_not_active"] += 1
            if heartbeat:
                self._heartbeat_done(self._monotonic())
            self._resume_pending = False
            return
        now = self._monotonic()
        resumed = self._resume_pending
        self._resume_pending = False
        if not (answer or urgent or resumed or self._heartbeat_transmits):
            self._heartbeat_done(now)
            self._publish_state_if_due(now)
            return
        sent = self._can.send_all(self.encoder.frames(state), kind="answers" if answer else "sets")
        # What the frames could not carry (saturated or fixed): the metric
        # bmslink_controller_frame_values_clamped_total.
        self._can.counters["values_clamped"] = self._clamped_before_reload + self.encoder.clamped
        if sent:
            self.stats.sets_sent += 1
            if heartbeat:
                self.stats.heartbeat_sets += 1
            elif not answer:
                self.stats.urgent_sets += 1
            if resumed:
                self.stats.resumed_sets += 1
        # Whether or not the bus took it, this is what we tried to say; the heartbeat retries.
        self.last_sent = state
        self._last_sent_at = now
        if answer:
            self._last_answer_at = now
        if heartbeat:
            self._heartbeat_done(now)
        self._link.set_sent(now)
        self._state_publish_pending |= not heartbeat
        self._publish_state_if_due(now)

    @property
    def _heartbeat_transmits(self) -> bool:
        """Whether a heartbeat deadline puts the set on the bus: always, except in a polled dialect
        that does not broadcast."""
        hv = self.config.can.pylon_hv
        return not self.encoder.polled or (hv is not None and hv.broadcast)

    def _heartbeat_done(self, now: float) -> None:
        before = self.heartbeat.skipped
        self.heartbeat.sent(now)
        skipped = self.heartbeat.skipped - before
        if skipped:
            self.stats.heartbeats_skipped += skipped
            self._throttled.warning("heartbeat_skipped", "heartbeat set more than a period late: "
                                    "%d deadline(s) skipped", skipped)

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
        self._publish(self._cluster_state_topic, encode(state), qos=0, expiry_s=5)

    def _heartbeat_wake_s(self) -> float:
        """When the next heartbeat can go: its deadline, unless the SMA inhibit or a failed fail-safe
        set holds it back (waking earlier would only spin)."""
        return max(self.heartbeat.next_s, self._last_sent_at + self._inhibit_s, self._heartbeat_hold_until)

    def _send_fail_safe(self, *, heartbeat: bool, answer: bool = False) -> None:
        """The fail-safe set, as this deadline's heartbeat when one is due, as the answer to the
        inverter's request, else in between."""
        try:
            state = fail_safe(self.state or self.last_sent, self.config, self._wall())
            self._send(state, heartbeat=heartbeat, urgent=not (heartbeat or answer), answer=answer)
        except Exception:
            # Not even the fail-safe set could be made or sent. Ending the control loop would leave
            # the inverter in silence: count it, and try again at the next tick.
            self.stats.failsafe_errors += 1
            self._heartbeat_hold_until = self._monotonic() + CONTROL_TICK_S
            log.exception("fail-safe set failed; trying again in %g s", CONTROL_TICK_S)


def _encoder(config: ControllerConfig) -> FrameEncoder:
    """The frame encoder of ``config``: the roster's size is the Pylon pack count, its capacity the
    Pylon HV installed capacity."""
    return FrameEncoder(config.can, module_count=len(config.roster),
                        capacity_ah=sum(rack.capacity_ah for rack in config.roster))


# A fallback CVL below this share of the bank's nominal voltage is a 48 V default left in an HV site.
FALLBACK_SHARE_OF_NOMINAL = 0.5


def polled_dialect_warnings(config: ControllerConfig) -> list[str]:
    """What a Pylon HV configuration gets wrong without being invalid, said at start."""
    hv = config.can.pylon_hv
    if hv is None:
        return []
    warnings = []
    fallback = config.aggregation.fallback_voltage_v
    if fallback < FALLBACK_SHARE_OF_NOMINAL * hv.voltage_level_v:
        warnings.append(
            f"aggregation.fallback_voltage_v = {fallback:g} V, the CVL told before any rack reported, is "
            f"far below the bank's nominal {hv.voltage_level_v} V: set it to the bank's voltage"
        )
    if config.failover.enabled and not config.failover.heartbeat_enabled:
        warnings.append(
            "failover without heartbeats in the pylon_hv dialect: a standby judges the active by its "
            "answers, which come only as often as the inverter asks; keep failover.heartbeat_enabled = true"
        )
    return warnings
