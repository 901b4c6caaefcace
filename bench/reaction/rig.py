"""The rig every phase runs on: one broker, one CAN bridge, a recorder of 0x351 frames, the broker's drop
counter, and the children a phase starts (publisher, floor, controller) — all on the shared harness
(``bmslink.processes``), all stopped by :meth:`Rig.stop`.

A lowering (:func:`react`): the publisher lowers one rack's CCL to the next value of the ladder and
reports the monotonic time of its write (CLOCK_MONOTONIC is system-wide); the reaction is the time until
the recorder sees the first 0x351 whose CCL is the bank's new limit.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.reaction.wire import (
    BANK_BASE_A,
    ID_LIMITS,
    LADDER_STEPS,
    PREFIX,
    SITE,
    bank_a,
    ladder_value,
    rack_ids,
)
from bmslink.processes import CanBridge, ManagedProcess, MosquittoBroker, ProcessGroup

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
PUBLISHER_READY_TIMEOUT_S = 60.0  # encodes one payload per rack first
REACTION_TIMEOUT_S = 2.0
RESTORE_TIMEOUT_S = 5.0  # an increase goes out with the next heartbeat (period_ms 1000)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def cpu_shares(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Fraction of one core each process used over the next ``seconds`` (all over the same window)."""
    c0, t0 = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {name: (cpu_seconds(pid) - c0[name]) / elapsed for name, pid in pids.items()}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100.0 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Frame:
    received_s: float
    ccl_a: float


class Recorder:
    """Receives the bus through the bridge; keeps every 0x351 with its arrival time and CCL."""

    def __init__(self, channel: str) -> None:
        import can  # noqa: PLC0415

        from controller.frames import FrameDecoder  # noqa: PLC0415
        from shared.controller_config import Dialect  # noqa: PLC0415

        self._bus = can.Bus(interface="remote", channel=channel)
        self._decoder = FrameDecoder(Dialect.PYLON)
        self.frames: list[Frame] = []
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="can-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            msg = self._bus.recv(0.2)
            if msg is None or msg.arbitration_id != ID_LIMITS:
                continue
            now = time.monotonic()
            ccl = self._decoder.decode(ID_LIMITS, msg.data)["ChargeCurrentLimit"]
            with self._cond:
                self.frames.append(Frame(now, ccl))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.frames)

    def wait_for(self, ccl_a: float, since: int, timeout_s: float) -> Frame | None:
        """The first 0x351 at index ≥ ``since`` carrying this CCL (to 0.05 A)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for f in self.frames[since:]:
                    if abs(f.ccl_a - ccl_a) < 0.05:
                        return f
                since = len(self.frames)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self._bus.shutdown()


class BrokerDrops:
    """Counts messages the broker dropped ($SYS, published every second)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self.dropped = 0
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{os.getpid()}")
        self._client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/publish/messages/dropped")
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=10)
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError):
            self.dropped = int(msg.payload)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Rig:
    """Broker, CAN bridge, recorder and drop counter, plus the children a phase starts; stops all of it.

    The broker is configured as ``deploy/mosquitto/bmslink.conf`` where it matters here (TCP_NODELAY,
    default queues), on loopback, anonymous, without persistence, with $SYS every second for the drop
    counter. ``controller_gc`` ("A,B,C") runs the controller with ``gc.set_threshold(A, B, C)`` (a what-if).
    """

    def __init__(self, work: Path, *, controller_gc: str | None = None) -> None:
        self.work = work
        self.controller_gc = controller_gc
        self.procs = ProcessGroup(work / "procs")
        self.broker = MosquittoBroker(work / "broker", extra_config=["sys_interval 1"])
        self.bridge = CanBridge(work / "can")
        self._recorder: Recorder | None = None
        self._drops: BrokerDrops | None = None

    @property
    def recorder(self) -> Recorder:
        assert self._recorder is not None, "Rig.start() first"
        return self._recorder

    @property
    def drops(self) -> BrokerDrops:
        assert self._drops is not None, "Rig.start() first"
        return self._drops

    def start(self) -> None:
        self.broker.start()
        self.bridge.start()
        self._recorder = Recorder(self.bridge.channel)
        self._drops = BrokerDrops(self.broker.port)

    def child(self, name: str, argv: list[str], *, talk: bool = True) -> ManagedProcess:
        return self.procs.start(name, argv, cwd=ROOT, talk=talk)

    def stop_child(self, child: ManagedProcess) -> None:
        self.procs.stop(child.name)

    def pids(self, system: ManagedProcess, pub: ManagedProcess) -> dict[str, int]:
        """The processes whose CPU a phase reports: the system under test and the rest of the rig."""
        broker, bridge = self.broker.pid, self.bridge.pid
        assert broker is not None and bridge is not None
        return {"system": system.pid, "broker": broker, "can bridge": bridge, "publisher": pub.pid,
                "bench (recorder)": os.getpid()}

    def stop(self) -> None:
        if self._drops is not None:
            self._drops.close()
        if self._recorder is not None:
            self._recorder.close()
        self.procs.stop_all()
        self.bridge.stop()
        self.broker.close()


