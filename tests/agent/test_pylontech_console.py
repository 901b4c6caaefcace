"""The agent reading Pylontech LV packs over their RS-485 protocol, on a socat pty pair, against the
simulated packs (sim/pylontech_console.py) or a scripted peer, publishing to a real Mosquitto."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bmslink.cli import main
from rack_agent.agent import RackAgent
from rack_agent.errors import CrcError, PollTimeoutError
from rack_agent.links.pylontech_console import PylontechConsoleBmsLink
from rack_agent.pylontech.codec import Command, Frame, FrameAssembler, decode_frame, encode_frame
from rack_agent.pylontech.serial_line import SerialLine
from shared.agent_config import AgentConfig
from shared.codec import telemetry_decoder
from shared.config import MqttConfig, validate_config
from shared.models import ContactorState, LinkStatus, RackCommState, RackTelemetry
from shared.mqtt import MqttSession
from shared.topics import Topics
from sim.pylontech_console import BOARD_ABOVE_CELLS_C, ConsoleFaults, PylontechConsoleSim
from tests.agent.helpers import started_links, stop_links, wait_until
from tests.agent.test_pylontech_codec import US2000_ANALOG, US2000_MANAGEMENT
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.serial_pair import SerialPair

ADDRESSES = (2, 3, 4)
INTERVAL_MS = 300
TIMEOUT_MS = 100


def pylontech_config(
    device: str,
    *,
    addresses: tuple[int, ...] = ADDRESSES,
    profile: str = "pylontech_lv",
    mqtt_port: int = 1,
    prefix: str = "bmslink",
    comm_lost_after: int = 3,
    unit_extra: dict[str, Any] | None = None,
) -> AgentConfig:
    data: dict[str, Any] = {
        "site_id": "site-t",
        "rack_id": "rack-01",
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic_prefix": prefix, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5},
        "polling": {"interval_ms": INTERVAL_MS, "request_timeout_ms": TIMEOUT_MS,
                    "comm_lost_after": comm_lost_after, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
        "links": [{"type": "pylontech_console", "name": "rs485", "device": device, "baudrate": 115200}],
        "units": [
            {"name": f"pack-{a}", "link": "rs485", "device_id": a, "profile": profile, **(unit_extra or {})}
            for a in addresses
        ],
    }
    return validate_config(data, AgentConfig, "<test>")


@dataclass
class Line:
    sim: PylontechConsoleSim
    pair: SerialPair


@pytest.fixture
async def line(serial_pair: SerialPair) -> AsyncIterator[Line]:
    """Three simulated packs (addresses 2, 3, 4) on one end of the pty pair; the agent takes the other."""
    sim = PylontechConsoleSim.with_packs(len(ADDRESSES))
    await sim.start(serial_pair.a, baudrate=115200)
    try:
        yield Line(sim, serial_pair)
    finally:
        await sim.stop()


@pytest.fixture
async def agent(line: Line) -> AsyncIterator[RackAgent]:
    rack = RackAgent(pylontech_config(line.pair.b))
    await started_links(rack)
    try:
        yield rack
    finally:
        await stop_links(rack)


def _units(t: RackTelemetry) -> dict[str, Any]:
    return {u.unit: u for u in t.units}


def _console(agent: RackAgent) -> PylontechConsoleBmsLink:
    link = agent.links["rs485"]
    assert isinstance(link, PylontechConsoleBmsLink)
    return link


class TelemetrySubscriber:
    """A plain subscriber on the real broker, decoding telemetry as the controller does."""

    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        config = MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix, reconnect_min_s=0.1,
                            reconnect_max_s=0.5)
        self.session = MqttSession(config, f"listener-{prefix}")
        self.session.subscribe(Topics(prefix, "site-t").all_rack_telemetry)
        self.decoder = telemetry_decoder()
        self.received: list[RackTelemetry] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TelemetrySubscriber:
        await self.session.start()
        assert await self.session.wait_connected(5.0)
        self._task = asyncio.create_task(self._pump(), name="pylontech-listener")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.session.stop()

    async def _pump(self) -> None:
        while True:
            msg = await self.session.messages.get()
            self.received.append(self.decoder.decode(msg.payload, msg.topic))

    def latest(self, predicate: Callable[[RackTelemetry], bool]) -> RackTelemetry | None:
        return next((t for t in reversed(self.received) if predicate(t)), None)


async def test_every_pack_on_the_line_is_read_and_published_to_mosquitto(
    line: Line, mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    for address in ADDRESSES:
        line.sim.pack(address).set_current(10.0)  # each pack charges at 10 A
    agent = RackAgent(pylontech_config(line.pair.b, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix))
    stop = asyncio.Event()
    async with TelemetrySubscriber(mqtt_broker, unique_topic_prefix) as listener:
        runner = asyncio.create_task(agent.run(stop), name="agent-under-test")
        try:
            def all_ok(t: RackTelemetry) -> bool:
                return t.comm_state is RackCommState.OK and all(u.status is LinkStatus.OK for u in t.units)

            await wait_until(lambda: listener.latest(all_ok) is not None, 10.0, "every pack ok")
        finally:
            stop.set()
            await asyncio.wait_for(runner, 5.0)
    telemetry = listener.latest(all_ok)
    assert telemetry is not None and telemetry.measurements is not None
    m = telemetry.measurements
    truths = [line.sim.pack(a).model.measurements() for a in ADDRESSES]
    assert sorted(_units(telemetry)) == ["pack-2", "pack-3", "pack-4"]
    assert m.current_a == pytest.approx(30.0, abs=0.3)  # 3 × 10 A, positive = charging end to end
    assert m.pack_voltage_v == pytest.approx(sum(t.pack_voltage_v for t in truths) / 3, abs=0.05)
    assert m.cell_voltage_max_v == pytest.approx(max(t.cell_voltage_max_v for t in truths), abs=0.002)
    assert m.soc_pct == pytest.approx(truths[0].soc_pct, abs=0.5)
    # Parallel packs: N × the smallest limit; voltages from the management info (0x92).
    ccl, dcl = min(t.charge_current_limit_a for t in truths), min(t.discharge_current_limit_a for t in truths)
    assert m.charge_current_limit_a == pytest.approx(3 * ccl, abs=0.3)
    assert m.discharge_current_limit_a == pytest.approx(3 * dcl, abs=0.3)
    assert (m.charge_voltage_limit_v, m.discharge_voltage_limit_v) == pytest.approx((51.75, 43.5))
    # Cell sensors only: the BMS board (sensor 1) runs BOARD_ABOVE_CELLS_C warmer and is no cell.
    assert m.temperature_max_c == pytest.approx(max(t.temperature_max_c for t in truths), abs=0.2)
    assert m.temperature_max_c < max(t.temperature_max_c for t in truths) + BOARD_ABOVE_CELLS_C - 0.5
    assert "sensor" in m.temperature_max_location and "sensor 1" not in m.temperature_max_location
    assert m.capacity_ah == pytest.approx(3 * 74.0)
    assert m.soh_pct == 100.0  # the profile's assumed value: the protocol carries none
    assert m.contactor is ContactorState.CLOSED
    assert line.sim.requests[(3, Command.MANUFACTURER_INFO)] == 1  # identified once per connection


async def test_a_silent_pack_becomes_comm_lost_and_the_line_is_kept(line: Line, agent: RackAgent) -> None:
    link = _console(agent)
    assert (await agent.poll_once()).comm_state is RackCommState.OK
    attempts = link.connect_attempts
    line.sim.pack(3).faults.set_no_answer(True)
    states = []
    for _ in range(3):
        t = await agent.poll_once()
        states.append(t.comm_state)
    assert states == [RackCommState.OK, RackCommState.OK, RackCommState.COMM_LOST]
    units = _units(t)
    assert units["pack-3"].status is LinkStatus.TIMEOUT and units["pack-3"].counters.timeout == 3
    assert units["pack-2"].status is LinkStatus.OK and units["pack-4"].status is LinkStatus.OK
    assert t.measurements is not None and t.measurements.charge_current_limit_a == 0.0
    assert link.connected and link.connect_attempts == attempts  # a serial line is not reopened for silence
    line.sim.pack(3).faults.set_no_answer(False)
    t = await agent.poll_once()
    assert t.comm_state is RackCommState.OK and _units(t)["pack-3"].status is LinkStatus.OK


async def test_corrupted_answers_are_crc_errors_counted_and_logged(
    line: Line, agent: RackAgent, caplog: pytest.LogCaptureFixture
) -> None:
    line.sim.pack(2).faults.set_corrupt_crc(True)
    t = await agent.poll_once()
    assert _units(t)["pack-2"].status is LinkStatus.CRC_ERROR
    assert "CRC Error" in caplog.text and "frame checksum" in caplog.text
    line.sim.pack(2).faults.set_corrupt_crc(False)
    line.sim.pack(4).set_console_faults(ConsoleFaults(bad_length_checksum=True))
    t = await agent.poll_once()
    units = _units(t)
    assert units["pack-2"].status is LinkStatus.OK
    assert units["pack-4"].status is LinkStatus.CRC_ERROR and units["pack-4"].counters.crc_error == 1
    assert "LCHKSUM" in caplog.text
    assert units["pack-3"].counters.crc_error == 0 and units["pack-3"].status is LinkStatus.OK


async def test_a_refusing_pack_is_a_refusal_with_its_return_code(
    line: Line, agent: RackAgent, caplog: pytest.LogCaptureFixture
) -> None:
    line.sim.pack(3).set_console_faults(ConsoleFaults(rtn=0x90))
    t = await agent.poll_once()
    unit = _units(t)["pack-3"]
    assert unit.status is LinkStatus.MODBUS_EXCEPTION and unit.last_exception_code == 0x90
    assert unit.counters.modbus_exception == 1
    assert "Pack Refusal" in caplog.text and "ADR error" in caplog.text


async def test_a_pack_without_manufacturer_info_is_still_read(
    line: Line, agent: RackAgent, caplog: pytest.LogCaptureFixture
) -> None:
    await stop_links(agent)  # identification happens once per connection: start a fresh one
    line.sim.pack(2).set_console_faults(ConsoleFaults(rtn=0x04, rtn_commands=frozenset({0x51})))
    caplog.set_level(logging.INFO)
    await started_links(agent)
    t = await agent.poll_once()
    assert {u.status for u in t.units} == {LinkStatus.OK}
    assert "pack 2 gives no manufacturer info" in caplog.text and "CID2 invalid" in caplog.text
    assert "pack 3 on pylontech rs485" in caplog.text and "is US3000C software 2.3 by PYLON" in caplog.text
    await agent.poll_once()
    assert line.sim.requests[(2, 0x51)] == 1  # asked once per connection, refused or not


@pytest.mark.parametrize(("lie", "reason"), [
    (ConsoleFaults(reported_soc_pct=150.0), "soc_pct"),
    (ConsoleFaults(pack_voltage_offset_v=12.0), "above 15 cells"),
    (ConsoleFaults(pack_voltage_offset_v=-30.0), "below 15 cells"),
])
async def test_a_lying_pack_is_refused_as_invalid_data_and_the_line_is_kept(
    line: Line, agent: RackAgent, lie: ConsoleFaults, reason: str
) -> None:
    link = _console(agent)
    assert (await agent.poll_once()).comm_state is RackCommState.OK
    attempts = link.connect_attempts
    line.sim.pack(4).set_console_faults(lie)
    for _ in range(4):  # more polls than comm_lost_after: a lie is heard, never comm loss
        t = await agent.poll_once()
    unit = _units(t)["pack-4"]
    assert unit.status is LinkStatus.INVALID_DATA and reason in unit.detail
    assert unit.counters.invalid_data == 4
    assert t.comm_state is RackCommState.OK
    assert t.measurements is not None
    assert t.measurements.charge_current_limit_a == 0.0  # the rack grants no current while a unit is invalid
    assert link.connected and link.connect_attempts == attempts
    line.sim.pack(4).set_console_faults(ConsoleFaults())
    t = await agent.poll_once()
    assert _units(t)["pack-4"].status is LinkStatus.OK and t.measurements is not None
    assert t.measurements.charge_current_limit_a > 0


async def test_cells_in_series_the_pack_contradicts_is_invalid_data(line: Line) -> None:
    agent = RackAgent(pylontech_config(line.pair.b, addresses=(2,), unit_extra={"cells_in_series": 16}))
    await started_links(agent)
    try:
        t = await agent.poll_once()
    finally:
        await stop_links(agent)
    assert t.units[0].status is LinkStatus.INVALID_DATA
    assert "reports 15 cells, the unit's cells_in_series is 16" in t.units[0].detail


def _profile(tmp_path: Path, **edits: str) -> str:
    text = (Path(__file__).parents[2] / "rack_agent/profiles/pylontech_lv.toml").read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "pack.toml"
    path.write_text(text)
    return str(path)


async def test_profile_read_options_change_what_is_asked(line: Line, tmp_path: Path) -> None:
    profile = _profile(tmp_path, **{"alarms = true": "alarms = false", "identify = true": "identify = false"})
    agent = RackAgent(pylontech_config(line.pair.b, addresses=(2,), profile=profile))
    await started_links(agent)
    try:
        line.sim.pack(2).faults.raise_alarm("charge_over_temperature")
        t = await agent.poll_once()
    finally:
        await stop_links(agent)
    assert t.measurements is not None and t.units[0].status is LinkStatus.OK
    assert t.measurements.contactor is ContactorState.UNKNOWN  # no 0x44: switches unknown
    assert not t.measurements.alarms.any()
    asked = {cid2 for (_, cid2) in line.sim.requests}
    assert asked == {Command.ANALOG_VALUES, Command.MANAGEMENT_INFO}


async def test_alarm_info_becomes_alarms_warnings_and_the_contactor(line: Line, agent: RackAgent) -> None:
    pack = line.sim.pack(2)
    pack.faults.raise_alarm("charge_over_temperature")
    pack.faults.raise_warning("cell_over_voltage")
    pack.faults.raise_alarm("internal_fault")
    line.sim.pack(3).faults.open_contactor()
    t = await agent.poll_once()
    m = t.measurements
    assert m is not None
    assert set(m.alarms.raised()) == {"charge_over_temperature", "internal_fault"}
    assert set(m.warnings.raised()) == {"cell_over_voltage"}
    assert m.contactor is ContactorState.OPEN  # pack 3's MOSFETs are off
    assert m.charge_current_limit_a == 0.0  # the alarmed pack stops charging; 0 × N is 0


@pytest.mark.parametrize(("edits", "reason"), [
    ({"cells = 15": "cells = 16"}, "reports 15 cells, the profile expects 16"),
    ({"sensors = [2, 3, 4, 5]": "sensors = [2, 3, 4, 5, 6]"}, "include [6]"),
])
async def test_a_pack_that_does_not_fit_the_profile_is_invalid_data(
    line: Line, tmp_path: Path, edits: dict[str, str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    agent = RackAgent(pylontech_config(line.pair.b, addresses=(2,), profile=_profile(tmp_path, **edits)))
    await started_links(agent)
    try:
        t = await agent.poll_once()
    finally:
        await stop_links(agent)
    assert t.units[0].status is LinkStatus.INVALID_DATA and t.units[0].counters.invalid_data == 1
    assert reason in caplog.text


async def test_assumed_soh_is_what_is_published(line: Line, tmp_path: Path) -> None:
    profile = _profile(tmp_path, **{"assumed_soh_pct = 100.0": "assumed_soh_pct = 87.5"})
    agent = RackAgent(pylontech_config(line.pair.b, addresses=(3,), profile=profile))
    await started_links(agent)
    try:
        t = await agent.poll_once()
    finally:
        await stop_links(agent)
    assert t.measurements is not None and t.measurements.soh_pct == 87.5


# -- the line itself, against a scripted peer -------------------------------------------------------


@pytest.fixture
async def console(serial_pair: SerialPair) -> AsyncIterator[tuple[PylontechConsoleBmsLink, SerialLine]]:
    """The agent's link on one end, a scripted peer (our serial line, raw frames) on the other."""
    agent = RackAgent(pylontech_config(serial_pair.b, addresses=(2,)))
    peer = SerialLine(serial_pair.a, 115200)
    await peer.open(2.0)
    await started_links(agent)
    try:
        yield _console(agent), peer
    finally:
        await stop_links(agent)
        peer.close()


