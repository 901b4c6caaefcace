"""ConsolidatedModbusServer: the real server on 127.0.0.1, read by pymodbus and by pysunspec2."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from controller.modbus_server import (
    EVT1_ALARMS,
    EVT1_CLUSTER,
    EVT1_WARNINGS,
    EVT_VND1_BITS,
    SUNSPEC_BASE_ADDRESS,
    BatteryState,
    ChargeStatus,
    ConsolidatedModbusServer,
    ModbusServerError,
    battery_model,
    battery_state,
    charge_status,
    evt1,
    image_length,
    parse_allow_list,
)
from rack_agent.profiles import load_profile
from rack_agent.profiles.spec import SunSpecProfile
from rack_agent.profiles.sunspec import model_points
from shared.cluster import ClusterFlags, ConsolidatedState
from shared.controller_config import ModbusServerConfig
from shared.models import PROTECTION_FLAG_NAMES
from tests.controller.frames.states import flags, state
from tests.sim.helpers import LOOPBACK, free_port, quiet_pymodbus, wait_until

OTHER_LOOPBACK = "127.0.0.2"  # Linux routes all of 127/8 to lo: a second client address without setup
CLIENT_TIMEOUT_S = 1.0
BATTERY = SUNSPEC_BASE_ADDRESS + 2 + 68  # SunS, then model 1 (ID, L, 66 registers)
WRITE_FUNCTION_CODES = (5, 6, 15, 16, 22, 23)

ServerFactory = Callable[..., Awaitable[ConsolidatedModbusServer]]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start servers on free 127.0.0.1 ports: ``await make_server(allowed_clients=..., device_id=...)``."""
    made: list[ConsolidatedModbusServer] = []

    async def make(**overrides: Any) -> ConsolidatedModbusServer:
        fields: dict[str, Any] = {"enabled": True, "host": LOOPBACK, "port": free_port(),
                                  "allowed_clients": (LOOPBACK,)}
        fields.update(overrides)
        server = ConsolidatedModbusServer(ModbusServerConfig(**fields))
        made.append(server)
        await server.start()
        return server

    yield make
    for server in made:
        await server.stop()


@contextlib.asynccontextmanager
async def client_of(
    server: ConsolidatedModbusServer, source: str | None = None
) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(
        LOOPBACK, port=server.config.port, timeout=CLIENT_TIMEOUT_S, retries=0, reconnect_delay=0,
        source_address=(source, 0) if source else None,
    )
    try:
        assert await client.connect()
        yield client
    finally:
        client.close()


async def read(client: AsyncModbusTcpClient, address: int, count: int, device_id: int = 1) -> list[int]:
    response = await client.read_holding_registers(address, count=count, device_id=device_id)
    assert not response.isError(), response
    return list(response.registers)


