"""Soak: 200 racks × 10 Hz of genuine telemetry through a real broker to a real controller, for 10 minutes.

The rig is ``bench/chaos_rig.py``'s: Mosquitto on a free 127.0.0.1 port, the python-can-remote CAN
bridge, the real ``bmslink controller`` (roster of ``--racks``, Pylon, ``can.period_ms`` 1000 as
shipped, Prometheus endpoint on, stderr to a file) and ``--publishers`` paho processes publishing
valid ``RackTelemetry`` for their share of the racks, each rack with its own ``stream_id``, evenly
spread on absolute times. The racks' limits differ (CCL 10.0–20.0 A, DCL 12.0–22.0 A), so the bank
the inverter may be granted is n × the weakest: 2000 A / 2400 A at 200 racks.

Printed every ``--sample-s`` (a minute by default), and as JSON to ``--json`` at the end: the
controller's RSS and CPU share (of one core), the 0x351 frames per second the CAN witness saw, the
lowest and highest CCL/DCL among them against the expected bank, frames above it (must be 0),
the longest gap between limits frames, payloads accepted and refused per second (its metrics), and
whether it is still running. At the end: RSS growth per minute (least-squares slope, over every
sample and over those after the first, once the thermal windows are full), 0x351 sets in the
soak against duration / period (the heartbeat must not drift), log bytes written.

Run: ``.venv/bin/python bench/soak.py [--duration-s 600] [--racks 200] [--hz 10]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos_rig import (  # noqa: E402  (after the path set-up above)
    FRAME_RESOLUTION_A,
    ChaosRig,
    ControllerSettings,
    GenuineRack,
    count_tracebacks,
    cpu_seconds,
    linear_slope,
    max_gap_s,
    rejected_total,
    rss_bytes,
    stream_id_for,
    telemetry_counters,
)

MIB = 1024 * 1024
CCL_BASE_A = 10.0
DCL_BASE_A = 12.0
STEP_A = 2.5
STEPS = 5


@dataclass
class Sample:
    minute: float  # end of the window, minutes since the soak started
    rss_mib: float
    cpu_pct: float  # of one core, over the window
    frames_per_s: float
    ccl_min_a: float
    ccl_max_a: float
    dcl_min_a: float
    dcl_max_a: float
    frames_above: int
    frames_below: int
    max_gap_s: float
    accepted_per_s: float
    rejected_per_s: float
    alive: bool


@dataclass
class SoakResult:
    racks: int
    hz: float
    publishers: int
    duration_s: float
    period_ms: int
    expected_ccl_a: float
    expected_dcl_a: float
    samples: list[Sample] = field(default_factory=list)
    rss_growth_mib_per_min: float = 0.0
    rss_growth_after_first_mib_per_min: float = 0.0
    limits_frames: int = 0
    frames_expected_by_period: int = 0
    frames_above_total: int = 0
    frames_below_total: int = 0
    max_gap_s: float = 0.0
    controller_alive: bool = True
    controller_exit: int | None = None
    tracebacks: int = 0
    log_bytes: int = 0
    genuine_sent: int = 0
    genuine_late: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    warmup_s: float = 0.0


def soak_racks(n: int, seed: int) -> list[GenuineRack]:
    racks = []
    for i in range(n):
        rid = f"rack-{i + 1:03d}"
        step = (i % STEPS) * STEP_A
        racks.append(GenuineRack(rid, CCL_BASE_A + step, DCL_BASE_A + step, stream_id_for(seed, rid)))
    return racks


def run_soak(work: Path, *, duration_s: float, racks: int, hz: float, publishers: int, sample_s: float,
             seed: int, period_ms: int = 1000) -> SoakResult:
    genuine = soak_racks(racks, seed)
    settings = ControllerSettings(period_ms=period_ms, hold_s=2.0, ramp_s=2.0)
    rig = ChaosRig(work, genuine, settings, publisher_hz=hz, publishers=publishers)
    exp_ccl, exp_dcl = 0.0, 0.0
    result = SoakResult(racks, hz, publishers, duration_s, period_ms, 0.0, 0.0)
    try:
        t_boot = time.monotonic()
        rig.start()
        assert rig.listener is not None
        exp_ccl, exp_dcl = rig.allowed(charge=True), rig.allowed(charge=False)
        result.expected_ccl_a, result.expected_dcl_a = exp_ccl, exp_dcl
        rig.wait_granted(120.0)
        result.warmup_s = time.monotonic() - t_boot
        pid = rig.controller_pid
        log0 = rig.controller_stderr.stat().st_size
        print(f"soak: {racks} racks × {hz:g} Hz ({racks * hz:.0f} msg/s) from {publishers} publisher(s), "
              f"{duration_s:.0f} s; expected CCL {exp_ccl:.1f} A, DCL {exp_dcl:.1f} A "
              f"(granted {result.warmup_s:.1f} s after start)", flush=True)
        header = (f"{'min':>5} {'RSS MiB':>8} {'CPU %':>6} {'0x351/s':>8} {'CCL min..max':>15} "
                  f"{'DCL min..max':>15} {'above':>6} {'below':>6} {'gap s':>6} {'acc/s':>7} "
                  f"{'rej/s':>6} alive")
        print(header, flush=True)
        t0 = time.monotonic()
        cpu_prev, t_prev = cpu_seconds(pid), t0
        counters_prev = telemetry_counters(rig.metrics())
        rss_points: list[tuple[float, float]] = [(0.0, rss_bytes(pid) / MIB)]
        while True:
            now = time.monotonic()
            if now - t0 >= duration_s - 0.5:
                break
            target = min(t0 + duration_s, t_prev + sample_s)
            while time.monotonic() < target and rig.controller_returncode() is None:
                time.sleep(min(1.0, max(0.0, target - time.monotonic())))
            t_now = time.monotonic()
            alive = rig.controller_returncode() is None
            frames = [f for f in rig.listener.since(t_prev) if f.t < t_now]
            counters = telemetry_counters(rig.metrics()) if alive else counters_prev
            window = t_now - t_prev
            cpu_now = cpu_seconds(pid) if alive else cpu_prev
            rss = rss_bytes(pid) / MIB if alive else 0.0
            minute = (t_now - t0) / 60.0
            rss_points.append((minute, rss))
            above = sum(1 for f in frames if f.ccl_a > exp_ccl + FRAME_RESOLUTION_A / 2
                        or f.dcl_a > exp_dcl + FRAME_RESOLUTION_A / 2)
            below = sum(1 for f in frames if f.ccl_a < exp_ccl - FRAME_RESOLUTION_A
                        or f.dcl_a < exp_dcl - FRAME_RESOLUTION_A)
            s = Sample(
                minute=round(minute, 2), rss_mib=round(rss, 2),
                cpu_pct=round((cpu_now - cpu_prev) / window * 100.0, 1),
                frames_per_s=round(len(frames) / window, 3),
                ccl_min_a=min((f.ccl_a for f in frames), default=0.0),
                ccl_max_a=max((f.ccl_a for f in frames), default=0.0),
                dcl_min_a=min((f.dcl_a for f in frames), default=0.0),
                dcl_max_a=max((f.dcl_a for f in frames), default=0.0),
                frames_above=above, frames_below=below,
                max_gap_s=round(max_gap_s(frames, start=t_prev, end=t_now), 3),
                accepted_per_s=round(
                    (counters.get("accepted", 0) - counters_prev.get("accepted", 0)) / window, 1),
                rejected_per_s=round((rejected_total(counters) - rejected_total(counters_prev)) / window, 1),
                alive=alive,
            )
            result.samples.append(s)
            print(f"{s.minute:>5.1f} {s.rss_mib:>8.1f} {s.cpu_pct:>6.1f} {s.frames_per_s:>8.2f} "
                  f"{s.ccl_min_a:>7.1f}..{s.ccl_max_a:<7.1f} {s.dcl_min_a:>7.1f}..{s.dcl_max_a:<7.1f} "
                  f"{s.frames_above:>6} {s.frames_below:>6} {s.max_gap_s:>6.2f} {s.accepted_per_s:>7.0f} "
                  f"{s.rejected_per_s:>6.1f} {'yes' if alive else 'NO'}", flush=True)
            cpu_prev, t_prev, counters_prev = cpu_now, t_now, counters
            if not alive:
                break
        t_end = time.monotonic()
        all_frames = [f for f in rig.listener.since(t0) if f.t < t_end]
        result.limits_frames = len(all_frames)
        result.frames_expected_by_period = int((t_end - t0) * 1000 / period_ms)
        result.frames_above_total = sum(s.frames_above for s in result.samples)
        result.frames_below_total = sum(s.frames_below for s in result.samples)
        result.max_gap_s = round(max_gap_s(all_frames, start=t0, end=t_end), 3)
        xs, ys = [p[0] for p in rss_points], [p[1] for p in rss_points]
        result.rss_growth_mib_per_min = round(linear_slope(xs, ys), 4)
        result.rss_growth_after_first_mib_per_min = round(linear_slope(xs[1:], ys[1:]), 4)
        result.counters = counters_prev
        result.controller_alive = rig.controller_returncode() is None
        result.controller_exit = rig.controller_returncode()
        result.log_bytes = rig.controller_stderr.stat().st_size - log0
    finally:
        rig.stop()
    stats = rig.publisher_stats()
    result.genuine_sent, result.genuine_late = stats["sent"], stats["late"]
    result.tracebacks = count_tracebacks(rig.controller_stderr)
    return result


def print_summary(r: SoakResult) -> None:
    print("-" * 100)
    print(f"RSS growth: {r.rss_growth_mib_per_min:+.3f} MiB/min over every sample, "
          f"{r.rss_growth_after_first_mib_per_min:+.3f} MiB/min after the first minute")
    print(f"0x351 frames: {r.limits_frames} in the soak ({r.frames_expected_by_period} by the "
          f"{r.period_ms} ms period), above expected {r.frames_above_total}, "
          f"below {r.frames_below_total}, longest gap "
          f"{r.max_gap_s:.3f} s")
    print(f"controller: {'alive' if r.controller_alive else f'EXITED with status {r.controller_exit}'}, "
          f"tracebacks in its log {r.tracebacks}, log bytes written in the soak {r.log_bytes}")
    print(f"genuine payloads sent {r.genuine_sent} (late slots skipped {r.genuine_late}); "
          f"controller counters {r.counters}")
    print("-" * 100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--racks", type=int, default=200)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--period-ms", type=int, default=1000, help="the controller's can.period_ms")
    parser.add_argument("--seed", type=int, default=1, help="stream ids of the racks")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "bmslink-soak.json")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bmslink-soak-") as tmp:
        result = run_soak(args.workdir or Path(tmp), duration_s=args.duration_s, racks=args.racks, hz=args.hz,
                          publishers=args.publishers, sample_s=args.sample_s, seed=args.seed,
                          period_ms=args.period_ms)
    print_summary(result)
    args.json.write_text(json.dumps(asdict(result), indent=2))
    print(f"figures written to {args.json}")
    ok = result.controller_alive and result.frames_above_total == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
