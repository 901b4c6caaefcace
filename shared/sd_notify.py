"""systemd's notification protocol, and a watchdog that pings only while a service's loop makes progress.

The protocol (sd_notify(3), sd_watchdog_enabled(3), systemd.service(5) ``Type=notify``,
``WatchdogSec=``, ``NotifyAccess=``): the service manager passes a unix datagram socket in
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name written with a leading ``@``); the
service sends newline-separated ``KEY=value`` assignments to it, one datagram per message:
``READY=1`` once start-up is done (a ``Type=notify`` unit is "activating" until then),
``STATUS=...`` a line ``systemctl status`` shows, ``WATCHDOG=1`` a keep-alive, ``STOPPING=1`` at
shutdown. With ``WatchdogSec=`` set, ``$WATCHDOG_USEC`` carries the timeout in microseconds (and
``$WATCHDOG_PID`` the process it is meant for); a service that sends no ``WATCHDOG=1`` for that long
is killed (SIGABRT) and, with ``Restart=on-failure``, started again. sd_watchdog_enabled(3) advises
pinging at half the timeout.

Written on the stdlib ``socket`` module: no library for three message kinds. Sending never raises
and never blocks (a non-blocking socket; a full or vanished socket is counted and logged once), so a
service manager that is away can never stop the service it manages.

What makes the watchdog worth having is *what* it pings for. :class:`LoopWatchdog` reads a progress
counter of the service's own loop (the controller's control cycles, the agent's unit polls) and pings
only while that counter moved within the last half timeout. A hung event loop stops every task,
this one too, so it stops pinging; a control task that died or hangs on an await while the rest of
the process runs also stops the counter, so it stops pinging too. systemd then restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# sd_watchdog_enabled(3): "send WATCHDOG=1 ... at half the interval"; progress is sampled twice as
# often, so that a loop which moved is seen before the ping that depends on it.
PING_FRACTION = 0.5
SAMPLES_PER_PING = 2


@dataclass(frozen=True, slots=True)
class NotifyTarget:
    """Where systemd listens, and the watchdog timeout it expects (None: no watchdog for us)."""

    address: str | bytes
    watchdog_s: float | None


def notify_target(environ: Mapping[str, str], pid: int) -> NotifyTarget | None:
    """The target ``environ`` names for process ``pid``; None when not started by systemd with
    ``Type=notify`` (no ``$NOTIFY_SOCKET``).

    ``$WATCHDOG_USEC`` counts only if ``$WATCHDOG_PID`` is unset or is ``pid`` (a child that inherited
    the variables must not ping for its parent); a value that is not a positive integer is ignored.
    """
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    # An abstract-namespace socket: "@name" stands for a leading NUL byte.
    address: str | bytes = b"\0" + name[1:].encode() if name.startswith("@") else name
    watchdog_s = None
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0 and (not owner or owner == str(pid)):
        watchdog_s = int(usec) / 1_000_000
    return NotifyTarget(address, watchdog_s)


class Notifier:
    """Sends notifications to one target; a None target makes every send a no-op."""

    def __init__(self, target: NotifyTarget | None) -> None:
        self.target = target
        self.sent = 0
        self.failed = 0
        self._socket: socket.socket | None = None
        if target is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        return cls(notify_target(os.environ if environ is None else environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (``send(READY="1", STATUS="...")``) in one datagram; True if sent.

        A value is one line: a newline in a STATUS text would start a new assignment, so it is
        replaced by a space.
        """
        if self._socket is None or self.target is None:
            return False
        text = "\n".join(f"{key}={' '.join(value.splitlines())}" for key, value in fields.items())
        try:
            self._socket.sendto(text.encode(), self.target.address)
        except OSError as exc:
            self.failed += 1
            if self.failed == 1:
                log.warning("systemd notification to %r failed (%s); further failures are counted only",
                            self.target.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class LoopWatchdog:
    """READY at start, then WATCHDOG=1 (and a STATUS line) while ``progress()`` keeps moving.

    ``progress`` returns a number that grows each time the service's loop does its work; ``status``
    the line ``systemctl status`` shows. Run :meth:`run` as a task once the service has started; it
    sends READY=1 at once and, when systemd set a watchdog timeout, pings every half timeout if the
    counter moved within the last half timeout (a loop slower than that gets no ping and is
    restarted: set ``WatchdogSec=`` well above the loop's slowest normal round). :meth:`stopping`
    says STOPPING=1.
    """

    def __init__(
        self,
        notifier: Notifier,
        progress: Callable[[], int],
        status: Callable[[], str],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self._progress = progress
        self._status = status
        self._monotonic = monotonic
        self.pings = 0
        self.withheld = 0  # pings not sent because the loop did not move

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    async def run(self) -> None:
        """Until cancelled: READY=1, then the pings (none without a watchdog timeout)."""
        self.notifier.send(READY="1", STATUS=self._status())
        timeout_s = self.notifier.target.watchdog_s if self.notifier.target is not None else None
        if timeout_s is None:
            return
        ping_every_s = timeout_s * PING_FRACTION
        sample_every_s = ping_every_s / SAMPLES_PER_PING
        seen = self._progress()
        moved_at = self._monotonic()
        next_ping = moved_at  # the first ping at once: READY says we just started the loop
        while True:
            now = self._monotonic()
            current = self._progress()
            if current != seen:
                seen, moved_at = current, now
            if now >= next_ping:
                next_ping = now + ping_every_s
                if now - moved_at <= ping_every_s:
                    self.notifier.send(WATCHDOG="1", STATUS=self._status())
                    self.pings += 1
                else:
                    self.withheld += 1
                    if self.withheld == 1 or self.withheld % 10 == 0:
                        log.error("the service loop has not moved for %.1f s: withholding the systemd "
                                  "watchdog ping (systemd restarts the service %.1f s after the last one)",
                                  now - moved_at, timeout_s)
            await asyncio.sleep(sample_every_s)

    def stopping(self) -> None:
        self.notifier.send(STOPPING="1", STATUS="stopping")
        self.notifier.close()
