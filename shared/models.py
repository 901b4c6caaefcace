"""Rack telemetry: the wire contract between rack agents and the controller.

Sign convention (one place, used everywhere): ``current_a`` is **positive while
charging** and negative while discharging, matching the inverter CAN frame 0x356.
All limits are non-negative magnitudes. Units are part of every field name.

Physical bounds below are the validation of the contract: a payload outside
them is rejected by the decoder as physically impossible (0–1000 V DC,
−40…125 °C, limits ≥ 0, SOC/SOH 0–100 %, finite numbers only).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

SCHEMA_MAJOR = 1
# 1.1: ``stream_id`` (one per agent run) orders a rack's readings; 1.0 payloads lack it and are refused.
# 1.2: ``UnitLink.detail``, why a unit is not ok (a refused reading's contradiction). A 1.1 controller
# refuses it as an unknown field: upgrade the controllers before the agents.
# 1.3: maintenance mode (``RackView.maintenance``, ``LatchSet.maintenance``, the maintenance commands):
# controller-to-controller and controller-to-monitor only; upgrade the standbys first, then hand over.
SCHEMA_MINOR = 3
UNIT_DETAIL_MAX_CHARS = 200

PACK_VOLTAGE_MAX_V = 1000.0
CELL_VOLTAGE_MAX_V = 10.0
TEMPERATURE_MIN_C = -40.0
TEMPERATURE_MAX_C = 125.0
CURRENT_ABS_MAX_A = 10_000.0
CAPACITY_MAX_AH = 100_000.0

# Every wire type is Strict: a payload must carry the type the contract names. No string is read as a
# number ("9999" is not 9999 A), no bool as a number or a number as a bool, no bytes as text. An int
# stands for a float (msgpack packs 40.0 as a float, but a producer may send 40).
PackVolts = Annotated[float, Strict(), Field(ge=0.0, le=PACK_VOLTAGE_MAX_V, allow_inf_nan=False)]
CellVolts = Annotated[float, Strict(), Field(ge=0.0, le=CELL_VOLTAGE_MAX_V, allow_inf_nan=False)]
Celsius = Annotated[
    float, Strict(), Field(ge=TEMPERATURE_MIN_C, le=TEMPERATURE_MAX_C, allow_inf_nan=False)
]
Amps = Annotated[float, Strict(), Field(ge=-CURRENT_ABS_MAX_A, le=CURRENT_ABS_MAX_A, allow_inf_nan=False)]
LimitAmps = Annotated[float, Strict(), Field(ge=0.0, le=CURRENT_ABS_MAX_A, allow_inf_nan=False)]
Percent = Annotated[float, Strict(), Field(ge=0.0, le=100.0, allow_inf_nan=False)]
AmpHours = Annotated[float, Strict(), Field(ge=0.0, le=CAPACITY_MAX_AH, allow_inf_nan=False)]
Identifier = Annotated[
    str, Strict(), Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
Location = Annotated[str, Strict(), Field(max_length=64)]
Counter = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
Byte = Annotated[int, Strict(), Field(ge=0, le=255)]
Flag = Annotated[bool, Strict()]
# One agent run's stream of readings: random at each start (see RackTelemetry.stream_id).
StreamId = Annotated[str, Strict(), Field(min_length=8, max_length=32, pattern=r"^[0-9a-f]+$")]
Timestamp = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LinkStatus(StrEnum):
    """Outcome class of the last poll of one BMS unit."""

    OK = "ok"
    TIMEOUT = "timeout"
    CRC_ERROR = "crc_error"
    MODBUS_EXCEPTION = "modbus_exception"
    CONNECTION_REFUSED = "connection_refused"
    INVALID_DATA = "invalid_data"


class RackCommState(StrEnum):
    """Whether the agent currently has a working link to the rack's BMS."""

    OK = "ok"
    COMM_LOST = "comm_lost"


class ContactorState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    UNKNOWN = "unknown"


class ProtectionFlags(_Frozen):
    """Named protection conditions; used both for alarms (trips) and warnings (pre-alarms)."""

    cell_over_voltage: Flag = False
    cell_under_voltage: Flag = False
    pack_over_voltage: Flag = False
    pack_under_voltage: Flag = False
    charge_over_current: Flag = False
    discharge_over_current: Flag = False
    charge_over_temperature: Flag = False
    charge_under_temperature: Flag = False
    discharge_over_temperature: Flag = False
    discharge_under_temperature: Flag = False
    cell_imbalance: Flag = False
    internal_fault: Flag = False
    insulation_fault: Flag = False

    # These run several times per control cycle and per received payload: they read the field
    # values from ``__dict__`` (where a frozen ``extra="forbid"`` model keeps exactly its fields,
    # in declaration order) rather than through the model's iteration protocol, about 5× slower.
    # tests/controller/core/test_cache.py checks raised() against that protocol for every set.

    def raised(self) -> tuple[str, ...]:
        """Names of the conditions that are set, in declaration order."""
        values = self.__dict__
        if not any(values.values()):
            return ()
        return tuple(name for name, value in values.items() if value)

    def any(self) -> bool:
        return any(self.__dict__.values())

    def union(self, other: ProtectionFlags) -> ProtectionFlags:
        if not other.any():
            return self
        if not self.any():
            return other
        theirs = other.__dict__
        return ProtectionFlags(**{name: value or theirs[name] for name, value in self.__dict__.items()})


