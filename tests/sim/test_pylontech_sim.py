"""The simulated Pylontech LV packs (sim/pylontech_console.py) on a socat pty pair: what they answer, how
they refuse, their faults, and ``bmslink sim bms --transport pylontech`` as a process read by
``bmslink agent`` as a process, publishing to a real Mosquitto."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bmslink.processes import ProcessGroup, bmslink_cli
from rack_agent.pylontech.codec import (
    Command,
    Frame,
    FrameChecksumError,
    LengthChecksumError,
    answer_info,
    decode_frame,
    encode_request,
    frame_checksum,
)
from rack_agent.pylontech.info import (
    ManagementStatus,
    ProtectionStatus,
    SwitchStatus,
    decode_alarm_info,
    decode_analog_values,
    decode_management_info,
    decode_manufacturer_info,
)
from rack_agent.pylontech.serial_line import SerialLine
from shared.codec import telemetry_decoder
from shared.config import MqttConfig
from shared.models import LinkStatus, RackCommState, RackTelemetry
from shared.mqtt import MqttSession
from shared.topics import Topics
from sim.cli import add_bms_parser, run_bms
from sim.pylontech_console import (
    BOARD_ABOVE_CELLS_C,
    PACK_CAPACITY_AH,
    ConsoleFaults,
    PylontechConsoleSim,
)
from sim.registers import MAKES
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.serial_pair import SerialPair

ANSWER_TIMEOUT_S = 1.0
SILENCE_S = 0.2
READY_TIMEOUT_S = 20.0
A_MAKE = sorted(MAKES)[0]  # any Modbus make the simulator knows


@pytest.fixture
async def packs(serial_pair: SerialPair) -> AsyncIterator[tuple[PylontechConsoleSim, SerialLine]]:
    """Packs 2 and 3 on one end; a client line (our own serial line, raw frames) on the other."""
    sim = PylontechConsoleSim.with_packs(2)
    await sim.start(serial_pair.a, baudrate=9600)
    client = SerialLine(serial_pair.b, 9600)
    await client.open(2.0)
    try:
        yield sim, client
    finally:
        client.close()
        await sim.stop()


async def _ask(client: SerialLine, wire: bytes, timeout_s: float = ANSWER_TIMEOUT_S) -> Frame:
    client.clear_input()
    await client.send(wire)
    async with asyncio.timeout(timeout_s):
        return decode_frame(await client.receive_frame())


async def _silent(client: SerialLine, wire: bytes) -> bool:
    try:
        await _ask(client, wire, SILENCE_S)
    except TimeoutError:
        return True
    return False


async def test_each_pack_answers_what_its_model_says(packs: tuple[PylontechConsoleSim, SerialLine]) -> None:
    sim, client = packs
    sim.pack(3).set_current(-12.0)
    truth = sim.pack(3).model.snapshot()
    frame = await _ask(client, encode_request(3, Command.ANALOG_VALUES, b"\x03"))
    assert frame.address == 3
    analog = decode_analog_values(answer_info(frame, address=3, command=0x42), 3)
    assert analog.cell_voltages_v == pytest.approx(truth.cell_voltages_v, abs=0.0006)
    assert analog.temperatures_c[0] == pytest.approx(truth.temperature_avg_c + BOARD_ABOVE_CELLS_C, abs=0.06)
    assert analog.temperatures_c[1:] == pytest.approx(truth.module_temperatures_c, abs=0.06)
    assert analog.current_a == pytest.approx(-12.0, abs=0.06)
    assert analog.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=0.001)
    assert analog.total_ah == PACK_CAPACITY_AH  # above 65.535 Ah: the 24-bit form, decoded back
    assert 100 * analog.remaining_ah / analog.total_ah == pytest.approx(truth.soc_pct, abs=0.01)
    management = decode_management_info((await _ask(client, encode_request(3, 0x92, b"\x03"))).info, 3)
    assert management.charge_current_limit_a == pytest.approx(truth.charge_current_limit_a, abs=0.06)
    assert management.discharge_current_limit_a == pytest.approx(-truth.discharge_current_limit_a, abs=0.06)
    assert management.status == ManagementStatus.CHARGE_ENABLE | ManagementStatus.DISCHARGE_ENABLE
    identity = decode_manufacturer_info((await _ask(client, encode_request(2, 0x51))).info)
    assert identity.device_name == "US3000C"


async def test_alarm_info_carries_the_models_flags_and_switches(
    packs: tuple[PylontechConsoleSim, SerialLine]
) -> None:
    sim, client = packs
    pack = sim.pack(2)
    pack.faults.raise_alarm("discharge_over_current")
    pack.faults.raise_warning("cell_under_voltage")
    pack.faults.open_contactor()
    alarm = decode_alarm_info((await _ask(client, encode_request(2, Command.ALARM_INFO, b"\x02"))).info, 2)
    snapshot = pack.model.snapshot()
    assert alarm.protection == ProtectionStatus.DISCHARGE_OVER_CURRENT
    assert alarm.cell_states[snapshot.cell_min_index - 1] == 0x01 and sum(alarm.cell_states) == 1
    assert alarm.switches == SwitchStatus(0)  # contactor open: both MOSFETs off
    management = decode_management_info((await _ask(client, encode_request(2, 0x92, b"\x02"))).info, 2)
    assert management.status == ManagementStatus(0)  # an open pack allows nothing


async def test_an_address_nobody_has_stays_silent(packs: tuple[PylontechConsoleSim, SerialLine]) -> None:
    sim, client = packs
    assert await _silent(client, encode_request(9, Command.ANALOG_VALUES, b"\x09"))
    assert sim.requests[(9, 0x42)] == 0


def _reframed(body: bytes) -> bytes:
    return b"~" + body + f"{frame_checksum(body):04X}".encode() + b"\r"


@pytest.mark.parametrize(("wire", "rtn"), [
    (encode_request(2, Command.ANALOG_VALUES, b"\x02")[:-5] + b"0000\r", 0x02),  # bad CHKSUM
    (_reframed(b"20024642F00202"), 0x03),  # LENGTH F002: wrong LCHKSUM
    (encode_request(2, Command.ANALOG_VALUES, b"\x02", version=0x21), 0x01),
    (encode_request(2, Command.SYSTEM_PARAMETERS, b"\x02"), 0x04),  # not served by this simulator
    (encode_request(2, Command.ANALOG_VALUES, b"\x03"), 0x90),  # INFO names pack 3, ADR pack 2
    (encode_request(2, Command.ANALOG_VALUES), 0x90),  # no command value at all
])
async def test_requests_a_pack_cannot_serve_get_its_return_code(
    packs: tuple[PylontechConsoleSim, SerialLine], wire: bytes, rtn: int
) -> None:
    sim, client = packs
    frame = await _ask(client, wire)
    assert (frame.address, frame.cid2, frame.info) == (2, rtn, b"")
    assert sim.refused[rtn] == 1


async def test_faults_silence_spoil_and_lie(packs: tuple[PylontechConsoleSim, SerialLine]) -> None:
    sim, client = packs
    analog = encode_request(2, Command.ANALOG_VALUES, b"\x02")
    sim.pack(2).faults.set_no_answer(True)
    assert await _silent(client, analog)
    assert not await _silent(client, encode_request(3, Command.ANALOG_VALUES, b"\x03"))
    sim.pack(2).faults.set_no_answer(False)
    sim.pack(2).faults.set_corrupt_crc(True)
    with pytest.raises(FrameChecksumError):
        await _ask(client, analog)
    sim.pack(2).faults.set_corrupt_crc(False)
    sim.pack(2).set_console_faults(ConsoleFaults(bad_length_checksum=True))
    with pytest.raises(LengthChecksumError):
        await _ask(client, analog)
    sim.pack(2).set_console_faults(ConsoleFaults(rtn=0x91))
    assert (await _ask(client, analog)).cid2 == 0x91
    sim.pack(2).set_console_faults(ConsoleFaults(reported_soc_pct=150.0, pack_voltage_offset_v=5.0))
    lie = decode_analog_values((await _ask(client, analog)).info, 2)
    assert lie.remaining_ah / lie.total_ah == pytest.approx(1.5, abs=0.001)
    assert lie.pack_voltage_v == pytest.approx(sum(lie.cell_voltages_v) + 5.0, abs=0.002)
    sim.pack(2).set_console_faults(ConsoleFaults())
    sim.pack(2).faults.set_delay(150)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _ask(client, analog)
    assert loop.time() - started >= 0.14


# -- the command line ------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bms_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bms", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (("--transport", "pylontech"), "give one --device (got 0)"),
    (("--transport", "pylontech", "--device", "/dev/a", "--device", "/dev/b"), "give one --device (got 2)"),
    (("--transport", "pylontech", "--device", "/dev/a", "--racks", "16"), "1..15 packs"),
    (("--transport", "pylontech", "--device", "/dev/a", "--baudrate", "19200"), "9600 or 115200 baud"),
    (("--transport", "pylontech", "--device", "/dev/a", "--rtn", "7"), "--rtn 7 is no Pylontech return code"),
    (("--transport", "pylontech", "--device", "/dev/a", "--exception-code", "4"), "--exception-code: Modbus"),
    (("--transport", "pylontech", "--device", "/dev/a", "--profile", A_MAKE), f"--profile {A_MAKE} is a Mod"),
])
def test_arguments_that_cannot_work_exit_2(argv: tuple[str, ...], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bms(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_a_line_that_cannot_be_opened_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = str(tmp_path / "ttyNOPE")
    assert run_bms(_parse("--transport", "pylontech", "--device", device)) == 1
    err = capsys.readouterr().err
    assert f"serial line {device}: cannot open at 9600 baud" in err and "No such file or directory" in err


async def test_simulator_process_serves_packs_until_sigint(
    serial_pair: SerialPair, procs: ProcessGroup
) -> None:
    procs.start("sim", bmslink_cli("sim", "bms", "--transport", "pylontech", "--device", serial_pair.a,
                                   "--racks", "2", "--baudrate", "115200", "--current", "5"))
    out = await asyncio.to_thread(procs.wait_for_output, "sim", "sim rack 1 ready", READY_TIMEOUT_S)
    assert f"sim rack 0 ready: pylontech rs485 {serial_pair.a} 115200 address 2" in out
    assert f"sim rack 1 ready: pylontech rs485 {serial_pair.a} 115200 address 3" in out
    client = SerialLine(serial_pair.b, 115200)
    await client.open(2.0)
    try:
        for address in (2, 3):
            frame = await _ask(client, encode_request(address, Command.ANALOG_VALUES, bytes([address])))
            assert frame.address == address
            assert decode_analog_values(frame.info, address).current_a == pytest.approx(5.0)
    finally:
        client.close()
    procs.send_signal("sim", signal.SIGINT)
    assert await asyncio.to_thread(procs.wait, "sim", 10.0) == 0


async def test_simulator_process_refuses_with_the_return_code_given(
    serial_pair: SerialPair, procs: ProcessGroup
) -> None:
    procs.start("sim", bmslink_cli("sim", "bms", "--transport", "pylontech", "--device", serial_pair.a,
                                   "--rtn", "145"))
    await asyncio.to_thread(procs.wait_for_output, "sim", "sim rack 0 ready", READY_TIMEOUT_S)
    client = SerialLine(serial_pair.b, 9600)
    await client.open(2.0)
    try:
        frame = await _ask(client, encode_request(2, Command.MANAGEMENT_INFO, b"\x02"))
    finally:
        client.close()
    assert (frame.address, frame.cid2) == (2, 0x91)
    assert procs.stop("sim") == 0


async def test_simulator_process_runs_a_scenario_on_the_packs(
    serial_pair: SerialPair, procs: ProcessGroup, tmp_path: Path
) -> None:
    scenario = tmp_path / "silence.toml"
    scenario.write_text('[[events]]\nat_s = 0.0\naction = "no_answer"\nrack = 1\n')
    procs.start("sim", bmslink_cli("sim", "bms", "--transport", "pylontech", "--device", serial_pair.a,
                                   "--racks", "2", "--scenario", str(scenario)))
    await asyncio.to_thread(procs.wait_for_output, "sim", "sim scenario t=", READY_TIMEOUT_S)
    client = SerialLine(serial_pair.b, 9600)
    await client.open(2.0)
    try:
        assert not await _silent(client, encode_request(2, Command.ANALOG_VALUES, b"\x02"))
        assert await _silent(client, encode_request(3, Command.ANALOG_VALUES, b"\x03"))  # rack 1 = pack 3
    finally:
        client.close()
    assert procs.stop("sim") == 0


AGENT_TOML = """\
site_id = "site-t"
rack_id = "rack-07"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{prefix}"

