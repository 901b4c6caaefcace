"""The rack table: roster only, typed rejections counted, and the 'act now' signal for decreases."""

from __future__ import annotations

from typing import Any

import msgpack

from controller.core.snapshot import RackInput
from controller.rack_table import RackTable
from shared.codec import encode
from shared.models import ContactorState, ProtectionFlags, RackCommState
from shared.topics import Topics
from tests.contract.samples import measurements, telemetry

TOPICS = Topics("bmslink", "site-a")


def _table() -> RackTable:
    return RackTable(TOPICS, ("rack-01", "rack-02"), "site-a", 64 * 1024)


def _send(table: RackTable, rack: str = "rack-01", now: float = 1.0, **kw: object):  # type: ignore[no-untyped-def]
    t = telemetry(rack_id=rack, **kw)
    return table.ingest(TOPICS.rack_telemetry(rack), encode(t), now)


def _latest(table: RackTable) -> dict[str, RackInput]:
    return {rack_id: rack_input for rack_id in table.roster if (rack_input := table.latest(rack_id))}


def test_roster_rack_is_accepted_and_stored() -> None:
    table = _table()
    result = _send(table)
    assert result.accepted and not result.urgent
    racks = _latest(table)
    assert set(racks) == {"rack-01", "rack-02"}
    assert racks["rack-01"].telemetry is not None
    assert racks["rack-01"].received_s == 1.0
    assert racks["rack-02"].telemetry is None


def test_unknown_rack_is_reported_and_never_counted() -> None:
    table = _table()
    result = _send(table, rack="rack-99")
    assert not result.accepted
    assert table.unknown_ids() == ("rack-99",)
    assert "rack-99" not in _latest(table)
    assert table.counters["unknown_rack"] == 1


def test_payload_claiming_another_rack_is_treated_as_invalid() -> None:
    table = _table()
    _send(table, seq=1)
    t = telemetry(rack_id="rack-02", seq=2)
    result = table.ingest(TOPICS.rack_telemetry("rack-01"), encode(t), 2.0)
    assert not result.accepted and result.urgent
    racks = _latest(table)
    assert racks["rack-01"].invalid_at_s == 2.0
    assert racks["rack-01"].telemetry is not None  # the last good one is kept, marked invalid
    assert table.counters["identity_mismatch"] == 1


def test_garbage_marks_the_rack_invalid_and_counts_the_reason() -> None:
    table = _table()
    result = table.ingest(TOPICS.rack_telemetry("rack-01"), b"\x00\x01garbage", 3.0)
    assert not result.accepted and result.urgent
    assert _latest(table)["rack-01"].invalid_at_s == 3.0
    assert table.counters["rejected_malformed"] == 1
    # A good message afterwards clears the invalid mark.
    assert _send(table, now=4.0).accepted
    assert _latest(table)["rack-01"].invalid_at_s is None


def test_out_of_range_payload_counted_as_invalid() -> None:
    raw = msgpack.unpackb(encode(telemetry()), raw=False)
    raw["measurements"]["temperature_max_c"] = 500.0
    table = _table()
    table.ingest(TOPICS.rack_telemetry("rack-01"), msgpack.packb(raw), 1.0)
    assert table.counters["rejected_invalid"] == 1


def test_duplicate_is_ignored() -> None:
    table = _table()
    assert _send(table, seq=5).accepted
    assert not _send(table, seq=5, now=2.0).accepted
    assert table.counters["out_of_order"] == 1


def test_decreases_and_new_alarms_are_urgent_increases_are_not() -> None:
    table = _table()
    _send(table, seq=1)
    lower = measurements(charge_current_limit_a=100.0)
    assert _send(table, seq=2, timestamp_s=1_790_000_001.0, measurements=lower).urgent
    higher = measurements(charge_current_limit_a=120.0)
    assert not _send(table, seq=3, timestamp_s=1_790_000_002.0, measurements=higher).urgent
    alarm = measurements(charge_current_limit_a=120.0, alarms=ProtectionFlags(charge_over_temperature=True))
    assert _send(table, seq=4, timestamp_s=1_790_000_003.0, measurements=alarm).urgent
    opened = measurements(charge_current_limit_a=120.0, contactor=ContactorState.OPEN)
    assert _send(table, seq=5, timestamp_s=1_790_000_004.0, measurements=opened).urgent
    lost = measurements(charge_current_limit_a=0.0, discharge_current_limit_a=0.0)
    assert _send(table, seq=6, timestamp_s=1_790_000_005.0, measurements=lost,
                 comm_state=RackCommState.COMM_LOST).urgent


def test_reload_keeps_known_racks_and_adds_new_ones() -> None:
    table = _table()
    _send(table)
    _send(table, rack="rack-03")
    table.set_roster(("rack-01", "rack-03"))
    racks = {r.rack_id: r for r in table.take(full=True)}  # every roster rack is given again
    assert set(racks) == {"rack-01", "rack-03"}
    assert racks["rack-01"].telemetry is not None
    assert table.unknown_ids() == ()


