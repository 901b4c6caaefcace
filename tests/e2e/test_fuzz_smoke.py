"""The payload fuzz of ``bench/fuzz_payloads.py`` at a small size, against the shipped processes.

Same code, same rig (real Mosquitto, CAN bridge, ``bmslink controller``, genuine racks at 10 Hz):
2,000 payloads from a fixed seed. It fails if the controller dies, if any 0x351 grants more than
the genuine racks allow (a wrongly-typed limit such as the string "9999" taken as a number shows
up here: the fuzz sends such limits, never honest-typed ones above the genuine), if the inverter
hears no limits for longer than two periods plus slack, if nothing was refused, if the log grows
by more than a few dozen bytes per refused payload, or if the genuine racks are not granted in
full again once the fuzz stops (a payload locked a rack out).

The first test runs the controller without failover, so that the leader record is not read and the
verdict does not hang on the machine's scheduling (see the second). The second runs it with failover,
as a single node, then freezes it for a second, as a loaded gateway's loop can be: it must take over
again and grant. A leader record the contract accepts (epoch up to 2**63 - 1) that says more than the
32-bit heartbeat epoch can carry made that takeover fail its every cycle: silence. The role
machine now bounds epochs by what the heartbeat carries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz_payloads import FuzzResult, run_fuzz

SEED = 20261202
COUNT = 2000
LEADER_COUNT = 1000
RATE_PER_S = 800.0
PERIOD_MS = 200
# Rate-limited warnings cost a few lines per kind and 10 s window; one unthrottled line per refused
# payload costs ~150 bytes. This bound lies between the two.
LOG_BYTES_PER_REJECTED_MAX = 40.0


def _context(r: FuzzResult, tmp_path: Path) -> str:
    return (f"seed {r.seed}: counters {r.counters_after}, log lines {r.log_lines_by_kind}; "
            f"logs under {tmp_path}")


def _assert_safe(r: FuzzResult, count: int, context: str) -> None:
    assert r.count == count, context
    assert r.controller_alive, f"controller exited with status {r.controller_exit}; {context}"
    assert r.worst_excess_a <= 0.0, (
        f"0x351 above what the genuine racks allow (CCL {r.allowed_ccl_a} / DCL {r.allowed_dcl_a} A): "
        f"{r.excess_frames}; {context}")
    assert r.max_gap_s <= r.silence_bound_s, f"inverter silent for {r.max_gap_s:.3f} s; {context}"
    assert r.recovered, f"the genuine racks were not granted in full again after the fuzz; {context}"


@pytest.mark.slow
def test_fuzzed_payloads_never_crash_raise_or_silence_the_controller(tmp_path: Path) -> None:
    r = run_fuzz(tmp_path, seed=SEED, count=COUNT, rate=RATE_PER_S, period_ms=PERIOD_MS, failover=False)
    context = _context(r, tmp_path)
    _assert_safe(r, COUNT, context)
    assert r.tracebacks == 0, context
    assert r.rejected_delta >= COUNT // 2, context
    assert r.log_bytes_per_rejected <= LOG_BYTES_PER_REJECTED_MAX, context


@pytest.mark.slow
def test_fuzzed_leader_records_leave_a_takeover_working(tmp_path: Path) -> None:
    r = run_fuzz(tmp_path, seed=SEED, count=LEADER_COUNT, rate=RATE_PER_S, period_ms=PERIOD_MS, failover=True)
    context = _context(r, tmp_path)
    _assert_safe(r, LEADER_COUNT, context)
    assert r.stall_resumed, f"no steady full grant after a 1 s freeze (role {r.stall_role}); {context}"
