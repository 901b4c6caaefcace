"""systemd's notification protocol, spoken to a real unix datagram socket standing in for systemd:
READY at start, WATCHDOG pings while the loop really runs and none when it does not, STOPPING at the
end — for the watchdog alone, for a controller whose control task died while its process lives on, and
for a controller and an agent started as processes the way systemd starts them (a frozen process,
SIGSTOP, is what a hung one looks like to systemd: no pings)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.service import ControllerService
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from shared.sd_notify import LoopWatchdog, Notifier, NotifyTarget, notify_target
from tests.agent.helpers import wait_until
from tests.fixtures.broker import free_port
from tests.fixtures.procs import ProcessGroup, bmslink_cli


class FakeSystemd:
    """The listening end of $NOTIFY_SOCKET: every datagram, with the time it arrived.

    A real AF_UNIX datagram socket, in a short directory of its own (a socket path has at most 107
    bytes), read by a thread that is stopped on close.
    """

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bmslink-notify-"))
        self.path = self._dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, f) for t, f in self.messages if key in f and t >= since]

    def env(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    try:
        yield fake
    finally:
        fake.close()


def max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# -- the protocol's environment ------------------------------------------------------------------------------


def test_the_environment_names_the_socket_and_the_timeout_for_this_process_only() -> None:
    assert notify_target({}, 42) is None
    plain = "/run/systemd/notify"
    assert notify_target({"NOTIFY_SOCKET": plain}, 42) == NotifyTarget(plain, None)
    assert notify_target({"NOTIFY_SOCKET": "@sd-notify", "WATCHDOG_USEC": "3000000"}, 42) == \
        NotifyTarget(b"\0sd-notify", 3.0)
    env = {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "3000000"}
    assert notify_target({**env, "WATCHDOG_PID": "42"}, 42) == NotifyTarget("/n", 3.0)
    # Meant for another process (a parent whose environment we inherited): no watchdog for us.
    assert notify_target({**env, "WATCHDOG_PID": "41"}, 42) == NotifyTarget("/n", None)
    for bad in ("", "0", "-5", "3s", "1e6"):
        assert notify_target({**env, "WATCHDOG_USEC": bad}, 42) == NotifyTarget("/n", None), bad


def test_a_socket_nobody_listens_on_is_counted_never_raised(tmp_path: Path) -> None:
    notifier = Notifier(NotifyTarget(str(tmp_path / "gone"), 1.0))
    assert notifier.send(READY="1") is False
    assert notifier.send(WATCHDOG="1") is False
    assert notifier.failed == 2 and notifier.sent == 0
    notifier.close()
    assert Notifier(None).send(READY="1") is False  # not under systemd: nothing to do


async def test_pings_follow_the_loops_progress(systemd: FakeSystemd) -> None:
    """READY with a status, pings while the counter moves, none while it stands, pings again after."""
    progress = 0
    watchdog = LoopWatchdog(Notifier(NotifyTarget(str(systemd.path), 0.4)), progress=lambda: progress,
                            status=lambda: f"cycle {progress}\nsecond line")
    task = asyncio.create_task(watchdog.run(), name="watchdog-under-test")
    try:
        end = time.monotonic() + 1.2
        while time.monotonic() < end:  # a loop that works
            progress += 1
            await asyncio.sleep(0.02)
        await wait_until(lambda: len(systemd.with_key("WATCHDOG")) >= 4, 2, "pings while the loop moves")
        ready = systemd.with_key("READY")
        assert len(ready) == 1 and ready[0][1]["STATUS"].startswith("cycle ")
        assert "\n" not in ready[0][1]["STATUS"] and "second line" in ready[0][1]["STATUS"]
        assert max_gap([t for t, _ in systemd.with_key("WATCHDOG")]) < 0.4  # within the timeout

        hung_at = time.monotonic()  # the loop stops moving; the event loop runs on
        await asyncio.sleep(1.2)
        late = [t for t, _ in systemd.with_key("WATCHDOG", since=hung_at + 0.25)]
        assert late == [], "pinged for a loop that did not move"
        assert watchdog.withheld >= 2

        progress += 1  # it moves again: the pings come back
        resumed_at = time.monotonic()
        await wait_until(lambda: bool(systemd.with_key("WATCHDOG", since=resumed_at)), 1, "a ping again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    watchdog.stopping()
    await wait_until(lambda: bool(systemd.with_key("STOPPING")), 1, "STOPPING")


# -- a controller whose control task is gone, in a process that lives on -------------------------------------


async def test_a_controller_whose_control_loop_died_stops_pinging(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in systemd.env(0.6).items():
        monkeypatch.setenv(key, value)
    config = validate_config({
        "site_id": "site-w", "node_id": "ctl-w",
        "mqtt": {"host": "127.0.0.1", "port": free_port()},  # no broker: the loop runs without one
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "can": {"interface": "virtual", "channel": f"wd-{free_port()}", "period_ms": 200},
    }, ControllerConfig, "<test>")
    service = ControllerService(config)
    await service.start()
    try:
        await wait_until(lambda: len(systemd.with_key("WATCHDOG")) >= 3, 3, "pings from a cycling loop")
        assert "READY" in systemd.messages[0][1]
        assert systemd.with_key("READY")[0][1]["STATUS"].startswith("active, ")
        control = next(t for t in asyncio.all_tasks() if t.get_name() == "controller-control")
        control.cancel()  # the control task is gone; MQTT, CAN and the watchdog task run on
        await asyncio.gather(control, return_exceptions=True)
        died_at = time.monotonic()
        await asyncio.sleep(1.2)
        assert systemd.with_key("WATCHDOG", since=died_at + 0.35) == []
        assert service.watchdog.withheld >= 2
    finally:
        await service.stop()
    assert systemd.with_key("STOPPING")


# -- processes, as systemd starts them -----------------------------------------------------------------------


def _controller_toml(tmp_path: Path) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(f"""\
site_id = "site-w"
node_id = "ctl-w"

