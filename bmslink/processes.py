"""Real peers on this machine, for the demo, the tests and the benchmarks: one harness for all three.

* :class:`ProcessGroup` — named subprocesses (our CLI, simulators, a bench's helper processes), each
  leading its own process group, output in files, stopped for certain (SIGINT, SIGTERM, SIGKILL).
* :class:`MosquittoBroker` — one Mosquitto on a free 127.0.0.1 port that may be killed, paused and
  restarted on the same port.
* :class:`CanBridge` — a CAN bus shared between processes: the python-can-remote server on a virtual bus.
* :func:`free_port`, :func:`wait_port`, :func:`find_mosquitto`.

It lives in the package, not under ``tests/``, because the demo ships with the package; the test
fixtures (``tests/fixtures``) and the benchmarks import it from here. Everything blocks (for at most a few
seconds); from async code call it through ``asyncio.to_thread``.

Every child is started with ``start_new_session=True``: a terminal's Ctrl-C reaches only the parent, which
then stops its children in order (the broker last), rather than all of them at once.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.02
OUTPUT_TAIL_CHARS = 4000


# -- ports -----------------------------------------------------------------------------------------


def free_port(span: int = 1) -> int:
    """A port P on 127.0.0.1 such that P..P+span-1 were all free when asked (another process may
    still take one before it is used)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port + span - 1 > 65535:
            continue
        try:
            for offset in range(1, span):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((LOOPBACK, port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no run of {span} free ports found on 127.0.0.1")


def can_connect(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host``:``port`` is accepted now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout_s: float) -> None:
    """Return once something accepts TCP connections on ``host``:``port``; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not can_connect(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")
        time.sleep(0.05)


# -- subprocesses ----------------------------------------------------------------------------------

# Escalation when stopping: SIGINT lets our CLI shut down cleanly (asyncio.run turns it into
# cancellation of the main task), SIGTERM is what systemd sends, SIGKILL cannot be refused.
SIGINT_GRACE_S = 5.0
SIGTERM_GRACE_S = 3.0
SIGKILL_GRACE_S = 2.0


class ProcessError(RuntimeError):
    """A managed process is unknown, already running, or did not do what a wait asked for."""


class LineChannel:
    """Lines to a child's stdin and from its stdout, for a child that answers commands (a bench's helper).

    A thread reads stdout as it comes, so the pipe never fills; every line read is also appended to the
    child's stdout file, so :meth:`ProcessGroup.output` still shows it.
    """

    def __init__(self, name: str, popen: subprocess.Popen[bytes], transcript: Path) -> None:
        self.name = name
        self._popen = popen
        self._lines: deque[str] = deque()
        self._ready = threading.Condition()
        self._reader = threading.Thread(
            target=self._read, args=(transcript,), name=f"{name}-stdout", daemon=True
        )
        self._reader.start()

    def _read(self, transcript: Path) -> None:
        assert self._popen.stdout is not None
        with transcript.open("ab") as copy:
            for raw in self._popen.stdout:
                copy.write(raw)
                copy.flush()
                with self._ready:
                    self._lines.append(raw.decode(errors="replace").strip())
                    self._ready.notify_all()
        with self._ready:
            self._ready.notify_all()

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self._popen.stdin is not None
        self._popen.stdin.write((line + "\n").encode())
        self._popen.stdin.flush()

    def expect(self, prefix: str, timeout_s: float = 10.0) -> str:
        """The next line starting with ``prefix`` (lines before it are dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while True:
                while self._lines:
                    line = self._lines.popleft()
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self._popen.poll() is not None and not self._reader.is_alive()):
                    raise ProcessError(
                        f"{self.name}: no {prefix!r} line (exit status {self._popen.poll()})"
                    )
                self._ready.wait(left)

    def ask(self, line: str, prefix: str, timeout_s: float = 10.0) -> str:
        """Send ``line``, return the next line starting with ``prefix``."""
        self.send(line)
        return self.expect(prefix, timeout_s)

    def close(self) -> None:
        """Close stdin and wait for the reader (the child has exited, or exits on end of input)."""
        if self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()
        self._reader.join(SIGKILL_GRACE_S)
        if self._popen.stdout is not None and not self._reader.is_alive():
            self._popen.stdout.close()


@dataclass(slots=True)
class ManagedProcess:
    """One started process and where its output goes."""

    name: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    channel: LineChannel | None = None  # set when started with ``talk=True``

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def lines(self) -> LineChannel:
        """The command channel of a process started with ``talk=True``."""
        if self.channel is None:
            raise ProcessError(f"{self.name!r} was not started with talk=True")
        return self.channel


def bmslink_cli(*args: str) -> list[str]:
    """argv running the installed ``bmslink`` console script of the venv that runs this interpreter."""
    script = Path(sys.executable).with_name("bmslink")
    if not script.exists():
        raise ProcessError(
            f"{script} not found: the project is not installed in this venv (run scripts/setup)"
        )
    return [str(script), *args]


def _signal_group(proc: ManagedProcess, sig: signal.Signals) -> None:
    # The leader's pid is the group id (start_new_session=True). Once the leader is reaped the group
    # may still hold its children, so signal the group, not the pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_all(procs: Sequence[ManagedProcess], deadline: float) -> list[ManagedProcess]:
    """Poll until every process exited or the deadline passed; return the ones still running."""
    alive = [p for p in procs if p.poll() is None]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        alive = [p for p in alive if p.poll() is None]
    return alive


class ProcessGroup:
    """Named subprocesses with their output in files under ``workdir``, stopped for certain.

    Each process leads its own process group, so a stop signal also reaches anything it started, as a
    terminal's Ctrl-C would. stdout and stderr go to files, never to pipes nobody reads (a full pipe
    blocks the child); a process started with ``talk=True`` has a :class:`LineChannel` that reads its
    stdout instead. A name may be started again after its process exited; its output files are appended
    to, so :meth:`output` then shows every run.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, ManagedProcess] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._procs

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        talk: bool = False,
    ) -> ManagedProcess:
        """Start ``argv`` as ``name``. ``env`` entries are added to (not substituted for) our environment.

        ``PYTHONUNBUFFERED=1`` is set unless ``env`` says otherwise, so that a Python child's output
        reaches the files while it runs rather than at exit. ``talk=True`` gives the process a
        :class:`LineChannel` (its stdin and stdout), reached as ``.lines``.
        """
        previous = self._procs.get(name)
        if previous is not None and previous.poll() is None:
            raise ProcessError(f"process {name!r} is already running (pid {previous.pid})")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        stdout_path = self.workdir / f"{name}.stdout"
        stderr_path = self.workdir / f"{name}.stderr"
        with stdout_path.open("ab") as out, stderr_path.open("ab") as err:
            popen = subprocess.Popen(  # noqa: S603 - argv is the caller's, run without a shell
                list(argv),
                stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
                stdout=subprocess.PIPE if talk else out,
                stderr=err,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, tuple(argv), popen, stdout_path, stderr_path)
        if talk:
            proc.channel = LineChannel(name, popen, stdout_path)
        self._procs[name] = proc
        return proc

    def get(self, name: str) -> ManagedProcess:
        """The process started as ``name``."""
        try:
            return self._procs[name]
        except KeyError:
            raise ProcessError(f"no process named {name!r}; started: {sorted(self._procs)}") from None

    def running(self, name: str) -> bool:
        """Whether ``name`` was started and has not exited."""
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def stdout(self, name: str) -> str:
        """Everything ``name`` wrote to stdout so far."""
        return self.get(name).stdout_path.read_bytes().decode(errors="replace")

    def stderr(self, name: str) -> str:
        """Everything ``name`` wrote to stderr so far (Python logging goes here by default)."""
        return self.get(name).stderr_path.read_bytes().decode(errors="replace")

    def output(self, name: str) -> str:
        """stdout followed by stderr of ``name`` (two files, so the relative order of lines is lost)."""
        return self.stdout(name) + self.stderr(name)

    def wait_for_output(self, name: str, needle: str, timeout_s: float, *, count: int = 1) -> str:
        """Wait until ``needle`` appears (``count`` times) in the output of ``name``; return the output.

        Fails early, with the output, if the process exits without having printed it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            exited = self.get(name).poll() is not None
            text = self.output(name)
            if text.count(needle) >= count:
                return text
            if exited:
                raise ProcessError(f"{name!r} exited without printing {needle!r}:\n{self._tail(text)}")
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"{name!r} did not print {needle!r} within {timeout_s} s:\n{self._tail(text)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def wait(self, name: str, timeout_s: float) -> int:
        """Wait for ``name`` to exit by itself; return its exit status (negative: killed by that signal)."""
        try:
            return self.get(name).popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise ProcessError(
                f"{name!r} still running after {timeout_s} s:\n{self._tail(self.output(name))}"
            ) from None

    def send_signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group of ``name`` (e.g. SIGSTOP to freeze it like a hung node)."""
        _signal_group(self.get(name), sig)

    def stop(self, name: str) -> int | None:
        """Stop ``name`` (SIGINT, then SIGTERM, then SIGKILL); return its exit status."""
        return self._stop([self.get(name)])[name]

    def stop_all(self) -> dict[str, int | None]:
        """Stop every process still running, all at once; return each name's exit status.

        The status is None only if even SIGKILL did not end the process within its grace time.
        """
        return self._stop(list(self._procs.values()))

    def describe(self) -> str:
        """Each process with its status and output tail: printed at fixture teardown for failed tests."""
        parts = []
        for proc in self._procs.values():
            code = proc.poll()
            state = "running" if code is None else f"exit status {code}"
            parts.append(
                f"--- {proc.name} ({state}): {' '.join(proc.argv)}\n{self._tail(self.output(proc.name))}"
            )
        return "\n".join(parts)

    def _stop(self, procs: list[ManagedProcess]) -> dict[str, int | None]:
        signalled = [p for p in procs if p.poll() is None]
        alive = signalled
        # Read at call time (not bound as defaults): tests shorten the grace times with monkeypatch.
        for sig, grace_s in (
            (signal.SIGINT, SIGINT_GRACE_S),
            (signal.SIGTERM, SIGTERM_GRACE_S),
            (signal.SIGKILL, SIGKILL_GRACE_S),
        ):
            if not alive:
                break
            for proc in alive:
                _signal_group(proc, sig)
                # A frozen (SIGSTOPped) process acts on nothing but SIGKILL until it is continued.
                _signal_group(proc, signal.SIGCONT)
            alive = _wait_all(alive, time.monotonic() + grace_s)
        for proc in signalled:
            # Whatever the leader left behind in its group. Only for leaders reaped just now: the id of
            # one reaped long ago may since have been reused by an unrelated process group.
            if proc.poll() is not None:
                _signal_group(proc, signal.SIGKILL)
        for proc in procs:
            if proc.channel is not None and proc.poll() is not None:
                proc.channel.close()
        return {p.name: p.poll() for p in procs}

    @staticmethod
    def _tail(text: str) -> str:
        return text if len(text) <= OUTPUT_TAIL_CHARS else "…" + text[-OUTPUT_TAIL_CHARS:]


# -- Mosquitto -------------------------------------------------------------------------------------

MOSQUITTO_FALLBACK_PATH = "/usr/sbin/mosquitto"  # Debian installs it in sbin, which a non-root PATH lacks
BROKER_START_DEADLINE_S = 5.0
BROKER_STOP_DEADLINE_S = 5.0
BROKER_KILL_DEADLINE_S = 2.0
# After kill() the old socket is gone at once, but a restart can still race a port in TIME_WAIT on some
# kernels, or an unrelated process that grabbed the port meanwhile: retry the bind for this long.
RESTART_BIND_RETRY_S = 5.0
# A port chosen by free_port() can be taken by someone else before mosquitto binds it.
FRESH_PORT_ATTEMPTS = 3
BROKER_LOG_TAIL_LINES = 40
# Logged by mosquitto once every listener is open ("mosquitto version 2.0.11 running").
_READY_MARKER = b" running"
_ADDRESS_IN_USE_MARKER = b"Address already in use"
_DEFAULT_BROKER_USERS = ("mosquitto", "nobody")


class BrokerError(RuntimeError):
    """The broker could not be found, started or stopped; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, *, port: int | None = None, log_tail: str = "") -> None:
        self.port = port
        self.log_tail = log_tail
        text = message if not log_tail else f"{message}\n--- mosquitto log (tail) ---\n{log_tail}"
        super().__init__(text)


