"""The opt-in Prometheus endpoint of one process: its own registry (no process-global state), served
by prometheus-client's HTTP server only when the configuration enables it.

Every endpoint's registry carries, besides what its process adds:

* ``bmslink_build_info{component, version}`` (always 1): which code answers, from
  :data:`bmslink.__version__`;
* prometheus-client's process collector (``process_cpu_seconds_total``,
  ``process_resident_memory_bytes``, ``process_open_fds``, ...; read from ``/proc``, so Linux only),
  its platform collector (``python_info``) and its garbage-collector one (``python_gc_*``) — each
  registered on this registry, never on the library's global one, so two endpoints in one process
  (the tests run an agent and a controller together) do not collide.

Names follow https://prometheus.io/docs/practices/naming/: base units in the name (``_seconds``,
``_volts``, ``_amperes``, ``_celsius``, ``_ratio`` for 0..1 fractions such as a state of charge),
``_total`` for counters, and enum-style gauges (one series per possible state, 1 for the current
one) for states; the helpers below build those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from bmslink import __version__
from shared.config import MetricsConfig

if TYPE_CHECKING:
    from shared.models import RackMeasurements
    from shared.mqtt import MqttStats

# Seconds the server thread is given to end at close before it is left to die with the process.
SERVER_JOIN_S = 2.0


class _BuildInfo(Collector):
    def __init__(self, component: str) -> None:
        self._component = component

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("bmslink_build", "The bmslink code this process runs (always 1)",
                               value={"component": self._component, "version": __version__})


class MetricsEndpoint:
    """One process's registry and, once :meth:`serve` is called with metrics enabled, its HTTP server.

    ``component`` (``agent``, ``controller``) labels the build info.
    """

    def __init__(self, component: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_BuildInfo(component))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def serve(self, config: MetricsConfig) -> None:
        if config.enabled:
            self._server, self._thread = start_http_server(config.port, config.host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=SERVER_JOIN_S)
            self._thread = None


# -- building families at scrape time -------------------------------------------------------------


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge with no labels."""
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """A counter with no labels; ``name`` without ``_total`` (the exposition adds it)."""
    return CounterMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str, documentation: str, label: str, values: Mapping[str, int]
) -> CounterMetricFamily:
    """One counter series per ``values`` key, in ``label`` (sorted, so scrapes compare line by line)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def enum_gauge(
    name: str,
    documentation: str,
    *,
    state_label: str,
    states: Iterable[str],
    current: str,
    labels: Sequence[str] = (),
    label_values: Sequence[str] = (),
) -> GaugeMetricFamily:
    """An enum-style gauge for one subject: a series per possible state, 1 for ``current``, 0 else.

    Every state is always there, so a query such as ``x{state="faulted"} == 1`` sees a state leave as
    a change to 0, never as a series that stops (which Prometheus shows for 5 minutes as if it held).
    """
    family = GaugeMetricFamily(name, documentation, labels=[*labels, state_label])
    add_enum(family, label_values, states, current)
    return family


def add_enum(family: GaugeMetricFamily, label_values: Sequence[str], states: Iterable[str],
             current: str) -> None:
    """Add one subject's enum series (see :func:`enum_gauge`) to a family made for several."""
    for state in states:
        family.add_metric([*label_values, state], 1.0 if state == current else 0.0)


def mqtt_families(prefix: str, stats: MqttStats) -> Iterator[Metric]:
    """The broker session's counters, each family one meaning (``prefix`` is e.g. ``bmslink_agent``).

    Failed connection attempts and handler exceptions are errors: the caller counts them in its
    ``<prefix>_errors_total{kind}`` (see :func:`mqtt_errors`); whether the session is connected now
    is its ``<prefix>_link_up{link="mqtt"}``.
    """
    yield counter(f"{prefix}_mqtt_connects", "Broker connections established", stats.connects)
    yield counter(f"{prefix}_mqtt_disconnects", "Broker connections lost or closed", stats.disconnects)
    yield counter(f"{prefix}_mqtt_messages_received", "Messages received from the broker", stats.received)
    yield counter(f"{prefix}_mqtt_messages_published", "Messages handed to the broker", stats.published)
    yield counter(f"{prefix}_mqtt_publish_dropped",
                  "Messages not published because the broker was away (QoS 0; nothing is queued)",
                  stats.publish_dropped_offline)
    yield counter(f"{prefix}_mqtt_receive_dropped", "Received messages dropped on a full receive queue",
                  stats.receive_queue_dropped)


def mqtt_errors(stats: MqttStats) -> dict[str, int]:
    """The session's error counts by kind, for the caller's ``<prefix>_errors_total{kind}``."""
    return {"mqtt_connect": stats.connect_failures, "mqtt_handler": stats.handler_errors}


# -- battery values ---------------------------------------------------------------------------------

# One row per value a BMS reports: (name after the prefix, what it is, how it is read). SOC and SOH
# are percentages on the wire and 0..1 ratios here (Prometheus' base unit for a fraction).
_VALUES: tuple[tuple[str, str, Callable[[RackMeasurements], float]], ...] = (
    ("soc_ratio", "State of charge, 0..1", lambda m: m.soc_pct / 100.0),
    ("soh_ratio", "State of health, 0..1", lambda m: m.soh_pct / 100.0),
    ("voltage_volts", "Pack voltage", lambda m: m.pack_voltage_v),
    ("current_amperes", "Pack current, positive while charging", lambda m: m.current_a),
    ("temperature_max_celsius", "Highest cell temperature", lambda m: m.temperature_max_c),
    ("temperature_min_celsius", "Lowest cell temperature", lambda m: m.temperature_min_c),
    ("cell_voltage_max_volts", "Highest cell voltage", lambda m: m.cell_voltage_max_v),
    ("cell_voltage_min_volts", "Lowest cell voltage", lambda m: m.cell_voltage_min_v),
)
# The limits the BMS itself reports (before any derating of the controller's).
_LIMITS: tuple[tuple[str, str, Callable[[RackMeasurements], float]], ...] = (
    ("charge_current_limit_amperes", "Charge current limit (CCL) the BMS reports",
     lambda m: m.charge_current_limit_a),
    ("discharge_current_limit_amperes", "Discharge current limit (DCL) the BMS reports",
     lambda m: m.discharge_current_limit_a),
    ("charge_voltage_limit_volts", "Charge voltage limit (CVL) the BMS reports",
     lambda m: m.charge_voltage_limit_v),
    ("discharge_voltage_limit_volts", "Discharge voltage limit (DVL) the BMS reports",
     lambda m: m.discharge_voltage_limit_v),
)


def measurement_families(
    prefix: str,
    limit_prefix: str,
    labels: Sequence[str],
    rows: Sequence[tuple[Sequence[str], RackMeasurements]],
) -> Iterator[Metric]:
    """One gauge family per reported value (``<prefix>soc_ratio``, ...) and per BMS limit
    (``<limit_prefix>charge_current_limit_amperes``, ...), a series per row's label values."""
    for table, head in ((_VALUES, prefix), (_LIMITS, limit_prefix)):
        for suffix, documentation, read in table:
            family = GaugeMetricFamily(f"{head}{suffix}", documentation, labels=list(labels))
            for label_values, measurements in rows:
                family.add_metric(list(label_values), read(measurements))
            yield family
