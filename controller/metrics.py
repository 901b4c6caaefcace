"""Opt-in Prometheus endpoint of one controller (its own registry: no process-global state).

The controller already counts everything it does (cycles, sets sent, rejected payloads by reason,
CAN and MQTT events) and keeps the state it computed; this collector reads those when scraped
instead of keeping a second set on the hot path. What it reads is :class:`ControllerReadings`;
:class:`controller.service.ControllerService` provides it.

The families, by what a person graphs (names per https://prometheus.io/docs/practices/naming/,
built with the helpers of :mod:`shared.metrics`):

* the bank — what the inverter was last told by this controller (absent on a standby, which tells
  it nothing): ``bmslink_controller_{charge,discharge}_current_limit_amperes``,
  ``..._{charge,discharge}_voltage_limit_volts``, ``..._{charge,discharge}_enabled``,
  ``..._force_charge_request``; and as this controller's last cycle computed it (a standby too):
  ``bmslink_controller_bank_*`` (SOC, SOH, voltage, current, temperatures, cells), alarms and
  warnings by flag, cluster flags, eligible and roster racks;
* each roster rack — its last admitted telemetry (``bmslink_controller_rack_soc_ratio{rack}``, ...,
  and the limits its BMS reports, ``bmslink_controller_rack_bms_*``), and what the last cycle made
  of it: ``..._rack_state{rack,state}`` (enum), ``..._rack_maintenance``, ``..._rack_eligible``,
  ``..._rack_share_ratio`` and the derated limits that entered the policy,
  ``..._rack_derated_{charge,discharge}_current_limit_amperes``;
* the controller — ``..._role{role}`` (enum), ``..._link_up{link}`` (mqtt, can), the
  foreign-transmitter alarm, and counters, one meaning per family: cycles, frame sets by trigger,
  refused and resumed sets, heartbeats, CAN frames and bus events, inverter requests, payloads by
  outcome, commands by outcome, journal entries, MQTT traffic, and every error by kind in
  ``bmslink_controller_errors_total{kind}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.cluster import RackState
from shared.metrics import (
    MetricsEndpoint,
    add_enum,
    counter,
    enum_gauge,
    gauge,
    labelled_counter,
    measurement_families,
    mqtt_errors,
    mqtt_families,
)
from shared.models import PROTECTION_FLAG_NAMES

if TYPE_CHECKING:
    from controller.failover import Role
    from controller.rack_table import RackTable
    from controller.stats import ControllerStats
    from shared.cluster import ConsolidatedState
    from shared.mqtt import MqttStats

P = "bmslink_controller"


class ControllerReadings(Protocol):
    """What one scrape reads from the controller.

    The scrape runs in prometheus-client's server thread, so each member is a plain read of state the
    event loop keeps anyway: a counter table (copied here in one C-level call, safe against the loop
    adding a key meanwhile), a flag, or an immutable state.
    """

    @property
    def stats(self) -> ControllerStats:
        """Control cycles, frame sets sent and refused, heartbeats."""

    @property
    def table(self) -> RackTable:
        """The rack table: each roster rack's last admitted telemetry (``latest``)."""

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
        """Journal entries recorded and suppressed by the rate limit; state database write errors."""

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
    def state(self) -> ConsolidatedState | None:
        """What this controller's last cycle computed (a standby computes too)."""

    @property
    def last_sent(self) -> ConsolidatedState | None:
        """What the inverter was last told by this controller."""


# -- the CAN port's counter table, by meaning ----------------------------------------------------