class _PortInUseError(BrokerError):
    """mosquitto exited because its port was taken; the caller decides whether to retry."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary: PATH first, then Debian's /usr/sbin; BrokerError if neither."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    if os.access(MOSQUITTO_FALLBACK_PATH, os.X_OK):
        return MOSQUITTO_FALLBACK_PATH
    raise BrokerError(
        "mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto; scripts/setup does it)"
    )


def _broker_user() -> pwd.struct_passwd | None:
    """The account mosquitto switches to when started as root (see ``user`` in mosquitto.conf(5))."""
    for name in _DEFAULT_BROKER_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class MosquittoBroker:
    """One mosquitto process on ``host``:``port``, restartable on the same port.

    ``workdir`` receives ``mosquitto.conf`` and ``mosquitto.log`` (appended across restarts). The broker
    logs to its stderr, which is that file opened by this process: when started as root, mosquitto drops
    privileges to user ``mosquitto`` (``nobody`` if that user is missing) right after reading its config,
    and could then no longer open a log file under a 0700 directory (pytest's tmp dirs).

    With ``persistence=True`` retained messages and sessions survive ``stop()``/``restart()`` (and
    ``kill()`` once the autosave ran: ``autosave_interval`` is 1 s here); the database lives in a separate
    directory under the system temp dir, owned by the broker's unprivileged user. ``extra_config`` lines are
    appended to the generated config verbatim (a bench adds ``sys_interval 1``). ``site_config`` is a
    site's own configuration (the shipped deploy/mosquitto/bmslink.conf, its paths adapted), used instead
    of the generated listener, authentication and persistence lines; ``{port}`` in it is this broker's
    port, and the logging lines are added after it.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        site_config: Sequence[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._port_fixed = port is not None
        self.port: int = port if port is not None else free_port()
        self.persistence = persistence
        self.extra_config = tuple(extra_config)
        self.site_config = None if site_config is None else tuple(site_config)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._binary = find_mosquitto()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._persistence_dir: Path | None = None

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, pid={self.pid})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The running broker's process id, None while stopped."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """True while the broker process exists (a paused broker counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = BROKER_LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the broker log, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        """Start the broker and return once it accepts TCP connections on ``port``.

        On a port picked by this class, a port stolen in the meantime moves the broker to a fresh one;
        on a port given by the caller it raises :class:`BrokerError`.
        """
        if self.is_running():
            raise BrokerError(f"broker already running on port {self.port}", port=self.port)
        attempts = 1 if self._port_fixed else FRESH_PORT_ATTEMPTS
        for attempt in range(attempts):
            try:
                self._start_once()
            except _PortInUseError:
                if attempt + 1 == attempts:
                    raise
                self.port = free_port()
            else:
                return

    def restart(self) -> None:
        """Stop the broker if it runs, then start it again on the SAME port (clients reconnect there)."""
        self.stop()
        deadline = time.monotonic() + RESTART_BIND_RETRY_S
        while True:
            try:
                self._start_once()
            except _PortInUseError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
            else:
                return

    def stop(self) -> None:
        """SIGTERM (clean shutdown: wills of connected clients are NOT sent), SIGKILL if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            # A paused broker only acts on SIGTERM once continued.
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(BROKER_STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(BROKER_KILL_DEADLINE_S)
        self._release_process()

    def kill(self) -> None:
        """SIGKILL: a crash. Clients see their TCP connection reset; nothing is saved."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(BROKER_KILL_DEADLINE_S)
        self._release_process()

    def pause(self) -> None:
        """SIGSTOP: the broker hangs with its sockets open, as a broker behind a network partition looks."""
        self._require_running().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._require_running().send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop the broker and remove the persistence directory; the instance cannot be started again."""
        self.stop()
        if self._persistence_dir is not None:
            shutil.rmtree(self._persistence_dir, ignore_errors=True)
            self._persistence_dir = None

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("broker is not running", port=self.port, log_tail=self.log_tail())
        return self._proc

    def _release_process(self) -> None:
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _write_config(self) -> None:
        if self.site_config is not None:
            lines = [line.replace("{port}", str(self.port)) for line in self.site_config] + self._log_lines()
            self.config_path.write_text("\n".join([*lines, *self.extra_config]) + "\n")
            return
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            *self._log_lines(),
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self._ensure_persistence_dir()}/",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")

    @staticmethod
    def _log_lines() -> list[str]:
        return [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]

    def _ensure_persistence_dir(self) -> Path:
        if self._persistence_dir is None:
            self._persistence_dir = Path(tempfile.mkdtemp(prefix="bmslink-mosquitto-db-"))
            user = _broker_user()
            if os.geteuid() == 0 and user is not None:
                os.chown(self._persistence_dir, user.pw_uid, user.pw_gid)
        return self._persistence_dir

    def _start_once(self) -> None:
        self._write_config()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            [self._binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,
        )
        deadline = time.monotonic() + BROKER_START_DEADLINE_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail_exited(log_offset)
            if self._log_since(log_offset).find(_READY_MARKER) >= 0 and can_connect(self.host, self.port):
                return
            time.sleep(POLL_INTERVAL_S)
        self.kill()
        raise BrokerError(
            f"mosquitto did not accept connections on {self.host}:{self.port} "
            f"within {BROKER_START_DEADLINE_S} s",
            port=self.port,
            log_tail=self.log_tail(),
        )

    def _log_since(self, offset: int) -> bytes:
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read()

    def _fail_exited(self, log_offset: int) -> None:
        assert self._proc is not None
        code = self._proc.returncode
        in_use = _ADDRESS_IN_USE_MARKER in self._log_since(log_offset)
        self._release_process()
        error = _PortInUseError if in_use else BrokerError
        raise error(
            f"mosquitto exited with status {code} while starting on {self.host}:{self.port}",
            port=self.port,
            log_tail=self.log_tail(),
        )


# -- CAN bus shared between processes ----------------------------------------------------------------

CAN_BRIDGE_START_DEADLINE_S = 10.0
CAN_BRIDGE_STOP_DEADLINE_S = 5.0


class CanBridge:
    """The python-can-remote server on 127.0.0.1 over a virtual bus: a CAN bus shared between processes.

    Clients connect with ``can.Bus(interface="remote", channel=bridge.channel)``; every client hears every
    other client's frames (not its own). Its log is ``workdir/can_remote.log``.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "can_remote.log"

    @property
    def channel(self) -> str:
        """The python-can ``channel`` of the remote interface: ``127.0.0.1:<port>``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running bridge's process id, None while stopped."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        """Start the bridge and return once it accepts connections; RuntimeError with its log if not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                [sys.executable, "-m", "can_remote", "-i", "virtual", "-c", "0", "-H", LOOPBACK,
                 "-p", str(self.port), "-v"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + CAN_BRIDGE_START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"can_remote exited: {self.log_path.read_text()[-2000:]}")
            if can_connect(LOOPBACK, self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"can_remote did not listen on {self.port}: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(CAN_BRIDGE_STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(CAN_BRIDGE_STOP_DEADLINE_S)
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
