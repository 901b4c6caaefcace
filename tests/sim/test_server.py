"""SimulatedBms over Modbus TCP: read by pysunspec2 (independent reader), by the agent's plan, and faulted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from rack_agent.profiles.plan import decode_measurements
from rack_agent.profiles.spec import Table
from shared.models import ContactorState
from sim.battery import SimRackConfig
from sim.bms_server import SimStartError, SimulatedBms
from sim.registers import flat_register_plan
from tests.sim.helpers import LOOPBACK, free_port, quiet_pymodbus, wait_until

CLIENT_TIMEOUT_S = 0.3


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimulatedBms, int]]:
    port = free_port()
    bms = SimulatedBms(update_period_s=0.02)
    await bms.start_tcp(LOOPBACK, port)
    try:
        yield bms, port
    finally:
        await bms.stop()


@pytest.fixture
async def client(sim: tuple[SimulatedBms, int]) -> AsyncIterator[AsyncModbusTcpClient]:
    c = AsyncModbusTcpClient(LOOPBACK, port=sim[1], timeout=CLIENT_TIMEOUT_S, retries=0, reconnect_delay=0)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


def _scan(port: int) -> dict[str, Any]:
    """pysunspec2's own blocking scan: the independent check of the SunSpec image."""
    device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr=LOOPBACK, ipport=port, timeout=2)
    try:
        device.scan()
        battery = device.battery[0]
        bank = device.models[803][0]
        return {
            "models": [m for m in device.models if isinstance(m, int)],
            "errors": [m.error_info for mid in (1, 802, 803) for m in device.models[mid]],
            "manufacturer": device.common[0].Mn.value,
            "soc": battery.SoC.cvalue,
            "voltage": battery.V.cvalue,
            "current": battery.A.cvalue,
            "charge_limit": battery.AChaMax.cvalue,
            "state": battery.State.value,
            "evt1": battery.Evt1.value,
            "temperature_max": bank.ModTmpMax.cvalue,
            "strings": bank.NStr.value,
            "string_status": bank.string[0].StrSt.value,
        }
    finally:
        device.close()


async def test_pysunspec2_scan_finds_the_models_and_reads_scaled_values(
    sim: tuple[SimulatedBms, int],
) -> None:
    bms, port = sim
    bms.set_current(42.0)
    found = await asyncio.to_thread(_scan, port)
    truth = bms.model.measurements()
    assert found["models"] == [1, 802, 803]
    assert found["errors"] == ["", "", ""]  # discovered L matches pysunspec2's computed length
    assert found["manufacturer"] == "bmslink"
    assert found["soc"] == pytest.approx(truth.soc_pct, abs=0.1)
    assert found["voltage"] == pytest.approx(truth.pack_voltage_v, abs=0.02)
    assert found["current"] == pytest.approx(42.0)
    assert found["charge_limit"] == pytest.approx(truth.charge_current_limit_a, abs=0.1)
    assert found["temperature_max"] == pytest.approx(truth.temperature_max_c, abs=0.1)
    assert (found["state"], found["strings"], found["string_status"]) == (3, 1, 0b11)
    assert found["evt1"] == 0


async def test_pysunspec2_sees_contactor_and_alarm(sim: tuple[SimulatedBms, int]) -> None:
    bms, port = sim
    bms.faults.open_contactor()
    bms.faults.raise_alarm("charge_over_temperature")
    found = await asyncio.to_thread(_scan, port)
    assert found["state"] == 1  # DISCONNECTED
    assert found["string_status"] == 0b01  # enabled, contactor bit clear
    assert found["evt1"] == 1 << 1  # OVER_TEMP_ALARM
    assert found["charge_limit"] == 0.0


async def _read_flat(client: AsyncModbusTcpClient) -> Any:
    plan = flat_register_plan()
    (block,) = plan.blocks
    response = await client.read_holding_registers(block.address, count=block.count, device_id=1)
    assert not response.isError()
    image = {(Table.HOLDING, block.address + i): v for i, v in enumerate(response.registers)}
    return decode_measurements(plan, image)


async def test_flat_map_over_tcp_matches_the_model(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient
) -> None:
    bms, _ = sim
    bms.set_current(-63.2)
    decoded = await _read_flat(client)
    truth = bms.model.measurements()
    assert decoded.current_a == pytest.approx(-63.2)
    assert decoded.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=0.006)
    assert decoded.soc_pct == pytest.approx(truth.soc_pct, abs=0.06)
    assert decoded.cell_voltage_min_v == pytest.approx(truth.cell_voltage_min_v, abs=0.0006)
    assert decoded.charge_current_limit_a == pytest.approx(truth.charge_current_limit_a, abs=0.06)
    assert decoded.contactor is ContactorState.CLOSED


async def test_registers_follow_the_running_model() -> None:
    port = free_port()
    # A 2 Ah rack at 140 A moves SOC by 0.4 % in 0.2 s: visible at the flat map's 0.1 % resolution.
    async with SimulatedBms(SimRackConfig(capacity_ah=2.0), update_period_s=0.02) as bms:
        await bms.start_tcp(LOOPBACK, port)
        client = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=1.0, retries=0, reconnect_delay=0)
        assert await client.connect()
        try:
            bms.set_current(140.0)
            first = await _read_flat(client)
            await wait_until(lambda: bms.model.elapsed_s > 0.3, 2.0, "model steps")
            later = await _read_flat(client)
            assert later.soc_pct - first.soc_pct >= 0.3
            assert later.current_a == pytest.approx(140.0)
            bms.faults.open_contactor()
            # At once, not at the next model step: the image is rebuilt when the faults change.
            assert (await _read_flat(client)).contactor is ContactorState.OPEN
        finally:
            client.close()