def signed(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


def point(regs: list[int], name: str) -> int:
    """Raw value of a one-register 802 point in a model-802 register list (header included)."""
    return regs[model_points(802)[name].offset]


def value(regs: list[int], name: str) -> float:
    """A scaled 802 point, decoded by hand (independent of pysunspec2)."""
    pdef = model_points(802)[name]
    raw = regs[pdef.offset]
    if pdef.sunspec_type == "int16":
        raw = signed(raw)
    assert pdef.sf is not None
    sf = signed(regs[model_points(802)[pdef.sf].offset])
    return float(raw * 10.0**sf)


def scan(port: int, device_id: int = 1) -> dict[str, Any]:
    """pysunspec2's own blocking discovery and decode: the independent check of the image."""
    device = SunSpecModbusClientDeviceTCP(slave_id=device_id, ipaddr=LOOPBACK, ipport=port, timeout=2)
    try:
        device.scan()
        common, battery = device.common[0], device.battery[0]
        names = ("AHRtg", "SoC", "SoH", "V", "VMax", "VMin", "CellVMax", "CellVMin", "A", "AChaMax",
                 "ADisChaMax", "W", "WHRtg")
        raw = ("ChaSt", "LocRemCtl", "Hb", "Typ", "State", "Evt1", "EvtVnd1", "CellVMaxStr",
               "CellVMaxMod", "SetOp", "AlmRst")
        return {
            "models": [m for m in device.models if isinstance(m, int)],
            "errors": [m.error_info for mid in (1, 802) for m in device.models[mid]],
            "Mn": common.Mn.value, "Md": common.Md.value, "SN": common.SN.value, "DA": common.DA.value,
            **{name: getattr(battery, name).cvalue for name in names},
            **{name: getattr(battery, name).value for name in raw},
        }
    finally:
        device.close()


# -- discovery and values -------------------------------------------------------------------------
async def test_pysunspec2_discovers_models_1_and_802_and_decodes_the_state(
    make_server: ServerFactory,
) -> None:
    server = await make_server()
    server.update(state(cell_voltage_max_location="r3: module 2 cell 7"))
    found = await asyncio.to_thread(scan, server.config.port)
    assert found["models"] == [1, 802]
    assert found["errors"] == ["", ""]  # each L matches the length pysunspec2 computes
    assert (found["Mn"], found["Md"], found["SN"], found["DA"]) == ("bmslink", "cluster", "ctl-1", 1)
    assert found["AChaMax"] == pytest.approx(370.0)
    assert found["ADisChaMax"] == pytest.approx(370.0)
    assert found["VMax"] == pytest.approx(53.2)  # CVL
    assert found["VMin"] == pytest.approx(46.0)  # DVL
    assert found["SoC"] == pytest.approx(56.3)
    assert found["SoH"] == pytest.approx(98.0)
    assert found["V"] == pytest.approx(52.1)  # 52.13 V at V_SF -1
    assert found["A"] == pytest.approx(-12.3)  # negative: discharging (positive = charging)
    assert found["CellVMax"] == pytest.approx(3.312)
    assert found["CellVMin"] == pytest.approx(3.251)
    assert found["AHRtg"] == pytest.approx(400.0)
    assert (found["State"], found["ChaSt"], found["Typ"], found["LocRemCtl"]) == (3, 3, 4, 1)
    assert (found["Evt1"], found["EvtVnd1"], found["Hb"]) == (0, 0, 1)
    assert found["CellVMaxStr"] == 3  # rack r3 is the third roster rack
    # Points with no source, and control points nobody may write, read as "not implemented".
    assert [found[name] for name in ("CellVMaxMod", "W", "WHRtg", "SetOp", "AlmRst")] == [None] * 5


async def test_raw_image_round_trips_limits_and_measurements(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state(charge_current_limit_a=123.4, discharge_current_limit_a=321.0, current_a=45.6,
                        charge_voltage_limit_v=56.8, discharge_voltage_limit_v=44.8, soc_pct=12.3,
                        pack_voltage_v=53.37))
    async with client_of(server) as client:
        head = await read(client, SUNSPEC_BASE_ADDRESS, BATTERY - SUNSPEC_BASE_ADDRESS)
        battery = await read(client, BATTERY, image_length() - (BATTERY - SUNSPEC_BASE_ADDRESS))
    assert head[:4] == [0x5375, 0x6E53, 1, 66]  # "SunS", model 1 with L = 66
    assert battery[:2] == [802, 62]
    assert battery[64:] == [0xFFFF, 0]  # end model
    assert value(battery, "AChaMax") == pytest.approx(123.4)
    assert value(battery, "ADisChaMax") == pytest.approx(321.0)
    assert value(battery, "VMax") == pytest.approx(56.8)
    assert value(battery, "VMin") == pytest.approx(44.8)
    assert value(battery, "SoC") == pytest.approx(12.3)
    assert value(battery, "V") == pytest.approx(53.4)
    assert value(battery, "A") == pytest.approx(45.6)
    assert point(battery, "ChaSt") == ChargeStatus.CHARGING  # ChaSt confirms A's sign
    assert [signed(point(battery, sf)) for sf in ("V_SF", "CellV_SF", "A_SF", "AMax_SF", "SoC_SF",
                                                   "SoH_SF", "AHRtg_SF")] == [-1, -3, -1, -1, -1, 0, 0]
    assert point(battery, "W_SF") == 0x8000  # not implemented, like W


async def test_update_changes_what_the_next_read_returns(make_server: ServerFactory) -> None:
    server = await make_server()
    ccl = BATTERY + model_points(802)["AChaMax"].offset
    hb = BATTERY + model_points(802)["Hb"].offset
    async with client_of(server) as client:
        server.update(state(charge_current_limit_a=100.0))
        first = await read(client, hb, 1) + await read(client, ccl, 1)
        server.update(state(charge_current_limit_a=0.0, charge_enabled=False))
        second = await read(client, hb, 1) + await read(client, ccl, 1)
    assert first == [1, 1000]
    assert second == [2, 0]  # Hb moved by one per update
    assert server.counters["reads"] == 4
    assert server.counters["updates"] == 2


async def test_reads_before_the_first_update_answer_device_busy(make_server: ServerFactory) -> None:
    server = await make_server()
    async with client_of(server) as client:
        response = await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2, device_id=1)
        assert response.isError()
        assert response.exception_code == ExcCodes.DEVICE_BUSY
        server.update(state())
        assert await read(client, SUNSPEC_BASE_ADDRESS, 2) == [0x5375, 0x6E53]
    assert server.counters["reads_busy"] == 1


