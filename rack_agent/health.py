"""Health bookkeeping of one BMS unit: counters by failure class, the comm-lost rule, invalid readings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rack_agent.errors import PollError
from shared.models import UNIT_DETAIL_MAX_CHARS, LinkCounters, LinkStatus, RackMeasurements, UnitLink


@dataclass(slots=True)
class UnitHealth:
    """After ``comm_lost_after`` consecutive link failures the unit is comm-lost until the device is
    heard again. A reading refused as implausible (``error.link_failure`` false) is heard: it ends a
    streak of link failures, and makes the unit *invalid* (``invalid_reason``) until a good poll.
    """

    unit: str
    comm_lost_after: int
    status: LinkStatus = LinkStatus.OK
    # Failed polls in a row, of any class (what the wire reports).
    consecutive_failures: int = 0
    # Polls in a row that did not get a complete answer: the comm-lost rule counts these only.
    consecutive_link_failures: int = 0
    last_exception_code: int | None = None
    last_good: RackMeasurements | None = None
    counts: Counter[str] = field(default_factory=Counter)
    ever_ok: bool = False
    # Why the last poll failed, as logged ("unit bms: Invalid Data: model 803 ... not on the device").
    last_error: str | None = None
    # Set while the latest poll's answer was refused as implausible: what contradicts what.
    invalid_reason: str | None = None

    @property
    def comm_lost(self) -> bool:
        return not self.ever_ok or self.consecutive_link_failures >= self.comm_lost_after

    def record_success(self, measurements: RackMeasurements) -> bool:
        """Count a good poll; True if this ends a comm-lost period (the unit recovered)."""
        recovered = self.comm_lost
        self.status = LinkStatus.OK
        self.consecutive_failures = 0
        self.consecutive_link_failures = 0
        self.last_good = measurements
        self.ever_ok = True
        self.last_error = None
        self.invalid_reason = None
        self.counts[LinkStatus.OK.value] += 1
        return recovered

    def record_failure(self, error: PollError) -> bool:
        """Count a failed poll; True if this failure is the one that makes the unit comm-lost.

        An implausible reading (``error.link_failure`` false) never is: the device was heard.
        """
        was_lost = self.comm_lost
        self.status = error.status
        self.consecutive_failures += 1
        self.counts[error.status.value] += 1
        self.last_error = str(error)
        if error.code is not None:
            self.last_exception_code = error.code
        if error.link_failure:
            self.consecutive_link_failures += 1
            self.invalid_reason = None
        else:
            self.consecutive_link_failures = 0
            self.invalid_reason = error.detail
        return self.comm_lost and not was_lost

    @property
    def invalid(self) -> bool:
        """Whether the latest poll's answer was refused as implausible (the link works, the data not)."""
        return self.invalid_reason is not None

    def record_skipped_slot(self, n: int = 1) -> None:
        self.counts["skipped_slots"] += n

    def to_wire(self) -> UnitLink:
        return UnitLink(
            unit=self.unit,
            status=self.status,
            consecutive_failures=self.consecutive_failures,
            last_exception_code=self.last_exception_code,
            counters=LinkCounters(**{k: v for k, v in self.counts.items() if k in LinkCounters.model_fields}),
            detail=(self.invalid_reason or "")[:UNIT_DETAIL_MAX_CHARS],
        )