[polling]
interval_ms = 500
request_timeout_ms = 200

[[links]]
type = "pylontech_console"
name = "rs485"
device = "{device}"
baudrate = 115200

[[units]]
name = "pack-2"
link = "rs485"
device_id = 2
profile = "pylontech_lv"

[[units]]
name = "pack-3"
link = "rs485"
device_id = 3
profile = "pylontech_lv"
"""


async def test_agent_process_reads_simulator_process_into_mosquitto(
    serial_pair: SerialPair, procs: ProcessGroup, mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        AGENT_TOML.format(port=mqtt_broker.port, prefix=unique_topic_prefix, device=serial_pair.b))
    procs.start("sim", bmslink_cli("sim", "bms", "--transport", "pylontech", "--device", serial_pair.a,
                                   "--racks", "3", "--baudrate", "115200", "--current", "-8"))
    await asyncio.to_thread(procs.wait_for_output, "sim", "sim rack 2 ready", READY_TIMEOUT_S)
    mqtt = MqttConfig(host="127.0.0.1", port=mqtt_broker.port, topic_prefix=unique_topic_prefix)
    session = MqttSession(mqtt, f"listener-{unique_topic_prefix}")
    session.subscribe(Topics(unique_topic_prefix, "site-t").all_rack_telemetry)
    decoder = telemetry_decoder()
    await session.start()
    try:
        assert await session.wait_connected(5.0)
        procs.start("agent", bmslink_cli("agent", "--config", str(config)))
        telemetry: RackTelemetry | None = None
        async with asyncio.timeout(READY_TIMEOUT_S):
            while telemetry is None or telemetry.comm_state is not RackCommState.OK:
                message = await session.messages.get()
                telemetry = decoder.decode(message.payload, message.topic)
    finally:
        await session.stop()
    assert telemetry.rack_id == "rack-07"
    assert [(u.unit, u.status) for u in telemetry.units] == [
        ("pack-2", LinkStatus.OK), ("pack-3", LinkStatus.OK)]
    assert telemetry.measurements is not None
    assert telemetry.measurements.current_a == pytest.approx(-16.0, abs=0.2)  # two packs at -8 A each
    assert procs.stop("agent") == 0
    assert procs.stop("sim") == 0
