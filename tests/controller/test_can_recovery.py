"""The controller is never silent for good, whatever happens to its CAN interface.

The remote interface is tested by really killing the python-can-remote bridge process and starting
it again on the same port; the others through python-can's own error paths on a virtual bus (a bus
shut down under the port, a receiver whose queue is full so that send raises CanOperationError).
The witness is always an independent bus on the same channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import can
import pytest

from controller.can_port import REOPEN_MAX_S, Backoff
from controller.failover import Role
from controller.service import ControllerService
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from tests.agent.helpers import wait_until
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.can_bridge import CanBridge

RESUME_WITHIN_S = 2.0  # issue 10: frames resume within 2 s of the interface's return


def config(broker: MosquittoBroker, prefix: str, interface: str, channel: str, period_ms: int,
           **failover: Any) -> ControllerConfig:
    data: dict[str, Any] = {
        "site_id": "site-a", "node_id": "n1",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": "rack-01", "capacity_ah": 280}],
        "can": {"interface": interface, "channel": channel, "period_ms": period_ms},
    }
    if failover:
        data["failover"] = {"enabled": True, "node_number": 1, "rank": 0, **failover}
    return validate_config(data, ControllerConfig, "<test>")


class Witness:
    """An independent bus on the inverter's side: arrival times of every 0x351."""

    def __init__(self, interface: str, channel: str) -> None:
        self.bus = can.Bus(interface=interface, channel=channel)
        self.limits: list[float] = []
        self.notifier = can.Notifier(self.bus, [self._rx], timeout=0.05)

    def _rx(self, msg: can.Message) -> None:
        if msg.arbitration_id == 0x351 and not msg.is_error_frame:
            self.limits.append(time.monotonic())

    def first_after(self, t: float) -> float | None:
        return next((x for x in self.limits if x >= t), None)

    def close(self) -> None:
        self.notifier.stop()
        self.bus.shutdown()


@pytest.fixture
def flood_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def _callback_tracebacks(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("Exception in callback"))


# -- the schedule ------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_jittered_below_it_and_resets() -> None:
    b = Backoff(first_s=0.05, max_s=1.0, jitter=0.2, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(10)]
    nominal = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    for got, want in zip(delays, nominal, strict=True):
        assert want * 0.8 <= got <= want
    assert max(delays) <= REOPEN_MAX_S <= 1.0  # the interface's return is noticed within a second
    b.reset()
    assert b.next_delay() <= 0.05


def test_backoff_refuses_a_schedule_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(first_s=0.0)
    with pytest.raises(ValueError, match="first_s"):
        Backoff(first_s=2.0, max_s=1.0)


# -- remote: the bridge process killed and started again -----------------------------------------


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[CanBridge]:
    b = CanBridge(tmp_path / "can")
    await asyncio.to_thread(b.start)
    try:
        yield b
    finally:
        await asyncio.to_thread(b.stop)


async def _kill(bridge: CanBridge) -> None:
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(bridge.proc.wait, 5)
    bridge.proc = None


@pytest.mark.slow
async def test_remote_bridge_killed_and_restarted_frames_resume_within_2_s(
    bridge: CanBridge, mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
    flood_log: pytest.LogCaptureFixture,
) -> None:
    svc = ControllerService(config(mqtt_broker, unique_topic_prefix, "remote", bridge.channel, 500))
    await svc.start()
    witness = Witness("remote", bridge.channel)
    try:
        await wait_until(lambda: len(witness.limits) >= 2, 5.0, "frames before the kill")
        first_bus = svc.can.bus
        witness.close()
        for trial in range(2):  # twice: the reopened bus must be as recoverable as the first
            await _kill(bridge)
            await wait_until(lambda: not svc.can.is_open, 2.0, "the dead bus dropped")
            await asyncio.sleep(1.5)  # the bridge stays away while the port keeps trying
            assert svc.can.counters["open_failed"] >= 2, svc.can.counters
            await asyncio.to_thread(bridge.start)  # same port
            back = time.monotonic()
            witness = Witness("remote", bridge.channel)
            seen = witness.first_after
            await wait_until(lambda: seen(back) is not None,  # noqa: B023 - awaited within the iteration
                             3.0 + RESUME_WITHIN_S, f"0x351 after the bridge's return (trial {trial})")
            took = witness.first_after(back)
            assert took is not None
            assert took - back <= RESUME_WITHIN_S, took - back
            if trial == 0:
                witness.close()
        assert svc.can.bus is not None and svc.can.bus is not first_bus
        assert svc.can.counters["reader_errors"] >= 2
        assert svc.can.counters["dropped"] >= 2
        await asyncio.sleep(1.2)
        assert len(witness.limits) >= 3  # and it stays on its heartbeat
    finally:
        witness.close()
        await svc.stop()
    # A dead bus does not flood the loop nor the log: no callback tracebacks, a few throttled lines.
    assert _callback_tracebacks(flood_log) == 0
    port_lines = [r for r in flood_log.records
                  if r.name == "controller.can_port" and r.levelno >= logging.WARNING]
    assert len(port_lines) <= 30, [r.getMessage() for r in port_lines]


