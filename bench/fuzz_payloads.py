"""Payload fuzz against the shipped processes: no single message may crash the controller, raise a limit
or silence it (issue 10, "Done when").

The rig (``bench/chaos_rig.py``): a real Mosquitto on a free 127.0.0.1 port, the python-can-remote
CAN bridge, the real ``bmslink controller`` (failover on as a single node, so that the leader
record it subscribes to is read; Prometheus endpoint on; stderr to a file), three genuine rack
publishers at 10 Hz with distinct limits, and a CAN witness decoding every 0x351 with cantools.

The fuzz: ``--count`` payloads from ``random.Random(--seed)``, sent over one raw MQTT 3.1.1 connection
(QoS 0; a few retained on the status and leader topics) at ``--rate`` per second, to every topic the
controller and the agents subscribe to (rack telemetry wildcard, the leader record; the agents
subscribe to nothing today) and to those somebody may listen to tomorrow (rack status, controller
status, cluster state, cmd), plus odd rack levels under the telemetry wildcard. Mutation kinds:
see ``KINDS``. The bytes sent depend only on the seed, ``--rate`` and ``--epoch`` (the wall time
the payloads' stamps are relative to, as each is stamped when it is due; printed, pass it back to
replay the same bytes): the digest of every (topic, payload, retain) is printed to show it.

What a mutation may not test: a payload the contract accepts *is* a rack speaking (the broker's ACLs,
not the controller, keep impostors out; deploy/README.md). Such a payload sent on a roster rack's
topic therefore never carries more than that rack's genuine limits, nor a contactor "open" (which
would legitimately let the bank rise), nor readings that would rightly latch an alarm (a raised flag,
101 °C, a 9 V cell): an honest-typed limit above the genuine one is lowered to it, and such readings
take the genuine values, before sending (``_honest``). A wrongly-typed one ("9999" as a string,
``true``) is left as it is: the controller must refuse it, and a 0x351 above the allowance is how we
would see it taken.

Verdict (printed, and written as JSON to ``--json``): the controller's exit status (crash), the
highest CCL/DCL on the bus against what the genuine racks allow under the configured policy (worst
excess, expected 0), the longest silence on 0x351, the rejection counters, RSS before/after, the log
bytes written per rejected payload, whether the racks' genuine streams are granted in full again
after it, and (failover on) whether the controller, frozen for a second after the fuzz, takes over
again and grants: a leader record it took during the fuzz must not break that takeover.

Run: ``.venv/bin/python bench/fuzz_payloads.py --seed 1 --count 100000`` (about 2–3 minutes at the
default rate).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import signal
import socket
import string
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402  (after the path set-up above)

from bench.chaos_rig import (  # noqa: E402
    FRAME_RESOLUTION_A,
    ChaosRig,
    ControllerSettings,
    GenuineRack,
    count_tracebacks,
    counters_under,
    max_gap_s,
    rejected_total,
    rss_bytes,
    stream_id_for,
    telemetry,
    telemetry_counters,
)
from bench.controller_reaction import connect_packet, publish_packet  # noqa: E402
from shared.topics import Topics  # noqa: E402

DEFAULT_COUNT = 100_000
DEFAULT_RATE = 800.0  # payloads/s: the controller keeps up with more; the generator on a shared core not
POLL_INTERVAL_MS = 100  # the genuine racks publish at 10 Hz
GENUINE_LIMITS = ((40.0, 60.0), (70.0, 90.0), (100.0, 120.0))  # (CCL, DCL) of rack-01..03
OVERSIZE_BYTES = 64 * 1024  # the controller's default max_payload_bytes
BATCH_S = 0.005
# The genuine racks' readings (bench/chaos_rig.py ``telemetry``) that could latch or derate.
GENUINE_READINGS = {
    "cell_voltage_max_v": 3.31, "cell_voltage_min_v": 3.29,
    "temperature_max_c": 27.5, "temperature_min_c": 24.0,
}

SETTLE_S = 2.0  # after the first full grant, before the baseline is taken
RECOVERY_TIMEOUT_S = 15.0
SILENCE_SLACK_S = 0.8  # on a 2-core VM shared with others: scheduling noise beyond 2 × period
STREAM_FRESH_SHARE = 0.6
# After the fuzz (failover on): the controller is frozen this long, as a loaded gateway's loop can be,
# then watched for STALL_OBSERVE_S. Resumed, it fences and takes over anew, with an epoch above every
# epoch it has seen, leader records the fuzz sent included; it must end the watch granting in full
# without a silence, for at least STALL_STEADY_S.
STALL_S = 1.0
STALL_OBSERVE_S = 5.0
STALL_STEADY_S = 2.0

KINDS: dict[str, int] = {  # mutation kind → weight (per topic class, see Mutator.case)
    "random_bytes": 8,
    "truncated": 6,
    "bit_flip": 8,
    "type_swap": 16,
    "out_of_range": 10,
    "absurd_order": 8,
    "contradictory": 6,
    "unknown_field": 5,
    "wrong_schema": 5,
    "identity_mismatch": 5,
    "oversized": 1,
    "deep_nesting": 1,
    "wrong_top_type": 3,
    "new_stream": 3,
}
TOPIC_CLASSES: dict[str, int] = {
    "roster_telemetry": 70,
    "unknown_rack_telemetry": 6,
    "rack_status": 6,
    "leader": 6,
    "controller_status": 4,
    "cluster_state": 3,
    "cmd": 3,
    "other_site": 2,
}
ODD_RACK_LEVELS = ("", " ", "rack-01 ", "RACK-01", "rack-1", "räck-01", "rack-01.", "-", "x" * 300,
                   "☃", "rack-99", "00", "rack-01?")


@dataclass(frozen=True, slots=True)
class Case:
    topic: str
    payload: bytes
    kind: str
    topic_class: str
    retain: bool = False


def _msgpack_family(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "map"
    return "ext"


class Mutator:
    """Deterministic stream of fuzz cases for one seed (and one ``epoch``)."""

    def __init__(self, seed: int, racks: list[GenuineRack], *, site: str, prefix: str, epoch: float,
                 rate: float) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.index = 0
        self.racks = racks
        self.site = site
        self.topics = Topics(prefix, site)
        self.other_site = Topics(prefix, site + "-other")
        self.epoch = epoch
        self.bases = {r.rack_id: telemetry(r, seq=1, timestamp_s=epoch, poll_interval_ms=POLL_INTERVAL_MS,
                                           site_id=site).model_dump(mode="json") for r in racks}
        self.neutralised = 0

    # -- building blocks -----------------------------------------------------------------------

    def _base(self, rack: GenuineRack) -> dict[str, Any]:
        """The rack's genuine payload as a map, placed where the controller would take it if valid.

        Stamped when the case is due to be sent (``epoch`` + index / rate, ± 1 s): a stamp the
        controller refuses as future would hide what the rest of the payload does. Mostly a fresh
        stream (a restarted agent, heard at once whatever its seq); otherwise the genuine stream
        with a seq that is mostly out of order or too far ahead (refused).
        """
        d: dict[str, Any] = msgpack.unpackb(msgpack.packb(self.bases[rack.rack_id]), raw=False)  # deep copy
        if self.rng.random() < STREAM_FRESH_SHARE:
            d["stream_id"] = "%016x" % self.rng.getrandbits(64)  # noqa: UP031
            d["seq"] = self.rng.randrange(1, 1000)
        else:
            d["seq"] = self.rng.randrange(1, 10**6)
        d["timestamp_s"] = self.epoch + self.index / self.rate + self.rng.uniform(-1.0, 1.0)
        return d

    def _paths(self, d: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Every field of the map, nested ones as paths (keys and list indexes)."""
        out: list[tuple[Any, ...]] = []

        def walk(node: Any, path: tuple[Any, ...]) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    out.append((*path, k))
                    walk(v, (*path, k))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    out.append((*path, i))
                    walk(v, (*path, i))

        walk(d, ())
        return out

    @staticmethod
    def _get(d: Any, path: tuple[Any, ...]) -> Any:
        for p in path:
            d = d[p]
        return d

    @staticmethod
    def _set(d: Any, path: tuple[Any, ...], value: Any) -> None:
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value

    def _pick_path(self, d: dict[str, Any]) -> tuple[Any, ...]:
        # Half the picks hit a limit: the fields whose acceptance would matter most.
        if self.rng.random() < 0.5 and isinstance(d.get("measurements"), dict):
            return ("measurements", self.rng.choice(["charge_current_limit_a", "discharge_current_limit_a"]))
        return self.rng.choice(self._paths(d))

    def _value_of_family(self, family: str) -> Any:
        r = self.rng
        if family == "nil":
            return None
        if family == "bool":
            return r.choice([True, False])
        if family == "int":
            return r.choice([0, 1, 9999, -1, 2**63 - 1, 2**64 - 1, -(2**63), r.randrange(-1000, 100000)])
        if family == "float":
            return r.choice([0.0, 9999.0, -1.5, 1e308, float("nan"), float("inf"), r.uniform(-1e4, 1e4)])
        if family == "str":
            return r.choice(["9999", "1e4", "40", "nan", "inf", "true", "", "closed", "ok", "rack-01",
                             "x" * 300, "\u202erack", "0x10",
                             r.choice(string.printable) * r.randrange(1, 20)])
        if family == "bin":
            return r.choice([b"9999", b"rack-01", b"", b"\xff\xfe",
                             bytes(r.randrange(256) for _ in range(8))])
        if family == "array":
            return r.choice([[], [9999], [1, 1], [[[]]], ["a", None], list(range(70))])
        if family == "map":
            return r.choice([{}, {"a": 1}, {"charge_current_limit_a": 9999.0}, {"x": {"y": {"z": [1]}}}])
        return r.choice([msgpack.ExtType(5, b"\x00\x01"), msgpack.Timestamp(4_000_000_000, 0)])

    def _other_type(self, value: Any) -> Any:
        """A value of another msgpack type; half the time one a lax decoder would coerce back to a
        plausible value of the field's type (issue 10: "9999" read as 9999 A, true as 1 A, bytes as text)."""
        family = _msgpack_family(value)
        if self.rng.random() < 0.5:
            if family in ("int", "float"):
                return self.rng.choice(["9999", "1e4", "9999.0", b"9999", True])
            if family == "str":
                return self.rng.choice([value.encode(), [value]])
            if family == "bool":
                return self.rng.choice([1, 0, "true", "false", 1.0])
        families = ["nil", "bool", "int", "float", "str", "bin", "array", "map", "ext"]
        families.remove(_msgpack_family(value))
        return self._value_of_family(self.rng.choice(families))

    def _pack(self, d: Any) -> bytes:
        packed: bytes = msgpack.packb(d, use_bin_type=True)
        return packed

    # -- telemetry mutations -------------------------------------------------------------------

    def telemetry_payload(self, rack: GenuineRack, kind: str) -> bytes:
        r = self.rng
        d = self._base(rack)
        m = d["measurements"]
        if kind == "random_bytes":
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 600)))
        if kind == "truncated":
            raw = self._pack(d)
            return raw[:r.randrange(0, len(raw))]
        if kind == "bit_flip":
            flipped = bytearray(self._pack(d))
            for _ in range(r.randrange(1, 9)):
                bit = r.randrange(len(flipped) * 8)
                flipped[bit // 8] ^= 1 << (bit % 8)
            return bytes(flipped)
        if kind == "type_swap":
            path = self._pick_path(d)
            self._set(d, path, self._other_type(self._get(d, path)))
            return self._pack(d)
        if kind == "out_of_range":
            numeric = [p for p in self._paths(d) if _msgpack_family(self._get(d, p)) in ("int", "float")]
            path = r.choice(numeric + [("measurements", "charge_current_limit_a")] * 6)
            self._set(d, path, r.choice([float("nan"), float("inf"), float("-inf"), -1, -1e-9, -1e308, 1e308,
                                         2**64 - 1, -(2**63), 10_001.0, 1e6, 101.0, 1001.0, 126.0, -41.0,
                                         4e9, 0, 9]))
            return self._pack(d)
        if kind == "absurd_order":
            if r.random() < 0.3:
                d["stream_id"] = "%016x" % r.getrandbits(64)  # noqa: UP031
            d["seq"] = r.choice([2**63 - 1, 2**63, 2**64 - 1, 0, 10**12, d["seq"]])
            now = d["timestamp_s"]
            d["timestamp_s"] = r.choice([4e9, 0.0, -1.0, -4e9, 1e300, now + 3600.0, now + 86400 * 365,
                                         now - 1e6, now])
            return self._pack(d)
        if kind == "contradictory":
            choice = r.randrange(5)
            if choice == 0:
                m["cell_voltage_min_v"], m["cell_voltage_max_v"] = 3.6, 3.1
            elif choice == 1:
                m["temperature_min_c"], m["temperature_max_c"] = 60.0, 20.0
            elif choice == 2:
                d["comm_state"] = "comm_lost"  # with its non-zero limits
            elif choice == 3:
                d["measurements"] = None  # with comm_state ok
            else:
                d["comm_state"] = "comm_lost"
                m["charge_current_limit_a"] = 0.0
                m["discharge_current_limit_a"] = r.choice([0.0, 9999.0, 1e-9])
            return self._pack(d)
        if kind == "unknown_field":
            where = r.choice([d, m, m["alarms"], d["units"][0], d["units"][0]["counters"]])
            key: Any = r.choice(["charge_current_limit", "override", "x" * 100, "seq2", "__class__", 7, b"k"])
            where[key] = r.choice([9999.0, True, "open", None])
            return self._pack(d)
        if kind == "wrong_schema":
            variant = r.choice([[0, 1], [2, 0], [255, 255], [1], [1, 1, 1], "1.1", [1.0, 1], [True, 1], None,
                                "missing", [-1, 0], [1, -1], [1, 2**40], [2, 1], {"major": 1}])
            if variant == "missing":
                del d["schema_version"]
            else:
                d["schema_version"] = variant
            return self._pack(d)
        if kind == "identity_mismatch":
            others = [x.rack_id for x in self.racks if x.rack_id != rack.rack_id]
            choice = r.randrange(3)
            if choice == 0:
                d["rack_id"] = r.choice(others)
            elif choice == 1:
                d["site_id"] = self.site + "-other"
            else:
                d["rack_id"] = "rack-77"
            # An impostor for a weaker rack would raise the bank if taken: speak with high limits.
            m["charge_current_limit_a"] = m["discharge_current_limit_a"] = 9999.0
            return self._pack(d)
        if kind == "oversized":
            m["cell_voltage_max_location"] = "A" * (OVERSIZE_BYTES + r.randrange(1, 4096))
            return self._pack(d)
        if kind == "deep_nesting":
            depth = r.choice([1000, 30000, 60000, 70000])
            return r.choice([b"\x91" * depth + b"\xc0", b"\x81\xa1a" * (depth // 3) + b"\xc0"])
        if kind == "wrong_top_type":
            return self._pack(r.choice([[d], "telemetry", 9999, None, True, 1.5, b"\x00", []]))
        if kind == "new_stream":
            d["stream_id"] = "%016x" % r.getrandbits(64)  # noqa: UP031
            d["seq"] = r.choice([1, 2**63 - 1])
            return self._pack(d)
        raise ValueError(kind)

    def _honest(self, rack: GenuineRack, payload: bytes) -> bytes:
        """Lower honest-typed limits above ``rack``'s genuine ones (and an "open" contactor): see the
        module docstring. Anything the contract would refuse is left as it is."""
        try:
            d = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception:
            return payload
        if not isinstance(d, dict) or d.get("rack_id") != rack.rack_id or d.get("site_id") != self.site:
            return payload  # not this rack speaking: the controller must refuse it, whatever it claims
        m = d.get("measurements")
        if not isinstance(m, dict):
            return payload
        changed = False
        limits = (("charge_current_limit_a", rack.ccl_a), ("discharge_current_limit_a", rack.dcl_a))
        for key, genuine in limits:
            v = m.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and v > genuine and not math.isinf(v) \
                    and v <= 10_000.0:
                m[key] = genuine
                changed = True
        if m.get("contactor") == "open":
            m["contactor"] = "closed"
            changed = True
        # A genuine rack reporting 101 °C, a 9 V cell or a raised alarm flag would rightly latch an
        # alarm (released only by an operator's clear) or derate the bank, so the recovery check
        # after the fuzz would see that, not a defect: honest-typed readings take the genuine values.
        for key, genuine_value in GENUINE_READINGS.items():
            v = m.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and v != genuine_value:
                m[key] = genuine_value
                changed = True
        for key in ("alarms", "warnings"):
            flags = m.get(key)
            if isinstance(flags, dict) and any(v is True for v in flags.values()):
                m[key] = {name: False if v is True else v for name, v in flags.items()}
                changed = True
        if not changed:
            return payload
        self.neutralised += 1
        return self._pack(d)

    # -- other topics --------------------------------------------------------------------------

    def leader_payload(self) -> bytes:
        r = self.rng
        d: dict[str, Any] = {"schema_version": [1, 1], "site_id": self.site, "node_id": "chaos-ctl",
                             "node_number": 1, "epoch": r.randrange(0, 100), "timestamp_s": self.epoch}
        choice = r.randrange(6)
        if choice == 0:
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 200)))
        if choice == 1:
            d["epoch"] = r.choice([2**63 - 1, 2**32, 2**32 - 1, 2**31, -1, 2**64 - 1])
        elif choice == 2:
            path = r.choice(list(d))
            d[path] = self._other_type(d[path])
        elif choice == 3:
            d["node_number"] = r.choice([0, 2, 254, 255, 256, -1])
            d["node_id"] = r.choice(["chaos-ctl", "intruder", "", "x" * 100])
        elif choice == 4:
            raw = self._pack(d)
            return raw[:r.randrange(0, len(raw))]
        else:
            d["extra"] = 1
        return self._pack(d)

    def misc_payload(self) -> bytes:
        r = self.rng
        choice = r.randrange(5)
        if choice == 0:
            return r.choice([b"online", b"offline", b"clear", b"", b"ONLINE", b"\x00"])
        if choice == 1:
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 400)))
        if choice == 2:
            return self._pack(r.choice([{"cmd": "clear_latched_alarms"}, {"cmd": 9999}, [],
                                        {"role": "active"}]))
        rack = r.choice(self.racks)
        return self.telemetry_payload(rack, r.choice(list(KINDS)))

    # -- the stream ----------------------------------------------------------------------------

    def case(self) -> Case:
        r = self.rng
        self.index += 1
        topic_class = r.choices(list(TOPIC_CLASSES), weights=list(TOPIC_CLASSES.values()))[0]
        kind = r.choices(list(KINDS), weights=list(KINDS.values()))[0]
        # The weakest rack binds the bank (n × min): a limit wrongly taken there shows on the bus.
        rack = r.choices(self.racks, weights=[2] + [1] * (len(self.racks) - 1))[0]
        if topic_class == "roster_telemetry":
            payload = self._honest(rack, self.telemetry_payload(rack, kind))
            return Case(self.topics.rack_telemetry(rack.rack_id), payload, kind, topic_class)
        if topic_class == "unknown_rack_telemetry":
            level = r.choice([*ODD_RACK_LEVELS, f"rack-{r.randrange(100, 100000)}"])
            payload = self.telemetry_payload(rack, kind)
            if kind in ("new_stream", "absurd_order") and level.strip():
                # A well-formed payload of a rack that is not on the roster: identity consistent.
                d = msgpack.unpackb(payload, raw=False)
                d["rack_id"] = level
                payload = self._pack(d)
            return Case(self.topics.rack_telemetry(level), payload, kind, topic_class)
        if topic_class == "leader":
            return Case(self.topics.leader, self.leader_payload(), "leader", topic_class,
                        retain=r.random() < 0.1)
        if topic_class == "rack_status":
            return Case(self.topics.rack_status(rack.rack_id), self.misc_payload(), "misc", topic_class,
                        retain=r.random() < 0.1)
        if topic_class == "controller_status":
            node = r.choice(["chaos-ctl", "ctl-b", "x"])
            return Case(self.topics.controller_status(node), self.misc_payload(), "misc", topic_class)
        if topic_class == "cluster_state":
            return Case(self.topics.cluster_state, self.misc_payload(), "misc", topic_class)
        if topic_class == "cmd":
            target = r.choice(["all", "chaos-ctl", rack.rack_id, "clear"])
            return Case(self.topics.command(target), self.misc_payload(), "misc", topic_class)
        payload = self._honest(rack, self.telemetry_payload(rack, kind))
        return Case(self.other_site.rack_telemetry(rack.rack_id), payload, kind, topic_class)

    def cases(self, count: int) -> Iterator[Case]:
        for _ in range(count):
            yield self.case()


