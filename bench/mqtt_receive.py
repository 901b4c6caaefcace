"""Receive cost of the MQTT client stacks the controller could use, on their public APIs only.

A real Mosquitto on a free 127.0.0.1 port; a raw-socket publisher (its own process, pre-encoded
packets, so it costs little) sends 1.4 kB QoS 0 telemetry; the receiver, one fresh process per run,
measures from its first message to its last: throughput, CPU µs per message (all its threads,
``time.process_time``), and the garbage collector's work (objects found in reference cycles and time
spent collecting, from ``gc.callbacks``). Two loads:

* ``burst``: N messages as fast as the publisher can send them (receive throughput at saturation);
* ``paced``: the controller's load, 1000 racks × 2 Hz = 2000 msg/s, arriving as from independent
  racks (Poisson): most wake-ups of the receiver find one message.

Candidates (all MQTT 3.1.1, the controller's default):

* ``paho-loop``: paho 2.x driven from the asyncio loop through its external-loop API (``loop_read``,
  ``loop_write``, ``loop_misc``, ``add_reader``); ``loop_read`` handles one packet per call, so each
  readable event calls it until a call delivers no message (at most 64 calls);
* ``paho-loop-1``: the same, one ``loop_read`` per readable event;
* ``paho-thread``: paho's own network thread (``loop_start``), each message handed to the loop with
  ``call_soon_threadsafe`` (what a handler on the loop needs);
* ``gmqtt``: gmqtt, an asyncio-native client (its own protocol parser on an asyncio transport);
* ``aiomqtt``: aiomqtt (paho in its external-loop mode, messages through an asyncio queue; not a
  project dependency: skipped unless installed by hand);
* ``session``: ``shared.mqtt.MqttSession`` as the controller uses it (gmqtt, with the session's
  handler contract on top).

Run: ``python bench/mqtt_receive.py [--runs 3] [--n 50000] [--candidates paho-loop,gmqtt]``; prints one
table of medians over the runs (and each run's figures).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmslink.processes import find_mosquitto, free_port

PAYLOAD_BYTES = 1400
RACKS = 1000
PACED_RATE = 2000  # msg/s: 1000 racks at 2 Hz
PACED_SECONDS = 5
CANDIDATES = ("paho-loop", "paho-loop-1", "paho-thread", "gmqtt", "aiomqtt", "session")
TOPIC_FILTER = "bench/site/rack/+/telemetry"
READY = "ready"
RECEIVE_DEADLINE_S = 120.0


# -- the publisher: raw MQTT 3.1.1 over a socket ---------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _connect_packet(client_id: str) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def _publish_packet(topic: str, payload: bytes) -> bytes:
    body = _utf8(topic) + payload
    return b"\x30" + _remaining_length(len(body)) + body


def publish(port: int, n: int, rate: float) -> None:
    """Send n QoS 0 telemetry messages, at ``rate`` msg/s (0: as fast as possible)."""
    packets = [
        _publish_packet(f"bench/site/rack/r{i % RACKS:04d}/telemetry",
                        i.to_bytes(4, "big") + bytes(PAYLOAD_BYTES - 4))
        for i in range(n)
    ]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_connect_packet(f"bench-pub-{os.getpid()}"))
        if sock.recv(4)[:1] != b"\x20":
            raise RuntimeError("no CONNACK")
        if rate <= 0:
            for start in range(0, n, 40):
                sock.sendall(b"".join(packets[start:start + 40]))
        else:
            # Arrivals of many independent racks: a Poisson process (fixed seed), each message sent
            # when its time has come, so that some wake-ups of the receiver find more than one.
            arrivals, t = random.Random(1), 0.0
            due_s = []
            for _ in range(n):
                t += arrivals.expovariate(rate)
                due_s.append(t)
            start_s, sent = time.monotonic(), 0
            while sent < n:
                now = time.monotonic() - start_s
                due = sent
                while due < n and due_s[due] <= now:
                    due += 1
                if due > sent:
                    sock.sendall(b"".join(packets[sent:due]))
                    sent = due
                time.sleep(0.0002)
        sock.sendall(b"\xe0\x00")  # DISCONNECT


# -- the receivers -----------------------------------------------------------------------------------


class Meter:
    """Counts messages; the clocks run from the first message to the last."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.bad = 0
        self.t0 = self.c0 = self.t1 = self.c1 = 0.0
        self.gc_collected = 0
        self.gc_runs = [0, 0, 0]
        self.gc_s = 0.0
        self._gc_start = 0.0
        self.done = asyncio.Event()

    def on_message(self, topic: str, payload: bytes | bytearray) -> None:
        if self.count == 0:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            gc.callbacks.append(self._gc)
        if len(payload) != PAYLOAD_BYTES or not topic.endswith("/telemetry"):
            self.bad += 1
        self.count += 1
        if self.count == self.n:
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            gc.callbacks.remove(self._gc)
            self.done.set()

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start
            self.gc_collected += info["collected"]
            self.gc_runs[info["generation"]] += 1

    def result(self) -> dict[str, Any]:
        n = self.count - 1  # the clocks start at the first message
        wall, cpu = self.t1 - self.t0, self.c1 - self.c0
        return {
            "received": self.count, "bad": self.bad, "msg_per_s": n / wall if wall else 0.0,
            "cpu_us_per_msg": cpu / n * 1e6, "cpu_share": cpu / wall if wall else 0.0,
            "gc_objects_per_msg": self.gc_collected / n, "gc_us_per_msg": self.gc_s / n * 1e6,
            "gc_runs": self.gc_runs,
        }