[mqtt]
host = "127.0.0.1"
port = {free_port()}

[[roster]]
rack_id = "rack-01"
capacity_ah = 280

[can]
interface = "virtual"
channel = "wd-{free_port()}"
""")
    return path


def _agent_toml(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""\
site_id = "site-w"
rack_id = "rack-01"

[mqtt]
host = "127.0.0.1"
port = {free_port()}

[polling]
interval_ms = 200
request_timeout_ms = 100

[[links]]
type = "modbus_tcp"
name = "lan"
host = "127.0.0.1"
port = {free_port()}

[[units]]
name = "bms"
link = "lan"
profile = "acme_flat"
""")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["controller", "agent"])
async def test_a_service_process_says_ready_pings_and_goes_silent_when_frozen(
    kind: str, systemd: FakeSystemd, procs: ProcessGroup, tmp_path: Path
) -> None:
    """Neither needs its peers to run its loop: the agent polls a BMS nobody serves (each poll fails
    fast, which is the loop working) and the controller cycles without a broker."""
    config = _controller_toml(tmp_path) if kind == "controller" else _agent_toml(tmp_path)
    proc = procs.start(kind, bmslink_cli(kind, "--config", str(config)), env=systemd.env(1.0))
    await wait_until(lambda: bool(systemd.with_key("READY")), 20,
                     f"READY from the {kind}\n{procs.describe()}")
    await wait_until(lambda: len(systemd.with_key("WATCHDOG")) >= 4, 5, "pings")
    pings = [t for t, _ in systemd.with_key("WATCHDOG")]
    assert max_gap(pings) < 1.0, pings  # every ping inside WATCHDOG_USEC of the one before
    status = systemd.with_key("WATCHDOG")[-1][1]["STATUS"]
    assert ("rack rack-01: 0 of 1 unit(s) ok, broker away" if kind == "agent" else "active, ") in status

    os.kill(proc.pid, signal.SIGSTOP)  # hung, as far as systemd can tell
    frozen_at = time.monotonic()
    try:
        await asyncio.sleep(1.5)
        assert systemd.with_key("WATCHDOG", since=frozen_at + 0.1) == []
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    thawed_at = time.monotonic()
    await wait_until(lambda: bool(systemd.with_key("WATCHDOG", since=thawed_at)), 3, "pings after SIGCONT")

    procs.send_signal(kind, signal.SIGINT)  # systemctl stop (KillSignal=SIGINT)
    assert procs.wait(kind, 10) == 0
    assert systemd.with_key("STOPPING")

