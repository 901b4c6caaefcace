"""Opt-in Prometheus endpoint of one agent (its own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import MetricsEndpoint

_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class AgentMetrics(MetricsEndpoint):
    def __init__(self, rack_id: str) -> None:
        super().__init__()
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