def test_an_urgent_cycle_takes_urgent_inputs_and_routine_ones_wait_for_a_full_cycle() -> None:
    table = _table()
    first = table.take(full=True)  # at start: every roster rack, none heard yet
    assert sorted(r.rack_id for r in first) == ["rack-01", "rack-02"]
    _send(table, seq=1, now=1.0, measurements=measurements(charge_current_limit_a=100.0))
    _send(table, rack="rack-02", seq=1, now=1.0, measurements=measurements(charge_current_limit_a=100.0))
    assert [r.received_s for r in table.take(full=True)] == [1.0, 1.0]
    routine = _send(table, seq=2, now=1.5, measurements=measurements(charge_current_limit_a=100.0))
    assert not routine.urgent
    half = measurements(charge_current_limit_a=50.0)
    lowered = _send(table, rack="rack-02", seq=2, now=1.6, measurements=half)
    assert lowered.urgent
    urgent = table.take(full=False)
    assert [(r.rack_id, r.received_s) for r in urgent] == [("rack-02", 1.6)]  # the lowering, at once
    assert table.take(full=False) == []  # taken once
    full = table.take(full=True)
    assert [(r.rack_id, r.received_s) for r in full] == [("rack-01", 1.5)]  # the routine one waited
    assert table.take(full=True) == []
    _send(table, rack="rack-02", seq=3, now=1.7, measurements=half)
    assert [r.received_s for r in table.take(full=True)] == [1.7]
    table.set_roster(("rack-01", "rack-02"))
    assert sorted(r.rack_id for r in table.take(full=False)) == []
    assert sorted(r.rack_id for r in table.take(full=True)) == ["rack-01", "rack-02"]  # a reload


# -- ordering that cannot be poisoned (issue 10, item 2) -------------------------------------------

WALL_NOW_S = 1_790_000_010.0
GENUINE = "0123456789abcdef"
OTHER = "fedcba9876543210"


def _clocked_table() -> RackTable:
    return RackTable(TOPICS, ("rack-01", "rack-02"), "site-a", 64 * 1024, max_clock_ahead_s=5.0,
                     wall_clock=lambda: WALL_NOW_S)


def test_a_far_future_reading_is_refused_and_never_locks_the_rack_out() -> None:
    """The payload of the report: seq 2**63-1 stamped 4e9, then the genuine agent carries on."""
    table = _clocked_table()
    genuine: dict[str, Any] = {"stream_id": GENUINE, "timestamp_s": WALL_NOW_S}
    assert _send(table, seq=10, **genuine).accepted
    for stream in (GENUINE, OTHER):
        poison = _send(table, seq=2**63 - 1, timestamp_s=4e9, stream_id=stream,
                       measurements=measurements(charge_current_limit_a=1000.0), now=1.5)
        assert not poison.accepted and not poison.urgent
    assert table.counters["future_timestamp"] == 2
    for k, seq in enumerate(range(11, 31)):
        assert _send(table, seq=seq, now=2.0 + k, **genuine).accepted
    latest = table.latest("rack-01")
    assert latest is not None and latest.telemetry is not None and latest.telemetry.seq == 30
    assert latest.invalid_at_s is None  # the refusal did not even mark the rack invalid


def test_a_reading_within_the_clock_tolerance_is_heard() -> None:
    table = _clocked_table()
    assert _send(table, seq=1, stream_id=GENUINE, timestamp_s=WALL_NOW_S + 4.9).accepted
    assert not _send(table, seq=2, stream_id=GENUINE, timestamp_s=WALL_NOW_S + 5.1).accepted


def test_a_seq_jump_beyond_the_publish_rate_is_refused_within_a_stream() -> None:
    """Knowing the stream id, a forger still cannot push the stream's seq out of reach."""
    table = _clocked_table()
    assert _send(table, seq=100, stream_id=GENUINE, timestamp_s=WALL_NOW_S, now=10.0).accepted
    assert not _send(table, seq=2**62, stream_id=GENUINE, timestamp_s=WALL_NOW_S, now=10.1).accepted
    assert table.counters["seq_jump"] == 1
    assert _send(table, seq=101, stream_id=GENUINE, timestamp_s=WALL_NOW_S, now=10.6).accepted
    # After a long silence a larger jump is plausible (the agent kept publishing while we were away).
    assert _send(table, seq=101 + 50_000, stream_id=GENUINE, timestamp_s=WALL_NOW_S, now=300.0).accepted


def test_a_restarted_agent_is_heard_at_once_whatever_its_seq_and_clock() -> None:
    table = _clocked_table()
    assert _send(table, seq=5000, stream_id=GENUINE, timestamp_s=WALL_NOW_S).accepted
    # Restarted, seq from 1 again, and its clock was corrected 1 h back.
    assert _send(table, seq=1, stream_id=OTHER, timestamp_s=WALL_NOW_S - 3600, now=2.0).accepted
    assert table.counters["new_stream"] == 1
    assert _send(table, seq=2, stream_id=OTHER, timestamp_s=WALL_NOW_S - 3599.5, now=2.5).accepted
    assert not _send(table, seq=2, stream_id=OTHER, timestamp_s=WALL_NOW_S - 3599, now=3.0).accepted


def test_a_clock_corrected_backwards_within_a_run_does_not_stop_the_stream() -> None:
    table = _clocked_table()
    assert _send(table, seq=1, stream_id=GENUINE, timestamp_s=WALL_NOW_S).accepted
    assert _send(table, seq=2, stream_id=GENUINE, timestamp_s=WALL_NOW_S - 600.0, now=1.5).accepted


def test_rejections_log_a_sample_and_count_everything(caplog) -> None:  # type: ignore[no-untyped-def]
    table = _table()
    with caplog.at_level("WARNING", logger="controller.rack_table"):
        for k in range(500):
            table.ingest(TOPICS.rack_telemetry("rack-01"), b"\xc1garbage", 1.0 + k * 0.001)
    assert table.counters["rejected_malformed"] == 500
    assert len(caplog.records) <= 5
