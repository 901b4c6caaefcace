"""Opt-in Prometheus endpoint of one agent (its own registry: no process-global state).

Two kinds of family (names per https://prometheus.io/docs/practices/naming/):

* counted on the poll path, as it happens: ``bmslink_agent_polls_total{rack,unit,outcome}``,
  ``..._poll_latency_seconds``, ``..._discoveries_total``, ``..._skipped_slots_total``,
  ``..._published_total``, ``..._publish_dropped_total`` and the ``..._unit_comm_lost`` gauge;
* read from the agent when scraped (:class:`AgentReadings`): each unit's last good reading
  (``bmslink_agent_unit_soc_ratio{rack,unit}``, voltages, current, temperatures, cells, the limits
  it reports, its contactor and its alarms), its link status as an enum
  (``..._unit_status{status}``), ``..._link_up{link,type}`` for the broker and each BMS link,
  ``..._poll_rounds_total``, the broker session's counters and ``..._errors_total{kind}``.

A unit's values are left out while it is comm-lost or its latest reading was refused as
implausible: a graph then shows a gap, never the last good value drawn on as if it were current.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import (
    MetricsEndpoint,
    add_enum,
    labelled_counter,
    measurement_families,
    mqtt_errors,
    mqtt_families,
)
from shared.models import PROTECTION_FLAG_NAMES, ContactorState, LinkStatus

if TYPE_CHECKING:
    from rack_agent.links import BmsLink
    from rack_agent.unit import UnitRuntime
    from shared.agent_config import AgentConfig
    from shared.models import RackMeasurements
    from shared.mqtt import MqttSession

_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
P = "bmslink_agent"


class AgentStatsReading(Protocol):
    @property
    def polls(self) -> int:
        """Poll rounds completed (every unit polled once)."""


class AgentReadings(Protocol):
    """What one scrape reads from the agent (in prometheus-client's server thread: plain reads of
    state the event loop keeps anyway; the unit and link tables never change after start)."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def units(self) -> Mapping[str, UnitRuntime]: ...

    @property
    def links(self) -> Mapping[str, BmsLink]: ...

    @property
    def mqtt(self) -> MqttSession: ...

    @property
    def stats(self) -> AgentStatsReading: ...


class _ReadingsCollector(Collector):
    def __init__(self, readings: AgentReadings) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        a = self._readings
        rack = a.config.rack_id
        rounds = CounterMetricFamily(f"{P}_poll_rounds", "Poll rounds completed (every unit polled once)",
                                     labels=["rack"])
        rounds.add_metric([rack], a.stats.polls)
        yield rounds
        up = GaugeMetricFamily(f"{P}_link_up", "1 while the link works: the broker (type mqtt) and each "
                               "BMS link by its configured name", labels=["link", "type"])
        up.add_metric(["mqtt", "mqtt"], 1.0 if a.mqtt.is_connected else 0.0)
        for name, link in a.links.items():
            up.add_metric([name, a.config.link(name).type], 1.0 if link.connected else 0.0)
        yield up
        status = GaugeMetricFamily(f"{P}_unit_status", "1 for the outcome class of each unit's last poll",
                                   labels=["rack", "unit", "status"])
        contactor = GaugeMetricFamily(f"{P}_unit_contactor", "1 for the contactor state each unit reports",
                                      labels=["rack", "unit", "state"])
        alarms = GaugeMetricFamily(f"{P}_unit_alarm", "1 for each protection alarm a unit reports",
                                   labels=["rack", "unit", "flag"])
        rows: list[tuple[list[str], RackMeasurements]] = []
        for name, unit in a.units.items():
            labels = [rack, name]
            health = unit.health
            add_enum(status, labels, [s.value for s in LinkStatus], health.status.value)
            reading = health.last_good
            if reading is None or health.comm_lost or health.invalid:
                continue
            rows.append((labels, reading))
            add_enum(contactor, labels, [c.value for c in ContactorState], reading.contactor.value)
            raised = reading.alarms.raised()
            for flag in PROTECTION_FLAG_NAMES:
                alarms.add_metric([*labels, flag], 1.0 if flag in raised else 0.0)
        yield status
        yield contactor
        yield alarms
        yield from measurement_families(f"{P}_unit_", f"{P}_unit_", ["rack", "unit"], rows)
        stats = a.mqtt.stats
        yield from mqtt_families(P, stats)
        yield labelled_counter(f"{P}_errors", "Errors by kind (mqtt_connect, mqtt_handler); failed polls "
                               "are bmslink_agent_polls_total by outcome", "kind", mqtt_errors(stats))


class AgentMetrics(MetricsEndpoint):
    def __init__(self, rack_id: str, readings: AgentReadings | None = None) -> None:
        super().__init__("agent")
        labels = ["rack", "unit"]
        self.poll_latency = Histogram(
            "bmslink_agent_poll_latency_seconds", "Duration of successful unit polls", labels,
            buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.polls = Counter(
            "bmslink_agent_polls", "Unit polls by outcome (ok, timeout, crc_error, ...)",
            [*labels, "outcome"], registry=self.registry,
        )
        self.discoveries = Counter(
            "bmslink_agent_discoveries", "SunSpec discoveries by outcome (refused layouts back off)",
            [*labels, "outcome"], registry=self.registry,
        )
        self.comm_lost = Gauge("bmslink_agent_unit_comm_lost", "1 while a unit is comm-lost", labels,
                               registry=self.registry)
        self.skipped_slots = Counter("bmslink_agent_skipped_slots", "Poll slots skipped after overruns",
                                     ["rack"], registry=self.registry)
        self.published = Counter("bmslink_agent_published", "Telemetry messages handed to the broker",
                                 ["rack"], registry=self.registry)
        self.publish_dropped = Counter("bmslink_agent_publish_dropped", "Telemetry not sent (broker away)",
                                       ["rack"], registry=self.registry)
        self.rack_id = rack_id
        if readings is not None:
            self.registry.register(_ReadingsCollector(readings))
