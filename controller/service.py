"""The controller's I/O shell around the pure core.

One control task owns the cycle: take a snapshot of the rack table, step the
core, encode, send. The inverter frame set is sent *from the cycle itself*
every heartbeat period (a fire-and-forget periodic CAN task would keep sending
a stale permission if this loop stalled), and at once when a message may lower
a limit or raise an alarm: the message handler only sets an event, the cycle
runs within milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from controller.can_port import CanPort
from controller.core.engine import CoreMemory, step
from controller.frames import FrameEncoder
from controller.rack_table import RackTable
from shared.cluster import ConsolidatedState
from shared.codec import encode
from shared.controller_config import ControllerConfig, Dialect
from shared.mqtt import MqttSession, Will
from shared.topics import STATUS_OFFLINE, Topics

log = logging.getLogger(__name__)

CONTROL_TICK_S = 0.1  # staleness, ramps and slew advance at this rate even between heartbeats
SMA_INHIBIT_S = 0.2  # SMA: no ID more often than every 200 ms


@dataclass(slots=True)
class ControllerStats:
    cycles: int = 0
    sets_sent: int = 0
    urgent_sets: int = 0
    heartbeat_sets: int = 0
    messages: int = 0
    cycle_errors: int = 0


def fail_safe(previous: ConsolidatedState | None, config: ControllerConfig, wall_s: float) -> ConsolidatedState:
    """Zero current, both directions disabled, alarm set; CVL kept at a plausible non-zero value."""
    cvl = previous.charge_voltage_limit_v if previous is not None and previous.charge_voltage_limit_v > 0 \
        else config.aggregation.fallback_voltage_v
    dvl = previous.discharge_voltage_limit_v if previous is not None else 0.0
    base = previous or ConsolidatedState(
        site_id=config.site_id, node_id=config.node_id, timestamp_s=wall_s, charge_current_limit_a=0.0,
        discharge_current_limit_a=0.0, charge_voltage_limit_v=cvl, discharge_voltage_limit_v=min(dvl, cvl - 0.1),
        charge_enabled=False, discharge_enabled=False, roster_size=len(config.roster),
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
    if current.charge_enabled < previous.charge_enabled or current.discharge_enabled < previous.discharge_enabled:
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
                               config.max_payload_bytes)
        self.encoder = FrameEncoder(config.can, module_count=len(config.roster))
        self.can = CanPort(config.can)
        self.memory = CoreMemory.initial()
        self.state: ConsolidatedState | None = None
        self.last_sent: ConsolidatedState | None = None
        self._last_sent_at = -1e9
        self._next_heartbeat = 0.0
        self._last_state_publish = -1e9
        self._clear_command_s: float | None = None
        self._urgent = asyncio.Event()
        self.stats = ControllerStats()
        client_id = config.mqtt.client_id or f"bmslink-controller-{config.site_id}-{config.node_id}-{uuid.uuid4().hex[:8]}"
        self._status_topic = self.topics.controller_status(config.node_id)
        self.mqtt = MqttSession(config.mqtt, client_id, will=Will(self._status_topic, STATUS_OFFLINE),
                                receive_queue_size=100_000, on_connected=self._on_mqtt_connected)
        self.mqtt.subscribe(self.topics.all_rack_telemetry, qos=0)
        self._tasks: list[asyncio.Task[None]] = []

    # -- commands ----------------------------------------------------------------------------

    def clear_latched_alarms(self) -> None:
        """Accept a clear command: latched protection alarms whose condition has cleared are released."""
        self._clear_command_s = self._monotonic()
        log.warning("clear of latched alarms accepted")
        self._urgent.set()

    def reload(self, config: ControllerConfig) -> None:
        """Adopt a new roster and aggregation settings (SIGHUP); transport settings need a restart."""
        ignored = [name for name in ("mqtt", "can", "site_id", "node_id") if getattr(config, name) != getattr(self.config, name)]
        if ignored:
            log.warning("reload: changes to %s need a restart and were not applied", ignored)
            config = config.model_copy(update={name: getattr(self.config, name) for name in ignored})
        self.config = config
        self.table.set_roster(tuple(r.rack_id for r in config.roster))
        self.encoder = FrameEncoder(config.can, module_count=len(config.roster))
        log.info("reload: roster now %s", list(self.table.roster))
        self._urgent.set()

    # -- MQTT side ---------------------------------------------------------------------------

    def _on_mqtt_connected(self) -> None:
        self.mqtt.publish(self._status_topic, b"online", qos=1, retain=True)

    async def _consume(self) -> None:
        queue = self.mqtt.messages
        while True:
            msg = await queue.get()
            urgent = self._ingest(msg.topic, msg.payload, msg.received_monotonic_s)
            # Drain what is already queued before waking the cycle: one cycle per burst.
            while not queue.empty():
                m = queue.get_nowait()
                urgent |= self._ingest(m.topic, m.payload, m.received_monotonic_s)
            if urgent:
                self._urgent.set()

    def _ingest(self, topic: str, payload: bytes, received_s: float) -> bool:
        self.stats.messages += 1
        return self.table.ingest(topic, payload, received_s).urgent

    # -- the cycle ---------------------------------------------------------------------------

    def cycle(self, *, heartbeat_due: bool) -> ConsolidatedState:
        """One control cycle: snapshot → core → maybe send. Returns the new consolidated state."""
        now = self._monotonic()
        snapshot = self.table.snapshot(self._clear_command_s)
        state, self.memory = step(snapshot, self.config, now, self._wall(), self.memory)
        self.state = state
        self.stats.cycles += 1
        urgent = must_send_now(self.last_sent, state)
        if heartbeat_due or urgent:
            inhibit = SMA_INHIBIT_S if self.config.can.dialect is Dialect.SMA else 0.0
            if now - self._last_sent_at >= inhibit:
                self._send(state, urgent=urgent and not heartbeat_due)
        return state

    def _send(self, state: ConsolidatedState, *, urgent: bool) -> None:
        frames = self.encoder.encode(state)
        now = self._monotonic()
        if self.can.send_all(frames):
            self.stats.sets_sent += 1
            if urgent:
                self.stats.urgent_sets += 1
            else:
                self.stats.heartbeat_sets += 1
        # Whether or not the bus took it, this is what we tried to say; the heartbeat retries.
        self.last_sent = state
        self._last_sent_at = now
        self._next_heartbeat = now + self.config.can.period_ms / 1000.0
        if now - self._last_state_publish >= self.config.state_publish_period_ms / 1000.0 or urgent:
            self._last_state_publish = now
            self.mqtt.publish(self.topics.cluster_state, encode(state), qos=0, expiry_s=5)

    async def _control(self) -> None:
        self._next_heartbeat = self._monotonic()
        while True:
            now = self._monotonic()
            wait = min(CONTROL_TICK_S, max(0.0, self._next_heartbeat - now))
            try:
                async with asyncio.timeout(wait):
                    await self._urgent.wait()
            except TimeoutError:
                pass
            self._urgent.clear()
            heartbeat_due = self._monotonic() >= self._next_heartbeat
            try:
                self.cycle(heartbeat_due=heartbeat_due)
            except Exception:
                # A defect in the core must not silence the inverter nor leave a stale permission:
                # say "no current, alarm" and keep the heartbeat going.
                self.stats.cycle_errors += 1
                log.exception("control cycle failed; sending zero current with the alarm set")
                if heartbeat_due or self.stats.cycle_errors == 1:
                    self._send(fail_safe(self.state or self.last_sent, self.config, self._wall()), urgent=True)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.can.open()
        await self.mqtt.start()
        self._tasks = [
            asyncio.create_task(self._consume(), name="controller-consume"),
            asyncio.create_task(self._control(), name="controller-control"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.mqtt.stop(final=(self._status_topic, STATUS_OFFLINE, True))
        self.can.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
