"""A BMS side for the simulated-inverter tests: encoder frames sent on a virtual bus on a period."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import can

from controller.frames import FrameEncoder
from shared.cluster import ConsolidatedState
from shared.controller_config import Dialect, InverterCanConfig
from shared.dbc import load_dbc
from sim.inverter import SimulatedInverter
from tests.controller.frames.states import state

_channels = itertools.count()


def unique_channel() -> str:
    return f"inv-test-{time.monotonic_ns()}-{next(_channels)}"


def encoder(dialect: Dialect) -> FrameEncoder:
    return FrameEncoder(InverterCanConfig(dialect=dialect, period_ms=1000), module_count=2)


def pylon_frame(frame_id: int, **signals: float) -> can.Message:
    """A Pylon-DBC frame with the given raw values (others 0), packed by cantools without checks."""
    message = load_dbc("pylon").get_message_by_frame_id(frame_id)
    raw = {s.name: 0 for s in message.signals} | signals
    return can.Message(arbitration_id=frame_id, data=message.encode(raw, scaling=False, strict=False),
                       is_extended_id=False)


def sma_frame(frame_id: int, **signals: float) -> can.Message:
    message = load_dbc("sma").get_message_by_frame_id(frame_id)
    raw = {s.name: 0 for s in message.signals} | signals
    return can.Message(arbitration_id=frame_id, data=message.encode(raw, scaling=False, strict=False),
                       is_extended_id=False)


def send_all(bus: can.BusABC, messages: Iterable[can.Message]) -> None:
    for message in messages:
        bus.send(message)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class Feeder:
    """Sends ``encoder.encode(state)`` every ``period_s`` until paused or closed (owns its task)."""

    def __init__(self, bus: can.BusABC, enc: FrameEncoder, s: ConsolidatedState | None = None,
                 period_s: float = 0.1) -> None:
        self.bus, self.encoder, self.state, self.period_s = bus, enc, s or state(), period_s
        self.sets_sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="test-bms-feeder")

    async def pause(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            send_all(self.bus, self.encoder.encode(self.state))
            self.sets_sent += 1
            next_at += self.period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


@contextlib.asynccontextmanager
async def rig(dialect: Dialect = Dialect.PYLON, *, feed: bool = True, period_s: float = 0.1,
              s: ConsolidatedState | None = None,
              **inverter_kw: Any) -> AsyncIterator[tuple[SimulatedInverter, Feeder, can.BusABC]]:
    """An inverter and a BMS bus on a fresh virtual channel; everything stopped on exit."""
    channel = unique_channel()
    inverter = SimulatedInverter(dialect=dialect, **inverter_kw)
    bus = can.Bus(interface="virtual", channel=channel)
    feeder = Feeder(bus, encoder(dialect), s, period_s)
    try:
        await inverter.start(interface="virtual", channel=channel)
        if feed:
            feeder.start()
        yield inverter, feeder, bus
    finally:
        await feeder.pause()
        await inverter.stop()
        bus.shutdown()
