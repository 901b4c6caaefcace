"""The consolidated battery: what the controller computed from the rack table in one cycle.

Published (msgpack) on the cluster topic for monitoring, and the single input
of the inverter frame encoder. Sign and unit conventions as in
``shared/models.py`` (current positive = charging, limits as magnitudes).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

from shared.models import (
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    Amps,
    Byte,
    CellVolts,
    Celsius,
    Counter,
    Flag,
    Identifier,
    LimitAmps,
    Location,
    PackVolts,
    Percent,
    ProtectionFlags,
    Timestamp,
)

# Strict wire types, as in shared/models.py: no coercion of strings, bools or bytes on decoding.
Text = Annotated[str, Strict()]
Seconds = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RackState(StrEnum):
    """Controller's verdict on one roster rack in this cycle; only ``ok`` racks are eligible."""

    OK = "ok"
    STALE = "stale"  # no valid telemetry for stale_after (or never heard)
    FAULTED = "faulted"  # a protection alarm that takes the rack out, or a latched alarm not yet cleared
    DISCONNECTED = "disconnected"  # contactor open: not in parallel, not counted
    COMM_LOST = "comm_lost"  # its agent reports the BMS link lost
    INVALID = "invalid"  # the last payload failed validation


class ClusterFlags(_Frozen):
    """Cluster-level conditions raised by the controller itself."""

    not_enough_racks: Flag = False
    latched_alarm: Flag = False  # a protection alarm is latched until cleared by command
    unknown_rack_seen: Flag = False
    # Limits frames on the inverter bus from a node that is not a bmslink controller: the inverter
    # hears conflicting limits (docs/failover.md, "Foreign transmitter").
    foreign_transmitter: Flag = False

    def raised(self) -> tuple[str, ...]:
        return tuple(name for name, value in self if value)


class RackView(_Frozen):
    rack_id: Identifier
    state: RackState
    eligible: Flag
    # 0..1 while a returning rack ramps in (1 = full share); 0 when not eligible.
    share: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] = 0.0
    charge_current_limit_a: LimitAmps = 0.0
    discharge_current_limit_a: LimitAmps = 0.0
    reason: Text = ""
    # Put in maintenance by an operator: it adds no capacity (see controller/core/maintenance.py).
    maintenance: Flag = False


class ConsolidatedState(_Frozen):
    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    node_id: Identifier
    timestamp_s: Timestamp
    # What the inverter is told.
    charge_current_limit_a: LimitAmps
    discharge_current_limit_a: LimitAmps
    charge_voltage_limit_v: PackVolts
    discharge_voltage_limit_v: PackVolts
    charge_enabled: Flag
    discharge_enabled: Flag
    # An operator's time-bounded force-charge request is in force (the dialect's request flag; it
    # asks the inverter to charge within the limits above, and never changes them).
    force_charge_request: Flag = False
    # Why: e.g. "CCL 112 A = rack-03 (cell 3.43 V taper) × 4 eligible, ramping".
    ccl_reason: Text = ""
    dcl_reason: Text = ""
    cvl_reason: Text = ""
    dvl_reason: Text = ""
    # The consolidated battery as measured.
    soc_pct: Percent = 0.0
    soh_pct: Percent = 0.0
    pack_voltage_v: PackVolts = 0.0
    current_a: Amps = 0.0
    temperature_avg_c: Celsius = 25.0
    cell_voltage_max_v: CellVolts = 0.0
    cell_voltage_max_location: Location = ""
    cell_voltage_min_v: CellVolts = 0.0
    cell_voltage_min_location: Location = ""
    temperature_max_c: Celsius = 25.0
    temperature_max_location: Location = ""
    temperature_min_c: Celsius = 25.0
    temperature_min_location: Location = ""
    alarms: ProtectionFlags = ProtectionFlags()
    warnings: ProtectionFlags = ProtectionFlags()
    cluster: ClusterFlags = ClusterFlags()
    capacity_ah: Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)] = 0.0
    roster_size: Counter = 0
    eligible_racks: Counter = 0
    racks: tuple[RackView, ...] = ()
    unknown_racks: tuple[Text, ...] = ()

    @property
    def alarm_active(self) -> bool:
        return bool(self.alarms.raised()) or self.cluster.not_enough_racks or self.cluster.latched_alarm


class ControllerStatus(_Frozen):
    """Published (msgpack, retained) by every controller on its status topic, for operators."""

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    node_id: Identifier
    node_number: Byte = 0
    role: Text
    epoch: Counter = 0
    # Seconds since this node last heard the active (0 when it is the active; None: never).
    since_active_heard_s: Seconds | None = None
    active_node_number: Byte = 0
    last_change_reason: Text = ""
    last_change_timestamp_s: Seconds = 0.0
    timestamp_s: Seconds = 0.0
    # A node that is not a bmslink controller sends limits frames (alarm; docs/failover.md).
    foreign_transmitter: Flag = False
    foreign_transmitter_last_seen_s: Seconds | None = None  # wall clock of its last frame; None: never
    foreign_limits_frames: Counter = 0  # limits frames no bmslink controller accounted for


class LeaderRecord(_Frozen):
    """Retained, with a Message Expiry: who was active at which epoch (advisory; CAN decides)."""

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    node_id: Identifier
    node_number: Byte = 0
    epoch: Counter
    timestamp_s: Seconds = 0.0


class LatchedAlarm(_Frozen):
    rack_id: Identifier
    flag: Text


class LatchSet(_Frozen):
    """The active controller's latched alarms (retained, on ``Topics.latches``): a standby holds the
    union of its own and these, so a takeover never forgets a latch (controller/latch_share.py)."""

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    node_id: Identifier
    epoch: Counter = 0
    timestamp_s: Timestamp
    latches: tuple[LatchedAlarm, ...] = ()
    # The racks an operator put in maintenance; held the same way (a union; only an accepted command
    # takes a rack out of maintenance).
    maintenance: tuple[Identifier, ...] = ()


class JournalEvent(_Frozen):
    """One entry of a controller's journal (controller/journal.py), published on ``Topics.events``:
    ``kind`` is latch, release, command, role, rack_state or limit."""

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    node_id: Identifier
    timestamp_s: Timestamp
    kind: Text
    rack_id: Text = ""
    text: Text
