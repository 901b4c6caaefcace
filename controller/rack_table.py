"""The controller's table of racks, fed by MQTT telemetry; hands out one immutable snapshot per cycle.

The hot path (one message) is: decode + validate, store, and a cheap check of
whether this message lowers a limit or raises an alarm, in which case the
caller runs a control cycle at once instead of waiting for the heartbeat.

Two views of the racks: the latest input of each, and the inputs committed to
the core. A full cycle commits everything; an urgent message is committed at
once, alone, so that the urgent cycle it triggers recomputes that rack and not
every rack whose routine payload arrived since the last full cycle (those wait
for it, a control tick away, as they would without the urgent one).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import NamedTuple

from controller.core.snapshot import RackInput, Snapshot
from shared.codec import DecodeError
from shared.models import RackCommState
from shared.records import TelemetryDecoder, TelemetryRecord
from shared.topics import Topics

log = logging.getLogger(__name__)

MAX_UNKNOWN_TRACKED = 64  # a spoofing publisher must not grow our memory without bound


class Ingest(NamedTuple):
    """Outcome of one message: which rack, whether it was accepted, and whether it calls for a cycle now.

    (A NamedTuple: one per message, a third of a frozen dataclass's cost.)
    """

    rack_id: str | None
    accepted: bool
    urgent: bool
    reason: str = ""


def _urgent_change(old: TelemetryRecord | None, new: TelemetryRecord) -> bool:
    """True if ``new`` may lower the bank limits or raise an alarm compared with ``old``."""
    if old is None:
        return False  # a newly heard rack can only add current, and it is re-admitted slowly anyway
    if new.comm_state is not old.comm_state:
        return new.comm_state is RackCommState.COMM_LOST
    a, b = old.measurements, new.measurements
    if a is None or b is None:
        return b is None
    return (
        b.charge_current_limit_a < a.charge_current_limit_a
        or b.discharge_current_limit_a < a.discharge_current_limit_a
        or b.charge_voltage_limit_v < a.charge_voltage_limit_v
        or b.discharge_voltage_limit_v > a.discharge_voltage_limit_v
        or b.contactor is not a.contactor
        or (b.alarms != a.alarms and not set(b.alarms.raised()) <= set(a.alarms.raised()))
        or b.cell_voltage_max_v > a.cell_voltage_max_v + 0.005
        or b.cell_voltage_min_v < a.cell_voltage_min_v - 0.005
        or b.temperature_max_c > a.temperature_max_c + 0.5
    )


class RackTable:
    def __init__(self, topics: Topics, roster: tuple[str, ...], site_id: str, max_payload_bytes: int) -> None:
        self.topics = topics
        self.site_id = site_id
        self.decoder = TelemetryDecoder(max_payload_bytes)
        self._racks: dict[str, RackInput] = {}  # the latest input of every roster rack
        self._committed: dict[str, RackInput] = {}  # what the core is to see in an urgent cycle
        self._committed_since_snapshot: set[str] = set()
        self._stored_since_full: set[str] | None = None  # None: unknown (start, roster change)
        self._roster: tuple[str, ...] = ()
        self.unknown: dict[str, int] = {}
        self.counters: Counter[str] = Counter()
        self.set_roster(roster)

    def set_roster(self, roster: tuple[str, ...]) -> None:
        """Adopt a new roster (SIGHUP reload): keeps what is known of racks that stay."""
        self._roster = roster
        self._racks = {rid: self._racks.get(rid, RackInput(rid)) for rid in roster}
        self._committed = dict(self._racks)
        self._committed_since_snapshot.clear()
        self._stored_since_full = None
        for rid in roster:
            self.unknown.pop(rid, None)

    @property
    def roster(self) -> tuple[str, ...]:
        return self._roster

    def latest(self, rack_id: str) -> RackInput | None:
        """The rack's latest input (the one the next full snapshot carries); None off the roster."""
        return self._racks.get(rack_id)

    def ingest(self, topic: str, payload: bytes, now_s: float) -> Ingest:
        rack_id = self.topics.rack_id_from_topic(topic)
        if rack_id is None:
            self.counters["foreign_topic"] += 1
            return Ingest(None, False, False, "not a rack topic")
        current = self._racks.get(rack_id)
        if current is None:
            return self._unknown(rack_id, "not on the roster")
        try:
            telemetry = self.decoder.decode(payload, topic)
        except DecodeError as exc:
            self.counters[f"rejected_{exc.reason.value}"] += 1
            log.warning("rack %s: %s", rack_id, exc)
            self._commit(RackInput(
                rack_id, current.telemetry, current.received_s, invalid_at_s=now_s, invalid_reason=str(exc)
            ))
            return Ingest(rack_id, False, True, str(exc))
        if telemetry.rack_id != rack_id or telemetry.site_id != self.site_id:
            # A payload claiming another identity than its topic is spoofed or misconfigured: never counted.
            self.counters["identity_mismatch"] += 1
            log.warning("rack %s: payload claims site %s rack %s; ignored", rack_id, telemetry.site_id,
                        telemetry.rack_id)
            self._commit(RackInput(
                rack_id, current.telemetry, current.received_s, invalid_at_s=now_s,
                invalid_reason=f"payload claims rack {telemetry.rack_id} of site {telemetry.site_id}",
            ))
            return Ingest(rack_id, False, True, "identity mismatch")
        old = current.telemetry
        if old is not None and telemetry.seq <= old.seq and telemetry.timestamp_s <= old.timestamp_s:
            # A duplicate or reordered message (QoS redelivery, agent restart is caught by timestamp).
            self.counters["out_of_order"] += 1
            return Ingest(rack_id, False, False, "out of order")
        self.counters["accepted"] += 1
        urgent = _urgent_change(old, telemetry) or current.invalid_at_s is not None
        latest = RackInput(rack_id, telemetry, now_s)
        if urgent:
            self._commit(latest)
        else:
            self._store(latest)
        return Ingest(rack_id, True, urgent)

    def _store(self, rack_input: RackInput) -> None:
        self._racks[rack_input.rack_id] = rack_input
        if self._stored_since_full is not None:
            self._stored_since_full.add(rack_input.rack_id)

    def _commit(self, rack_input: RackInput) -> None:
        self._store(rack_input)
        self._committed[rack_input.rack_id] = rack_input
        self._committed_since_snapshot.add(rack_input.rack_id)

    def _unknown(self, rack_id: str, why: str) -> Ingest:
        self.counters["unknown_rack"] += 1
        if rack_id not in self.unknown:
            if len(self.unknown) >= MAX_UNKNOWN_TRACKED:
                return Ingest(rack_id, False, False, why)
            log.warning("telemetry from rack %s which is %s: reported, never counted", rack_id, why)
        self.unknown[rack_id] = self.unknown.get(rack_id, 0) + 1
        return Ingest(rack_id, False, False, why)

    def snapshot(self, clear_command_s: float | None, *, full: bool = True) -> Snapshot:
        """The inputs for a cycle: every latest one (``full``, which commits them), else the committed.

        It names the racks whose input may differ from the previous snapshot's (``changed``): for an
        urgent one those committed since, for a full one those stored since the previous full one.
        """
        changed: frozenset[str] | None
        if full:
            stored = self._stored_since_full
            changed = None if stored is None else frozenset(stored)
            self._stored_since_full = set()
            self._committed = dict(self._racks)
        else:
            changed = frozenset(self._committed_since_snapshot)
        self._committed_since_snapshot.clear()
        return Snapshot(
            changed=changed,
            racks=dict(self._committed),
            unknown_racks=tuple(sorted(self.unknown)),
            clear_command_s=clear_command_s,
        )