def _peer(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.reaction.peers", role, *args]


def start_publisher(rig: Rig, n: int, rate: float) -> ManagedProcess:
    pub = rig.child(f"publisher-{n}", _peer("publisher", "--port", str(rig.broker.port), "--racks", str(n),
                                            "--rate", str(rate), "--base", repr(ladder_value(n, 0))))
    pub.lines.expect("ready", PUBLISHER_READY_TIMEOUT_S)
    return pub


def start_floor(rig: Rig, n: int, role: str = "floor") -> ManagedProcess:
    """A floor subscriber (``role``: ``floor`` on gmqtt, ``raw-floor`` on a raw socket)."""
    floor = rig.child(f"{role}-{n}", _peer(role, "--port", str(rig.broker.port), "--racks", str(n),
                                           "--base", repr(ladder_value(n, 0)), "--can", rig.bridge.channel))
    floor.lines.expect("ready", READY_TIMEOUT_S)
    return floor


def controller_toml(mqtt_port: int, can_channel: str, n: int) -> str:
    """The controller's bench config: no re-admission hold or ramp, a fast ramp-up, 1 s heartbeat;
    thermal derate and cell taper at their defaults (they run, nothing derates)."""
    roster = "".join(f'[[roster]]\nrack_id = "{rid}"\ncapacity_ah = 280\n\n' for rid in rack_ids(n))
    return f"""site_id = "{SITE}"
node_id = "bench"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
topic_prefix = "{PREFIX}"

[can]
interface = "remote"
channel = "{can_channel}"
dialect = "pylon"
period_ms = 1000

[aggregation]
min_racks = 1
readmit_hold_s = 0
readmit_ramp_s = 0
ramp_up_a_per_s = 1000000
max_charge_current_a = 3276

{roster}"""


def start_controller(rig: Rig, n: int) -> ManagedProcess:
    """``bmslink controller`` as shipped, for a roster of ``n``; returns once it grants the base limit."""
    path = rig.work / f"controller-{n}.toml"
    path.write_text(controller_toml(rig.broker.port, rig.bridge.channel, n))
    mark = rig.recorder.mark()
    run = [sys.executable, "-m", "bmslink"]
    if rig.controller_gc:
        # The product as shipped, with only the collector's thresholds changed (run as `-m bmslink`).
        run = [sys.executable, "-c", f"import gc, runpy; gc.set_threshold({rig.controller_gc}); "
               "runpy.run_module('bmslink', run_name='__main__', alter_sys=True)"]
    ctl = rig.child(f"controller-{n}", [*run, "--log-level", "warning", "controller", "--config", str(path)],
                    talk=False)
    if rig.recorder.wait_for(BANK_BASE_A, mark, READY_TIMEOUT_S) is None:
        raise RuntimeError(f"controller ({n} racks) never granted {BANK_BASE_A} A; see {ctl.stderr_path}")
    return ctl


@dataclass
class Ladder:
    """Unique, falling rack limits: step j puts the bank at BANK_BASE_A − j amps."""

    n: int
    step: int = 0

    def next(self, pub: ManagedProcess, rig: Rig, *, controller: bool) -> float:
        if self.step >= LADDER_STEPS:
            self.restore(pub, rig, controller=controller)
        self.step += 1
        return ladder_value(self.n, self.step)

    def restore(self, pub: ManagedProcess, rig: Rig, *, controller: bool) -> None:
        mark = rig.recorder.mark()
        pub.lines.ask("restore", "restored")
        self.step = 0
        if controller and rig.recorder.wait_for(BANK_BASE_A, mark, RESTORE_TIMEOUT_S) is None:
            raise RuntimeError("the bank CCL did not come back to base after a restore")


def react(rig: Rig, pub: ManagedProcess, ladder: Ladder, rnd: random.Random, *,
          controller: bool) -> float | None:
    """One lowering: seconds from its publish to the first 0x351 carrying it (None: never seen)."""
    value = ladder.next(pub, rig, controller=controller)
    expected = bank_a(value, ladder.n)
    mark = rig.recorder.mark()
    reply = pub.lines.ask(f"lower {rnd.randrange(ladder.n)} {value!r}", "pub")
    t_pub = float(reply.split()[2])
    frame = rig.recorder.wait_for(expected, mark, REACTION_TIMEOUT_S)
    return None if frame is None else frame.received_s - t_pub


def stat(child: ManagedProcess) -> int:
    """The first counter of a peer's ``stats`` answer (messages sent, or received)."""
    return int(child.lines.ask("stats", "stats").split()[1])


@dataclass
class Trials:
    """Latencies of the lowerings that came back, and how many did not."""

    latencies_s: list[float] = field(default_factory=list)
    missed: int = 0

    def add(self, latency_s: float | None) -> None:
        if latency_s is None:
            self.missed += 1
        else:
            self.latencies_s.append(latency_s)