PROTECTION_FLAG_NAMES: tuple[str, ...] = tuple(ProtectionFlags.model_fields)


class LinkCounters(_Frozen):
    """Cumulative poll outcomes of one BMS unit since the agent started."""

    ok: Counter = 0
    timeout: Counter = 0
    crc_error: Counter = 0
    modbus_exception: Counter = 0
    connection_refused: Counter = 0
    invalid_data: Counter = 0
    skipped_slots: Counter = 0


class UnitLink(_Frozen):
    """Link health of one BMS unit of the rack."""

    unit: Identifier
    status: LinkStatus
    consecutive_failures: Counter = 0
    last_exception_code: Byte | None = None
    counters: LinkCounters = LinkCounters()
    # Why the unit is not ok, for a person: e.g. the contradiction of its refused reading ("" when ok).
    detail: Annotated[str, Strict(), Field(max_length=UNIT_DETAIL_MAX_CHARS)] = ""


class RackMeasurements(_Frozen):
    """What the rack's BMS reports, in SI-ish units with the unit in the name."""

    pack_voltage_v: PackVolts
    current_a: Amps
    soc_pct: Percent
    soh_pct: Percent
    cell_voltage_max_v: CellVolts
    cell_voltage_max_location: Location = ""
    cell_voltage_min_v: CellVolts
    cell_voltage_min_location: Location = ""
    temperature_max_c: Celsius
    temperature_max_location: Location = ""
    temperature_min_c: Celsius
    temperature_min_location: Location = ""
    charge_current_limit_a: LimitAmps
    discharge_current_limit_a: LimitAmps
    charge_voltage_limit_v: PackVolts
    discharge_voltage_limit_v: PackVolts
    alarms: ProtectionFlags = ProtectionFlags()
    warnings: ProtectionFlags = ProtectionFlags()
    contactor: ContactorState = ContactorState.UNKNOWN
    capacity_ah: AmpHours

    @model_validator(mode="after")
    def _ordered(self) -> RackMeasurements:
        check_measurement_order(self)
        return self


def check_measurement_order(m: RackMeasurements) -> None:
    """The cross-field rule of :class:`RackMeasurements`: each minimum is at most its maximum.

    Raises ``ValueError``. A function of its own so the rule has one definition: the model's
    validator calls it, and :mod:`shared.records` runs it as each record's ``__post_init__``.
    """
    if m.cell_voltage_min_v > m.cell_voltage_max_v:
        raise ValueError(
            f"cell_voltage_min_v {m.cell_voltage_min_v} exceeds cell_voltage_max_v {m.cell_voltage_max_v}"
        )
    if m.temperature_min_c > m.temperature_max_c:
        raise ValueError(
            f"temperature_min_c {m.temperature_min_c} exceeds temperature_max_c {m.temperature_max_c}"
        )


class RackTelemetry(_Frozen):
    """One published state of one rack.

    ``measurements`` is ``None`` only when the agent has never read the BMS.
    When ``comm_state`` is ``comm_lost`` the limits are zero by contract: a
    rack that cannot be heard grants no current.
    """

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    site_id: Identifier
    rack_id: Identifier
    # Readings are ordered by ``seq`` within one agent run only: a new run (a restart) starts a new
    # stream, heard at once whatever its seq or clock. A payload can therefore never lock a rack out
    # by claiming a huge seq or a far-future timestamp (the controller also refuses those).
    stream_id: StreamId
    seq: Counter
    timestamp_s: Timestamp
    poll_interval_ms: Annotated[int, Strict(), Field(ge=10, le=60_000)]
    comm_state: RackCommState
    measurements: RackMeasurements | None
    units: tuple[UnitLink, ...] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _comm_lost_grants_nothing(self) -> RackTelemetry:
        check_comm_state(self)
        return self


def check_comm_state(t: RackTelemetry) -> None:
    """The cross-field rule of :class:`RackTelemetry`: a comm_lost rack carries zero current limits,
    and an ok rack carries measurements.

    Raises ``ValueError``. Also each telemetry record's ``__post_init__`` (see
    :func:`check_measurement_order`).
    """
    m = t.measurements
    if (
        t.comm_state is RackCommState.COMM_LOST
        and m is not None
        and (m.charge_current_limit_a != 0.0 or m.discharge_current_limit_a != 0.0)
    ):
        raise ValueError("a comm_lost rack must carry zero charge and discharge current limits")
    if t.comm_state is RackCommState.OK and m is None:
        raise ValueError("comm_state ok requires measurements")
