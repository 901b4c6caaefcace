"""The controller's port on the inverter CAN bus: sends frame sets, listens, and tracks bus health.

Error frames (bus-off, error-passive, no-ACK) and send failures (ENOBUFS when
nobody acknowledges) are counted and logged, never fatal: after a streak of
send failures the bus is reopened, and the port reports itself unhealthy so
that failover can act.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import can

from shared.controller_config import InverterCanConfig

log = logging.getLogger(__name__)

# linux/can/error.h classes carried in the arbitration id of an error frame.
CAN_ERR_CRTL = 0x004
CAN_ERR_ACK = 0x020
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_RX_PASSIVE = 0x10
SEND_TIMEOUT_S = 0.01  # a healthy bus takes a frame in well under a millisecond
REOPEN_AFTER_S = 1.0

FrameHandler = Callable[[can.Message, float], None]


class CanPort:
    def __init__(self, config: InverterCanConfig, *, on_frame: FrameHandler | None = None,
                 failures_before_fault: int | None = None) -> None:
        self.config = config
        self._failures_before_fault = failures_before_fault or config.send_failures_before_fault
        self._on_frame = on_frame
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self.counters: Counter[str] = Counter()
        self.consecutive_send_failures = 0
        self.last_error = ""
        self._last_open_attempt = -1e9

    @property
    def is_open(self) -> bool:
        return self._bus is not None

    @property
    def healthy(self) -> bool:
        return self._bus is not None and self.consecutive_send_failures < self._failures_before_fault

    def open(self) -> bool:
        """Open the bus and start listening; False (logged, counted) if the interface is not there."""
        self._last_open_attempt = time.monotonic()
        kwargs: dict[str, Any] = {"interface": self.config.interface, "channel": self.config.channel}
        if self.config.interface not in ("virtual", "remote", "socketcan"):
            kwargs["bitrate"] = self.config.bitrate
        if self.config.interface == "virtual":
            kwargs["receive_own_messages"] = False
        try:
            bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError) as exc:
            self.counters["open_failed"] += 1
            self.last_error = f"cannot open CAN {self.config.interface}:{self.config.channel}: {exc}"
            log.error("%s", self.last_error)
            return False
        self._bus = bus
        self._notifier = can.Notifier(bus, [self._received], timeout=0.2, loop=asyncio.get_running_loop())
        log.info("CAN %s:%s open", self.config.interface, self.config.channel)
        return True

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def _received(self, msg: can.Message) -> None:
        now = time.monotonic()
        if msg.is_error_frame:
            self._count_error_frame(msg)
            return
        self.counters["rx_frames"] += 1
        if self._on_frame is not None:
            self._on_frame(msg, now)

    def _count_error_frame(self, msg: can.Message) -> None:
        self.counters["error_frames"] += 1
        cls = msg.arbitration_id
        if cls & CAN_ERR_BUSOFF:
            self.counters["bus_off"] += 1
            log.error("CAN %s: bus-off", self.config.channel)
        if cls & CAN_ERR_ACK:
            self.counters["no_ack"] += 1
            log.warning("CAN %s: no ACK (is the inverter connected and at %d bit/s?)", self.config.channel,
                        self.config.bitrate)
        passive = CAN_ERR_CRTL_TX_PASSIVE | CAN_ERR_CRTL_RX_PASSIVE
        if cls & CAN_ERR_CRTL and len(msg.data) > 1 and msg.data[1] & passive:
            self.counters["error_passive"] += 1
            log.warning("CAN %s: error-passive", self.config.channel)
        if cls & CAN_ERR_RESTARTED:
            self.counters["restarted"] += 1
            log.info("CAN %s: controller restarted after bus-off", self.config.channel)

    def send_all(self, frames: Iterable[can.Message], *, kind: str = "sets") -> bool:
        """Send a frame set in order; False if any frame failed (counted, logged once per streak).

        ``frames`` may be a generator: each frame leaves as soon as it is made (the limits first).
        """
        if self._bus is None:
            if time.monotonic() - self._last_open_attempt >= REOPEN_AFTER_S:
                self.open()
            if self._bus is None:
                self.counters["send_skipped_closed"] += 1
                self.consecutive_send_failures += 1
                return False
        ok = True
        sent = 0
        for frame in frames:
            try:
                self._bus.send(frame, timeout=SEND_TIMEOUT_S)
            except (can.CanError, OSError) as exc:
                ok = False
                self.counters["send_failed"] += 1
                if self.consecutive_send_failures == 0:
                    log.error("CAN %s: send failed: %s", self.config.channel, exc)
                self.last_error = str(exc)
                break  # the rest of the set would fail the same way; the next cycle retries
            sent += 1
        if ok:
            self.counters[f"{kind}_sent"] += 1
            self.counters["frames_sent"] += sent
            if self.consecutive_send_failures:
                log.info("CAN %s: sending again after %d failed set(s)", self.config.channel,
                         self.consecutive_send_failures)
            self.consecutive_send_failures = 0
            return True
        self.consecutive_send_failures += 1
        if self.consecutive_send_failures == self._failures_before_fault:
            log.error("CAN %s: %d consecutive send failures: reopening the bus", self.config.channel,
                      self.consecutive_send_failures)
            self.close()
        return False
