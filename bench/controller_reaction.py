"""Controller reaction benchmark: rack publish → CAN frame with the lowered limit, next to the bare floor.

Everything runs on 127.0.0.1, in separate processes, on one Mosquitto broker (``set_tcp_nodelay
true``) and one python-can-remote CAN bridge (virtual bus):

* **publisher**: a low-CPU raw-socket MQTT publisher (this file, ``_publisher``). It sends
  pre-encoded ``RackTelemetry`` payloads (the real contract, ``shared.codec.encode``; only ``seq``
  and the charge limit are patched in place) for N racks, evenly spread, at a set total rate.
* **bare floor** (this file, ``_floor``): a minimal paho subscriber with TCP_NODELAY that only
  receives and ``msgpack``-decodes every message, and sends one 0x351 frame over the same CAN
  bridge when a rack's charge limit drops. Its reaction is the transport's floor.
* **controller**: the real ``bmslink controller --config FILE`` (roster N, Pylon, remote CAN).
* **this process**: records 0x351 frames from the bridge with their arrival time and decodes them
  with ``controller.frames.FrameDecoder``.

Reaction: the publisher lowers one rack's CCL to a unique value and reports the monotonic time of
the publish (CLOCK_MONOTONIC is system-wide); the reaction is the time until the first 0x351 whose
CCL is that rack's new limit × N (policy ``n_times_min``; every step of the ladder is 1 A on the
bank, so each lowering is identifiable). Racks publish at 2 Hz during the trials.

Sustained rate: the publisher offers rising totals over 1000 racks; a rate is sustained when
every probe (a lowering, as above) comes back, the probes' p99 stays below
``SUSTAIN_P99_S`` (a growing queue shows up there), the broker drops nothing, and (floor) the
subscriber counts every message sent.

CPU: utime + stime from /proc over a quiet window (no probes) at 1000 racks × 2 Hz.

The controller gets a bench config: no re-admission hold or ramp, a fast ramp-up, 1 s
heartbeat; thermal derate and cell taper at their defaults (they run, nothing derates). The
controller phases start with a warm-up as long as the thermal window, so that every rack carries
a full window of samples, as in steady operation.

Run: ``.venv/bin/python bench/controller_reaction.py [--racks 10 100 1000] [--trials 150]
[--warmup-s 32] [--quick] [--skip step reaction rate]``; about 12 minutes in full. It stops every
process it starts. ``--controller-gc A,B,C`` is a what-if: the same controller with the
garbage collector's thresholds raised (at 1000 racks, full collections of its heap are the
step's p99).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bmslink.processes import free_port  # noqa: E402  (after the path set-up above)

SITE = "bench"
PREFIX = "bmslink"
BANK_BASE_A = 3000.0  # bank CCL with every rack at its base limit (base = BANK_BASE_A / N)
LADDER_STEPS = 400  # lowerings of 1 A on the bank before the racks are restored
RATE_PER_RACK_HZ = 2.0
POLL_INTERVAL_MS = 500  # what the payload says (2 Hz): the controller's stale limit is 3 × this
ID_LIMITS = 0x351
SEQ_SENTINEL = 2**63 - 1  # packs as uint64 (0xcf + 8 bytes): patched in place
CCL_SENTINEL = 1234.56789  # packs as float64 (0xcb + 8 bytes): patched in place
SUSTAIN_P99_S = 0.05  # the sweep also reports the highest rate with the probes' p99 below this
BACKLOG_GROWTH_MS = 20.0
BACKLOG_P50_MS = 100.0
BACKLOG_P99_MS = 1000.0
MIN_SLEEP_S = 0.002  # the publisher wakes at most this often (sends what is due in one write)
READY_TIMEOUT_S = 30.0
REACTION_TIMEOUT_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers -------------------------------------------------------------------------------


def wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100.0 * len(ordered))))
    return ordered[rank - 1]


def rack_ids(n: int) -> list[str]:
    return [f"rack-{i:04d}" for i in range(n)]


def bank_a(rack_limit_a: float, n: int) -> float:
    """The bank CCL the controller sends for N racks at this minimum (its own rounding)."""
    from controller.core.bounds import current_down_da  # noqa: PLC0415

    return current_down_da(rack_limit_a * n) / 10.0


def ladder_value(n: int, step: int) -> float:
    """Rack limit of ladder step ``step`` (0 = base): each step takes 1 A off the bank."""
    return (BANK_BASE_A - step) / n


# -- payloads and MQTT packets -------------------------------------------------------------------


def telemetry_template(rack_id: str) -> tuple[bytes, int, int]:
    """(payload, seq offset, CCL offset): a valid RackTelemetry with patchable seq and CCL."""
    from shared.codec import encode  # noqa: PLC0415
    from shared.models import (  # noqa: PLC0415
        ContactorState,
        LinkStatus,
        ProtectionFlags,
        RackCommState,
        RackMeasurements,
        RackTelemetry,
        UnitLink,
    )

    telemetry = RackTelemetry(
        site_id=SITE,
        rack_id=rack_id,
        stream_id="be4c000000000001",
        seq=SEQ_SENTINEL,
        timestamp_s=1_790_000_000.25,
        poll_interval_ms=POLL_INTERVAL_MS,
        comm_state=RackCommState.OK,
        measurements=RackMeasurements(
            pack_voltage_v=52.8, current_a=12.5, soc_pct=64.0, soh_pct=98.0,
            cell_voltage_max_v=3.31, cell_voltage_max_location="cell 4",
            cell_voltage_min_v=3.29, cell_voltage_min_location="cell 9",
            temperature_max_c=27.5, temperature_min_c=24.0,
            charge_current_limit_a=CCL_SENTINEL, discharge_current_limit_a=200.0,
            charge_voltage_limit_v=55.2, discharge_voltage_limit_v=46.4,
            alarms=ProtectionFlags(), warnings=ProtectionFlags(),
            contactor=ContactorState.CLOSED, capacity_ah=280.0,
        ),
        units=(UnitLink(unit="bms", status=LinkStatus.OK),),
    )
    payload = encode(telemetry)
    seq_mark = b"\xcf" + struct.pack(">Q", SEQ_SENTINEL)
    ccl_mark = b"\xcb" + struct.pack(">d", CCL_SENTINEL)
    assert payload.count(seq_mark) == 1 and payload.count(ccl_mark) == 1
    return payload, payload.index(seq_mark) + 1, payload.index(ccl_mark) + 1


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep-alive off (the publisher never goes quiet)."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> tuple[bytearray, int]:
    """MQTT 3.1.1 PUBLISH QoS 0, and the offset of the payload inside it."""
    head = _utf8(topic)
    fixed = b"\x30" + _remaining_length(len(head) + len(payload))
    return bytearray(fixed + head + payload), len(fixed) + len(head)


# -- child process: the low-CPU publisher --------------------------------------------------------


def run_publisher(args: argparse.Namespace) -> None:
    """Publishes for ``--racks`` racks at ``--rate`` msg/s total until told to quit (stdin lines).

    Commands: ``rate R``; ``lower I V`` (rack I's CCL becomes V, published at once; answers
    ``pub I T`` with the monotonic time of the write); ``restore`` (every rack back to base,
    published at once); ``stats`` (answers ``stats SENT LATE``); ``quit``.
    """
    from shared.topics import Topics  # noqa: PLC0415

    topics = Topics(PREFIX, SITE)
    n, base = args.racks, args.base
    packets: list[bytearray] = []
    seq_at: list[int] = []
    ccl_at: list[int] = []
    for rid in rack_ids(n):
        payload, seq_off, ccl_off = telemetry_template(rid)
        packet, start = publish_packet(topics.rack_telemetry(rid), payload)
        struct.pack_into(">d", packet, start + ccl_off, base)
        packets.append(packet)
        seq_at.append(start + seq_off)
        ccl_at.append(start + ccl_off)
    lowered: set[int] = set()
    sock = socket.create_connection((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"bench-pub-{os.getpid()}"))
    if sock.recv(4)[:2] != b"\x20\x02":
        raise SystemExit("publisher: no CONNACK")
    seq = time.time_ns() // 1000  # above anything an earlier run used (microseconds)
    rate = float(args.rate)
    t0, sent, total, late = time.monotonic(), 0, 0, 0
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    pending = b""

    def one(i: int) -> bytes:
        nonlocal seq
        struct.pack_into(">Q", packets[i], seq_at[i], seq)
        seq += 1
        return bytes(packets[i])

    def reply(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    reply("ready")
    while True:
        now = time.monotonic()
        due = int((now - t0) * rate)
        if due - sent > rate * 0.5:  # more than 0.5 s behind: do not burst, count it
            late += due - sent
            sent = due
        if due > sent:
            sock.sendall(b"".join(one(k % n) for k in range(sent, due)))
            total += due - sent
            sent = due
        wait = max(MIN_SLEEP_S, t0 + (sent + 1) / rate - time.monotonic()) if rate > 0 else 0.05
        if not selector.select(min(wait, 0.05)):
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            cmd = raw.decode().split()
            if not cmd:
                continue
            if cmd[0] == "quit":
                sock.close()
                return
            if cmd[0] == "rate":
                rate, t0, sent = float(cmd[1]), time.monotonic(), 0
                reply(f"rate {rate:g}")
            elif cmd[0] == "lower":
                i, value = int(cmd[1]), float(cmd[2])
                struct.pack_into(">d", packets[i], ccl_at[i], value)
                lowered.add(i)
                data = one(i)
                t_pub = time.monotonic()
                sock.sendall(data)
                total += 1
                reply(f"pub {i} {t_pub!r}")
            elif cmd[0] == "restore":
                for i in sorted(lowered):
                    struct.pack_into(">d", packets[i], ccl_at[i], base)
                    sock.sendall(one(i))
                lowered.clear()
                reply("restored")
            elif cmd[0] == "stats":
                reply(f"stats {total} {late}")


# -- child process: the bare floor ---------------------------------------------------------------


def run_floor(args: argparse.Namespace) -> None:
    """paho subscriber: receive + msgpack-decode every message; one 0x351 when a CCL drops."""
    import can  # noqa: PLC0415
    import msgpack  # noqa: PLC0415
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    from shared.dbc import load_dbc  # noqa: PLC0415
    from shared.topics import Topics  # noqa: PLC0415

    topics = Topics(PREFIX, SITE)
    limits = load_dbc("pylon").get_message_by_frame_id(ID_LIMITS)
    bus = can.Bus(interface="remote", channel=args.can)
    n, base = args.racks, args.base
    last: dict[str, float] = {}
    counter = [0]

    def on_connect(client: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(topics.all_rack_telemetry, qos=0)

    def on_subscribe(_c: paho.Client, _u: Any, _mid: Any, _rc: Any, _p: Any) -> None:
        print("ready", flush=True)

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        counter[0] += 1
        data = msgpack.unpackb(msg.payload, raw=False, strict_map_key=True)
        ccl = data["measurements"]["charge_current_limit_a"]
        rack = data["rack_id"]
        if last.get(rack, base) != ccl:
            last[rack] = ccl
            if ccl < base:
                payload = limits.encode({"ChargeVoltageLimit": 55.2, "ChargeCurrentLimit": bank_a(ccl, n),
                                         "DischargeCurrentLimit": 200.0, "DischargeVoltageLimit": 46.4})
                bus.send(can.Message(arbitration_id=ID_LIMITS, data=payload, is_extended_id=False))

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{os.getpid()}",
                         protocol=paho.MQTTv5)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=5)
    client.loop_start()
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(f"stats {counter[0]}", flush=True)
            elif line.strip() == "quit":
                break
    finally:
        client.disconnect()
        client.loop_stop()
        bus.shutdown()


# -- the bench process ---------------------------------------------------------------------------


class Child:
    """A child process spoken to by lines on stdin/stdout (replies are read by a thread)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, lines: bool = True) -> None:
        self.name = name
        self.log = (log_dir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if lines else subprocess.DEVNULL,
            stdout=subprocess.PIPE if lines else self.log, stderr=self.log, cwd=ROOT,
        )
        self.replies: deque[str] = deque()
        self._ready = threading.Condition()
        if lines:
            threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._ready:
                self.replies.append(raw.decode().strip())
                self._ready.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout_s: float = 10.0) -> str:
        """The next reply starting with ``prefix`` (others before it are dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while True:
                while self.replies:
                    line = self.replies.popleft()
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: no {prefix!r} reply (exit {self.proc.poll()})")
                self._ready.wait(left)

    def ask(self, line: str, prefix: str, timeout_s: float = 10.0) -> str:
        self.send(line)
        return self.expect(prefix, timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.send("quit")
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self.log.close()


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


@dataclass
class Rig:
    """Broker, CAN bridge and recorder, plus whatever children a phase starts; stops all of it."""

    work: Path
    mqtt_port: int = 0
    can_port: int = 0
    children: list[Child] = field(default_factory=list)
    recorder: Recorder | None = None
    drops: BrokerDrops | None = None
    controller_gc: str | None = None  # "A,B,C": gc.set_threshold in the controller process (what-if)

    @property
    def can_channel(self) -> str:
        return f"127.0.0.1:{self.can_port}"

    def start(self) -> None:
        self.mqtt_port = free_port()
        conf = self.work / "mosquitto.conf"
        # As deploy/mosquitto/bmslink.conf where it matters here (TCP_NODELAY, default queues), on
        # loopback, anonymous, no persistence, $SYS every second for the drop counter.
        conf.write_text(f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        "persistence false\nsys_interval 1\nlog_type error\nlog_type warning\n")
        mosquitto = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
        self.children.append(Child("mosquitto", [mosquitto, "-c", str(conf)], self.work, lines=False))
        wait_port(self.mqtt_port, 5.0)
        self.can_port = free_port()
        bridge = [sys.executable, "-m", "can_remote", "-i", "virtual", "-c", "0", "-H", "127.0.0.1",
                  "-p", str(self.can_port)]
        self.children.append(Child("can-bridge", bridge, self.work, lines=False))
        wait_port(self.can_port, 15.0)
        self.recorder = Recorder(self.can_channel)
        self.drops = BrokerDrops(self.mqtt_port)

    def child(self, name: str, argv: list[str], *, lines: bool = True) -> Child:
        c = Child(name, argv, self.work, lines=lines)
        self.children.append(c)
        return c

    def stop_child(self, child: Child) -> None:
        child.stop()
        self.children.remove(child)

    def stop(self) -> None:
        if self.drops is not None:
            self.drops.close()
        if self.recorder is not None:
            self.recorder.close()
        for c in reversed(self.children):
            c.stop()
        self.children.clear()


def this_file(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def start_publisher(rig: Rig, n: int, rate: float) -> Child:
    pub = rig.child(f"publisher-{n}", this_file("_publisher", "--port", str(rig.mqtt_port), "--racks", str(n),
                                                "--rate", str(rate), "--base", repr(ladder_value(n, 0))))
    pub.expect("ready", 60.0)
    return pub


def start_floor(rig: Rig, n: int) -> Child:
    floor = rig.child(f"floor-{n}", this_file("_floor", "--port", str(rig.mqtt_port), "--racks", str(n),
                                              "--base", repr(ladder_value(n, 0)), "--can", rig.can_channel))
    floor.expect("ready", READY_TIMEOUT_S)
    return floor


def controller_toml(mqtt_port: int, can_channel: str, n: int) -> str:
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


def start_controller(rig: Rig, n: int) -> Child:
    path = rig.work / f"controller-{n}.toml"
    path.write_text(controller_toml(rig.mqtt_port, rig.can_channel, n))
    mark = rig.recorder.mark() if rig.recorder else 0
    run = [sys.executable, "-m", "bmslink"]
    if rig.controller_gc:
        # The product as shipped, with only the collector's thresholds changed (run as `-m bmslink`).
        run = [sys.executable, "-c", f"import gc, runpy; gc.set_threshold({rig.controller_gc}); "
               "runpy.run_module('bmslink', run_name='__main__', alter_sys=True)"]
    ctl = rig.child(f"controller-{n}", [*run, "--log-level", "warning", "controller", "--config", str(path)],
                    lines=False)
    assert rig.recorder is not None
    if rig.recorder.wait_for(BANK_BASE_A, mark, READY_TIMEOUT_S) is None:
        raise RuntimeError(f"controller ({n} racks) never granted {BANK_BASE_A} A; see {ctl.log.name}")
    return ctl


@dataclass
class Ladder:
    """Unique, falling rack limits: step j puts the bank at BANK_BASE_A − j amps."""

    n: int
    step: int = 0

    def next(self, pub: Child, rig: Rig, *, controller: bool) -> float:
        if self.step >= LADDER_STEPS:
            self.restore(pub, rig, controller=controller)
        self.step += 1
        return ladder_value(self.n, self.step)

    def restore(self, pub: Child, rig: Rig, *, controller: bool) -> None:
        assert rig.recorder is not None
        mark = rig.recorder.mark()
        pub.ask("restore", "restored")
        self.step = 0
        # An increase goes out with the next heartbeat (period_ms 1000).
        if controller and rig.recorder.wait_for(BANK_BASE_A, mark, 5.0) is None:
            raise RuntimeError("the bank CCL did not come back to base after a restore")


def react(rig: Rig, pub: Child, ladder: Ladder, rnd: random.Random, *, controller: bool) -> float | None:
    """One lowering: seconds from its publish to the first 0x351 carrying it (None: never seen)."""
    assert rig.recorder is not None
    value = ladder.next(pub, rig, controller=controller)
    expected = bank_a(value, ladder.n)
    mark = rig.recorder.mark()
    reply = pub.ask(f"lower {rnd.randrange(ladder.n)} {value!r}", "pub")
    t_pub = float(reply.split()[2])
    frame = rig.recorder.wait_for(expected, mark, REACTION_TIMEOUT_S)
    return None if frame is None else frame.received_s - t_pub


def trials(rig: Rig, pub: Child, ladder: Ladder, count: int, rnd: random.Random, *,
           controller: bool) -> tuple[list[float], int]:
    latencies: list[float] = []
    missed = 0
    for _ in range(count):
        latency = react(rig, pub, ladder, rnd, controller=controller)
        if latency is None:
            missed += 1
        else:
            latencies.append(latency)
        time.sleep(rnd.uniform(0.03, 0.09))  # off the 2 Hz grid and the control tick
    return latencies, missed


def cpu_shares(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Fraction of one core each process used over the next ``seconds`` (all over the same window)."""
    c0, t0 = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {name: (cpu_seconds(pid) - c0[name]) / elapsed for name, pid in pids.items()}


