"""Child-process supervision for the demo: start, wait for a ready line, stop everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 3.0


def free_port(span: int = 1) -> int:
    """A port P on 127.0.0.1 such that P..P+span-1 were all free when asked (another process may
    still take one before it is used)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + span - 1 > 65535:
            continue
        try:
            for offset in range(1, span):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no run of {span} free ports found on 127.0.0.1")


MOSQUITTO_FALLBACK_PATH = "/usr/sbin/mosquitto"  # Debian installs it in sbin, which a non-root PATH lacks


def find_mosquitto() -> str:
    """Path of the mosquitto binary: PATH first, then Debian's /usr/sbin."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    if os.access(MOSQUITTO_FALLBACK_PATH, os.X_OK):
        return MOSQUITTO_FALLBACK_PATH
    raise FileNotFoundError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")


def write_mosquitto_conf(folder: Path, port: int) -> Path:
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        "log_type error\nlog_type warning\n"
    )
    return conf


async def wait_port(host: str, port: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


@dataclass
class Supervisor:
    """Owns child processes; ``stop_all`` leaves none running (SIGINT, then SIGTERM, then SIGKILL)."""

    log_dir: Path
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    async def start(self, name: str, argv: list[str]) -> asyncio.subprocess.Process:
        out = (self.log_dir / f"{name}.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # our Ctrl-C is delivered by us, in order, not by the terminal
            )
        finally:
            out.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_for_line(self, name: str, needle: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        path = self.log_dir / f"{name}.log"
        while loop.time() < deadline:
            if path.exists() and needle in path.read_text(errors="replace"):
                return
            if self.procs[name].returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} did not report {needle!r}:\n{self.log_tail(name)}")

    async def stop_all(self) -> None:
        stages = ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 2.0))
        for sig, grace in stages:
            alive = [p for p in self.procs.values() if p.returncode is None]
            if not alive:
                return
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(p.wait() for p in alive))