# -- sending -----------------------------------------------------------------------------------------


class RawPublisher:
    """One MQTT 3.1.1 connection, QoS 0 only (the packets of ``bench/controller_reaction.py``):
    cheap enough that the fuzz rate is the generator's. Reconnects if the broker drops it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reconnects = 0
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(f"chaos-fuzz-{time.monotonic_ns()}"))
        if sock.recv(4)[:2] != b"\x20\x02":
            raise RuntimeError("fuzz publisher: no CONNACK")
        return sock

    def send(self, cases: list[Case]) -> None:
        chunks = []
        for c in cases:
            packet, _ = publish_packet(c.topic, c.payload)
            if c.retain:
                packet[0] |= 0x01
            chunks.append(bytes(packet))
        data = b"".join(chunks)
        try:
            self.sock.sendall(data)
        except OSError:
            self.reconnects += 1
            self.sock.close()
            self.sock = self._connect()
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class FuzzResult:
    seed: int
    count: int
    rate_per_s: float
    epoch: float
    digest: str
    sent_by_kind: dict[str, int]
    sent_by_topic: dict[str, int]
    neutralised: int
    publisher_reconnects: int
    fuzz_seconds: float
    controller_alive: bool
    controller_exit: int | None
    tracebacks: int
    allowed_ccl_a: float
    allowed_dcl_a: float
    max_ccl_a: float
    max_dcl_a: float
    worst_excess_a: float
    excess_frames: list[dict[str, float]]
    limits_frames: int
    period_ms: int
    max_gap_s: float
    silence_bound_s: float
    recovered: bool
    recovery_s: float | None
    counters_before: dict[str, int]
    counters_after: dict[str, int]
    rejected_delta: int
    accepted_delta: int
    unknown_racks_tracked: int
    mqtt_events: dict[str, int]
    can_events: dict[str, int]
    rss_before_bytes: int
    rss_after_bytes: int
    log_bytes: int
    log_bytes_per_rejected: float
    log_lines_by_kind: dict[str, int] = field(default_factory=dict)
    genuine_sent: int = 0
    genuine_late: int = 0
    stall_resumed: bool | None = None  # None: not tried (failover off)
    stall_resume_s: float | None = None
    stall_role: str = ""


def _log_kinds(text: str, top: int = 12) -> dict[str, int]:
    """Log lines by level, logger and the first words of the message (where the bytes come from)."""
    kinds: Counter[str] = Counter()
    for line in text.splitlines():
        parts = line.split(" ", 4)
        if len(parts) == 5 and parts[2] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            words = " ".join(w for w in parts[4].split()[:3] if not any(ch.isdigit() for ch in w))
            kinds[f"{parts[2]} {parts[3]} {words}"] += 1
        else:
            kinds["<other lines>"] += 1
    return dict(kinds.most_common(top))


def genuine_racks(seed: int) -> list[GenuineRack]:
    return [GenuineRack(f"rack-{i + 1:02d}", ccl, dcl, stream_id_for(seed, f"rack-{i + 1:02d}"))
            for i, (ccl, dcl) in enumerate(GENUINE_LIMITS)]


def run_fuzz(work: Path, *, seed: int = 1, count: int = DEFAULT_COUNT, rate: float = DEFAULT_RATE,
             epoch: float | None = None, period_ms: int = 200, failover: bool = True,
             progress: Callable[[str], None] | None = None) -> FuzzResult:
    """Start the rig under ``work``, fuzz, measure, stop everything; return the figures."""
    say = progress or (lambda _line: None)
    racks = genuine_racks(seed)
    rig = ChaosRig(work, racks, ControllerSettings(period_ms=period_ms, failover=failover))
    try:
        rig.start()
        assert rig.listener is not None
        rig.wait_granted()
        time.sleep(SETTLE_S)
        epoch = time.time() if epoch is None else epoch
        mutator = Mutator(seed, racks, site=rig.site, prefix=rig.prefix, epoch=epoch, rate=rate)
        before = rig.metrics()
        counters0 = telemetry_counters(before)
        rss0 = rss_bytes(rig.controller_pid)
        log0 = rig.controller_stderr.stat().st_size
        publisher = RawPublisher(rig.broker.port)
        digest = hashlib.sha256()
        by_kind: Counter[str] = Counter()
        by_topic: Counter[str] = Counter()
        say(f"fuzzing: seed {seed}, {count} payloads at {rate:g}/s, epoch {epoch!r}")
        t_start = time.monotonic()
        sent = 0
        stream = mutator.cases(count)
        next_report = t_start + 10.0
        while sent < count:
            due = min(count, int((time.monotonic() - t_start) * rate) + 1)
            batch = []
            for _ in range(due - sent):
                case = next(stream)
                digest.update(case.topic.encode() + bytes([0, case.retain])
                              + struct.pack(">I", len(case.payload)) + case.payload)
                by_kind[case.kind] += 1
                by_topic[case.topic_class] += 1
                batch.append(case)
            if batch:
                publisher.send(batch)
                sent += len(batch)
            if rig.controller_returncode() is not None:
                say(f"controller exited with status {rig.controller_returncode()} after {sent} payloads")
                break
            now = time.monotonic()
            if now >= next_report:
                say(f"  {sent} sent, {now - t_start:.0f} s")
                next_report += 10.0
            time.sleep(max(0.0, min(BATCH_S, t_start + sent / rate - time.monotonic())))
        t_end = time.monotonic()
        publisher.close()

        allowed_ccl, allowed_dcl = rig.allowed(charge=True), rig.allowed(charge=False)
        recovered_frame = rig.listener.wait_for(
            lambda f: (f.ccl_a >= allowed_ccl - FRAME_RESOLUTION_A
                       and f.dcl_a >= allowed_dcl - FRAME_RESOLUTION_A),
            RECOVERY_TIMEOUT_S)
        t_check = time.monotonic()
        after = rig.metrics()
        counters1 = telemetry_counters(after)
        alive = rig.controller_returncode() is None
        rss1 = rss_bytes(rig.controller_pid) if alive else 0
        log1 = rig.controller_stderr.stat().st_size
        frames = rig.listener.since(t_start)
        window = [f for f in frames if f.t <= t_check]
        max_ccl = max((f.ccl_a for f in window), default=0.0)
        max_dcl = max((f.dcl_a for f in window), default=0.0)
        excess = [f for f in window if f.ccl_a > allowed_ccl + FRAME_RESOLUTION_A / 2
                  or f.dcl_a > allowed_dcl + FRAME_RESOLUTION_A / 2]
        worst = max((max(f.ccl_a - allowed_ccl, f.dcl_a - allowed_dcl) for f in excess), default=0.0)
        rejected = rejected_total(counters1) - rejected_total(counters0)
        log_text = rig.controller_stderr.read_bytes()[log0:log1].decode(errors="replace")
        bound = 2 * period_ms / 1000.0 + SILENCE_SLACK_S
        stall = _stall_and_resume(rig, bound) if failover and alive else None
    finally:
        rig.stop()
    genuine = rig.publisher_stats()
    exit_code = rig.controller_returncode()
    return FuzzResult(
        seed=seed, count=sent, rate_per_s=rate, epoch=epoch, digest=digest.hexdigest()[:16],
        sent_by_kind=dict(sorted(by_kind.items())), sent_by_topic=dict(sorted(by_topic.items())),
        neutralised=mutator.neutralised, publisher_reconnects=publisher.reconnects,
        fuzz_seconds=t_end - t_start, controller_alive=alive,
        controller_exit=None if alive else exit_code, tracebacks=count_tracebacks(rig.controller_stderr),
        allowed_ccl_a=allowed_ccl, allowed_dcl_a=allowed_dcl, max_ccl_a=max_ccl, max_dcl_a=max_dcl,
        worst_excess_a=round(worst, 3),
        excess_frames=[{"t_s": round(f.t - t_start, 3), "ccl_a": f.ccl_a, "dcl_a": f.dcl_a}
                       for f in excess[:20]],
        limits_frames=len(window), period_ms=period_ms,
        max_gap_s=max_gap_s(window, start=t_start, end=t_check),
        silence_bound_s=2 * period_ms / 1000.0 + SILENCE_SLACK_S,
        recovered=recovered_frame is not None,
        recovery_s=None if recovered_frame is None else round(recovered_frame.t - t_end, 3),
        counters_before=counters0, counters_after=counters1, rejected_delta=rejected,
        accepted_delta=counters1.get("accepted", 0) - counters0.get("accepted", 0),
        unknown_racks_tracked=len(after.get("bmslink_controller_unknown_rack_payloads_total", {})),
        mqtt_events=counters_under(after, "bmslink_controller_mqtt_"),
        can_events=counters_under(after, "bmslink_controller_can_"),
        rss_before_bytes=rss0, rss_after_bytes=rss1, log_bytes=log1 - log0,
        log_bytes_per_rejected=round((log1 - log0) / rejected, 2) if rejected > 0 else float("inf"),
        log_lines_by_kind=_log_kinds(log_text),
        genuine_sent=genuine["sent"], genuine_late=genuine["late"],
        stall_resumed=None if stall is None else stall[0] is not None,
        stall_resume_s=None if stall is None or stall[0] is None else round(stall[0], 3),
        stall_role="" if stall is None else stall[1],
    )


def _stall_and_resume(rig: ChaosRig, bound_s: float) -> tuple[float | None, str]:
    """Freeze the controller for STALL_S and resume it; (seconds from the resume to the start of the
    unbroken run of full grants that ends the watch, None if there is no such run of STALL_STEADY_S;
    the role it ends in). A resumed controller may send a late set or two before it notices its stall
    and fences: only how the watch ends counts."""
    assert rig.listener is not None
    allowed_ccl, allowed_dcl = rig.allowed(charge=True), rig.allowed(charge=False)
    rig.procs.send_signal("controller", signal.SIGSTOP)
    time.sleep(STALL_S)
    rig.procs.send_signal("controller", signal.SIGCONT)
    t_resume = time.monotonic()
    time.sleep(STALL_OBSERVE_S)
    t_end = time.monotonic()
    run_start: float | None = None
    later = t_end
    for f in reversed(rig.listener.since(t_resume)):
        if later - f.t > bound_s or f.ccl_a < allowed_ccl - FRAME_RESOLUTION_A \
                or f.dcl_a < allowed_dcl - FRAME_RESOLUTION_A:
            break
        run_start = later = f.t
    roles = rig.metrics().get("bmslink_controller_role", {})
    role = next((name for name, v in roles.items() if v == 1.0), "?")
    if run_start is None or t_end - run_start < STALL_STEADY_S:
        return None, role
    return run_start - t_resume, role


def print_result(r: FuzzResult) -> None:
    line = "-" * 78
    mib = 1024 * 1024
    print(line)
    print(f"fuzz: seed {r.seed}, {r.count} payloads in {r.fuzz_seconds:.1f} s "
          f"({r.count / r.fuzz_seconds:.0f}/s), digest {r.digest}, epoch {r.epoch!r}")
    print(f"  by kind:  {', '.join(f'{k} {v}' for k, v in r.sent_by_kind.items())}")
    print(f"  by topic: {', '.join(f'{k} {v}' for k, v in r.sent_by_topic.items())}")
    print(f"  honest-typed limits lowered to the genuine ones before sending: {r.neutralised}; "
          f"publisher reconnects: {r.publisher_reconnects}")
    print(line)
    rows = [
        ("controller alive after the fuzz",
         "yes" if r.controller_alive else f"NO (exit {r.controller_exit})"),
        ("tracebacks in its log", str(r.tracebacks)),
        ("allowed by the genuine racks CCL / DCL (A)", f"{r.allowed_ccl_a:.1f} / {r.allowed_dcl_a:.1f}"),
        ("max on the bus CCL / DCL (A)", f"{r.max_ccl_a:.1f} / {r.max_dcl_a:.1f}"),
        ("worst excess (A), frames above", f"{r.worst_excess_a:.1f}, {len(r.excess_frames)}"),
        ("0x351 frames, longest gap (bound)",
         f"{r.limits_frames}, {r.max_gap_s:.3f} s ({r.silence_bound_s:.2f} s)"),
        ("full grant again after the fuzz", f"yes, {r.recovery_s:.2f} s" if r.recovered else "NO"),
        (f"... after a {STALL_S:g} s freeze of the controller",
         "not tried" if r.stall_resumed is None else
         f"yes, {r.stall_resume_s:.2f} s" if r.stall_resumed else f"NO (role {r.stall_role})"),
        ("rejected (telemetry counters, delta)", str(r.rejected_delta)),
        ("accepted (delta; genuine sent in all)",
         f"{r.accepted_delta} ({r.genuine_sent}, late {r.genuine_late})"),
        ("unknown racks tracked", str(r.unknown_racks_tracked)),
        ("RSS before / after (MiB)", f"{r.rss_before_bytes / mib:.1f} / {r.rss_after_bytes / mib:.1f}"),
        ("log bytes written, per rejected payload", f"{r.log_bytes}, {r.log_bytes_per_rejected:.2f}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value}")
    print(f"counters after: {r.counters_after}")
    print(f"mqtt: {r.mqtt_events}")
    print(f"can: {r.can_events}")
    print("log lines by kind (during the fuzz):")
    for kind, n in r.log_lines_by_kind.items():
        print(f"  {n:>7}  {kind}")
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="payloads per second")
    parser.add_argument("--epoch", type=float, default=None,
                        help="wall time the payloads' stamps are relative to (default: now; printed)")
    parser.add_argument("--period-ms", type=int, default=200, help="the controller's can.period_ms")
    parser.add_argument("--no-failover", action="store_true",
                        help="controller without failover (the leader record is then not read)")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "bmslink-fuzz.json")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bmslink-fuzz-") as tmp:
        work = args.workdir or Path(tmp)
        result = run_fuzz(work, seed=args.seed, count=args.count, rate=args.rate, epoch=args.epoch,
                          period_ms=args.period_ms, failover=not args.no_failover,
                          progress=lambda s: print(s, flush=True))
    print_result(result)
    args.json.write_text(json.dumps(asdict(result), indent=2))
    print(f"figures written to {args.json}")
    ok = (result.controller_alive and result.worst_excess_a <= 0 and result.recovered
          and result.max_gap_s <= result.silence_bound_s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
