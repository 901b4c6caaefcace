"""CAN recovery benchmark: how soon a controller's frames come back after the CAN bridge returns.

A real controller process (``bmslink controller``, single mode, 1 s period, remote interface) runs
against a real Mosquitto and the python-can-remote bridge. Each trial kills the bridge (SIGKILL),
leaves it away for ``--down`` seconds, starts it again on the same port and measures

  recovery = first 0x351 seen by an independent listener - the moment the bridge listens again.

The listener connects right after the bridge is back; a resumed set sent before it connected would be
missed and the next heartbeat counted instead, so the figure errs on the long side. Also reported:
the controller's log lines per trial (the issue saw ~3,800 tracebacks a second) and whether any
"Exception in callback" traceback appeared.

Run: ``.venv/bin/python bench/can_recovery.py [--trials 10] [--down 2.0]``
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.broker import MosquittoBroker  # noqa: E402 - the same fixtures the tests use
from tests.fixtures.can_bridge import CanBridge  # noqa: E402
from tests.fixtures.procs import ProcessGroup, bmslink_cli  # noqa: E402

PERIOD_MS = 1000
TARGET_S = 2.0
WAIT_S = 10.0

CONTROLLER_TOML = """\
site_id = "bench"
node_id = "ctl-bench"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "bench"

[can]
interface = "remote"
channel = "{channel}"
period_ms = {period}

[[roster]]
rack_id = "rack-01"
capacity_ah = 280
"""


class Listener:
    """A remote bus on the bridge: the time of every 0x351 it hears."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="remote", channel=channel)
        self.times: list[float] = []
        self._lock = threading.Lock()
        self.notifier = can.Notifier(self.bus, [self._rx], timeout=0.05)

    def _rx(self, msg: can.Message) -> None:
        if msg.arbitration_id == 0x351:
            with self._lock:
                self.times.append(time.monotonic())

    def first_after(self, t: float) -> float | None:
        with self._lock:
            return next((x for x in self.times if x >= t), None)

    def close(self) -> None:
        self.notifier.stop()
        try:
            self.bus.shutdown()
        except OSError:
            can.BusABC.shutdown(self.bus)  # the bridge went first: nothing left to close


def wait_first(listener: Listener, since: float, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        t = listener.first_after(since)
        if t is not None:
            return t
        time.sleep(0.005)
    return None


def kill(bridge: CanBridge) -> None:
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGKILL)
    bridge.proc.wait(5)
    bridge.proc = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--down", type=float, default=2.0, help="seconds the bridge stays away per trial")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-can-recovery-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "mosquitto")
        bridge = CanBridge(work / "can")
        procs = ProcessGroup(work / "procs")
        broker.start()
        bridge.start()
        listener: Listener | None = None
        try:
            cfg = work / "controller.toml"
            cfg.write_text(
                CONTROLLER_TOML.format(broker=broker.port, channel=bridge.channel, period=PERIOD_MS)
            )
            procs.start("controller", bmslink_cli("controller", "--config", str(cfg)))
            listener = Listener(bridge.channel)
            if wait_first(listener, 0.0, WAIT_S) is None:
                print("the controller never sent a 0x351", file=sys.stderr)
                print(procs.describe(), file=sys.stderr)
                return 1
            listener.close()
            listener = None
            recoveries: list[float] = []
            lines_before = procs.output("controller").count("\n")
            for i in range(args.trials):
                kill(bridge)
                time.sleep(args.down)
                bridge.start()
                back = time.monotonic()
                listener = Listener(bridge.channel)
                first = wait_first(listener, back, WAIT_S)
                listener.close()
                listener = None
                if first is None:
                    print(f"trial {i + 1}: no 0x351 within {WAIT_S:g} s of the bridge's return")
                    continue
                recoveries.append(first - back)
                print(f"trial {i + 1:2d}: recovery {1000 * (first - back):6.0f} ms")
            output = procs.output("controller")
            lines = output.count("\n") - lines_before
            tracebacks = output.count("Exception in callback")
        finally:
            if listener is not None:
                listener.close()
            procs.stop_all()
            bridge.stop()
            broker.close()
    print(f"\n{len(recoveries)}/{args.trials} trials recovered (bridge away {args.down:g} s each, "
          f"period {PERIOD_MS} ms)")
    if recoveries:
        p50 = 1000 * statistics.median(recoveries)
        print(f"recovery (bridge back -> first 0x351 seen): p50 {p50:.0f} ms, "
              f"p90 {1000 * pct(recoveries, 0.9):.0f} ms, max {1000 * max(recoveries):.0f} ms "
              f"(target {TARGET_S:g} s)")
    print(f"controller log lines during the trials: {lines} ({lines / max(1, args.trials):.1f} per trial); "
          f"'Exception in callback' tracebacks: {tracebacks}")
    ok = len(recoveries) == args.trials and max(recoveries, default=1e9) <= TARGET_S and tracebacks == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
