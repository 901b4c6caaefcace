"""Rack classification: the state of one roster rack in one cycle, and why.

Precedence when several conditions hold (the first wins, and names the state)::

    stale > invalid > comm_lost > faulted > disconnected > ok

The order follows how much we can trust what we hold. Without current telemetry (``stale``)
nothing else can be judged; a newer payload that failed validation (``invalid``) means the
last good one no longer describes the rack, and so does a unit the agent reports as
``invalid_data`` (the agent refused that unit's newest reading: the BMS is heard, its data is
not believed); a ``comm_lost`` report is a current statement by the agent that the BMS cannot
be heard, so its measurements are old. Only a rack whose telemetry is current, valid and has a
working BMS link (here: *reporting*) can be judged on its content: a rack-level fault
(``faulted``) ranks above an open contactor (``disconnected``) so that the fault stays visible
after the BMS opened its contactor because of it.

Contactor ``unknown`` is treated as **closed**: the rack counts as in parallel, with its limits
in the bank minimum. A BMS that cannot say whether its contactor is closed must not be left
out while current may be flowing into it; leaving it out would raise N×min for the others.

Stale: telemetry is stale when it is *older than* ``stale_after`` (``RosterRack.stale_after_ms``,
else 3 × the rack's own reported ``poll_interval_ms``, bounded to 1–10 s). Two missed polls
are tolerated; the third makes the rack stale. A rack never heard is stale.

The stale threshold itself has no hysteresis band: a rack flapping across it is held out by
the re-admission hold (``admission.py``), which acts as the hysteresis of this threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from controller.core.faults import Direction, Latch, direction_of, latch_label
from controller.core.snapshot import RackInput
from shared.cluster import RackState
from shared.controller_config import RosterRack
from shared.models import ContactorState, LinkStatus, RackCommState
from shared.records import MeasurementsRecord, TelemetryRecord

STALE_AFTER_POLLS = 3
STALE_AFTER_MIN_S = 1.0
STALE_AFTER_MAX_S = 10.0


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class Reading(NamedTuple):
    """What one rack's input says this cycle, before its alarms are considered.

    ``link_state`` is ``stale``, ``invalid`` or ``comm_lost`` when the telemetry cannot be
    judged on its content, None when the rack is *reporting*; ``measurements`` is set only
    then, with ``received_s`` the controller time its payload arrived.
    """

    link_state: RackState | None
    reason: str
    measurements: MeasurementsRecord | None = None
    received_s: float | None = None


def stale_after_s(roster_rack: RosterRack, telemetry: TelemetryRecord) -> float:
    """How old the rack's last valid telemetry may be before the rack is stale, in seconds."""
    if roster_rack.stale_after_ms is not None:
        return roster_rack.stale_after_ms / 1000.0
    own_s = STALE_AFTER_POLLS * telemetry.poll_interval_ms / 1000.0
    return min(STALE_AFTER_MAX_S, max(STALE_AFTER_MIN_S, own_s))


def read_rack(rack_input: RackInput, roster_rack: RosterRack, site_id: str, now_s: float) -> Reading:
    """Judge freshness, validity and the BMS link of one rack (the first three precedence steps)."""
    telemetry, received_s = rack_input.telemetry, rack_input.received_s
    rejected = (
        f"; newest payload rejected: {rack_input.invalid_reason or 'no reason given'}"
        if rack_input.invalid_at_s is not None
        else ""
    )
    if telemetry is None or received_s is None:
        return Reading(RackState.STALE, f"stale: no valid telemetry yet{rejected}")
    limit_s = stale_after_s(roster_rack, telemetry)
    # A receive time ahead of now_s is the shell's bookkeeping, not an old payload: age 0.
    age_s = max(0.0, now_s - received_s)
    if age_s > limit_s:
        return Reading(
            RackState.STALE, f"stale: no valid telemetry for {age_s:.1f} s (limit {limit_s:.1f} s){rejected}"
        )
    if rack_input.invalid_at_s is not None:
        return Reading(RackState.INVALID, f"invalid{rejected}")
    if telemetry.site_id != site_id or telemetry.rack_id != roster_rack.rack_id:
        return Reading(
            RackState.INVALID,
            f"invalid: telemetry is for {telemetry.site_id}/{telemetry.rack_id}, "
            f"not {site_id}/{roster_rack.rack_id}",
        )
    # The agent refused its newest reading of a unit (a contradiction, an impossible value): the rack
    # is heard, its data is not believed. Ahead of comm_lost, as a payload refused here would be.
    refused = [u for u in telemetry.units if u.status is LinkStatus.INVALID_DATA]
    if refused:
        why = "; ".join(f"unit {u.unit}: {u.detail}" if u.detail else f"unit {u.unit}" for u in refused)
        return Reading(RackState.INVALID, f"invalid: the agent refuses the data of {why}")
    if telemetry.comm_state is RackCommState.COMM_LOST or telemetry.measurements is None:
        return Reading(RackState.COMM_LOST, "comm_lost: the agent reports the BMS link lost")
    return Reading(None, "", telemetry.measurements, received_s)


def classify(reading: Reading, latches: Mapping[str, Latch]) -> tuple[RackState, str]:
    """The rack's state and the reason for it, given its latches after this cycle's update."""
    rack_faults = [
        f"{flag} ({latch_label(latch)})"
        for flag, latch in latches.items()
        if direction_of(flag) is Direction.RACK
    ]
    if reading.link_state is not None:
        held = f"; holds {', '.join(rack_faults)}" if rack_faults else ""
        return reading.link_state, reading.reason + held
    m = reading.measurements
    assert m is not None  # a reporting rack always carries measurements (Reading's contract)
    if rack_faults:
        return RackState.FAULTED, "faulted: " + ", ".join(rack_faults)
    if m.contactor is ContactorState.OPEN:
        return RackState.DISCONNECTED, "disconnected: contactor open"
    if m.contactor is ContactorState.UNKNOWN:
        return RackState.OK, "ok (contactor unknown: counted as closed)"
    return RackState.OK, "ok"