async def _answer_next(peer: SerialLine, *chunks: bytes, delay_s: float = 0.0) -> bytes:
    request = await peer.receive_frame()
    await asyncio.sleep(delay_s)
    for chunk in chunks:
        await peer.send(chunk)
    return request


async def test_echo_and_frames_of_other_packs_are_skipped(
    console: tuple[PylontechConsoleBmsLink, SerialLine]
) -> None:
    link, peer = console
    other_pack = encode_frame(Frame(9, 0, b"\x00\x09"))

    async def script() -> bytes:
        request = await peer.receive_frame()
        for chunk in (request, other_pack, US2000_ANALOG[1]):  # our echo, a late answer of pack 9, the answer
            await peer.send(chunk)
        return request

    peer_task = asyncio.create_task(script())
    info = await link.request(2, Command.ANALOG_VALUES, b"\x02", timeout_s=0.5)
    assert await peer_task == b"~20024642E00202FD33\r"
    assert info == decode_frame(US2000_ANALOG[1]).info
    assert (link.echoes_skipped, link.foreign_frames_skipped) == (1, 1)


async def test_bytes_that_never_make_a_frame_are_a_crc_error_and_silence_a_timeout(
    console: tuple[PylontechConsoleBmsLink, SerialLine]
) -> None:
    link, peer = console
    peer_task = asyncio.create_task(_answer_next(peer, b"\x00\xff~20024600B0140"))  # cut short, no EOI
    with pytest.raises(CrcError, match=r"bytes from pack 2 .* never formed its answer"):
        await link.request(2, Command.MANAGEMENT_INFO, b"\x02", timeout_s=0.2)
    await peer_task
    peer_task = asyncio.create_task(_answer_next(peer))  # reads the request, says nothing
    with pytest.raises(PollTimeoutError, match="no answer within 200 ms"):
        await link.request(2, Command.MANAGEMENT_INFO, b"\x02", timeout_s=0.2)
    await peer_task


