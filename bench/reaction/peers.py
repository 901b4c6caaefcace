"""The bench's helper processes, each commanded by lines on stdin and answering on stdout.

* ``publisher``: a low-CPU raw-socket MQTT publisher. It sends pre-encoded payloads
  (:mod:`bench.reaction.wire`) for N racks, evenly spread, at a set total rate.
* ``floor``: the bare floor, a minimal paho subscriber with TCP_NODELAY that only receives and
  msgpack-decodes every message, and sends one 0x351 frame over the CAN bridge when a rack's charge
  limit drops. Its reaction is the transport's floor.

Run by the rig as ``python -m bench.reaction.peers {publisher,floor} --port P --racks N --base A ...``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

from bench.reaction.wire import (
    ID_LIMITS,
    PREFIX,
    SITE,
    bank_a,
    connect_packet,
    publish_packet,
    rack_ids,
    telemetry_template,
)

MIN_SLEEP_S = 0.002  # the publisher wakes at most this often (sends what is due in one write)
MAX_BEHIND_S = 0.5  # a publisher further behind its schedule skips (and counts) rather than bursts


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
    # Each rack's own seq, counting up by one per payload as an agent's does (a seq shared by all
    # racks would jump by the roster size between one rack's payloads, which the controller refuses
    # as a jump beyond its publish rate); the start is above anything an earlier run used.
    seqs = [time.time_ns() // 1000] * n
    rate = float(args.rate)
    t0, sent, total, late = time.monotonic(), 0, 0, 0
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    pending = b""

    def one(i: int) -> bytes:
        seqs[i] += 1
        struct.pack_into(">Q", packets[i], seq_at[i], seqs[i])
        return bytes(packets[i])

    def reply(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    reply("ready")
    while True:
        now = time.monotonic()
        due = int((now - t0) * rate)
        if due - sent > rate * MAX_BEHIND_S:
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


def run_floor(args: argparse.Namespace) -> None:
    """paho subscriber: receive + msgpack-decode every message; one 0x351 when a CCL drops.

    Commands: ``stats`` (answers ``stats RECEIVED``); ``quit``.
    """
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reaction.peers")
    parser.add_argument("role", choices=["publisher", "floor"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--racks", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--base", type=float, required=True)
    parser.add_argument("--can", default="")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    if args.role == "publisher":
        run_publisher(args)
    else:
        run_floor(args)


if __name__ == "__main__":
    main(sys.argv[1:])