# key -> (family, label value or None). Labelled families list every label value they may carry, so
# a dashboard sees them at 0 from the first scrape. ``<kind>_sent`` keys are the frame sets the port
# sent by kind; ``open_attempts`` and ``inverter_requests`` are sums of other keys, left out.
_SENDS = f"{P}_can_sends"
_BUS_EVENTS = f"{P}_can_bus_events"
_REQUESTS = f"{P}_inverter_requests"
_ERRORS = f"{P}_errors"
_CAN_TABLE: dict[str, tuple[str, str | None]] = {
    "frames_sent": (f"{P}_can_frames_sent", None),
    "rx_frames": (f"{P}_can_frames_received", None),
    "rx_dropped": (f"{P}_can_frames_dropped", None),
    "error_frames": (f"{P}_can_error_frames", None),
    "opened": (f"{P}_can_bus_opens", None),
    "dropped": (f"{P}_can_bus_drops", None),
    "bad_heartbeats": (f"{P}_can_bad_heartbeats", None),
    "foreign_limits_frames": (f"{P}_foreign_limits_frames", None),
    "requests_not_active": (f"{P}_inverter_requests_unanswered", None),
    "answers_failsafe": (f"{P}_inverter_answers_failsafe", None),
    "values_clamped": (f"{P}_frame_values_clamped", None),
    "sets_sent": (_SENDS, "sets"),
    "answers_sent": (_SENDS, "answers"),
    "equipment_answers_sent": (_SENDS, "equipment_answers"),
    "heartbeats_sent": (_SENDS, "heartbeats"),
    "bus_off": (_BUS_EVENTS, "bus_off"),
    "no_ack": (_BUS_EVENTS, "no_ack"),
    "error_passive": (_BUS_EVENTS, "error_passive"),
    "restarted": (_BUS_EVENTS, "restarted"),
    "requests_ensemble": (_REQUESTS, "ensemble"),
    "requests_equipment": (_REQUESTS, "equipment"),
    "requests_unsupported": (_REQUESTS, "unsupported"),
    "send_failed": (_ERRORS, "can_send"),
    "send_skipped_closed": (_ERRORS, "can_bus_closed"),
    "open_failed": (_ERRORS, "can_open"),
    "reader_errors": (_ERRORS, "can_reader"),
    "rx_handler_errors": (_ERRORS, "can_rx_handler"),
    "shutdown_failed": (_ERRORS, "can_shutdown"),
}
_SUMS = frozenset({"open_attempts", "inverter_requests"})
_DOCS: dict[str, tuple[str, str | None]] = {  # family -> (help, label name of a labelled family)
    f"{P}_can_frames_sent": ("Frames the inverter bus took", None),
    f"{P}_can_frames_received": ("Frames read from the inverter bus (error frames apart)", None),
    f"{P}_can_frames_dropped": ("Received frames dropped on a full reader queue", None),
    f"{P}_can_error_frames": ("Error frames the CAN controller reported", None),
    f"{P}_can_bus_opens": ("Times the CAN bus was opened", None),
    f"{P}_can_bus_drops": ("Times the CAN bus was closed after failing, to be opened again", None),
    f"{P}_can_bad_heartbeats": ("Heartbeat frames of other controllers that could not be read", None),
    f"{P}_foreign_limits_frames": ("Limits frames on the bus no bmslink controller accounts for", None),
    f"{P}_inverter_requests_unanswered": ("Inverter requests not answered: this controller is not "
                                          "the active", None),
    f"{P}_inverter_answers_failsafe": ("Inverter requests answered with the fail-safe set", None),
    f"{P}_frame_values_clamped": ("Values the inverter frames could not carry as computed (saturated, or "
                                  "fixed by the encoder)", None),
    _SENDS: ("Frame sets the CAN port sent, by kind", "kind"),
    _BUS_EVENTS: ("CAN bus state events read from error frames", "event"),
    _REQUESTS: ("Inverter requests by kind (Pylon HV 0x4200)", "kind"),
}
_OTHER_CAN = f"{P}_can_other_events"


def _can_families(events: Mapping[str, int], errors: dict[str, int]) -> Iterator[Metric]:
    """The CAN port's counters by meaning; its errors go to ``errors`` (for ``errors_total``)."""
    plain: dict[str, int] = {}
    labelled: dict[str, dict[str, int]] = {}
    for key, (family, label) in _CAN_TABLE.items():
        if family == _ERRORS:
            assert label is not None
            errors[label] = events.get(key, 0)
        elif label is None:
            plain[family] = events.get(key, 0)
        else:
            labelled.setdefault(family, {})[label] = events.get(key, 0)
    for family, value in plain.items():
        yield counter(family, _DOCS[family][0], value)
    for family, values in labelled.items():
        documentation, label_name = _DOCS[family]
        assert label_name is not None
        yield labelled_counter(family, documentation, label_name, values)
    # A key added to the port without a row here is still shown, never lost.
    other = {k: v for k, v in events.items() if k not in _CAN_TABLE and k not in _SUMS}
    yield labelled_counter(_OTHER_CAN, "CAN port events this endpoint has no family for", "event", other)


def _bank(sent: ConsolidatedState) -> Iterator[Metric]:
    """What the inverter was last told."""
    yield gauge(f"{P}_charge_current_limit_amperes", "Charge current limit (CCL) the inverter was "
                "last told", sent.charge_current_limit_a)
    yield gauge(f"{P}_discharge_current_limit_amperes", "Discharge current limit (DCL) the inverter "
                "was last told", sent.discharge_current_limit_a)
    yield gauge(f"{P}_charge_voltage_limit_volts", "Charge voltage limit (CVL) the inverter was last "
                "told", sent.charge_voltage_limit_v)
    yield gauge(f"{P}_discharge_voltage_limit_volts", "Discharge voltage limit (DVL) the inverter was "
                "last told", sent.discharge_voltage_limit_v)
    yield gauge(f"{P}_charge_enabled", "1 while the inverter is told it may charge",
                1.0 if sent.charge_enabled else 0.0)
    yield gauge(f"{P}_discharge_enabled", "1 while the inverter is told it may discharge",
                1.0 if sent.discharge_enabled else 0.0)
    yield gauge(f"{P}_force_charge_request", "1 while an operator's force-charge request is in force",
                1.0 if sent.force_charge_request else 0.0)


