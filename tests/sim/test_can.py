"""SimulatedBms on CAN: the Pylon frame set on a python-can virtual bus, decoded with the shared DBC."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import can
import pytest

from shared.dbc import load_dbc
from sim.battery import BatteryModel, SimRackConfig
from sim.bms_server import SimStartError, SimulatedBms
from sim.can_frames import FRAME_IDS, pylon_frames
from sim.faults import FaultState

PERIOD_S = 0.05
_channels = itertools.count()


def _channel() -> str:
    return f"sim-test-{time.monotonic_ns()}-{next(_channels)}"


@pytest.fixture
async def rig() -> AsyncIterator[tuple[SimulatedBms, can.BusABC]]:
    channel = _channel()
    listener = can.Bus(interface="virtual", channel=channel)
    bms = SimulatedBms()
    try:
        await bms.start_can(interface="virtual", channel=channel, period_s=PERIOD_S)
        yield bms, listener
    finally:
        await bms.stop()
        listener.shutdown()


async def _burst(bus: can.BusABC, timeout_s: float = 2.0) -> dict[int, dict[str, Any]]:
    """The next complete burst sent after this call (0x351 first), decoded; polled without a reader thread."""
    while bus.recv(timeout=0) is not None:  # frames already queued predate the caller's changes
        pass
    db = load_dbc("pylon")
    deadline = time.monotonic() + timeout_s
    frames: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    while time.monotonic() < deadline:
        message = bus.recv(timeout=0)
        if message is None:
            await asyncio.sleep(0.005)
            continue
        if message.arbitration_id == FRAME_IDS[0]:
            frames, order = {}, []
        if not frames and message.arbitration_id != FRAME_IDS[0]:
            continue
        assert not message.is_extended_id
        assert message.dlc == 8
        decoded = db.decode_message(message.arbitration_id, bytes(message.data), decode_choices=False)
        assert isinstance(decoded, dict)
        frames[message.arbitration_id] = decoded
        order.append(message.arbitration_id)
        if len(order) == len(FRAME_IDS):
            assert tuple(order) == FRAME_IDS
            return frames
    raise AssertionError("no complete Pylon burst received")


async def test_burst_carries_the_model(rig: tuple[SimulatedBms, can.BusABC]) -> None:
    bms, bus = rig
    bms.set_current(-35.0)
    frames = await _burst(bus)
    truth = bms.model.measurements()
    assert frames[0x351]["ChargeVoltageLimit"] == pytest.approx(55.2)
    assert frames[0x351]["ChargeCurrentLimit"] == pytest.approx(140.0)
    assert frames[0x351]["DischargeCurrentLimit"] == pytest.approx(140.0)  # positive magnitude
    assert frames[0x351]["DischargeVoltageLimit"] == pytest.approx(46.4)
    assert frames[0x355]["StateOfCharge"] == round(truth.soc_pct)
    assert frames[0x355]["StateOfHealth"] == 98
    assert frames[0x356]["PackVoltage"] == pytest.approx(truth.pack_voltage_v, abs=0.011)  # 0.01 V
    assert frames[0x356]["PackCurrent"] == pytest.approx(-35.0)  # positive = charging
    assert frames[0x356]["PackTemperature"] == pytest.approx(truth.temperature_max_c, abs=0.06)
    protection = frames[0x359]
    assert (protection["ModuleCount"], protection["MarkerP"], protection["MarkerN"]) == (1, 0x50, 0x4E)
    assert (frames[0x35C]["ChargeEnable"], frames[0x35C]["DischargeEnable"]) == (1, 1)
    assert bytes(frames[0x35E][f"Name{i}"] for i in range(8)) == b"PYLON   "
    assert frames[0x373]["CellVoltageMax"] == pytest.approx(truth.cell_voltage_max_v, abs=0.0011)
    assert frames[0x373]["CellTemperatureMax"] == pytest.approx(truth.temperature_max_c, abs=0.6)
    assert frames[0x379]["InstalledCapacity"] == 280


async def test_contactor_and_alarms_show_on_can(rig: tuple[SimulatedBms, can.BusABC]) -> None:
    bms, bus = rig
    bms.faults.open_contactor()
    bms.faults.raise_alarm("charge_over_temperature")
    bms.faults.raise_warning("cell_under_voltage")
    frames = await _burst(bus)
    assert frames[0x351]["ChargeCurrentLimit"] == 0.0
    assert frames[0x351]["DischargeCurrentLimit"] == 0.0
    assert (frames[0x35C]["ChargeEnable"], frames[0x35C]["DischargeEnable"]) == (0, 0)
    assert frames[0x359]["ProtOverTemperature"] == 1
    assert frames[0x359]["WarnLowVoltage"] == 1
    assert frames[0x359]["ProtCellOverVoltage"] == 0


async def test_period_and_silence(rig: tuple[SimulatedBms, can.BusABC]) -> None:
    bms, bus = rig
    await _burst(bus)
    sent = bms.can_frames_sent
    await asyncio.sleep(10 * PERIOD_S)
    bursts = (bms.can_frames_sent - sent) / len(FRAME_IDS)
    assert 7 <= bursts <= 12
    bms.faults.set_no_answer(True)
    await asyncio.sleep(2 * PERIOD_S)
    while bus.recv(timeout=0) is not None:
        pass
    await asyncio.sleep(4 * PERIOD_S)
    assert bus.recv(timeout=0) is None  # a silent BMS sends nothing at all
    bms.faults.set_no_answer(False)
    await _burst(bus)


def test_frames_saturate_for_a_large_rack() -> None:
    faults = FaultState()
    model = BatteryModel(SimRackConfig(cells_in_series=200, cells_per_module=16), faults)
    frames = {f.arbitration_id: f.data for f in pylon_frames(model.snapshot())}
    decoded = load_dbc("pylon").decode_message(0x356, frames[0x356])
    assert isinstance(decoded, dict)
    assert decoded["PackVoltage"] == pytest.approx(327.67)  # s16 × 0.01 V cannot show 660 V


async def test_unknown_interface_is_a_typed_start_error() -> None:
    async with SimulatedBms() as bms:
        with pytest.raises(SimStartError) as caught:
            await bms.start_can(interface="no-such-interface", channel="x")
        assert caught.value.transport == "can"
        assert not bms.running