async def test_a_late_answer_is_never_taken_for_the_next_request(
    console: tuple[PylontechConsoleBmsLink, SerialLine]
) -> None:
    link, peer = console
    late = asyncio.create_task(_answer_next(peer, US2000_ANALOG[1], delay_s=0.3))
    with pytest.raises(PollTimeoutError):
        await link.request(2, Command.ANALOG_VALUES, b"\x02", timeout_s=0.15)
    await late
    await asyncio.sleep(0.05)  # the late answer is in by now, unread
    prompt = asyncio.create_task(_answer_next(peer, US2000_MANAGEMENT[1]))
    info = await link.request(2, Command.MANAGEMENT_INFO, b"\x02", timeout_s=0.5)
    await prompt
    assert info == decode_frame(US2000_MANAGEMENT[1]).info


async def test_an_unplugged_line_is_connection_refused_and_comes_back(line: Line, agent: RackAgent) -> None:
    link = _console(agent)
    assert (await agent.poll_once()).comm_state is RackCommState.OK
    await line.sim.stop()
    line.pair.stop()  # both pty ends vanish: an adapter pulled out
    t = await agent.poll_once()
    assert {u.status for u in t.units} == {LinkStatus.CONNECTION_REFUSED}
    attempts = link.connect_attempts
    line.pair.start()
    await line.sim.start(line.pair.a, baudrate=115200)
    await wait_until(lambda: link.connected and link.connect_attempts > attempts, 5.0, "the link reopened")
    t = await agent.poll_once()
    assert t.comm_state is RackCommState.OK and {u.status for u in t.units} == {LinkStatus.OK}


