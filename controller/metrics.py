"""Opt-in Prometheus endpoint of one controller (its own registry: no process-global state).

The controller already counts everything it does (cycles, sets sent, rejected payloads by reason,
CAN and MQTT events); this collector reads those counters when scraped instead of keeping a second
set on the hot path. What it reads is :class:`ControllerReadings`, one member per metric family;
:class:`controller.service.ControllerService` provides it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.cluster import RackState
from shared.metrics import MetricsEndpoint

if TYPE_CHECKING:
    from controller.failover import Role
    from controller.stats import ControllerStats
    from shared.cluster import ConsolidatedState
    from shared.mqtt import MqttStats


class ControllerReadings(Protocol):
    """What one scrape reads from the controller.

    The scrape runs in prometheus-client's server thread, so each member is a plain read of state the
    event loop keeps anyway: a counter table (copied here in one C-level call, safe against the loop
    adding a key meanwhile), a flag, or an immutable state.
    """

    @property
    def stats(self) -> ControllerStats:
        """Control cycles, frame sets sent and refused, messages."""

    @property
    def payload_outcomes(self) -> Mapping[str, int]:
        """Rack payloads by outcome (accepted, rejected_*, ...)."""

    @property
    def unknown_racks(self) -> Mapping[str, int]:
        """Payloads by rack id, from racks not on the roster."""

    @property
    def can_events(self) -> Mapping[str, int]:
        """Inverter bus events (sets, error frames, send failures, foreign frames)."""

    @property
    def can_healthy(self) -> bool: ...

    @property
    def command_outcomes(self) -> Mapping[str, int]:
        """Operator commands by outcome (accepted, refused_<reason>, retransmitted, ignored_standby)."""

    @property
    def journal_counts(self) -> Mapping[str, int]:
        """Journal entries recorded, suppressed by the rate limit, lost to write errors; latched pairs."""

    @property
    def mqtt_stats(self) -> MqttStats: ...

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def role(self) -> Role: ...

    @property
    def foreign_transmitter(self) -> bool:
        """The foreign-transmitter alarm is raised now."""

    @property
    def foreign_transmitter_detections(self) -> int:
        """Times the foreign-transmitter alarm rose."""

    @property
    def last_sent(self) -> ConsolidatedState | None:
        """What the inverter was last told."""


def _counters(name: str, documentation: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _ReadingsCollector(Collector):
    def __init__(self, readings: ControllerReadings) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        s = self._readings
        yield _counters("bmslink_controller_events", "Control cycles, frame sets sent and refused, messages",
                        "event", asdict(s.stats))
        yield _counters("bmslink_controller_telemetry", "Rack payloads by outcome (accepted, rejected_*)",
                        "outcome", dict(s.payload_outcomes))
        yield _counters("bmslink_controller_unknown_rack_payloads",
                        "Payloads from racks not on the roster (never counted; at most 64 ids tracked)",
                        "rack", dict(s.unknown_racks))
        yield _counters("bmslink_controller_can", "Inverter bus events (sets, error frames, send failures)",
                        "event", dict(s.can_events))
        m = s.mqtt_stats
        yield _counters("bmslink_controller_mqtt", "Broker connection events and messages", "event", {
            "connects": m.connects,
            "disconnects": m.disconnects,
            "connect_failures": m.connect_failures,
            "received": m.received,
            "handler_errors": m.handler_errors,
            "published": m.published,
            "publish_dropped_offline": m.publish_dropped_offline,
        })
        yield _counters("bmslink_controller_commands", "Operator commands by outcome (refused_<reason>, ...)",
                        "outcome", dict(s.command_outcomes))
        yield _counters("bmslink_controller_journal", "Journal entries: recorded, suppressed, write_errors",
                        "event", dict(s.journal_counts))
        up = GaugeMetricFamily("bmslink_controller_up", "1 when the link works", labels=["link"])
        up.add_metric(["mqtt"], 1.0 if s.mqtt_connected else 0.0)
        up.add_metric(["can"], 1.0 if s.can_healthy else 0.0)
        yield up
        role = GaugeMetricFamily("bmslink_controller_role", "1 for the role this controller has",
                                 labels=["role"])
        role.add_metric([s.role.value], 1.0)
        yield role
        yield GaugeMetricFamily(
            "bmslink_controller_foreign_transmitter",
            "1 while limits frames from a node that is not a bmslink controller are heard (an alarm)",
            value=1.0 if s.foreign_transmitter else 0.0,
        )
        yield CounterMetricFamily(
            "bmslink_controller_foreign_transmitter_detections",
            "Times the foreign-transmitter alarm rose (its frames: can event foreign_limits_frames)",
            value=s.foreign_transmitter_detections,
        )
        state = s.last_sent
        if state is None:
            return
        limits = GaugeMetricFamily("bmslink_controller_limit", "What the inverter was last told",
                                   labels=["limit"])
        limits.add_metric(["charge_current_a"], state.charge_current_limit_a)
        limits.add_metric(["discharge_current_a"], state.discharge_current_limit_a)
        limits.add_metric(["charge_voltage_v"], state.charge_voltage_limit_v)
        limits.add_metric(["discharge_voltage_v"], state.discharge_voltage_limit_v)
        yield limits
        yield GaugeMetricFamily("bmslink_controller_eligible_racks", "Racks counted in the last set sent",
                                value=state.eligible_racks)
        racks = GaugeMetricFamily("bmslink_controller_rack_state", "1 for each rack's state in the last set",
                                  labels=["rack", "state"])
        for view in state.racks:
            for candidate in RackState:
                racks.add_metric([view.rack_id, candidate.value], 1.0 if view.state is candidate else 0.0)
        yield racks
        maintenance = GaugeMetricFamily("bmslink_controller_rack_maintenance",
                                        "1 while an operator has the rack in maintenance", labels=["rack"])
        for view in state.racks:
            maintenance.add_metric([view.rack_id], 1.0 if view.maintenance else 0.0)
        yield maintenance


class ControllerMetrics(MetricsEndpoint):
    def __init__(self, readings: ControllerReadings) -> None:
        super().__init__()
        self.registry.register(_ReadingsCollector(readings))