@pytest.mark.slow
async def test_no_bridge_at_start_the_controller_keeps_trying(
    tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    bridge = CanBridge(tmp_path / "can")  # port chosen, nothing listening yet
    svc = ControllerService(config(mqtt_broker, unique_topic_prefix, "remote", bridge.channel, 1000))
    await svc.start()
    try:
        assert not svc.can.is_open
        await asyncio.sleep(2.5)
        assert svc.can.counters["open_failed"] >= 4  # 50 ms doubling to 1 s: ~5 attempts in 2.5 s
        await asyncio.to_thread(bridge.start)
        back = time.monotonic()
        witness = Witness("remote", bridge.channel)
        try:
            await wait_until(lambda: witness.first_after(back) is not None, 5.0, "the first 0x351")
            took = witness.first_after(back)
            assert took is not None and took - back <= RESUME_WITHIN_S
        finally:
            witness.close()
    finally:
        await svc.stop()
        await asyncio.to_thread(bridge.stop)


# -- virtual: python-can's own error paths -------------------------------------------------------


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
async def test_bus_shut_down_under_the_port_is_replaced_at_once(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, flood_log: pytest.LogCaptureFixture
) -> None:
    """A bus that stops working (python-can raises CanOperationError on a closed virtual bus, in recv
    and in send alike) is dropped and replaced; with a 1 s period the inverter hears no gap beyond
    the period and the reopen, not the five failed periods it took before."""
    channel = f"rec-{free_port()}"
    witness = Witness("virtual", channel)
    svc = ControllerService(config(mqtt_broker, unique_topic_prefix, "virtual", channel, 1000))
    await svc.start()
    try:
        await wait_until(lambda: len(witness.limits) >= 1, 3.0, "the first set")
        dead = svc.can.bus
        assert dead is not None
        dead.shutdown()
        gone = time.monotonic()
        await wait_until(lambda: svc.can.bus is not None and svc.can.bus is not dead, 2.0, "a new bus")
        await wait_until(lambda: witness.first_after(gone) is not None, RESUME_WITHIN_S, "0x351 again")
        assert svc.can.counters["reader_errors"] >= 1
        assert svc.stats.resumed_sets >= 1
    finally:
        await svc.stop()
        witness.close()
    assert _callback_tracebacks(flood_log) == 0


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
async def test_full_send_buffer_fences_the_active_and_it_comes_back(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    """Sends raise CanOperationError while a receiver's queue is full (python-can's virtual bus, like
    ENOBUFS on socketcan when nobody acknowledges). With failover on, the active fences itself after
    3 failed sends; when the buffer drains it must become active again and send within 2 s (before,
    a fenced node never sent again, so the bus it had closed was never reopened: silent for good)."""
    channel = f"rec-{free_port()}"
    witness = Witness("virtual", channel)
    svc = ControllerService(config(mqtt_broker, unique_topic_prefix, "virtual", channel, 200,
                                   heartbeat_period_ms=100))
    await svc.start()
    stuck: can.BusABC | None = None
    try:
        await wait_until(lambda: svc.role is Role.ACTIVE and len(witness.limits) >= 2, 5.0, "active, sending")
        stuck = can.Bus(interface="virtual", channel=channel, rx_queue_size=1)  # never read: full at once
        await wait_until(lambda: svc.role is Role.FENCED, 3.0, "the active fencing itself")
        assert svc.can.counters["send_failed"] >= 3
        await asyncio.sleep(2.0)  # a while with a broken transmitter: it keeps trying, never spins
        assert svc.stats.cycles < 2.0 / 0.1 * 2 + 40, svc.stats
        stuck.shutdown()
        stuck = None
        drained = time.monotonic()
        await wait_until(lambda: svc.role is Role.ACTIVE, RESUME_WITHIN_S + 1.0, "active again")
        await wait_until(lambda: witness.first_after(drained) is not None, RESUME_WITHIN_S, "0x351 again")
        took = witness.first_after(drained)
        assert took is not None and took - drained <= RESUME_WITHIN_S, took
    finally:
        if stuck is not None:
            stuck.shutdown()
        await svc.stop()
        witness.close()