async def test_a_socket_url_reaches_packs_behind_a_tcp_gateway() -> None:
    """``device = "socket://host:port"``: an RS-485-to-TCP gateway passing the frames through."""
    sim = PylontechConsoleSim.with_packs(2)  # answers through the gateway below, on no serial line

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assembler = FrameAssembler()
        while data := await reader.read(4096):
            for frame in assembler.feed(data):
                answer = await sim.answer(frame)
                if answer is not None:
                    writer.write(answer)
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    agent = RackAgent(pylontech_config(f"socket://127.0.0.1:{port}", addresses=(2, 3)))
    try:
        await started_links(agent)
        t = await agent.poll_once()
    finally:
        await stop_links(agent)
        server.close()
        await server.wait_closed()
    assert t.comm_state is RackCommState.OK and {u.status for u in t.units} == {LinkStatus.OK}


async def test_a_missing_device_names_the_device_and_the_os_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = str(tmp_path / "ttyUSB9")
    agent = RackAgent(pylontech_config(device, addresses=(2,)))
    caplog.set_level(logging.DEBUG, logger="rack_agent.links.base")
    link = _console(agent)
    await link.start()
    try:
        await wait_until(lambda: link.connect_attempts >= 2, 5.0, "connect attempts")
        t = await agent.poll_once()
    finally:
        await link.stop()
    assert t.units[0].status is LinkStatus.CONNECTION_REFUSED
    assert f"serial line {device}: cannot open at 115200 baud" in caplog.text
    assert "No such file or directory" in caplog.text


