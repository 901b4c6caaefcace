"""The agent against real pymodbus servers (TCP on 127.0.0.1, RTU over a socat pty pair) and a CAN bus.

One behaviour, every transport: the same assertions run over each link type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rack_agent.agent import RackAgent
from shared.models import ContactorState, LinkStatus, RackCommState
from sim.bms_server import SimulatedBms
from tests.agent.helpers import agent_config, started_links, stop_links
from tests.fixtures.broker import free_port
from tests.fixtures.serial_pair import SerialPair


@dataclass
class Rig:
    sim: SimulatedBms
    agent: RackAgent
    transport: str


async def _rig(
    transport: str, profile: str, serial_pair: SerialPair | None, **cfg: Any
) -> tuple[SimulatedBms, RackAgent]:
    sim = SimulatedBms()
    if transport == "tcp":
        port = free_port()
        await sim.start_tcp("127.0.0.1", port)
        link = {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port}
    else:
        assert serial_pair is not None
        await sim.start_rtu(str(serial_pair.a), baudrate=19200)
        link = {"type": "modbus_rtu", "name": "rs485", "device": str(serial_pair.b), "baudrate": 19200}
    agent = RackAgent(agent_config(link, profile=profile, **cfg))
    return sim, agent


@pytest.fixture(params=["tcp", "rtu"])
async def rig(request: pytest.FixtureRequest, serial_pair: SerialPair) -> AsyncIterator[Rig]:
    sim, agent = await _rig(request.param, "acme_flat", serial_pair)
    try:
        await started_links(agent)
        yield Rig(sim, agent, request.param)
    finally:
        await stop_links(agent)
        await sim.stop()


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
@pytest.mark.parametrize("profile", ["sunspec", "acme_flat"])
async def test_reads_what_the_bms_says(transport: str, profile: str, serial_pair: SerialPair) -> None:
    sim, agent = await _rig(transport, profile, serial_pair)
    try:
        sim.set_current(30.0)
        await started_links(agent)
        telemetry = await agent.poll_once()
        truth = sim.model.measurements()
        assert telemetry.comm_state is RackCommState.OK
        m = telemetry.measurements
        assert m is not None
        assert m.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=0.1)
        assert m.soc_pct == pytest.approx(truth.soc_pct, abs=0.5)
        assert m.cell_voltage_max_v == pytest.approx(truth.cell_voltage_max_v, abs=0.002)
        assert m.temperature_max_c == pytest.approx(truth.temperature_max_c, abs=0.2)
        assert m.charge_current_limit_a == pytest.approx(truth.charge_current_limit_a, abs=0.2)
        assert m.discharge_current_limit_a == pytest.approx(truth.discharge_current_limit_a, abs=0.2)
        assert m.current_a == pytest.approx(truth.current_a, abs=0.2)
        assert m.current_a > 0  # charging is positive end to end
        assert m.contactor is ContactorState.CLOSED
        assert telemetry.units[0].status is LinkStatus.OK
    finally:
        await stop_links(agent)
        await sim.stop()


async def test_timeout_is_classified_as_timeout(rig: Rig) -> None:
    rig.sim.faults.set_no_answer(True)
    telemetry = await rig.agent.poll_once()
    unit = telemetry.units[0]
    assert unit.status is LinkStatus.TIMEOUT
    assert unit.counters.timeout == 1
    assert unit.counters.crc_error == 0


async def test_modbus_exception_is_classified_with_its_code(rig: Rig) -> None:
    rig.sim.faults.set_exception(4)
    telemetry = await rig.agent.poll_once()
    unit = telemetry.units[0]
    assert unit.status is LinkStatus.MODBUS_EXCEPTION
    assert unit.last_exception_code == 4
    assert unit.counters.modbus_exception == 1


async def test_crc_error_is_told_apart_from_timeout(
    serial_pair: SerialPair, caplog: pytest.LogCaptureFixture
) -> None:
    sim, agent = await _rig("rtu", "acme_flat", serial_pair)
    try:
        await started_links(agent)
        sim.faults.set_corrupt_crc(True)
        telemetry = await agent.poll_once()
        unit = telemetry.units[0]
        assert unit.status is LinkStatus.CRC_ERROR
        assert unit.counters.crc_error == 1
        assert unit.counters.timeout == 0
        assert "CRC Error" in caplog.text  # the words operators grep for
        sim.faults.set_corrupt_crc(False)
        sim.faults.set_no_answer(True)
        telemetry = await agent.poll_once()
        assert telemetry.units[0].status is LinkStatus.TIMEOUT
        assert "Timeout" in caplog.text
    finally:
        await stop_links(agent)
        await sim.stop()


async def test_refused_connection_is_classified_as_refused() -> None:
    port = free_port()  # nothing listens here
    agent = RackAgent(agent_config({"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port}))
    try:
        for link in agent.links.values():
            await link.start()
        telemetry = await agent.poll_once()
        assert telemetry.units[0].status is LinkStatus.CONNECTION_REFUSED
        assert telemetry.comm_state is RackCommState.COMM_LOST
        assert telemetry.measurements is None
    finally:
        await stop_links(agent)


async def test_missing_serial_device_is_classified_as_refused(tmp_path: Any) -> None:
    link = {"type": "modbus_rtu", "name": "rs485", "device": str(tmp_path / "ttyNOPE")}
    agent = RackAgent(agent_config(link))
    try:
        for lk in agent.links.values():
            await lk.start()
        telemetry = await agent.poll_once()
        assert telemetry.units[0].status is LinkStatus.CONNECTION_REFUSED
    finally:
        await stop_links(agent)


async def test_invalid_data_is_classified_as_invalid(tmp_path: Any) -> None:
    # A profile whose temperature scale is wrong by 100x makes the BMS's answer physically impossible:
    # the agent must refuse it (invalid_data), not publish it.
    base = (Path(__file__).parents[2] / "rack_agent/profiles/acme_flat.toml").read_text()
    bad = tmp_path / "wrong_scale.toml"
    bad.write_text(base.replace(
        'temperature_max_c = { address = 8, type = "u16", scale = 0.1,',
        'temperature_max_c = { address = 8, type = "u16", scale = 10.0,'))
    sim = SimulatedBms()
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    agent = RackAgent(agent_config({"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port},
                                   profile=str(bad)))
    try:
        await started_links(agent)
        telemetry = await agent.poll_once()
        assert telemetry.units[0].status is LinkStatus.INVALID_DATA
        assert telemetry.units[0].counters.invalid_data == 1
        assert telemetry.measurements is None
    finally:
        await stop_links(agent)
        await sim.stop()


async def test_comm_lost_after_n_failures_zero_limits_then_recovery(rig: Rig) -> None:
    first = await rig.agent.poll_once()
    assert first.comm_state is RackCommState.OK
    assert first.measurements is not None and first.measurements.charge_current_limit_a > 0
    rig.sim.faults.set_no_answer(True)
    states = []
    for _ in range(3):
        t = await rig.agent.poll_once()
        states.append(t.comm_state)
    # Failures 1 and 2 keep the last good reading; the 3rd (comm_lost_after = 3) zeroes the limits.
    assert states == [RackCommState.OK, RackCommState.OK, RackCommState.COMM_LOST]
    assert t.measurements is not None
    assert t.measurements.charge_current_limit_a == 0.0
    assert t.measurements.discharge_current_limit_a == 0.0
    assert t.units[0].consecutive_failures == 3
    rig.sim.faults.set_no_answer(False)
    for _ in range(30):  # the link may be re-opened after comm loss: give it a few polls
        t = await rig.agent.poll_once()
        if t.comm_state is RackCommState.OK:
            break
    assert t.comm_state is RackCommState.OK
    assert t.measurements is not None and t.measurements.charge_current_limit_a > 0
    assert t.units[0].status is LinkStatus.OK


async def test_can_bms_is_read_with_the_shared_dbc() -> None:
    channel = f"bms-{free_port()}"
    sim = SimulatedBms()
    await sim.start_can(interface="virtual", channel=channel, period_s=0.05)
    link = {
        "type": "can", "name": "bmscan", "interface": "virtual", "channel": channel, "stale_after_ms": 300,
    }
    agent = RackAgent(agent_config(link))
    try:
        sim.set_current(-20.0)
        await started_links(agent)
        for _ in range(50):
            telemetry = await agent.poll_once()
            if telemetry.comm_state is RackCommState.OK:
                break
            await asyncio.sleep(0.05)
        truth = sim.model.measurements()
        m = telemetry.measurements
        assert telemetry.comm_state is RackCommState.OK and m is not None
        assert m.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=0.05)
        assert m.current_a == pytest.approx(truth.current_a, abs=0.2)
        assert m.current_a < 0
        assert m.discharge_current_limit_a == pytest.approx(truth.discharge_current_limit_a, abs=0.2)
        assert m.capacity_ah == pytest.approx(truth.capacity_ah, abs=1)
        # A silent CAN BMS is a timeout, not stale data.
        await sim.stop()
        await asyncio.sleep(0.4)
        silent = await agent.poll_once()
        assert silent.units[0].status is LinkStatus.TIMEOUT
    finally:
        await stop_links(agent)
        await sim.stop()