def _flags(name: str, documentation: str, raised: tuple[str, ...], names: tuple[str, ...]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["flag"])
    for flag in names:
        family.add_metric([flag], 1.0 if flag in raised else 0.0)
    return family


_CLUSTER_FLAGS = ("not_enough_racks", "latched_alarm", "unknown_rack_seen", "foreign_transmitter")


def _computed(state: ConsolidatedState) -> Iterator[Metric]:
    """The bank as this controller's last cycle computed it, and what it made of each rack."""
    yield gauge(f"{P}_bank_soc_ratio", "State of charge of the bank, 0..1", state.soc_pct / 100.0)
    yield gauge(f"{P}_bank_soh_ratio", "State of health of the bank, 0..1", state.soh_pct / 100.0)
    yield gauge(f"{P}_bank_voltage_volts", "Bank voltage", state.pack_voltage_v)
    yield gauge(f"{P}_bank_current_amperes", "Bank current, positive while charging", state.current_a)
    yield gauge(f"{P}_bank_temperature_max_celsius", "Highest cell temperature of the bank",
                state.temperature_max_c)
    yield gauge(f"{P}_bank_temperature_min_celsius", "Lowest cell temperature of the bank",
                state.temperature_min_c)
    yield gauge(f"{P}_bank_cell_voltage_max_volts", "Highest cell voltage of the bank",
                state.cell_voltage_max_v)
    yield gauge(f"{P}_bank_cell_voltage_min_volts", "Lowest cell voltage of the bank",
                state.cell_voltage_min_v)
    yield _flags(f"{P}_bank_alarm", "1 for each protection alarm of the bank", state.alarms.raised(),
                 PROTECTION_FLAG_NAMES)
    yield _flags(f"{P}_bank_warning", "1 for each protection warning of the bank", state.warnings.raised(),
                 PROTECTION_FLAG_NAMES)
    yield _flags(f"{P}_cluster_flag", "1 for each condition the controller raises itself",
                 state.cluster.raised(), _CLUSTER_FLAGS)
    yield gauge(f"{P}_eligible_racks", "Racks counted in the bank in the last cycle", state.eligible_racks)
    yield gauge(f"{P}_roster_racks", "Racks on the roster", state.roster_size)
    rack_state = GaugeMetricFamily(f"{P}_rack_state", "1 for each rack's state in the last cycle",
                                   labels=["rack", "state"])
    maintenance = GaugeMetricFamily(f"{P}_rack_maintenance", "1 while an operator has the rack in "
                                    "maintenance", labels=["rack"])
    eligible = GaugeMetricFamily(f"{P}_rack_eligible", "1 while the rack counts in the bank", labels=["rack"])
    share = GaugeMetricFamily(f"{P}_rack_share_ratio", "The rack's share while it ramps in, 0..1 (1: full)",
                              labels=["rack"])
    derated_ccl = GaugeMetricFamily(f"{P}_rack_derated_charge_current_limit_amperes",
                                    "The rack's CCL that entered the policy, after the derates (0 while "
                                    "not in parallel)", labels=["rack"])
    derated_dcl = GaugeMetricFamily(f"{P}_rack_derated_discharge_current_limit_amperes",
                                    "The rack's DCL that entered the policy, after the derates (0 while "
                                    "not in parallel)", labels=["rack"])
    states = [s.value for s in RackState]
    for view in state.racks:
        rack = [view.rack_id]
        add_enum(rack_state, rack, states, view.state.value)
        maintenance.add_metric(rack, 1.0 if view.maintenance else 0.0)
        eligible.add_metric(rack, 1.0 if view.eligible else 0.0)
        share.add_metric(rack, view.share)
        derated_ccl.add_metric(rack, view.charge_current_limit_a)
        derated_dcl.add_metric(rack, view.discharge_current_limit_a)
    yield from (rack_state, maintenance, eligible, share, derated_ccl, derated_dcl)


