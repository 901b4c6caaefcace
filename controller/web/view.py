"""What the web page shows, as plain JSON-able values (pure: the state and the clock are passed in).

Field names carry their units, as everywhere in bmslink; the page's script and the JSON endpoints
(README "Web page") read exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.failover import STANDBY_LIVE_PERIODS, RoleMachine, WireRole
from controller.web.history import Sample
from shared.cluster import ConsolidatedState, JournalEvent

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """This controller, as the page names it."""

    site_id: str
    node_id: str
    node_number: int  # 0: failover off (a single controller, always active)


@dataclass(frozen=True, slots=True)
class LinkHealth:
    mqtt_connected: bool
    can_healthy: bool
    foreign_transmitter: bool


def sample_of(state: ConsolidatedState, wall_s: float) -> Sample:
    return Sample(
        t_s=wall_s,
        ccl_a=state.charge_current_limit_a,
        dcl_a=state.discharge_current_limit_a,
        soc_pct=state.soc_pct,
        temperature_max_c=state.temperature_max_c,
        temperature_min_c=state.temperature_min_c,
        temperature_avg_c=state.temperature_avg_c,
    )


def bank_view(state: ConsolidatedState) -> Json:
    """The consolidated battery: what the inverter is told, why, and what is measured."""
    return {
        "timestamp_s": state.timestamp_s,
        "charge_current_limit_a": state.charge_current_limit_a,
        "discharge_current_limit_a": state.discharge_current_limit_a,
        "charge_voltage_limit_v": state.charge_voltage_limit_v,
        "discharge_voltage_limit_v": state.discharge_voltage_limit_v,
        "charge_enabled": state.charge_enabled,
        "discharge_enabled": state.discharge_enabled,
        "force_charge_request": state.force_charge_request,
        "ccl_reason": state.ccl_reason,
        "dcl_reason": state.dcl_reason,
        "cvl_reason": state.cvl_reason,
        "dvl_reason": state.dvl_reason,
        "soc_pct": state.soc_pct,
        "soh_pct": state.soh_pct,
        "pack_voltage_v": state.pack_voltage_v,
        "current_a": state.current_a,
        "temperature_max_c": state.temperature_max_c,
        "temperature_max_location": state.temperature_max_location,
        "temperature_min_c": state.temperature_min_c,
        "temperature_min_location": state.temperature_min_location,
        "temperature_avg_c": state.temperature_avg_c,
        "cell_voltage_max_v": state.cell_voltage_max_v,
        "cell_voltage_max_location": state.cell_voltage_max_location,
        "cell_voltage_min_v": state.cell_voltage_min_v,
        "cell_voltage_min_location": state.cell_voltage_min_location,
        "alarms": list(state.alarms.raised()),
        "warnings": list(state.warnings.raised()),
        "cluster_flags": list(state.cluster.raised()),
        "capacity_ah": state.capacity_ah,
        "roster_size": state.roster_size,
        "eligible_racks": state.eligible_racks,
        "unknown_racks": list(state.unknown_racks),
    }


def rack_rows(state: ConsolidatedState) -> list[Json]:
    """One row per roster rack: its verdict this cycle, its limits, why, and maintenance."""
    # Built by hand rather than with model_dump: at a thousand racks this runs every second, and
    # plain dicts of the few fields shown cost a fraction of pydantic's serialiser.
    return [
        {
            "rack_id": view.rack_id,
            "state": view.state.value,
            "eligible": view.eligible,
            "share": view.share,
            "charge_current_limit_a": view.charge_current_limit_a,
            "discharge_current_limit_a": view.discharge_current_limit_a,
            "reason": view.reason,
            "maintenance": view.maintenance,
        }
        for view in state.racks
    ]


def controllers_view(node: NodeFacts, roles: RoleMachine | None, now_s: float) -> list[Json]:
    """This controller and the peers its role machine hears on the CAN bus (heartbeats carry node
    numbers, not names). ``heard_s_ago`` is None for this controller; ``live`` says whether a peer's
    heartbeat is recent enough to count (the role machine's own windows)."""
    if roles is None:
        return [{"node_id": node.node_id, "node_number": 0, "this": True, "role": "active", "epoch": 0,
                 "rank": None, "reason": "single controller (failover off)", "since_s": None,
                 "heard_s_ago": None, "live": True}]
    rows: list[Json] = [{
        "node_id": node.node_id, "node_number": node.node_number, "this": True,
        "role": roles.role.value, "epoch": roles.epoch, "rank": roles.config.rank, "reason": roles.reason,
        "since_s": max(0.0, now_s - roles.changed_s), "heard_s_ago": None, "live": True,
    }]
    peer, heard = roles.active_peer, roles.last_active_beat_s
    if peer is not None and heard is not None:
        role = "releasing" if peer.role is WireRole.RELEASING else "active"
        rows.append(_peer_row(peer.node_number, role, epoch=peer.epoch, rank=peer.rank, ago_s=now_s - heard,
                              live=roles.peer_active_live(now_s)))
    live_s = STANDBY_LIVE_PERIODS * roles.config.standby_heartbeat_period_ms / 1000.0
    for number, (beat, heard_s) in sorted(roles.standbys.items()):
        rows.append(_peer_row(number, "standby", epoch=beat.epoch, rank=beat.rank, ago_s=now_s - heard_s,
                              live=now_s - heard_s <= live_s))
    return rows


def _peer_row(number: int, role: str, *, epoch: int, rank: int, ago_s: float, live: bool) -> Json:
    return {"node_id": None, "node_number": number, "this": False, "role": role, "epoch": epoch,
            "rank": rank, "reason": "heard on the CAN bus" if live else "not heard lately",
            "since_s": None, "heard_s_ago": max(0.0, ago_s), "live": live}


def event_view(event: JournalEvent) -> Json:
    return {"timestamp_s": event.timestamp_s, "node_id": event.node_id, "kind": event.kind,
            "rack_id": event.rack_id, "text": event.text}


def sample_view(sample: Sample | None) -> Json | None:
    if sample is None:
        return None
    return {"t_s": sample.t_s, "ccl_a": sample.ccl_a, "dcl_a": sample.dcl_a, "soc_pct": sample.soc_pct,
            "temperature_max_c": sample.temperature_max_c, "temperature_min_c": sample.temperature_min_c,
            "temperature_avg_c": sample.temperature_avg_c}