async def _paho_loop(port: int, meter: Meter, one_per_event: bool) -> None:
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}",
                         protocol=paho.MQTTv311)
    subscribed = asyncio.Event()
    delivered = 0

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        nonlocal delivered
        delivered += 1
        meter.on_message(msg.topic, msg.payload)

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(TOPIC_FILTER, 0)
    def register_write(_c: Any, _u: Any, sock: Any) -> None:
        loop.add_writer(sock, client.loop_write)

    def unregister_write(_c: Any, _u: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    client.on_socket_register_write = register_write
    client.on_socket_unregister_write = unregister_write

    def readable() -> None:
        nonlocal delivered
        if one_per_event:
            client.loop_read()
            return
        for _ in range(64):
            delivered = 0
            client.loop_read()
            if not delivered:
                break

    client.connect("127.0.0.1", port, keepalive=60)
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    loop.add_reader(sock, readable)
    client.loop_write()

    async def misc() -> None:
        while True:
            await asyncio.sleep(0.5)
            client.loop_misc()

    misc_task = asyncio.create_task(misc())
    await subscribed.wait()
    print(READY, flush=True)
    await meter.done.wait()
    misc_task.cancel()
    loop.remove_reader(sock)
    client.disconnect()


async def _paho_thread(port: int, meter: Meter) -> None:
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}",
                         protocol=paho.MQTTv311)
    subscribed = asyncio.Event()
    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        loop.call_soon_threadsafe(meter.on_message, msg.topic, msg.payload)

    def on_subscribe(*_a: Any) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    client.on_message = on_message
    client.on_subscribe = on_subscribe

    def on_connect(c: Any, *_a: Any) -> None:
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.subscribe(TOPIC_FILTER, 0)

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    await subscribed.wait()
    print(READY, flush=True)
    await meter.done.wait()
    client.disconnect()
    client.loop_stop()


async def _gmqtt(port: int, meter: Meter) -> None:
    import gmqtt  # noqa: PLC0415
    from gmqtt.mqtt.constants import MQTTv311  # noqa: PLC0415

    client = gmqtt.Client(f"bench-{os.getpid()}")
    subscribed = asyncio.Event()
    client.on_message = lambda _c, topic, payload, _qos, _props: meter.on_message(topic, payload)
    client.on_subscribe = lambda *_a: subscribed.set()
    await client.connect("127.0.0.1", port, keepalive=60, version=MQTTv311)
    client.subscribe(TOPIC_FILTER, qos=0)
    await subscribed.wait()
    print(READY, flush=True)
    await meter.done.wait()
    await client.disconnect()


async def _aiomqtt(port: int, meter: Meter) -> None:
    import aiomqtt  # noqa: PLC0415

    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{os.getpid()}",
                              protocol=aiomqtt.ProtocolVersion.V311, keepalive=60) as client:
        await client.subscribe(TOPIC_FILTER, qos=0)
        print(READY, flush=True)
        async for message in client.messages:
            meter.on_message(message.topic.value, message.payload)
            if meter.done.is_set():
                break


async def _session(port: int, meter: Meter) -> None:
    from shared.config import MqttConfig  # noqa: PLC0415
    from shared.mqtt import MqttSession  # noqa: PLC0415

    config = MqttConfig(host="127.0.0.1", port=port, protocol="3.1.1", keepalive_s=60)
    session = MqttSession(config, f"bench-{os.getpid()}",
                          on_message=lambda m: meter.on_message(m.topic, m.payload))
    session.subscribe(TOPIC_FILTER, 0)
    await session.start()
    if not await session.wait_connected(5):
        raise RuntimeError("the session did not connect")
    await asyncio.sleep(0.5)  # SUBACK (the session has no signal for it)
    print(READY, flush=True)
    await meter.done.wait()
    await session.stop()