def _racks(table: RackTable) -> Iterator[Metric]:
    """Each roster rack's last admitted telemetry (a rack never heard has none)."""
    rows = []
    stamps = GaugeMetricFamily(f"{P}_rack_telemetry_timestamp_seconds",
                               "When the rack's agent read its last admitted telemetry (Unix time, the "
                               "agent's clock)", labels=["rack"])
    for rack_id in table.roster:
        latest = table.latest(rack_id)
        telemetry = latest.telemetry if latest is not None else None
        if telemetry is None:
            continue
        stamps.add_metric([rack_id], telemetry.timestamp_s)
        if telemetry.measurements is not None:
            rows.append(([rack_id], telemetry.measurements))
    yield stamps
    yield from measurement_families(f"{P}_rack_", f"{P}_rack_bms_", ["rack"], rows)


class _ReadingsCollector(Collector):
    def __init__(self, readings: ControllerReadings) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        s = self._readings
        stats = s.stats
        errors = {"cycle": stats.cycle_errors, "failsafe": stats.failsafe_errors}
        yield counter(f"{P}_cycles", "Control cycles run", stats.cycles)
        answers = stats.sets_sent - stats.heartbeat_sets - stats.urgent_sets
        yield labelled_counter(f"{P}_frame_sets_sent", "Limits frame sets the inverter bus took, by "
                               "trigger (heartbeat deadline, urgent change, answer to a request)", "trigger",
                               {"heartbeat": stats.heartbeat_sets, "urgent": stats.urgent_sets,
                                "answer": answers})
        yield counter(f"{P}_frame_sets_resumed", "Frame sets sent at once because the CAN bus was "
                      "(re)opened (also counted by trigger)", stats.resumed_sets)
        yield counter(f"{P}_frame_sets_refused", "Frame sets not sent: this controller may not transmit "
                      "(standby, fenced)", stats.sends_refused)
        yield counter(f"{P}_heartbeats_sent", "Failover heartbeat frames sent", stats.heartbeats_sent)
        yield counter(f"{P}_heartbeat_deadlines_skipped", "Heartbeat deadlines passed over because a "
                      "set was more than a period late", stats.heartbeats_skipped)
        outcomes = dict(s.payload_outcomes)
        new_streams = outcomes.pop("new_stream", 0)  # an accepted payload too: not an outcome
        yield labelled_counter(f"{P}_telemetry_payloads", "Rack payloads by outcome (accepted, rejected_*, "
                               "out_of_order, ...)", "outcome", outcomes)
        yield counter(f"{P}_telemetry_new_streams", "Payloads that started a new agent stream (an agent "
                      "restarted)", new_streams)
        yield labelled_counter(f"{P}_unknown_rack_payloads",
                               "Payloads from racks not on the roster (never counted; at most 64 ids "
                               "tracked)",
                               "rack", dict(s.unknown_racks))
        yield from _can_families(dict(s.can_events), errors)
        m = s.mqtt_stats
        yield from mqtt_families(P, m)
        errors.update(mqtt_errors(m))
        yield labelled_counter(f"{P}_commands", "Operator commands by outcome (accepted, refused_<reason>, "
                               "retransmitted, ignored_standby)", "outcome", dict(s.command_outcomes))
        journal = dict(s.journal_counts)
        errors["state_write"] = journal.pop("state_write_errors", 0)
        yield labelled_counter(f"{P}_journal_entries", "Journal entries by outcome (recorded, suppressed "
                               "by the rate limit)", "outcome", journal)
        yield labelled_counter(_ERRORS, "Errors by kind: cycle (a core defect; the fail-safe set went out), "
                               "failsafe (not even that), can_*, mqtt_*, state_write", "kind", errors)
        up = GaugeMetricFamily(f"{P}_link_up", "1 while the link works", labels=["link"])
        up.add_metric(["mqtt"], 1.0 if s.mqtt_connected else 0.0)
        up.add_metric(["can"], 1.0 if s.can_healthy else 0.0)
        yield up
        role = s.role
        yield enum_gauge(f"{P}_role", "1 for the role this controller has", state_label="role",
                         states=[r.value for r in type(role)], current=role.value)
        yield gauge(f"{P}_foreign_transmitter",
                    "1 while limits frames from a node that is not a bmslink controller are heard (an alarm)",
                    1.0 if s.foreign_transmitter else 0.0)
        yield CounterMetricFamily(
            f"{P}_foreign_transmitter_detections",
            "Times the foreign-transmitter alarm rose (its frames: bmslink_controller_foreign_limits_frames)",
            value=s.foreign_transmitter_detections,
        )
        yield from _racks(s.table)
        state = s.state
        if state is not None:
            yield from _computed(state)
        sent = s.last_sent
        if sent is not None:
            yield from _bank(sent)


class ControllerMetrics(MetricsEndpoint):
    def __init__(self, readings: ControllerReadings) -> None:
        super().__init__("controller")
        self.registry.register(_ReadingsCollector(readings))
