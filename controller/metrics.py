"""Opt-in Prometheus endpoint of one controller (its own registry: no process-global state).

The controller already counts everything it does (cycles, sets sent, rejected payloads by reason,
CAN and MQTT events); this collector reads those counters when scraped instead of keeping a second
set on the hot path. The scrape runs in prometheus-client's server thread: it copies each counter
table in one C-level call (safe against the loop adding a key meanwhile) and reads immutable state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.cluster import RackState
from shared.metrics import MetricsEndpoint

if TYPE_CHECKING:
    from controller.service import ControllerService


def _counters(name: str, documentation: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _ServiceCollector(Collector):
    def __init__(self, service: ControllerService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        s = self._service
        yield _counters("bmslink_controller_events", "Control cycles, frame sets sent and refused, messages",
                        "event", asdict(s.stats))
        yield _counters("bmslink_controller_telemetry", "Rack payloads by outcome (accepted, rejected_*)",
                        "outcome", dict(s.table.counters))
        yield _counters("bmslink_controller_unknown_rack_payloads",
                        "Payloads from racks not on the roster (never counted; at most 64 ids tracked)",
                        "rack", dict(s.table.unknown))
        yield _counters("bmslink_controller_can", "Inverter bus events (sets, error frames, send failures)",
                        "event", dict(s.can.counters))
        m = s.mqtt.stats
        yield _counters("bmslink_controller_mqtt", "Broker connection events and messages", "event", {
            "connects": m.connects,
            "disconnects": m.disconnects,
            "connect_failures": m.connect_failures,
            "received": m.received,
            "handler_errors": m.handler_errors,
            "published": m.published,
            "publish_dropped_offline": m.publish_dropped_offline,
        })
        up = GaugeMetricFamily("bmslink_controller_up", "1 when the link works", labels=["link"])
        up.add_metric(["mqtt"], 1.0 if s.mqtt.is_connected else 0.0)
        up.add_metric(["can"], 1.0 if s.can.healthy else 0.0)
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
            value=s.foreign.detections,
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


class ControllerMetrics(MetricsEndpoint):
    def __init__(self, service: ControllerService) -> None:
        super().__init__()
        self.registry.register(_ServiceCollector(service))
