"""The JSON documents the bridge publishes, made from validated contract objects only (pure functions).

Field names keep the wire contract's names and units (``shared/models.py``, ``shared/cluster.py``):
``current_a`` is positive while charging, limits are magnitudes. Added here, for dashboards:
``power_w`` (pack voltage × current, so also positive while charging), ``cell_voltage_delta_mv``,
the alarm and warning names as lists, ISO 8601 UTC times beside the Unix ones, and ``received_s``,
this bridge's clock when the input arrived.

A rack's document carries what its agent measured and, under ``controller``, what the active
controller made of the rack in its last consolidated state (its verdict, derated limits, reason and
maintenance). A number the rack has not reported (its BMS never read) is ``null``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.cluster import ConsolidatedState, RackView
from shared.models import ContactorState, RackTelemetry

JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ControllerSeen:
    """What the bridge last heard on one controller's status topic."""

    online: bool
    role: str = ""
    epoch: int = 0


def iso_utc(timestamp_s: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp_s, datetime.UTC).isoformat(timespec="milliseconds")


def _view(view: RackView | None, state: ConsolidatedState | None) -> JsonDict | None:
    if view is None or state is None:
        return None
    return {
        "node_id": state.node_id,
        "timestamp_s": state.timestamp_s,
        "state": view.state.value,
        "eligible": view.eligible,
        "share": view.share,
        "charge_current_limit_a": view.charge_current_limit_a,
        "discharge_current_limit_a": view.discharge_current_limit_a,
        "reason": view.reason,
        "maintenance": view.maintenance,
    }


_MEASURED = (
    "soc_pct", "soh_pct", "pack_voltage_v", "current_a", "cell_voltage_max_v", "cell_voltage_max_location",
    "cell_voltage_min_v", "cell_voltage_min_location", "temperature_max_c", "temperature_max_location",
    "temperature_min_c", "temperature_min_location", "capacity_ah",
)
_BMS_LIMITS = ("charge_current_limit_a", "discharge_current_limit_a", "charge_voltage_limit_v",
               "discharge_voltage_limit_v")


def rack_document(rack_id: str, site_id: str, telemetry: RackTelemetry | None, *, view: RackView | None,
                  state: ConsolidatedState | None, received_s: float | None) -> JsonDict:
    """One rack's JSON state. ``telemetry`` is None while the rack was never heard (the controller's
    view may still say why); ``view``/``state`` None before the first consolidated state."""
    doc: JsonDict = {"site_id": site_id, "rack_id": rack_id}
    m = telemetry.measurements if telemetry is not None else None
    if telemetry is None:
        doc.update(timestamp_s=None, timestamp=None, received_s=received_s, seq=None, stream_id=None,
                   poll_interval_ms=None, comm_state=None)
    else:
        doc.update(timestamp_s=telemetry.timestamp_s, timestamp=iso_utc(telemetry.timestamp_s),
                   received_s=received_s, seq=telemetry.seq, stream_id=telemetry.stream_id,
                   poll_interval_ms=telemetry.poll_interval_ms, comm_state=telemetry.comm_state.value)
    if m is None:
        doc.update(dict.fromkeys(_MEASURED))
        doc.update(power_w=None, cell_voltage_delta_mv=None, contactor=ContactorState.UNKNOWN.value,
                   bms=dict.fromkeys(_BMS_LIMITS), alarms=[], warnings=[])
    else:
        doc.update({name: getattr(m, name) for name in _MEASURED})
        doc.update(
            power_w=round(m.pack_voltage_v * m.current_a, 1),
            cell_voltage_delta_mv=round((m.cell_voltage_max_v - m.cell_voltage_min_v) * 1000.0, 1),
            contactor=m.contactor.value,
            bms={name: getattr(m, name) for name in _BMS_LIMITS},
            alarms=list(m.alarms.raised()),
            warnings=list(m.warnings.raised()),
        )
    doc["alarm"] = bool(doc["alarms"])
    doc["warning"] = bool(doc["warnings"])
    doc["units"] = [] if telemetry is None else [
        {"unit": u.unit, "status": u.status.value, "consecutive_failures": u.consecutive_failures,
         "detail": u.detail}
        for u in telemetry.units
    ]
    doc["controller"] = _view(view, state)
    return doc


def bank_document(state: ConsolidatedState, controllers: Mapping[str, ControllerSeen],
                  received_s: float) -> JsonDict:
    """The bank's JSON state: what the inverter is told (each limit with its reason), the battery
    as measured, which racks count, the alarms, and the controllers as last heard."""
    alarms = list(state.alarms.raised())
    cluster_alarms = list(state.cluster.raised())
    return {
        "site_id": state.site_id,
        "active_node": state.node_id,
        "timestamp_s": state.timestamp_s,
        "timestamp": iso_utc(state.timestamp_s),
        "received_s": received_s,
        "limits": {
            "charge_current_a": {"value": state.charge_current_limit_a, "reason": state.ccl_reason},
            "discharge_current_a": {"value": state.discharge_current_limit_a, "reason": state.dcl_reason},
            "charge_voltage_v": {"value": state.charge_voltage_limit_v, "reason": state.cvl_reason},
            "discharge_voltage_v": {"value": state.discharge_voltage_limit_v, "reason": state.dvl_reason},
        },
        "charge_enabled": state.charge_enabled,
        "discharge_enabled": state.discharge_enabled,
        "force_charge_request": state.force_charge_request,
        "soc_pct": state.soc_pct,
        "soh_pct": state.soh_pct,
        "pack_voltage_v": state.pack_voltage_v,
        "current_a": state.current_a,
        "power_w": round(state.pack_voltage_v * state.current_a, 1),
        "temperature_avg_c": state.temperature_avg_c,
        "temperature_max_c": state.temperature_max_c,
        "temperature_max_location": state.temperature_max_location,
        "temperature_min_c": state.temperature_min_c,
        "temperature_min_location": state.temperature_min_location,
        "cell_voltage_max_v": state.cell_voltage_max_v,
        "cell_voltage_max_location": state.cell_voltage_max_location,
        "cell_voltage_min_v": state.cell_voltage_min_v,
        "cell_voltage_min_location": state.cell_voltage_min_location,
        "capacity_ah": state.capacity_ah,
        "roster_size": state.roster_size,
        "eligible_count": state.eligible_racks,
        "eligible_racks": [r.rack_id for r in state.racks if r.eligible],
        "rack_states": {r.rack_id: r.state.value for r in state.racks},
        "maintenance_racks": [r.rack_id for r in state.racks if r.maintenance],
        "alarms": alarms,
        "warnings": list(state.warnings.raised()),
        "cluster_alarms": cluster_alarms,
        "alarm": state.alarm_active,
        "unknown_racks": list(state.unknown_racks),
        "controllers": {node: {"online": seen.online, "role": seen.role, "epoch": seen.epoch}
                        for node, seen in sorted(controllers.items())},
    }