async def test_exception_fault_returns_an_exception_response(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient
) -> None:
    sim[0].faults.set_exception(6)
    response = await client.read_holding_registers(0, count=2, device_id=1)
    assert response.isError()
    assert response.exception_code == 6
    sim[0].faults.set_exception(None)
    assert not (await client.read_holding_registers(0, count=2, device_id=1)).isError()


async def test_delay_fault_is_measurable(sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient) -> None:
    sim[0].faults.set_delay(150)
    started = time.monotonic()
    response = await client.read_holding_registers(0, count=2, device_id=1)
    elapsed = time.monotonic() - started
    assert not response.isError()
    assert 0.15 <= elapsed < 0.28


async def test_no_answer_is_a_timeout_then_recovers(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient
) -> None:
    sim[0].faults.set_no_answer(True)
    started = time.monotonic()
    with pytest.raises(ModbusIOException):
        await client.read_holding_registers(0, count=2, device_id=1)
    assert time.monotonic() - started == pytest.approx(CLIENT_TIMEOUT_S, abs=0.1)
    sim[0].faults.set_no_answer(False)
    assert not (await client.read_holding_registers(0, count=2, device_id=1)).isError()


async def test_other_units_and_writes_are_refused(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient
) -> None:
    other = await client.read_holding_registers(0, count=2, device_id=5)
    assert other.isError() and other.exception_code == 0x0B  # GATEWAY_NO_RESPONSE, as a gateway says
    gap = await client.read_holding_registers(100, count=2, device_id=1)
    assert gap.isError() and gap.exception_code == 2
    write = await client.write_register(0, 1, device_id=1)
    assert write.isError() and write.exception_code == 2


async def test_stop_releases_a_held_request_and_is_idempotent() -> None:
    port = free_port()
    bms = SimulatedBms()
    await bms.start_tcp(LOOPBACK, port)
    client = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=0.5, retries=0, reconnect_delay=0)
    assert await client.connect()
    bms.faults.set_delay(10_000)
    async def read() -> object:
        return await client.read_holding_registers(0, count=2, device_id=1)

    pending = asyncio.create_task(read())
    await wait_until(lambda: bool(bms._held_requests), 2.0, "the request to reach the hook")
    started = time.monotonic()
    await bms.stop()
    await bms.stop()
    assert time.monotonic() - started < 1.0
    assert not bms.running
    with pytest.raises((ModbusIOException, ConnectionError)):
        await pending
    client.close()


async def test_port_in_use_is_a_typed_start_error() -> None:
    port = free_port()
    async with SimulatedBms() as first, SimulatedBms() as second:
        await first.start_tcp(LOOPBACK, port)
        with pytest.raises(SimStartError) as caught:
            await second.start_tcp(LOOPBACK, port)
        assert caught.value.transport == "modbus tcp"
        assert caught.value.address == f"{LOOPBACK}:{port}"


async def test_port_zero_reports_the_bound_port() -> None:
    async with SimulatedBms(device_id=3) as bms:
        await bms.start_tcp(LOOPBACK, 0)
        (endpoint,) = bms.endpoints
        port = int(endpoint.split(":")[1].split()[0])
        assert port > 0 and endpoint.endswith("unit 3")
        client = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=1.0, retries=0, reconnect_delay=0)
        assert await client.connect()
        assert not (await client.read_holding_registers(40000, count=2, device_id=3)).isError()
        client.close()


def test_constructor_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="device_id"):
        SimulatedBms(device_id=0)
    with pytest.raises(ValueError, match="update_period_s"):
        SimulatedBms(update_period_s=0.0)


async def test_short_read_answers_fewer_registers_in_a_well_formed_frame(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient
) -> None:
    sim[0].faults.set_short_read(3)
    short = await client.read_holding_registers(0, count=10, device_id=1)
    assert not short.isError()
    assert len(short.registers) == 7
    assert sim[0].register_reads == 1
    # Exceptions are left alone, and the connection still carries whole frames afterwards.
    gap = await client.read_holding_registers(100, count=2, device_id=1)
    assert gap.isError() and gap.exception_code == 2
    sim[0].faults.set_short_read(0)
    assert len((await client.read_holding_registers(0, count=10, device_id=1)).registers) == 10


@pytest.mark.parametrize(
    ("layout", "first_registers"),
    [
        ("standard", [0x5375, 0x6E53, 1, 66]),
        ("no_marker", [0, 0, 1, 66]),
    ],
)
async def test_sunspec_layout_fault_changes_the_map_served(
    sim: tuple[SimulatedBms, int], client: AsyncModbusTcpClient, layout: str, first_registers: list[int]
) -> None:
    sim[0].faults.set_sunspec_layout(layout)
    response = await client.read_holding_registers(40000, count=4, device_id=1)
    assert response.registers == first_registers
