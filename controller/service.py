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
* :mod:`controller.modbus_server` — the optional read-only Modbus view of the consolidated state.

What stays here: the one place the core is called (:meth:`ControllerService._compute`, the control
loop's ``compute``: the rack table's new inputs handed to the engine, then its cycle), because that is
where the table and the engine meet; the two operator commands (clear of latched alarms, reload);
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
import time
import uuid
from collections.abc import Callable, Mapping

import can

from controller.can_port import CanPort
from controller.control_loop import STATE_PUBLISH_MIN_GAP_S, ControlLoop, HeartbeatSchedule, must_send_now
from controller.core.engine import Engine
from controller.failover import ForeignTransmitterWatch, Role, RoleMachine
from controller.failover_link import FailoverLink
from controller.frames import FrameEncoder
from controller.ingest import MqttIngest
from controller.metrics import ControllerMetrics
from controller.modbus_server import ConsolidatedModbusServer
from controller.rack_table import RackTable
from controller.stats import ControllerStats
from shared.cluster import ConsolidatedState
from shared.controller_config import ControllerConfig
from shared.mqtt import MqttSession, MqttStats, Will
from shared.topics import STATUS_OFFLINE, Topics

# Defined in controller.control_loop; imported from here by code and tests that predate the split.
__all__ = ["STATE_PUBLISH_MIN_GAP_S", "ControllerService", "HeartbeatSchedule", "must_send_now"]

log = logging.getLogger(__name__)


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
        self.engine = Engine(config)
        self._clear_command_s: float | None = None
        failover = config.failover
        self.can = CanPort(
            config.can, on_frame=self._on_can_frame, on_reopened=self._on_can_reopened,
            failures_before_fault=failover.send_failures_before_fence if failover.enabled else None,
        )
        self.link = FailoverLink(config, self.topics, self.can, self.stats, publish=self._publish,
                                 took_over=self._took_over, last_state=self._last_state,
                                 monotonic=monotonic, wall_clock=wall_clock)
        self.modbus: ConsolidatedModbusServer | None = (
            ConsolidatedModbusServer(config.modbus_server) if config.modbus_server.enabled else None
        )
        self.loop = ControlLoop(config, self.can, self.link, self.stats, compute=self._compute,
                                publish=self._publish, cluster_state_topic=self.topics.cluster_state,
                                on_state=self.modbus.update if self.modbus is not None else None,
                                monotonic=monotonic, wall_clock=wall_clock)
        self.ingest = MqttIngest(self.topics, self.table, loop=self.loop,
                                 link=self.link, stats=self.stats)
        client_id = (
            config.mqtt.client_id
            or f"bmslink-controller-{config.site_id}-{config.node_id}-{uuid.uuid4().hex[:8]}"
        )
        # Messages are handled as they are read, on the loop (no queue): see controller.ingest.
        self.mqtt = MqttSession(config.mqtt, client_id, will=Will(self.link.status_topic, STATUS_OFFLINE),
                                on_connected=self.link.on_mqtt_connected, on_message=self.ingest.on_message)
        self.mqtt.subscribe(self.topics.all_rack_telemetry, qos=0)
        self.mqtt.subscribe(self.topics.leader, qos=1)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = ControllerMetrics(self)

    # -- commands ----------------------------------------------------------------------------

    def clear_latched_alarms(self) -> None:
        """Accept a clear command: latched protection alarms whose condition has cleared are released."""
        self._clear_command_s = self._monotonic()
        log.warning("clear of latched alarms accepted")
        self.loop.wake()

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
        return self.engine.cycle(now, self._wall(), clear_command_s=self._clear_command_s,
                                 unknown_racks=self.table.unknown_ids())

    # -- wiring: rare calls made before their receiver exists (see the module docstring) -----

    def _on_can_frame(self, msg: can.Message, now_s: float) -> None:
        self.link.on_can_frame(msg, now_s)

    def _on_can_reopened(self) -> None:
        self.loop.on_can_reopened()

    def _publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                 expiry_s: int | None = None) -> bool:
        return self.mqtt.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def _took_over(self, now_s: float) -> None:
        self.loop.took_over(now_s)

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
        self.metrics.serve(self.config.metrics)
        await self.can.start()
        self.link.started(self._monotonic())
        if self.modbus is not None:
            await self.modbus.start()
        await self.mqtt.start()
        self._tasks = [
            asyncio.create_task(self.loop.run(), name="controller-control"),
        ]
        if self.link.roles is not None:
            self._tasks.append(asyncio.create_task(self.link.pulse(), name="controller-pulse"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.mqtt.stop(final=(self.link.status_topic, STATUS_OFFLINE, True))
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
