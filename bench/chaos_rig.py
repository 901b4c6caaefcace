"""Shared pieces of the fuzz and soak benches (``bench/fuzz_payloads.py``, ``bench/soak.py``).

Everything is a shipped process or a real peer on 127.0.0.1: a Mosquitto broker
(``tests.fixtures.broker``), the python-can-remote CAN bridge (``tests.fixtures.can_bridge``), the
real ``bmslink controller`` (``tests.fixtures.procs``, its stderr captured to a file), and genuine
rack publishers: child processes of this file using paho, each rack with its own ``stream_id``,
publishing valid ``RackTelemetry`` (``shared.models`` + ``shared.codec``, only ``seq`` and
``timestamp_s`` patched in place) at a steady rate on absolute times, as an agent does.

The witness is a CAN listener in this process that decodes every 0x351 with cantools from the
shipped DBC (``shared.dbc``), independently of the controller's own frame code, and keeps the
arrival time, CCL and DCL of each.

``allowed_bank`` states what the genuine racks allow under the configured policy: the figure a
0x351 must never exceed, whatever else is on the wire.

Child mode (used by the rig itself): ``python bench/chaos_rig.py _publish --port P --racks FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import signal
import struct
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.controller_config import CurrentPolicy  # noqa: E402  (after the path set-up above)

SITE = "chaos"
PREFIX = "bmslink"
ID_LIMITS = 0x351
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SEQ_SENTINEL = 2**63 - 1  # packs as uint64 (0xcf + 8 bytes): patched in place
TS_SENTINEL = 1234567890.123456  # packs as float64 (0xcb + 8 bytes): patched in place
MESSAGE_EXPIRY_S = 2  # as an agent's [publish] message_expiry_s default
READY_TIMEOUT_S = 60.0
# One 0x351 carries CCL/DCL in 0.1 A steps, rounded down by the controller: a frame equal to the
# allowance may differ from it by less than one step.
FRAME_RESOLUTION_A = 0.1


# -- genuine racks ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenuineRack:
    """One rack the genuine publishers speak for, with the limits its BMS grants."""

    rack_id: str
    ccl_a: float
    dcl_a: float
    stream_id: str


def stream_id_for(seed: int, rack_id: str) -> str:
    """A reproducible agent-run identity (16 hex digits) for ``rack_id`` under ``seed``."""
    return hashlib.sha256(f"{seed}:{rack_id}".encode()).hexdigest()[:16]


def telemetry(rack: GenuineRack, *, seq: int, timestamp_s: float, poll_interval_ms: int,
              site_id: str = SITE) -> Any:
    """A valid ``RackTelemetry`` of ``rack``: healthy, contactor closed, its limits; nothing derates."""
    from shared.models import (  # noqa: PLC0415
        ContactorState,
        LinkStatus,
        ProtectionFlags,
        RackCommState,
        RackMeasurements,
        RackTelemetry,
        UnitLink,
    )

    return RackTelemetry(
        site_id=site_id,
        rack_id=rack.rack_id,
        stream_id=rack.stream_id,
        seq=seq,
        timestamp_s=timestamp_s,
        poll_interval_ms=poll_interval_ms,
        comm_state=RackCommState.OK,
        measurements=RackMeasurements(
            pack_voltage_v=52.8, current_a=12.5, soc_pct=64.0, soh_pct=98.0,
            cell_voltage_max_v=3.31, cell_voltage_max_location="cell 4",
            cell_voltage_min_v=3.29, cell_voltage_min_location="cell 9",
            temperature_max_c=27.5, temperature_max_location="sensor 2",
            temperature_min_c=24.0, temperature_min_location="sensor 7",
            charge_current_limit_a=rack.ccl_a, discharge_current_limit_a=rack.dcl_a,
            charge_voltage_limit_v=55.2, discharge_voltage_limit_v=46.4,
            alarms=ProtectionFlags(), warnings=ProtectionFlags(),
            contactor=ContactorState.CLOSED, capacity_ah=280.0,
        ),
        units=(UnitLink(unit="bms", status=LinkStatus.OK),),
    )


def telemetry_template(rack: GenuineRack, poll_interval_ms: int,
                       site_id: str = SITE) -> tuple[bytes, int, int]:
    """(payload, seq offset, timestamp offset): the genuine payload with patchable seq and stamp."""
    from shared.codec import encode  # noqa: PLC0415

    payload = encode(telemetry(rack, seq=SEQ_SENTINEL, timestamp_s=TS_SENTINEL,
                               poll_interval_ms=poll_interval_ms, site_id=site_id))
    seq_mark = b"\xcf" + struct.pack(">Q", SEQ_SENTINEL)
    ts_mark = b"\xcb" + struct.pack(">d", TS_SENTINEL)
    assert payload.count(seq_mark) == 1 and payload.count(ts_mark) == 1
    return payload, payload.index(seq_mark) + 1, payload.index(ts_mark) + 1


def allowed_bank(racks: Sequence[GenuineRack], policy: CurrentPolicy, cap_a: float, *,
                 charge: bool) -> float:
    """The most the bank may be granted in one direction when every genuine rack is eligible.

    Fewer eligible racks can only lower this under every policy (n × min: n falls, the min cannot
    fall below the min of all; sum: fewer terms; min: a min over a subset is ≥ only if the weakest
    left, and then the controller must hold, issue 10 §4) — so it bounds every frame.
    """
    values = [r.ccl_a if charge else r.dcl_a for r in racks]
    if policy is CurrentPolicy.N_TIMES_MIN:
        bank = len(values) * min(values)
    elif policy is CurrentPolicy.SUM:
        bank = sum(values)
    else:
        bank = min(values)
    return min(bank, cap_a)


def write_racks(path: Path, racks: Sequence[GenuineRack]) -> Path:
    path.write_text(json.dumps([asdict(r) for r in racks]))
    return path


# -- child process: a genuine publisher (paho) ---------------------------------------------------


def run_publisher(args: argparse.Namespace) -> None:
    """Publishes every rack of ``--racks`` at ``--hz``, evenly spread, until SIGINT/SIGTERM; then prints
    ``sent N late M`` (late: slots skipped because this process fell more than a period behind)."""
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    from shared.topics import Topics  # noqa: PLC0415

    racks = [GenuineRack(**r) for r in json.loads(Path(args.racks).read_text())]
    topics = Topics(args.prefix, args.site)
    poll_ms = round(1000.0 / args.hz)
    templates = []
    for rack in racks:
        payload, seq_off, ts_off = telemetry_template(rack, poll_ms, args.site)
        templates.append((topics.rack_telemetry(rack.rack_id), bytearray(payload), seq_off, ts_off))
    seqs = [0] * len(racks)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    connected = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-genuine-{os.getpid()}",
                         protocol=paho.MQTTv5)
    client.on_connect = lambda *_: connected.set()
    client.max_queued_messages_set(0)
    client.connect(args.host, args.port, keepalive=10)
    client.loop_start()
    if not connected.wait(10.0):
        raise SystemExit("publisher: no CONNACK")
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = MESSAGE_EXPIRY_S
    print("ready", flush=True)

    n = len(racks)
    slot_s = 1.0 / (args.hz * n)
    t0 = time.monotonic()
    sent = late = done = 0
    while not stop.is_set():
        due = int((time.monotonic() - t0) / slot_s) + 1
        if due - done > args.hz * n:  # more than a period behind: skip, never burst stale readings
            late += due - done - 1
            done = due - 1
        wall = time.time()
        for k in range(done, due):
            i = k % n
            topic, buf, seq_off, ts_off = templates[i]
            seqs[i] += 1
            struct.pack_into(">Q", buf, seq_off, seqs[i])
            struct.pack_into(">d", buf, ts_off, wall)
            client.publish(topic, bytes(buf), qos=0, properties=props)
            sent += 1
        done = due
        stop.wait(max(0.002, t0 + done * slot_s - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    print(f"sent {sent} late {late}", flush=True)


# -- the CAN witness -------------------------------------------------------------------------------


@dataclass(slots=True)
class LimitsFrame:
    t: float
    ccl_a: float
    dcl_a: float
    cvl_v: float


class LimitsListener:
    """Every 0x351 on the bridge, decoded with cantools from the shipped Pylon DBC, with its arrival
    time (monotonic). A thread of its own, stopped by ``close``."""

    def __init__(self, channel: str) -> None:
        import can  # noqa: PLC0415

        from shared.dbc import load_dbc, numeric_signals  # noqa: PLC0415

        self._bus = can.Bus(interface="remote", channel=channel)
        self._message = load_dbc("pylon").get_message_by_frame_id(ID_LIMITS)
        self._numeric = numeric_signals
        self.frames: list[LimitsFrame] = []
        self.undecodable = 0
        self.other_ids: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="chaos-can-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            msg = self._bus.recv(0.2)
            if msg is None or msg.is_error_frame:
                continue
            now = time.monotonic()
            if msg.arbitration_id != ID_LIMITS:
                self.other_ids[msg.arbitration_id] += 1
                continue
            try:
                v = self._numeric(self._message.decode(bytes(msg.data), decode_choices=False))
                frame = LimitsFrame(now, float(v["ChargeCurrentLimit"]), float(v["DischargeCurrentLimit"]),
                                    float(v["ChargeVoltageLimit"]))
            except Exception:
                self.undecodable += 1
                continue
            with self._lock:
                self.frames.append(frame)

    def since(self, t: float) -> list[LimitsFrame]:
        with self._lock:
            return [f for f in self.frames if f.t >= t]

    def last(self) -> LimitsFrame | None:
        with self._lock:
            return self.frames[-1] if self.frames else None

    def mark(self) -> int:
        """Index of the next frame to arrive (for ``wait_for``)."""
        with self._lock:
            return len(self.frames)

    def wait_for(self, predicate: Any, timeout_s: float, start: int | None = None) -> LimitsFrame | None:
        """The first frame from index ``start`` (default: from now on) satisfying ``predicate``."""
        if start is None:
            start = self.mark()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                fresh = self.frames[start:]
                start = len(self.frames)
            for f in fresh:
                if predicate(f):
                    return f
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self._bus.shutdown()


def max_gap_s(frames: Sequence[LimitsFrame], start: float | None = None, end: float | None = None) -> float:
    """Longest time without a 0x351 among ``frames`` (and from ``start`` / to ``end`` if given)."""
    times = [f.t for f in frames]
    if start is not None:
        times.insert(0, start)
    if end is not None:
        times.append(end)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# -- process probes --------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (/proc/PID/statm, pages × page size)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0.0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def scrape(port: int, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
    """The controller's Prometheus endpoint as {family: {label values joined by ',': value}}."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = ",".join(str(v) for v in sample.labels.values())
            out.setdefault(sample.name, {})[key] = float(sample.value)
    return out


