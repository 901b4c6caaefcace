"""Rack telemetry as msgspec Structs: the controller's in-process form of the wire contract.

The contract is the pydantic models of :mod:`shared.models`: agents build and encode with them,
and they decide what is valid. The controller receives every rack's payload twice a second; at
a thousand racks, msgpack + pydantic validation was the largest single cost of its process
(about 22 µs a message alone, 40–60 µs inside the loaded process; msgspec decodes and validates
the same payload into these Structs in about 5 µs).

So the controller decodes straight into these Structs, and falls back to the pydantic path for
anything they refuse (:class:`TelemetryDecoder`). The Structs are therefore a *fast path* with one
rule: they never accept a payload the pydantic models reject, and what they accept carries the
same values. They are at most stricter (msgspec does not take ``true`` for a number, say); such a
payload then goes through pydantic, which decides, and its model is converted here.
``tests/contract/test_records.py`` holds them to that: field by field (names, order, defaults,
bounds) and by hypothesis over valid and mutated payloads.

Bounds come from the same constants as the models'. Cross-field rules (the models'
``model_validator``\\ s) are ``__post_init__`` checks here.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import msgspec

from shared.codec import DEFAULT_MAX_PAYLOAD_BYTES, Decoder, RejectReason
from shared.models import (
    CAPACITY_MAX_AH,
    CELL_VOLTAGE_MAX_V,
    CURRENT_ABS_MAX_A,
    PACK_VOLTAGE_MAX_V,
    SCHEMA_MAJOR,
    TEMPERATURE_MAX_C,
    TEMPERATURE_MIN_C,
    ContactorState,
    LinkStatus,
    RackCommState,
    RackTelemetry,
)

# msgspec rejects NaN against any ge/le bound (every comparison with NaN is false) and ±inf against
# the bound on its side; every float below has both bounds, so none can be NaN or infinite.
PackVolts = Annotated[float, msgspec.Meta(ge=0.0, le=PACK_VOLTAGE_MAX_V)]
CellVolts = Annotated[float, msgspec.Meta(ge=0.0, le=CELL_VOLTAGE_MAX_V)]
Celsius = Annotated[float, msgspec.Meta(ge=TEMPERATURE_MIN_C, le=TEMPERATURE_MAX_C)]
Amps = Annotated[float, msgspec.Meta(ge=-CURRENT_ABS_MAX_A, le=CURRENT_ABS_MAX_A)]
LimitAmps = Annotated[float, msgspec.Meta(ge=0.0, le=CURRENT_ABS_MAX_A)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
AmpHours = Annotated[float, msgspec.Meta(ge=0.0, le=CAPACITY_MAX_AH)]
# Python's ``$`` also matches before a final newline; the model's (Rust) ``$`` does not: ``\Z`` here.
Identifier = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
]
Location = Annotated[str, msgspec.Meta(max_length=64)]
StreamId = Annotated[str, msgspec.Meta(min_length=8, max_length=32, pattern=r"^[0-9a-f]+\Z")]
Counter63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
# The model bounds the timestamp below only (and refuses inf/NaN); any finite float is below this.
Timestamp = Annotated[float, msgspec.Meta(ge=0.0, le=1.7976931348623157e308)]


# Every record is frozen and refuses unknown fields, as the models do (``extra="forbid"``). Records
# hold only numbers, strings, enums and other records, so they can never be part of a reference
# cycle: ``gc=False`` keeps them out of the collector's lists (six per payload, at 2000 a second);
# ``kw_only`` keeps the models' field order where a field without a default follows one with.


class FlagsRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """:class:`shared.models.ProtectionFlags`, same names and order."""

    cell_over_voltage: bool = False
    cell_under_voltage: bool = False
    pack_over_voltage: bool = False
    pack_under_voltage: bool = False
    charge_over_current: bool = False
    discharge_over_current: bool = False
    charge_over_temperature: bool = False
    charge_under_temperature: bool = False
    discharge_over_temperature: bool = False
    discharge_under_temperature: bool = False
    cell_imbalance: bool = False
    internal_fault: bool = False
    insulation_fault: bool = False

    def raised(self) -> tuple[str, ...]:
        """Names of the conditions that are set, in declaration order."""
        values = msgspec.structs.astuple(self)
        if not any(values):
            return ()
        return tuple(name for name, value in zip(self.__struct_fields__, values, strict=True) if value)

    def any(self) -> bool:
        return any(msgspec.structs.astuple(self))


class LinkCountersRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    ok: Counter63 = 0
    timeout: Counter63 = 0
    crc_error: Counter63 = 0
    modbus_exception: Counter63 = 0
    connection_refused: Counter63 = 0
    invalid_data: Counter63 = 0
    skipped_slots: Counter63 = 0


class UnitLinkRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    unit: Identifier
    status: LinkStatus
    consecutive_failures: Counter63 = 0
    last_exception_code: Byte | None = None
    counters: LinkCountersRecord = LinkCountersRecord()


class MeasurementsRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, kw_only=True):
    """:class:`shared.models.RackMeasurements`."""

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
    alarms: FlagsRecord = FlagsRecord()
    warnings: FlagsRecord = FlagsRecord()
    contactor: ContactorState = ContactorState.UNKNOWN
    capacity_ah: AmpHours

    def __post_init__(self) -> None:
        if self.cell_voltage_min_v > self.cell_voltage_max_v:
            raise ValueError(
                f"cell_voltage_min_v {self.cell_voltage_min_v} "
                f"exceeds cell_voltage_max_v {self.cell_voltage_max_v}"
            )
        if self.temperature_min_c > self.temperature_max_c:
            raise ValueError(
                f"temperature_min_c {self.temperature_min_c} "
                f"exceeds temperature_max_c {self.temperature_max_c}"
            )


class TelemetryRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, kw_only=True):
    """:class:`shared.models.RackTelemetry`."""

    # Required on the wire (the codec refuses a payload without it); the model's default is for
    # producers building one.
    schema_version: tuple[Byte, Byte]
    site_id: Identifier
    rack_id: Identifier
    stream_id: StreamId
    seq: Counter63
    timestamp_s: Timestamp
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)]
    comm_state: RackCommState
    measurements: MeasurementsRecord | None
    units: Annotated[tuple[UnitLinkRecord, ...], msgspec.Meta(min_length=1, max_length=64)]

    def __post_init__(self) -> None:
        m = self.measurements
        if (
            self.comm_state is RackCommState.COMM_LOST
            and m is not None
            and (m.charge_current_limit_a != 0.0 or m.discharge_current_limit_a != 0.0)
        ):
            raise ValueError("a comm_lost rack must carry zero charge and discharge current limits")
        if self.comm_state is RackCommState.OK and m is None:
            raise ValueError("comm_state ok requires measurements")


def record_of(telemetry: RackTelemetry) -> TelemetryRecord:
    """The record of a validated model (values the model accepted are in the records' bounds)."""
    return msgspec.convert(telemetry.model_dump(mode="python"), TelemetryRecord)


class TelemetryDecoder:
    """Decodes rack payloads into :class:`TelemetryRecord`; same rejections and counters as
    :class:`shared.codec.Decoder` (it *is* that decoder for everything the fast path refuses)."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._fast = msgspec.msgpack.Decoder(TelemetryRecord)
        self._authority: Decoder[RackTelemetry] = Decoder(RackTelemetry, max_payload_bytes)
        self.fast_accepted = 0

    @property
    def max_payload_bytes(self) -> int:
        return self._authority.max_payload_bytes

    @property
    def accepted(self) -> int:
        return self.fast_accepted + self._authority.accepted

    @property
    def rejected(self) -> Counter[RejectReason]:
        return self._authority.rejected

    def decode(self, payload: bytes, topic: str | None = None) -> TelemetryRecord:
        if len(payload) <= self.max_payload_bytes:
            try:
                record = self._fast.decode(payload)
            except (msgspec.DecodeError, ValueError, TypeError):
                pass  # the authority decides, and says why
            else:
                if record.schema_version[0] == SCHEMA_MAJOR:
                    self.fast_accepted += 1
                    return record
        model = self._authority.decode(payload, topic)  # raises DecodeError, counted there
        return record_of(model)