# -- configuration ------------------------------------------------------------------------------------

CONSOLE_CONFIG = """\
site_id = "site-a"
rack_id = "rack-01"

[[links]]
type = "pylontech_console"
name = "rs485"
device = "/dev/ttyUSB0"

[[units]]
name = "pack-2"
link = "rs485"
device_id = 2
profile = "pylontech_lv"
"""


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code = main(["agent", "--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_console_link_with_the_shipped_profile_checks_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _check(tmp_path, CONSOLE_CONFIG, capsys)
    assert code == 0 and "ok" in out
    config = validate_config({"site_id": "s", "rack_id": "r", "links": [
        {"type": "pylontech_console", "name": "l", "device": "socket://gw:4196"}],
        "units": [{"name": "u", "link": "l"}]}, AgentConfig, "<test>")
    assert config.links[0].baudrate == 9600  # type: ignore[union-attr]  # the protocol's rate (V3.3)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace('profile = "pylontech_lv"', 'profile = "sunspec"'),
     "link 'rs485' is of type pylontech_console and needs a profile of kind pylontech_console"),
    (lambda t: t.replace('type = "pylontech_console"', 'type = "modbus_rtu"'),
     "profile 'pylontech_lv' (kind pylontech_console) speaks the Pylontech RS-485 protocol; "
     "link 'rs485' is of type modbus_rtu"),
    (lambda t: t.replace('device = "/dev/ttyUSB0"', 'device = "/dev/ttyUSB0"\nbaudrate = 19200'),
     "links[0].pylontech_console.baudrate"),
])
def test_a_profile_and_link_that_do_not_fit_are_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[str], str], expected: str
) -> None:
    code, _, err = _check(tmp_path, edit(CONSOLE_CONFIG), capsys)
    assert code == 2
    assert str(tmp_path / "agent.toml") in err
    assert expected in err