async def test_heartbeat_skips_the_not_implemented_value(make_server: ServerFactory) -> None:
    server = await make_server()
    server._heartbeat = 0xFFFD  # private: reaching 0xFFFE by 65533 updates would take seconds
    seen = []
    for _ in range(3):
        server.update(state())
        seen.append(server.heartbeat)
    assert seen == [0xFFFE, 0, 1]


# -- read-only ------------------------------------------------------------------------------------
async def test_every_write_is_refused_counted_and_changes_nothing(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    ccl = BATTERY + model_points(802)["AChaMax"].offset
    async with client_of(server) as client:
        before = await read(client, BATTERY, 64)
        responses = [
            await client.write_coil(ccl, True),
            await client.write_register(ccl, 9999),
            await client.write_coils(ccl, [True] * 16),
            await client.write_registers(ccl, [9999, 9999]),
            await client.mask_write_register(address=ccl, and_mask=0, or_mask=0xFFFF),
            await client.readwrite_registers(read_address=ccl, read_count=1, write_address=ccl, values=[9]),
            await client.write_register(100, 1),  # outside the map
        ]
        after = await read(client, BATTERY, 64)
    codes = [(r.function_code & 0x7F, r.exception_code) for r in responses]
    assert all(r.isError() for r in responses), codes
    assert {code for _, code in codes} <= {ExcCodes.ILLEGAL_FUNCTION, ExcCodes.ILLEGAL_ADDRESS}
    assert sorted({fc for fc, _ in codes}) == list(WRITE_FUNCTION_CODES)
    assert after == before
    assert server.counters["writes_refused"] == len(responses)


async def test_coil_reads_of_the_register_image_are_refused(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    async with client_of(server) as client:
        response = await client.read_coils(SUNSPEC_BASE_ADDRESS, count=8)
    assert response.isError()
    assert response.exception_code == ExcCodes.ILLEGAL_FUNCTION
    assert server.counters["functions_refused"] == 1


async def test_input_register_reads_serve_the_same_image(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    async with client_of(server) as client:
        response = await client.read_input_registers(SUNSPEC_BASE_ADDRESS, count=4)
    assert list(response.registers) == [0x5375, 0x6E53, 1, 66]


# -- unit id --------------------------------------------------------------------------------------
async def test_only_the_configured_unit_answers(make_server: ServerFactory) -> None:
    server = await make_server(device_id=7)
    server.update(state())
    async with client_of(server) as client:
        assert await read(client, SUNSPEC_BASE_ADDRESS, 2, device_id=7) == [0x5375, 0x6E53]
        other = await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2, device_id=1)
    assert other.isError()
    assert other.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
    assert server.counters["foreign_unit"] == 1
    found = await asyncio.to_thread(scan, server.config.port, 7)
    assert found["DA"] == 7


# -- allow-list -----------------------------------------------------------------------------------
async def _closed_without_answer(port: int) -> bool:
    """Connect from 127.0.0.1, send a valid read: True if the server closed without answering."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        # MBAP: tid 1, protocol 0, length 6, unit 1; PDU: FC3 at 40000, 2 registers.
        writer.write(bytes.fromhex("0001 0000 0006 01 03 9c40 0002"))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(256), CLIENT_TIMEOUT_S)  # the answer, or b"" at EOF
        except ConnectionResetError:
            data = b""
        return data == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.wait_closed()


async def test_a_client_not_on_the_allow_list_is_closed_at_once(make_server: ServerFactory) -> None:
    server = await make_server(allowed_clients=(OTHER_LOOPBACK,))
    server.update(state())
    assert await _closed_without_answer(server.config.port)
    # pymodbus's client: the TCP handshake completes, then the connection drops at once.
    client = AsyncModbusTcpClient(LOOPBACK, port=server.config.port, timeout=CLIENT_TIMEOUT_S, retries=0,
                                  reconnect_delay=0)
    try:
        assert await client.connect()
        await wait_until(lambda: not client.connected, CLIENT_TIMEOUT_S, "the server to drop the client")
        with pytest.raises(ConnectionException):
            await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2)
    finally:
        client.close()
    assert server.counters["refused_clients"] == 2
    assert server.counters["reads"] == 0
    # The same server serves the one address it allows.
    async with client_of(server, source=OTHER_LOOPBACK) as client:
        assert await read(client, SUNSPEC_BASE_ADDRESS, 2) == [0x5375, 0x6E53]
    assert server.counters["connections"] == 1


async def test_an_allowed_client_is_served(make_server: ServerFactory) -> None:
    server = await make_server(allowed_clients=(LOOPBACK, OTHER_LOOPBACK))
    server.update(state())
    assert not await _closed_without_answer(server.config.port)
    assert server.counters["refused_clients"] == 0


async def test_an_empty_allow_list_refuses_everyone(make_server: ServerFactory) -> None:
    server = await make_server(allowed_clients=())
    server.update(state())
    assert await _closed_without_answer(server.config.port)
    assert server.counters["refused_clients"] == 1


def test_allow_list_entries_are_ip_addresses() -> None:
    # Parsing only (no traffic): loopback literals, as everywhere in the tests.
    assert {str(a) for a in parse_allow_list((" 127.0.0.5", "::ffff:127.0.0.6", "::1"))} == {
        "127.0.0.5", "127.0.0.6", "::1"}  # IPv4-mapped IPv6 is compared as IPv4
    bad = ("127.0.0.1", "ems.local", "127.0.0.0/8")
    with pytest.raises(ValueError, match=r"ems\.local.*127\.0\.0\.0/8"):
        parse_allow_list(bad)
    # The config model refuses them first (one error per entry, so over several lines).
    with pytest.raises(ValueError, match=r"(?s)ems\.local.*127\.0\.0\.0/8"):
        ConsolidatedModbusServer(ModbusServerConfig(allowed_clients=bad))


# -- lifecycle ------------------------------------------------------------------------------------
async def test_stop_is_idempotent_closes_clients_and_frees_the_port(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    async with client_of(server) as client:
        await read(client, SUNSPEC_BASE_ADDRESS, 2)
        await server.stop()
        await server.stop()
        assert not server.running
        with pytest.raises((ConnectionException, ModbusIOException)):
            await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2)
    again = await make_server(port=server.config.port)  # the port is free again
    again.update(state())
    async with client_of(again) as client:
        assert await read(client, SUNSPEC_BASE_ADDRESS, 2) == [0x5375, 0x6E53]


async def test_stop_before_start_does_nothing() -> None:
    server = ConsolidatedModbusServer(ModbusServerConfig())
    await server.stop()
    assert not server.running


async def test_a_busy_port_is_a_typed_start_error(make_server: ServerFactory) -> None:
    first = await make_server()
    second = ConsolidatedModbusServer(first.config)
    with pytest.raises(ModbusServerError) as caught:
        await second.start()
    assert caught.value.address == f"{LOOPBACK}:{first.config.port}"
    assert not second.running


# -- the mapping (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, BatteryState.CONNECTED),
        ({"charge_enabled": False}, BatteryState.CONNECTED),
        ({"charge_enabled": False, "discharge_enabled": False}, BatteryState.STANDBY),
        ({"alarms": flags("cell_over_voltage")}, BatteryState.FAULT),
        ({"cluster": ClusterFlags(not_enough_racks=True)}, BatteryState.FAULT),
        ({"cluster": ClusterFlags(latched_alarm=True), "charge_enabled": False,
          "discharge_enabled": False}, BatteryState.FAULT),
        ({"warnings": flags("cell_over_voltage"), "cluster": ClusterFlags(unknown_rack_seen=True)},
         BatteryState.CONNECTED),
    ],
)
def test_state(overrides: dict[str, Any], expected: BatteryState) -> None:
    assert battery_state(state(**overrides)) is expected


@pytest.mark.parametrize(
    ("current_a", "enabled", "expected"),
    [
        (20.0, True, ChargeStatus.CHARGING),
        (-20.0, True, ChargeStatus.DISCHARGING),
        (0.5, True, ChargeStatus.HOLDING),
        (0.0, False, ChargeStatus.OFF),
        (-5.0, False, ChargeStatus.DISCHARGING),
    ],
)
def test_charge_status_follows_the_sign_of_the_current(
    current_a: float, enabled: bool, expected: ChargeStatus
) -> None:
    s = state(current_a=current_a, charge_enabled=enabled, discharge_enabled=enabled)
    assert charge_status(s) is expected


# The brief's Evt1 table (SunSpec 802 Evt1 bit numbers).
EXPECTED_ALARM_BITS = {
    "charge_over_temperature": 1, "discharge_over_temperature": 1,
    "charge_under_temperature": 3, "discharge_under_temperature": 3,
    "charge_over_current": 5, "discharge_over_current": 7,
    "cell_over_voltage": 9, "pack_over_voltage": 9, "cell_under_voltage": 11, "pack_under_voltage": 11,
    "insulation_fault": 22, "internal_fault": 25, "cell_imbalance": 25,
}
EXPECTED_WARNING_BITS = {
    "charge_over_temperature": 2, "discharge_over_temperature": 2,
    "charge_under_temperature": 4, "discharge_under_temperature": 4,
    "charge_over_current": 6, "discharge_over_current": 8,
    "cell_over_voltage": 10, "pack_over_voltage": 10, "cell_under_voltage": 12, "pack_under_voltage": 12,
    "cell_imbalance": 17, "internal_fault": 26, "insulation_fault": 26,
}


@pytest.mark.parametrize("flag", PROTECTION_FLAG_NAMES)
def test_each_protection_flag_sets_its_evt1_bit(flag: str) -> None:
    none = flags()
    assert evt1(flags(flag), none, ClusterFlags()) == 1 << EXPECTED_ALARM_BITS[flag]
    assert evt1(none, flags(flag), ClusterFlags()) == 1 << EXPECTED_WARNING_BITS[flag]


def test_cluster_flags_set_evt1_and_vendor_bits() -> None:
    none = flags()
    assert evt1(none, none, ClusterFlags(not_enough_racks=True)) == 1 << 25  # OTHER_ALARM
    assert evt1(none, none, ClusterFlags(latched_alarm=True)) == 1 << 25
    assert evt1(none, none, ClusterFlags(unknown_rack_seen=True)) == 1 << 29  # CONFIGURATION_WARNING
    regs, _ = battery_model(state(cluster=ClusterFlags(not_enough_racks=True, unknown_rack_seen=True)), 1)
    assert regs[model_points(802)["EvtVnd1"].offset:][:2] == [0, 0b101]


def test_the_tables_cover_every_flag() -> None:
    assert set(EVT1_ALARMS) == set(EVT1_WARNINGS) == set(PROTECTION_FLAG_NAMES)
    assert set(EVT1_CLUSTER) == set(EVT_VND1_BITS) == set(ClusterFlags.model_fields)


def test_evt1_agrees_with_the_agents_sunspec_reading_map() -> None:
    """A bmslink agent reading this server with the sunspec profile sees every flag the profile knows."""
    profile = load_profile("sunspec")
    assert isinstance(profile, SunSpecProfile)
    none = flags()
    for table, as_alarm in ((profile.alarms, True), (profile.warnings, False)):
        for flag, bit in table.items():
            if (bit.model, bit.point) != (802, "Evt1"):
                continue
            alarms, warnings = (flags(flag), none) if as_alarm else (none, flags(flag))
            assert evt1(alarms, warnings, ClusterFlags()) == 1 << bit.bit, (flag, as_alarm)


def test_alarms_reach_a_pysunspec2_reader_as_fault_and_evt1_bits() -> None:
    regs, _ = battery_model(state(alarms=flags("charge_over_temperature", "insulation_fault"),
                                  warnings=flags("cell_imbalance")), 1)
    evt = regs[model_points(802)["Evt1"].offset:][:2]
    assert (evt[0] << 16) | evt[1] == (1 << 1) | (1 << 22) | (1 << 17)
    assert point(regs, "State") == BatteryState.FAULT


def test_values_beyond_a_register_saturate_short_of_not_implemented() -> None:
    regs, saturated = battery_model(state(capacity_ah=100_000.0, current_a=-5000.0), 1)
    assert point(regs, "AHRtg") == 0xFFFE  # not 0xFFFF, which reads as "not implemented"
    assert signed(point(regs, "A")) == -0x7FFF  # not -0x8000
    assert set(saturated) == {"AHRtg", "A"}


def test_cell_location_names_the_rack_as_the_string() -> None:
    located = state(cell_voltage_max_location="r2: cell 4", cell_voltage_min_location="zz: 1")
    regs, _ = battery_model(located, 1)
    assert point(regs, "CellVMaxStr") == 2
    assert point(regs, "CellVMinStr") == 0xFFFF  # not a roster rack: not implemented
    assert point(regs, "CellVMaxMod") == 0xFFFF


async def test_update_is_cheap(make_server: ServerFactory) -> None:
    server = await make_server()
    states: list[ConsolidatedState] = [state(current_a=float(i)) for i in range(200)]
    started = time.perf_counter()
    for s in states:
        server.update(s)
    per_update_s = (time.perf_counter() - started) / len(states)
    assert per_update_s < 1e-3  # measured ~50 µs; the control cycle allows a few hundred
