"""The bench's helper processes, each commanded by lines on stdin and answering on stdout.

* ``publisher``: a low-CPU raw-socket MQTT publisher. It sends pre-encoded payloads
  (:mod:`bench.reaction.wire`) for N racks, evenly spread, at a set total rate.
* ``floor``: the bare floor on the controller's own client stack: a gmqtt subscriber (MQTT 3.1.1, as
  the controller's default) that only receives and msgpack-decodes every message, and sends one 0x351
  frame over the CAN bridge when a rack's charge limit drops. Its reaction is the floor the controller
  is held to.
* ``raw-floor``: the same work on a raw socket (MQTT packets parsed by hand, no client library):
  what the transport itself costs, reported beside the gmqtt floor.

Run by the rig as ``python -m bench.reaction.peers {publisher,floor,raw-floor} --port P --racks N ...``.
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

from bench.reaction.wire import (
    ID_LIMITS,
    PREFIX,
    SITE,
    bank_a,
    connect_packet,
    publish_packet,
    rack_ids,
    subscribe_packet,
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


class _FloorWork:
    """What every floor does per message: msgpack-decode it; one 0x351 when a rack's CCL drops."""

    def __init__(self, args: argparse.Namespace) -> None:
        # Imported here, not at the top: the publisher role needs neither. Bound once, not per message.
        import can  # noqa: PLC0415
        import msgpack  # noqa: PLC0415

        from shared.dbc import load_dbc  # noqa: PLC0415

        self._message = can.Message
        self._unpack = msgpack.unpackb
        self.limits = load_dbc("pylon").get_message_by_frame_id(ID_LIMITS)
        self.bus = can.Bus(interface="remote", channel=args.can)
        self.n, self.base = args.racks, args.base
        self.last: dict[str, float] = {}
        self.received = 0

    def on_payload(self, payload: bytes) -> None:
        self.received += 1
        data = self._unpack(payload, raw=False, strict_map_key=True)
        ccl = data["measurements"]["charge_current_limit_a"]
        rack = data["rack_id"]
        if self.last.get(rack, self.base) != ccl:
            self.last[rack] = ccl
            if ccl < self.base:
                frame = self.limits.encode({
                    "ChargeVoltageLimit": 55.2, "ChargeCurrentLimit": bank_a(ccl, self.n),
                    "DischargeCurrentLimit": 200.0, "DischargeVoltageLimit": 46.4})
                self.bus.send(self._message(arbitration_id=ID_LIMITS, data=frame, is_extended_id=False))

    def command(self, line: str) -> bool:
        """One stdin command (``stats``: answers ``stats RECEIVED``); False on ``quit``."""
        if line.strip() == "stats":
            print(f"stats {self.received}", flush=True)
        return line.strip() != "quit"

    def close(self) -> None:
        self.bus.shutdown()


def run_floor(args: argparse.Namespace) -> None:
    """gmqtt subscriber (public API, MQTT 3.1.1): receive + decode every message; 0x351 on a drop."""
    import asyncio  # noqa: PLC0415

    import gmqtt  # noqa: PLC0415
    from gmqtt.mqtt.constants import MQTTv311  # noqa: PLC0415

    from shared.topics import Topics  # noqa: PLC0415

    work = _FloorWork(args)
    topics = Topics(PREFIX, SITE)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        subscribed = asyncio.Event()
        client = gmqtt.Client(f"bench-floor-{os.getpid()}")
        client.on_message = lambda _c, _t, payload, _q, _p: work.on_payload(payload)
        client.on_subscribe = lambda *_: subscribed.set()
        await client.connect(args.host, args.port, keepalive=5, version=MQTTv311)
        client.subscribe(topics.all_rack_telemetry, qos=0)
        await asyncio.wait_for(subscribed.wait(), 5)
        print("ready", flush=True)
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        pending = [b""]

        def on_stdin() -> None:
            chunk = os.read(stdin, 65536)
            pending[0] += chunk
            while b"\n" in pending[0]:
                line, pending[0] = pending[0].split(b"\n", 1)
                if not work.command(line.decode()):
                    done.set()
            if not chunk:
                done.set()

        loop.add_reader(stdin, on_stdin)
        await done.wait()
        loop.remove_reader(stdin)
        await client.disconnect()

    try:
        asyncio.run(serve())
    finally:
        work.close()


def run_raw_floor(args: argparse.Namespace) -> None:
    """Raw-socket subscriber: MQTT 3.1.1 packets parsed by hand; the same work per message."""
    from shared.topics import Topics  # noqa: PLC0415

    work = _FloorWork(args)
    topics = Topics(PREFIX, SITE)
    sock = socket.create_connection((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_id = f"bench-raw-floor-{os.getpid()}"
    sock.sendall(connect_packet(client_id) + subscribe_packet(topics.all_rack_telemetry))
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_READ)
    buf = bytearray()
    pending = b""
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                    used = 0
                    while True:
                        packet = _next_packet(buf, used)
                        if packet is None:
                            break
                        kind, start, end = packet
                        if kind == 0x30:  # PUBLISH, QoS 0: topic, then the payload
                            topic_len = struct.unpack_from(">H", buf, start)[0]
                            work.on_payload(bytes(buf[start + 2 + topic_len:end]))
                        elif kind == 0x90:  # SUBACK
                            print("ready", flush=True)
                        used = end
                    del buf[:used]
                else:
                    chunk = os.read(stdin, 65536)
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if not work.command(line.decode()):
                            return
                    if not chunk:
                        return
    finally:
        sock.close()
        work.close()


def _next_packet(buf: bytearray, at: int) -> tuple[int, int, int] | None:
    """(packet type with flags cleared, body start, end) of the packet at ``at``, None if incomplete."""
    if len(buf) - at < 2:
        return None
    length, shift, i = 0, 0, at + 1
    while True:
        if i >= len(buf):
            return None
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            break
    end = i + length
    return (buf[at] & 0xF0, i, end) if end <= len(buf) else None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reaction.peers")
    parser.add_argument("role", choices=["publisher", "floor", "raw-floor"])
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
    elif args.role == "floor":
        run_floor(args)
    else:
        run_raw_floor(args)


if __name__ == "__main__":
    main(sys.argv[1:])