# -- the rig ---------------------------------------------------------------------------------------


CONTROLLER_TOML = """\
site_id = "{site}"
node_id = "chaos-ctl"
max_payload_bytes = {max_payload}

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
topic_prefix = "{prefix}"
keepalive_s = 5

[can]
interface = "remote"
channel = "{can_channel}"
dialect = "pylon"
period_ms = {period_ms}

[aggregation]
ccl_policy = "{policy}"
dcl_policy = "{policy}"
min_racks = 1
readmit_hold_s = {hold_s}
readmit_ramp_s = {ramp_s}
ramp_up_a_per_s = {ramp_rate}
max_charge_current_a = {cap_a}
max_discharge_current_a = {cap_a}

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}

{failover}
{roster}"""


@dataclass
class ControllerSettings:
    """The knobs of the controller a bench starts (everything else at its shipped default)."""

    period_ms: int = 200
    policy: CurrentPolicy = CurrentPolicy.N_TIMES_MIN
    hold_s: float = 0.0
    ramp_s: float = 0.0
    ramp_rate_a_per_s: float = 1_000_000.0
    cap_a: float = 3276.0
    failover: bool = False
    max_payload_bytes: int = 64 * 1024
    log_level: str = "info"  # the CLI's default: what an installer runs


@dataclass
class ChaosRig:
    """Broker, CAN bridge, CAN witness, a controller and genuine publishers; ``stop`` ends all of it."""

    work: Path
    racks: list[GenuineRack]
    settings: ControllerSettings = field(default_factory=ControllerSettings)
    site: str = SITE
    prefix: str = PREFIX
    publisher_hz: float = 10.0
    publishers: int = 1
    broker: Any = None
    bridge: Any = None
    procs: Any = None
    listener: LimitsListener | None = None
    metrics_port: int = 0

    def start(self) -> None:
        from bmslink.processes import free_port  # noqa: PLC0415
        from tests.fixtures.broker import MosquittoBroker  # noqa: PLC0415
        from tests.fixtures.can_bridge import CanBridge  # noqa: PLC0415
        from tests.fixtures.procs import ProcessGroup  # noqa: PLC0415

        self.work.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessGroup(self.work / "procs")
        self.broker = MosquittoBroker(self.work / "broker")
        self.broker.start()
        self.bridge = CanBridge(self.work / "can")
        self.bridge.start()
        self.listener = LimitsListener(self.bridge.channel)
        self.metrics_port = free_port()
        self.start_publishers()
        self.start_controller()

    @property
    def controller_pid(self) -> int:
        return int(self.procs.get("controller").pid)

    def controller_returncode(self) -> int | None:
        rc: int | None = self.procs.get("controller").poll()
        return rc

    @property
    def controller_stderr(self) -> Path:
        path: Path = self.procs.get("controller").stderr_path
        return path

    def controller_config(self) -> str:
        s = self.settings
        roster = "\n".join(f'[[roster]]\nrack_id = "{r.rack_id}"\ncapacity_ah = 280\n' for r in self.racks)
        failover = "[failover]\nenabled = true\nnode_number = 1\nrank = 0\n" if s.failover else ""
        return CONTROLLER_TOML.format(
            site=self.site, prefix=self.prefix, mqtt_port=self.broker.port, can_channel=self.bridge.channel,
            period_ms=s.period_ms, policy=s.policy.value, hold_s=s.hold_s, ramp_s=s.ramp_s,
            ramp_rate=s.ramp_rate_a_per_s, cap_a=s.cap_a, metrics_port=self.metrics_port,
            max_payload=s.max_payload_bytes, failover=failover, roster=roster)

    def start_controller(self) -> None:
        from tests.fixtures.procs import bmslink_cli  # noqa: PLC0415

        path = self.work / "controller.toml"
        path.write_text(self.controller_config())
        self.procs.start("controller", bmslink_cli("--log-level", self.settings.log_level, "controller",
                                                   "--config", str(path)))

    def start_publishers(self) -> None:
        per = math.ceil(len(self.racks) / self.publishers)
        for k in range(self.publishers):
            chunk = self.racks[k * per:(k + 1) * per]
            if not chunk:
                continue
            racks_file = write_racks(self.work / f"racks-{k}.json", chunk)
            name = f"genuine-{k}"
            self.procs.start(name, [sys.executable, str(Path(__file__).resolve()), "_publish",
                                    "--port", str(self.broker.port), "--racks", str(racks_file),
                                    "--hz", str(self.publisher_hz), "--site", self.site,
                                    "--prefix", self.prefix])
            self.procs.wait_for_output(name, "ready", 30.0)

    def allowed(self, *, charge: bool) -> float:
        return allowed_bank(self.racks, self.settings.policy, self.settings.cap_a, charge=charge)

    def wait_granted(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Wait for the first 0x351 granting what every genuine rack allows; return its time."""
        assert self.listener is not None
        ccl, dcl = self.allowed(charge=True), self.allowed(charge=False)
        deadline = time.monotonic() + timeout_s
        frame = None
        start = 0
        while frame is None and time.monotonic() < deadline and self.controller_returncode() is None:
            frame = self.listener.wait_for(
                lambda f: f.ccl_a >= ccl - FRAME_RESOLUTION_A and f.dcl_a >= dcl - FRAME_RESOLUTION_A,
                1.0, start)
            start = max(0, self.listener.mark() - 1)
        if frame is None:
            last = self.listener.last()
            raise RuntimeError(f"the controller never granted CCL {ccl} / DCL {dcl} A within {timeout_s} s "
                               f"(last 0x351: {last})\n{self.procs.describe()}")
        return frame.t

    def metrics(self) -> dict[str, dict[str, float]]:
        try:
            return scrape(self.metrics_port)
        except OSError:
            return {}

    def publisher_stats(self) -> dict[str, int]:
        """Sent and late of every genuine publisher (after ``stop_publishers``)."""
        total = {"sent": 0, "late": 0}
        for k in range(self.publishers):
            name = f"genuine-{k}"
            if name not in self.procs:
                continue
            for line in self.procs.stdout(name).splitlines():
                parts = line.split()
                if len(parts) == 4 and parts[0] == "sent":
                    total["sent"] += int(parts[1])
                    total["late"] += int(parts[3])
        return total

    def stop_publishers(self) -> None:
        for k in range(self.publishers):
            name = f"genuine-{k}"
            if name in self.procs:
                self.procs.stop(name)

    def stop(self) -> None:
        if self.procs is not None:
            self.procs.stop_all()
        if self.listener is not None:
            self.listener.close()
        if self.bridge is not None:
            self.bridge.stop()
        if self.broker is not None:
            self.broker.close()


def telemetry_counters(metrics: dict[str, dict[str, float]]) -> dict[str, int]:
    """The controller's rack payloads by outcome (accepted, rejected_*, out_of_order, ...)."""
    return {k: int(v) for k, v in metrics.get("bmslink_controller_telemetry_payloads_total", {}).items()}


def counters_under(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, int]:
    """Every counter whose name starts with ``prefix``, as {rest of the name[{label values}]: value}."""
    found: dict[str, int] = {}
    for name, samples in metrics.items():
        if name.startswith(prefix) and name.endswith("_total"):
            short = name.removeprefix(prefix).removesuffix("_total")
            for labels, value in samples.items():
                found[f"{short}{{{labels}}}" if labels else short] = int(value)
    return found


NOT_REJECTIONS = frozenset({"accepted", "new_stream"})


def rejected_total(counters: dict[str, int]) -> int:
    """Payloads the controller refused, by any reason (``new_stream`` is accepted, only noted)."""
    return sum(v for k, v in counters.items() if k not in NOT_REJECTIONS)


def count_tracebacks(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.read_bytes().count(b"Traceback (most recent call last)")
    return 0


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["_publish"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--racks", required=True, help="JSON file: a list of GenuineRack fields")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--site", default=SITE)
    parser.add_argument("--prefix", default=PREFIX)
    run_publisher(parser.parse_args(argv))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