@dataclass
class Reaction:
    system: str
    racks: int
    latencies_s: list[float]
    missed: int
    cpu: float | None = None
    others: dict[str, float] = field(default_factory=dict)  # CPU of the rest of the rig, same window

    def p(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000.0 if self.latencies_s else float("nan")


@dataclass
class RateStep:
    offered: float
    sent_per_s: float
    received_per_s: float | None
    p50_ms: float
    p99_ms: float
    missed: int
    dropped: int
    cpu: float
    growth_ms: float  # probes' median, last third minus first third of the window: a queue grows
    sustained: bool  # keeps up: nothing lost, nothing queueing up
    within_p99: bool  # and the probes' p99 below SUSTAIN_P99_S


def rate_step(rig: Rig, pub: Child, sub: Child | None, pid: int, ladder: Ladder, rate: float, seconds: float,
              rnd: random.Random, *, controller: bool) -> RateStep:
    assert rig.drops is not None
    pub.ask(f"rate {rate:g}", "rate")
    time.sleep(2.0)  # let a backlog show before measuring
    sent0 = int(pub.ask("stats", "stats").split()[1])
    got0 = int(sub.ask("stats", "stats").split()[1]) if sub else 0
    drop0, c0, t0 = rig.drops.dropped, cpu_seconds(pid), time.monotonic()
    latencies: list[float] = []
    missed = 0
    while time.monotonic() - t0 < seconds:
        latency = react(rig, pub, ladder, rnd, controller=controller)
        if latency is None:
            missed += 1
        else:
            latencies.append(latency)
        time.sleep(rnd.uniform(0.06, 0.12))
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - c0) / elapsed
    sent = (int(pub.ask("stats", "stats").split()[1]) - sent0) / elapsed
    received = (int(sub.ask("stats", "stats").split()[1]) - got0) / elapsed if sub else None
    time.sleep(1.1)  # the $SYS counter is published every second
    dropped = rig.drops.dropped - drop0
    p50 = percentile(latencies, 50) * 1000 if latencies else float("inf")
    p99 = percentile(latencies, 99) * 1000 if latencies else float("inf")
    third = max(1, len(latencies) // 3)
    growth = (percentile(latencies[-third:], 50) - percentile(latencies[:third], 50)) * 1000 if latencies \
        else float("inf")
    received_all = received is None or received >= 0.995 * sent
    # A backlog shows as lost probes, broker drops, messages not counted, or a queue: growing
    # through the window, or already long when it starts (the median probe waits 100 ms or more).
    sustained = (missed == 0 and dropped == 0 and received_all and sent >= 0.97 * rate
                 and growth <= BACKLOG_GROWTH_MS and p50 < BACKLOG_P50_MS and p99 < BACKLOG_P99_MS)
    within = sustained and p99 < SUSTAIN_P99_S * 1000
    return RateStep(rate, sent, received, p50, p99, missed, dropped, cpu, growth, sustained, within)


def sweep(rig: Rig, n: int, rates: Sequence[float], seconds: float, rnd: random.Random, *,
          controller: bool, warmup_s: float) -> list[RateStep]:
    """Rising offered rates until one is not kept up with (twice in a row: one failed window can be
    the VM's noise, and ended a sweep at a third of its ceiling once), then one bisection step below."""
    pub = start_publisher(rig, n, rates[0])
    sub: Child | None = None
    try:
        if controller:
            proc = start_controller(rig, n)
            time.sleep(warmup_s)
        else:
            proc = sub = start_floor(rig, n)
        ladder = Ladder(n)
        steps: list[RateStep] = []
        for rate in rates:
            steps.append(rate_step(rig, pub, sub, proc.pid, ladder, rate, seconds, rnd,
                                   controller=controller))
            if not steps[-1].sustained:
                steps.append(rate_step(rig, pub, sub, proc.pid, ladder, rate, seconds, rnd,
                                       controller=controller))
            if not steps[-1].sustained:
                passed = [s.offered for s in steps if s.sustained]
                if passed and rate - passed[-1] > 250:
                    middle = (rate + passed[-1]) / 2
                    steps.append(rate_step(rig, pub, sub, proc.pid, ladder, middle, seconds, rnd,
                                           controller=controller))
                break
        rig.stop_child(proc)
        return steps
    finally:
        rig.stop_child(pub)


def rig_pids(rig: Rig, system: Child, pub: Child) -> dict[str, int]:
    named = {c.name: c.pid for c in rig.children}
    return {"system": system.pid, "broker": named["mosquitto"], "can bridge": named["can-bridge"],
            "publisher": pub.pid, "bench (recorder)": os.getpid()}


def reaction_phase(rig: Rig, n: int, count: int, rnd: random.Random, *, warmup_s: float,
                   cpu_window_s: float) -> tuple[Reaction, Reaction]:
    pub = start_publisher(rig, n, RATE_PER_RACK_HZ * n)
    try:
        ladder = Ladder(n)
        floor = start_floor(rig, n)
        time.sleep(1.0)
        floor_cpu = cpu_shares(rig_pids(rig, floor, pub), cpu_window_s) if cpu_window_s else {}
        lat, missed = trials(rig, pub, ladder, count, rnd, controller=False)
        rig.stop_child(floor)
        bare = Reaction("bare floor", n, lat, missed, floor_cpu.pop("system", None), floor_cpu)
        ladder.restore(pub, rig, controller=False)
        started = time.monotonic()
        ctl = start_controller(rig, n)
        time.sleep(max(0.0, warmup_s - (time.monotonic() - started)))
        ctl_cpu = cpu_shares(rig_pids(rig, ctl, pub), cpu_window_s) if cpu_window_s else {}
        lat, missed = trials(rig, pub, ladder, count, rnd, controller=True)
        rig.stop_child(ctl)
        return bare, Reaction("controller", n, lat, missed, ctl_cpu.pop("system", None), ctl_cpu)
    finally:
        rig.stop_child(pub)


# -- the core's step, in this process ------------------------------------------------------------


def core_step_costs(n: int, warm_s: float, cycles: int) -> tuple[float, float, float, float]:
    """(tick p50, tick p99, urgent p50, urgent p99) in ms: N racks at 2 Hz, 0.1 s full ticks, thermal
    window full; an urgent (inputs-only) cycle 10 ms after each tick with one rack changed. This
    process keeps Python's default collector settings (the controller process raises them)."""
    from controller.core.engine import CoreMemory, step  # noqa: PLC0415
    from controller.core.snapshot import RackInput, Snapshot  # noqa: PLC0415
    from shared.config import validate_config  # noqa: PLC0415
    from shared.controller_config import ControllerConfig  # noqa: PLC0415
    from shared.records import TelemetryDecoder  # noqa: PLC0415

    cfg = validate_config(tomllib.loads(controller_toml(1883, "127.0.0.1:1", n)), ControllerConfig, "<bench>")
    decoder = TelemetryDecoder()  # the controller's in-process form of the payload
    ids = rack_ids(n)
    telemetry = {}
    for rid in ids:
        payload, seq_off, ccl_off = telemetry_template(rid)
        raw = bytearray(payload)
        struct.pack_into(">Q", raw, seq_off, 1)
        struct.pack_into(">d", raw, ccl_off, ladder_value(n, 0))
        telemetry[rid] = decoder.decode(bytes(raw))
    period_s = 1.0 / RATE_PER_RACK_HZ
    next_s = {rid: i * period_s / n for i, rid in enumerate(ids)}
    inputs: dict[str, RackInput] = {}
    memory = CoreMemory.initial()
    tick: list[float] = []
    urgent: list[float] = []
    k = 0
    changed: set[str] = set()
    while len(tick) < cycles:
        k += 1
        now = round(k * 0.1, 6)
        for rid in ids:
            if next_s[rid] <= now:
                inputs[rid] = RackInput(rid, telemetry[rid], next_s[rid])
                next_s[rid] += period_s
                changed.add(rid)
        t0 = time.perf_counter()
        # As the service runs it: the table names the racks whose input changed (controller.rack_table).
        told = None if k == 1 else frozenset(changed)
        _, memory = step(Snapshot(racks=dict(inputs), changed=told), cfg, now, 1e9 + now, memory)
        changed.clear()
        t1 = time.perf_counter()
        if now < warm_s:
            continue
        tick.append(t1 - t0)
        rid = ids[k % n]
        inputs[rid] = RackInput(rid, telemetry[rid], now + 0.01)
        t0 = time.perf_counter()
        changed.add(rid)
        _, memory = step(Snapshot(racks=dict(inputs), changed=frozenset(changed)), cfg, now + 0.01, 1e9 + now,
                         memory, inputs_only=True)
        changed.clear()
        urgent.append(time.perf_counter() - t0)
    ms = [percentile(x, q) * 1000 for x in (tick, urgent) for q in (50, 99)]
    return ms[0], ms[1], ms[2], ms[3]


# -- main ----------------------------------------------------------------------------------------


def print_tables(step_rows: list[tuple[int, tuple[float, float, float, float]]], reactions: list[Reaction],
                 sweeps: dict[str, list[RateStep]], cpu_n: int) -> None:
    line = "-" * 100
    if step_rows:
        print(line)
        print("core step() in-process, racks at 2 Hz, thermal window full (ms)")
        print(f"{'racks':>6} {'tick p50':>9} {'tick p99':>9} {'urgent p50':>11} {'urgent p99':>11}"
              "   (tick: ~0.2·N racks changed; urgent: 1 changed, 10 ms after a tick)")
        for n, (a, b, c, d) in step_rows:
            print(f"{n:>6} {a:>9.2f} {b:>9.2f} {c:>11.2f} {d:>11.2f}")
    if reactions:
        print(line)
        print("reaction: rack publish -> first 0x351 with the lowered CCL (racks at 2 Hz), ms")
        print(f"{'racks':>6} {'system':<12} {'n':>5} {'miss':>5} {'p50':>8} {'p99':>8} {'max':>8}"
              f" {'p99/floor':>10} {'CPU % core':>11}")
        floor_p99 = {r.racks: r.p(99) for r in reactions if r.system == "bare floor"}
        for r in reactions:
            ratio = ""
            if r.system == "controller" and r.racks in floor_p99:
                ratio = f"{r.p(99) / floor_p99[r.racks]:.2f}x"
            cpu = f"{r.cpu * 100:.1f}" if r.cpu is not None else "-"
            print(f"{r.racks:>6} {r.system:<12} {len(r.latencies_s):>5} {r.missed:>5} {r.p(50):>8.2f}"
                  f" {r.p(99):>8.2f} {r.p(100):>8.2f} {ratio:>10} {cpu:>11}")
    for r in reactions:
        if r.others:
            rest = ", ".join(f"{name} {share * 100:.1f} %" for name, share in r.others.items())
            print(f"  CPU beside the {r.system} ({r.racks} racks, same window): {rest}")
    for system, steps in sweeps.items():
        print(line)
        print(f"sustained rate, {system}, {cpu_n} racks: offered msg/s, probes (lowerings) p50/p99 ms")
        print(f"{'offered':>8} {'sent/s':>8} {'recv/s':>8} {'p50':>8} {'p99':>8} {'growth':>7} {'miss':>5}"
              f" {'dropped':>8} {'CPU %':>6}  keeps up  p99<{SUSTAIN_P99_S * 1000:.0f}ms")
        for s in steps:
            recv = f"{s.received_per_s:.0f}" if s.received_per_s is not None else "-"
            print(f"{s.offered:>8.0f} {s.sent_per_s:>8.0f} {recv:>8} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f}"
                  f" {s.growth_ms:>7.1f} {s.missed:>5} {s.dropped:>8} {s.cpu * 100:>6.1f}"
                  f"  {'yes' if s.sustained else 'NO':>8}  {'yes' if s.within_p99 else 'no'}")
    if len(sweeps) == 2:
        def ceiling(system: str, within: bool) -> float:
            ok = [s.offered for s in sweeps[system] if (s.within_p99 if within else s.sustained)]
            return max(ok, default=0.0)

        floor_c, ctl_c = ceiling("bare floor", False), ceiling("controller", False)
        share = ctl_c / floor_c if floor_c else float("nan")
        print(line)
        print(f"ceilings (keeps up, no backlog): bare floor {floor_c:.0f} msg/s, controller {ctl_c:.0f} msg/s"
              f" ({share:.2f}x of the floor)")
        floor_p, ctl_p = ceiling("bare floor", True), ceiling("controller", True)
        print(f"with the probes' p99 < {SUSTAIN_P99_S * 1000:.0f} ms: bare floor {floor_p:.0f} msg/s,"
              f" controller {ctl_p:.0f} msg/s")
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--racks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--trials", type=int, default=300, help="lowerings per system and roster size")
    parser.add_argument("--warmup-s", type=float, default=32.0,
                        help="controller warm-up (fills the thermal window)")
    parser.add_argument("--cpu-window-s", type=float, default=10.0)
    # At least 1 msg/s per rack: the payload says it polls every 500 ms, stale after 1.5 s.
    parser.add_argument("--rate-racks", type=int, default=1000, help="roster of the sustained-rate test")
    parser.add_argument("--rates", type=float, nargs="+", help="offered to the bare floor, msg/s",
                        default=[2000, 4000, 6000, 7000, 8000, 9000, 10000, 11000, 12000, 14000])
    parser.add_argument("--controller-rates", type=float, nargs="+", help="offered to the controller, msg/s",
                        default=[1000, 2000, 3000, 4000, 6000, 8000, 10000, 11000, 12000, 14000])
    parser.add_argument("--rate-seconds", type=float, default=5.0, help="measured window per offered rate")
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "reaction", "rate"])
    parser.add_argument("--quick", action="store_true", help="fewer trials, short warm-up (a smoke run)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--controller-gc", metavar="A,B,C", default=None,
                        help="what-if: gc.set_threshold(A, B, C) in the controller process")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.warmup_s, args.cpu_window_s, args.rate_seconds = 30, 3.0, 3.0, 2.0
    rnd = random.Random(args.seed)

    step_rows = []
    if "step" not in args.skip:
        for n in args.racks:
            step_rows.append((n, core_step_costs(n, warm_s=3.0 if args.quick else 32.0, cycles=100)))
        print_tables(step_rows, [], {}, args.rate_racks)
    reactions: list[Reaction] = []
    sweeps: dict[str, list[RateStep]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reaction-") as tmp:
        rig = Rig(Path(tmp), controller_gc=args.controller_gc)
        try:
            rig.start()
            if "reaction" not in args.skip:
                for n in args.racks:
                    window = args.cpu_window_s if n == max(args.racks) else 0.0
                    reactions.extend(reaction_phase(rig, n, args.trials, rnd, warmup_s=args.warmup_s,
                                                    cpu_window_s=window))
                    print_tables([], reactions[-2:], {}, args.rate_racks)
            if "rate" not in args.skip:
                for system, rates in (("bare floor", args.rates), ("controller", args.controller_rates)):
                    sweeps[system] = sweep(rig, args.rate_racks, rates, args.rate_seconds, rnd,
                                           controller=system == "controller",
                                           warmup_s=min(args.warmup_s, 10.0))
        finally:
            rig.stop()
    print("\n=== summary (same broker, same CAN bridge, one run) ===")
    if args.controller_gc:
        print(f"(what-if: the controller ran with gc.set_threshold({args.controller_gc}))")
    print_tables(step_rows, reactions, sweeps, args.rate_racks)
    return 0


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["_publisher", "_floor"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--racks", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--base", type=float, required=True)
    parser.add_argument("--can", default="")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    if args.role == "_publisher":
        run_publisher(args)
    else:
        run_floor(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_publisher", "_floor"):
        _child_main(sys.argv[1:])
    else:
        sys.exit(main())