# Candidates whose library the project does not depend on (installed by hand to measure them).
LIBRARY = {"aiomqtt": "aiomqtt"}

RECEIVERS: dict[str, Callable[[int, Meter], Any]] = {
    "paho-loop": lambda port, meter: _paho_loop(port, meter, one_per_event=False),
    "paho-loop-1": lambda port, meter: _paho_loop(port, meter, one_per_event=True),
    "paho-thread": _paho_thread,
    "gmqtt": _gmqtt,
    "aiomqtt": _aiomqtt,
    "session": _session,
}


async def receive(candidate: str, port: int, n: int) -> dict[str, Any]:
    meter = Meter(n)
    task = asyncio.create_task(RECEIVERS[candidate](port, meter))
    try:
        async with asyncio.timeout(RECEIVE_DEADLINE_S):
            await meter.done.wait()
    except TimeoutError:
        return {"received": meter.count, "error": "timed out"}
    finally:
        async with asyncio.timeout(5):
            await task
    return meter.result()


# -- the orchestration -------------------------------------------------------------------------------


def _one_run(port: int, candidate: str, n: int, rate: float) -> dict[str, Any]:
    me = [sys.executable, __file__, "--port", str(port), "--n", str(n)]
    receiver = subprocess.Popen([*me, "--receive", candidate], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        line = receiver.stdout.readline().strip()
        if line != READY:
            raise RuntimeError(f"{candidate} receiver did not get ready: {line!r}")
        subprocess.run([*me, "--publish", "--rate", str(rate)], check=True, timeout=RECEIVE_DEADLINE_S)
        out, _ = receiver.communicate(timeout=RECEIVE_DEADLINE_S)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _fmt_row(name: str, load: str, rows: list[dict[str, Any]]) -> str:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    return (f"{name:12} {load:6} {med('msg_per_s'):9.0f} {med('cpu_us_per_msg'):8.1f} "
            f"{100 * med('cpu_share'):6.1f} {med('gc_objects_per_msg'):7.2f} {med('gc_us_per_msg'):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=50_000, help="messages of the burst")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--loads", default="burst,paced")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    # internal: the receiver and publisher processes
    parser.add_argument("--port", type=int)
    parser.add_argument("--receive")
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args()

    if args.publish:
        publish(args.port, args.n, args.rate)
        return
    if args.receive:
        print(json.dumps(asyncio.run(receive(args.receive, args.port, args.n))), flush=True)
        return

    candidates = []
    for candidate in (c for c in args.candidates.split(",") if c):
        if candidate not in RECEIVERS:
            parser.error(f"unknown candidate {candidate!r}; choose among {', '.join(RECEIVERS)}")
        module = LIBRARY.get(candidate)
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"skipped {candidate}: {module} is not installed (pip install {module})", flush=True)
            continue
        candidates.append(candidate)
    loads = {"burst": (args.n, 0.0), "paced": (PACED_RATE * PACED_SECONDS, float(PACED_RATE))}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bmslink-bench-mqtt-") as folder:
        conf = Path(folder) / "mosquitto.conf"
        # No per-client queue limit: a slow receiver must not lose QoS 0 messages to the broker.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        "persistence false\nmax_queued_messages 0\nmax_queued_bytes 0\n"
                        "log_type error\n")
        broker = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            results: dict[str, dict[str, list[dict[str, Any]]]] = {}
            # Runs interleaved (every candidate once, then again) so a slow stretch of the VM hits all.
            for run in range(args.runs):
                for load, (n, rate) in loads.items():
                    if load not in args.loads.split(","):
                        continue
                    for candidate in candidates:
                        r = _one_run(port, candidate, n, rate)
                        results.setdefault(candidate, {}).setdefault(load, []).append(r)
                        print(f"run {run + 1} {candidate:12} {load:6} {json.dumps(r)}", flush=True)
        finally:
            broker.terminate()
            broker.wait(timeout=5)
    print()
    print(f"MQTT receive, {PAYLOAD_BYTES} B QoS 0, MQTT 3.1.1, median of {args.runs} runs "
          f"(burst: {args.n} msgs unpaced; paced: {PACED_RATE} msg/s for {PACED_SECONDS} s)")
    print(f"{'candidate':12} {'load':6} {'msg/s':>9} {'CPU µs':>8} {'CPU %':>6} {'gc obj':>7} {'gc µs':>7}"
          "   (per message; CPU % of one core while receiving)")
    for candidate, by_load in results.items():
        for load, rows in by_load.items():
            if all("error" not in r for r in rows):
                print(_fmt_row(candidate, load, rows))
            else:
                print(f"{candidate:12} {load:6} failed: {rows}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
