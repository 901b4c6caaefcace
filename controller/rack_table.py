"""The controller's table of racks, fed by MQTT telemetry; hands the new inputs to the core each cycle.

The hot path (one message) is: decode + validate, store, and a cheap check of
whether this message lowers a limit or raises an alarm, in which case the
caller runs a control cycle at once instead of waiting for the heartbeat.

Each rack's latest input is kept until the core takes it (:meth:`RackTable.take`). A full cycle
takes every one not taken yet; an urgent cycle only those of urgent messages, so that it recomputes
that rack and not every rack whose routine payload arrived since the last full cycle (those wait for
it, a control tick away, as they would without the urgent one).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from controller.core.snapshot import RackInput
from shared.codec import DecodeError
from shared.logthrottle import ThrottledLog
from shared.models import RackCommState
from shared.records import TelemetryDecoder, TelemetryRecord
from shared.topics import Topics

log = logging.getLogger(__name__)

MAX_UNKNOWN_TRACKED = 64  # a spoofing publisher must not grow our memory without bound
# Within one stream a reading may run ahead of the last accepted one by at most this many sequence
# numbers, plus MAX_SEQ_RATE_HZ for every second since that one was received: an agent publishes at
# most every 10 ms (poll_interval_ms >= 10), so anything further is a lie that would otherwise make
# every genuine reading after it look old.
SEQ_SLACK = 1000
MAX_SEQ_RATE_HZ = 200.0


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
    def __init__(
        self,
        topics: Topics,
        roster: tuple[str, ...],
        site_id: str,
        max_payload_bytes: int,
        *,
        max_clock_ahead_s: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.site_id = site_id
        self.decoder = TelemetryDecoder(max_payload_bytes)
        self.max_clock_ahead_s = max_clock_ahead_s
        self._wall = wall_clock
        self._racks: dict[str, RackInput] = {}  # the latest input of every roster rack
        self._untaken: dict[str, RackInput] = {}  # latest inputs the core has not taken yet
        self._urgent: set[str] = set()  # ids in _untaken stored by an urgent message
        self._roster: tuple[str, ...] = ()
        self.unknown: dict[str, int] = {}
        self.counters: Counter[str] = Counter()
        self._log = ThrottledLog(log)
        self.set_roster(roster)

    def set_roster(self, roster: tuple[str, ...]) -> None:
        """Adopt a new roster (SIGHUP reload): keeps what is known of racks that stay."""
        self._roster = roster
        self._racks = {rid: self._racks.get(rid, RackInput(rid)) for rid in roster}
        self._untaken = dict(self._racks)  # the core is given every rack again
        self._urgent.clear()
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
            self._log.warning(("rejected", rack_id, exc.reason), "rack %s: %s", rack_id, exc)
            return self._invalid(current, now_s, str(exc))
        if telemetry.rack_id != rack_id or telemetry.site_id != self.site_id:
            # A payload claiming another identity than its topic is spoofed or misconfigured: never counted.
            self.counters["identity_mismatch"] += 1
            self._log.warning(("identity", rack_id), "rack %s: payload claims site %s rack %s; ignored",
                              rack_id, telemetry.site_id, telemetry.rack_id)
            return self._invalid(
                current, now_s, f"payload claims rack {telemetry.rack_id} of site {telemetry.site_id}"
            )
        ahead_s = telemetry.timestamp_s - self._wall()
        if ahead_s > self.max_clock_ahead_s:
            # Refused, not stored: a far-future reading must not stand in for the rack's next ones.
            self.counters["future_timestamp"] += 1
            self._log.warning(("future", rack_id), "rack %s: reading stamped %.1f s ahead of this clock "
                              "(tolerance %.1f s); refused", rack_id, ahead_s, self.max_clock_ahead_s)
            return Ingest(rack_id, False, False, "timestamp in the future")
        old = current.telemetry
        refusal = self._out_of_sequence(current, telemetry, now_s)
        if refusal is not None:
            return Ingest(rack_id, False, False, refusal)
        self.counters["accepted"] += 1
        urgent = _urgent_change(old, telemetry) or current.invalid_at_s is not None
        latest = RackInput(rack_id, telemetry, now_s)
        if urgent:
            self._commit(latest)
        else:
            self._store(latest)
        return Ingest(rack_id, True, urgent)

    def _out_of_sequence(self, current: RackInput, telemetry: TelemetryRecord, now_s: float) -> str | None:
        """Why ``telemetry`` is not the next reading of its rack's stream, or None if it is.

        Order is judged by ``seq`` within one agent run (``stream_id``) only: a new stream is a
        restarted agent, heard at once whatever its seq or clock; so no reading can make the genuine
        ones after it look old for longer than the bounded jump below allows.
        """
        old = current.telemetry
        if old is None or telemetry.stream_id != old.stream_id:
            if old is not None:
                self.counters["new_stream"] += 1
                self._log.info(("stream", current.rack_id), "rack %s: new agent stream %s (was %s)",
                               current.rack_id, telemetry.stream_id, old.stream_id)
            return None
        if telemetry.seq <= old.seq:
            # A duplicate or reordered message of the same run.
            self.counters["out_of_order"] += 1
            return "out of order"
        since_s = max(0.0, now_s - (now_s if current.received_s is None else current.received_s))
        if telemetry.seq - old.seq > SEQ_SLACK + MAX_SEQ_RATE_HZ * since_s:
            self.counters["seq_jump"] += 1
            self._log.warning(("seq_jump", current.rack_id), "rack %s: seq jumps from %d to %d in %.1f s; "
                              "refused", current.rack_id, old.seq, telemetry.seq, since_s)
            return "sequence jump"
        return None

    def _invalid(self, current: RackInput, now_s: float, reason: str) -> Ingest:
        """An unusable payload: the rack's last good reading stays, marked invalid from now (urgent)."""
        self._commit(RackInput(
            current.rack_id, current.telemetry, current.received_s, invalid_at_s=now_s, invalid_reason=reason
        ))
        return Ingest(current.rack_id, False, True, reason)

    def _store(self, rack_input: RackInput) -> None:
        self._racks[rack_input.rack_id] = rack_input
        self._untaken[rack_input.rack_id] = rack_input

    def _commit(self, rack_input: RackInput) -> None:
        self._store(rack_input)
        self._urgent.add(rack_input.rack_id)

    def _unknown(self, rack_id: str, why: str) -> Ingest:
        self.counters["unknown_rack"] += 1
        if rack_id not in self.unknown:
            if len(self.unknown) >= MAX_UNKNOWN_TRACKED:
                return Ingest(rack_id, False, False, why)
            self._log.warning(("unknown",), "telemetry from rack %s which is %s: reported, never counted",
                              rack_id, why)
        self.unknown[rack_id] = self.unknown.get(rack_id, 0) + 1
        return Ingest(rack_id, False, False, why)

    def take(self, *, full: bool) -> list[RackInput]:
        """The inputs the core has not taken yet: all of them (``full``), else those of urgent messages.

        After a roster change every roster rack's input is given again.
        """
        if full:
            taken = list(self._untaken.values())
            self._untaken.clear()
        else:
            taken = [self._untaken.pop(rack_id) for rack_id in self._urgent if rack_id in self._untaken]
        self._urgent.clear()
        return taken

    def unknown_ids(self) -> tuple[str, ...]:
        """Ids heard that are not on the roster (at most ``MAX_UNKNOWN_TRACKED``), sorted."""
        return tuple(sorted(self.unknown))
