"""What the web page costs the controller: its CPU with the page on and two live clients, against the
controller alone, at the same load (100 racks × 2 Hz of telemetry by default).

The rig is ``bench/reaction``'s (``rig.py``): Mosquitto on a free 127.0.0.1 port, the python-can-remote
CAN bridge, the low-CPU raw-socket publisher (``peers.py``) and ``bmslink controller`` as shipped (the
reaction bench's config: Pylon, 1 s heartbeat, thermal derate and cell taper at their defaults), run
twice: without ``[web]`` and with ``[web] enabled = true``. With the page on, ``--clients`` readers in
this process act as browsers do: they load ``/``, ``/app.js``, ``/style.css`` and ``/api/history``, then
read ``/api/stream`` (Server-Sent Events) for the whole window.

Each phase waits until the controller grants the bank's base limit, lets it run ``--warmup-s`` (the
thermal windows fill: 30 s), then takes utime + stime from /proc over ``--measure-s``. The phases
alternate ``--rounds`` times so that drift of the machine falls on both. Printed: each phase's CPU share
of one core, the mean of each, and the difference (what the page and its clients cost), plus what the
clients received.

Run: ``.venv/bin/python bench/web_cpu.py [--racks 100] [--hz 2] [--clients 2] [--rounds 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.reaction.rig import (  # noqa: E402  (after the path set-up above)
    READY_TIMEOUT_S,
    Rig,
    controller_toml,
    cpu_seconds,
    start_publisher,
)
from bench.reaction.wire import BANK_BASE_A  # noqa: E402
from bmslink.processes import ManagedProcess, free_port  # noqa: E402

CLIENT_TIMEOUT_S = 10.0


@dataclass
class Phase:
    web: bool
    cpu_pct: float  # of one core, over the measured window
    window_s: float
    events_received: int = 0  # SSE state events all clients received in the window
    bytes_received: int = 0


@dataclass
class Result:
    racks: int
    hz: float
    clients: int
    warmup_s: float
    measure_s: float
    phases: list[Phase] = field(default_factory=list)
    alone_pct: float = 0.0
    with_web_pct: float = 0.0
    difference_pct: float = 0.0


class Readers:
    """``n`` browser-like clients of the page on their own event loop, in a thread of this process."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.events = 0
        self.bytes = 0
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="web-readers", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(CLIENT_TIMEOUT_S):
            raise RuntimeError(f"the page's clients did not connect: {self.errors}")
        if self.errors:
            raise RuntimeError(f"the page's clients failed: {self.errors}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(CLIENT_TIMEOUT_S)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        import aiohttp  # noqa: PLC0415

        self._stop = asyncio.Event()
        base = f"http://127.0.0.1:{self.port}"
        connected = 0
        timeout = aiohttp.ClientTimeout(total=None, sock_read=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def reader() -> None:
                nonlocal connected
                for path in ("/", "/app.js", "/style.css", "/api/history"):
                    async with http.get(base + path) as response:
                        response.raise_for_status()
                        await response.read()
                async with http.get(base + "/api/stream") as stream:
                    stream.raise_for_status()
                    connected += 1
                    if connected == self.n:
                        self._ready.set()
                    async for line in stream.content:
                        self.bytes += len(line)
                        if line.startswith(b"event: state"):
                            self.events += 1

            tasks = [asyncio.create_task(reader()) for _ in range(self.n)]
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    self.errors.append(repr(task.exception()))
                    self._ready.set()
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)


def start_controller(rig: Rig, n: int, web_port: int | None, tag: str) -> ManagedProcess:
    """``bmslink controller`` as shipped, for a roster of ``n``, with the page on ``web_port`` (None:
    no [web] table, the page off as by default); returns once it grants the bank's base limit."""
    path = rig.work / f"controller-{tag}.toml"
    text = controller_toml(rig.broker.port, rig.bridge.channel, n)
    if web_port is not None:
        text += f'\n[web]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n'
    path.write_text(text)
    mark = rig.recorder.mark()
    ctl = rig.child(f"controller-{tag}", [sys.executable, "-m", "bmslink", "--log-level", "warning",
                                          "controller", "--config", str(path)], talk=False)
    if rig.recorder.wait_for(BANK_BASE_A, mark, READY_TIMEOUT_S) is None:
        raise RuntimeError(f"controller ({tag}) never granted {BANK_BASE_A} A; see {ctl.stderr_path}")
    return ctl


def run_phase(rig: Rig, args: argparse.Namespace, web: bool, tag: str) -> Phase:
    port = free_port() if web else None
    ctl = start_controller(rig, args.racks, port, tag)
    readers = None
    try:
        if port is not None:
            readers = Readers(port, args.clients)
            readers.start()
        time.sleep(args.warmup_s)
        events0 = readers.events if readers else 0
        bytes0 = readers.bytes if readers else 0
        c0, t0 = cpu_seconds(ctl.pid), time.monotonic()
        time.sleep(args.measure_s)
        c1, t1 = cpu_seconds(ctl.pid), time.monotonic()
        if ctl.poll() is not None:
            raise RuntimeError(f"the controller ({tag}) exited; see {ctl.stderr_path}")
        phase = Phase(web, 100.0 * (c1 - c0) / (t1 - t0), t1 - t0)
        if readers is not None:
            phase.events_received = readers.events - events0
            phase.bytes_received = readers.bytes - bytes0
            if readers.errors:
                raise RuntimeError(f"the page's clients failed: {readers.errors}")
        return phase
    finally:
        if readers is not None:
            readers.stop()
        rig.stop_child(ctl)


def run(args: argparse.Namespace, work: Path) -> Result:
    result = Result(args.racks, args.hz, args.clients, args.warmup_s, args.measure_s)
    rig = Rig(work)
    try:
        rig.start()
        pub = start_publisher(rig, args.racks, args.racks * args.hz)
        try:
            for k in range(args.rounds):
                for web in (False, True):
                    phase = run_phase(rig, args, web, f"{'web' if web else 'alone'}-{k}")
                    result.phases.append(phase)
                    extra = (f", clients got {phase.events_received} updates, "
                             f"{phase.bytes_received / phase.window_s / 1024:.1f} KiB/s" if web else "")
                    print(f"round {k + 1}: controller {'with the page' if web else 'alone'}: "
                          f"{phase.cpu_pct:.1f} % of a core{extra}", flush=True)
        finally:
            rig.stop_child(pub)
    finally:
        rig.stop()
    result.alone_pct = statistics.fmean(p.cpu_pct for p in result.phases if not p.web)
    result.with_web_pct = statistics.fmean(p.cpu_pct for p in result.phases if p.web)
    result.difference_pct = result.with_web_pct - result.alone_pct
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--racks", type=int, default=100)
    parser.add_argument("--hz", type=float, default=2.0, help="telemetry per rack per second")
    parser.add_argument("--clients", type=int, default=2, help="live pages (SSE readers) with the page on")
    parser.add_argument("--warmup-s", type=float, default=35.0)
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bmslink-web-cpu-") as tmp:
        result = run(args, Path(tmp))
    print(f"{args.racks} racks × {args.hz:g} Hz, {args.measure_s:g} s windows after {args.warmup_s:g} s, "
          f"{args.rounds} round(s):")
    print(f"  controller alone:                      {result.alone_pct:5.1f} % of a core")
    print(f"  with the web page and {args.clients} live client(s): {result.with_web_pct:5.1f} % of a core")
    print(f"  difference:                            {result.difference_pct:+5.1f} points")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
