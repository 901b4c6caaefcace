"""``bmslink probe`` as an installer runs it: a separate process against a simulated BMS.

The simulator runs in the test (so what it serves is known exactly: its battery model and its register
images); the probe runs as the installed command, over Modbus TCP on 127.0.0.1, Modbus RTU over a socat
pty pair, and CAN through the python-can-remote bridge. Its decoded values must equal what the
simulator serves, its raw words the simulator's registers; and every failure an installer meets must
come out as its own class, with exit status 1 (unit not read) or 2 (usage or configuration).

Every profile the simulator serves is probed (:data:`PROFILES`): acme_flat and the SunSpec chain, which
every simulated unit serves, and each make of ``sim.registers.MAKES`` (``SimulatedBms(make=...)``, what
``bmslink sim bms --profile NAME`` runs), which serves that make's own map. A make added there is probed
here without further work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bmslink.probe import Row
from bmslink.probe_output import RAW_SHOWN_WORDS, format_raw, format_value
from bmslink.processes import free_port
from rack_agent.profiles import FlatProfile, SunSpecProfile, load_profile
from sim.battery import SimRackConfig
from sim.bms_server import SimulatedBms, quiet_pymodbus_logging
from sim.registers import MAKES, SUNSPEC_BASE_ADDRESS, flat_image, make_image, make_plan, sunspec_image
from tests.fixtures.can_bridge import CanBridge
from tests.fixtures.procs import ProcessGroup, bmslink_cli
from tests.fixtures.serial_pair import SerialPair

# Served by every simulated unit (flat at holding 0, SunSpec from 40000); then one map per make.
DEFAULT_MAPS = ("acme_flat", "sunspec")
PROFILES: list[str] = [*DEFAULT_MAPS, *sorted(MAKES)]
PROBE_DEADLINE_S = 60.0
# SunSpec's scale factors as the simulator picks them: 0.001 V per cell, 0.1 at most for the rest.
SUNSPEC_TOLERANCE = {"cell_voltage_max_v": 0.0011, "cell_voltage_min_v": 0.0011}
SUNSPEC_DEFAULT_TOLERANCE = 0.1 + 1e-9
_runs = itertools.count()


def _tolerance(profile: str, name: str) -> float:
    """One step of the register that carries ``name`` in ``profile``: the most a round trip can lose."""
    loaded = load_profile(profile)
    if isinstance(loaded, FlatProfile):
        point = loaded.points[name]
        scale: float = getattr(point, "scale", 0.0)
        return abs(scale) + 1e-9
    return SUNSPEC_TOLERANCE.get(name, SUNSPEC_DEFAULT_TOLERANCE)


async def _probe(procs: ProcessGroup, *args: str) -> tuple[int, str, str]:
    """Run ``bmslink probe ARGS`` to its end: (exit status, stdout, stderr)."""
    name = f"probe{next(_runs)}"
    procs.start(name, bmslink_cli("probe", *args))
    code = await asyncio.to_thread(procs.wait, name, PROBE_DEADLINE_S)
    return code, procs.stdout(name), procs.stderr(name)


async def _probe_json(procs: ProcessGroup, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await _probe(procs, *args, "--json")
    assert out.strip(), err
    report: dict[str, Any] = json.loads(out)
    return code, report


@pytest.fixture
async def bms() -> AsyncIterator[SimulatedBms]:
    quiet_pymodbus_logging()
    sim = SimulatedBms(SimRackConfig(seed=3, serial_number="PROBE-1"))
    yield sim
    await sim.stop()


def _simulator(profile: str) -> SimulatedBms:
    """A unit serving ``profile``: the default maps, or the make's own."""
    if profile in DEFAULT_MAPS:
        return SimulatedBms(SimRackConfig(seed=3, serial_number="PROBE-1"))
    return SimulatedBms(MAKES[profile].rack_config(seed=3, serial_number="PROBE-1"), make=profile)


@pytest.fixture
async def unit_of(request: pytest.FixtureRequest) -> AsyncIterator[SimulatedBms]:
    """The simulated unit for the test's ``profile`` parameter."""
    quiet_pymodbus_logging()
    sim = _simulator(request.node.callspec.params["profile"])
    yield sim
    await sim.stop()


def _framer(bms: SimulatedBms) -> str:
    return MAKES[bms.make].tcp_framer if bms.make is not None else "socket"


async def _tcp(bms: SimulatedBms) -> str:
    await bms.start_tcp("127.0.0.1", 0, framer=_framer(bms))  # type: ignore[arg-type]
    match = re.search(r"127\.0\.0\.1:(\d+)", bms.endpoints[-1])
    assert match is not None, bms.endpoints
    return f"127.0.0.1:{match[1]}"


def _served(bms: SimulatedBms) -> dict[tuple[str, int], int]:
    """Every register (and coil) the simulator serves right now, by (table, address)."""
    snap = bms.model.snapshot()
    if bms.make is not None:
        return {(table.value, a): v for (table, a), v in make_image(make_plan(bms.make), snap).items()}
    image = {("holding", a): w for a, w in enumerate(flat_image(snap))}
    sunspec = sunspec_image(snap, bms.config, bms.identity)
    image.update({("holding", SUNSPEC_BASE_ADDRESS + i): w for i, w in enumerate(sunspec)})
    return image


def _expected_location(profile: str, name: str, bms: SimulatedBms, row: dict[str, Any]) -> str:
    loaded = load_profile(profile)
    if isinstance(loaded, SunSpecProfile):  # "string {} module {}" around the raw numbers
        return loaded.locations[name].format.format(*row["raw"])
    assert isinstance(loaded, FlatProfile)
    snap = bms.model.snapshot()
    index = {
        "cell_voltage_max_location": snap.cell_max_index, "cell_voltage_min_location": snap.cell_min_index,
        "temperature_max_location": snap.temperature_max_module,
        "temperature_min_location": snap.temperature_min_module,
    }[name]
    return loaded.locations[name].format.format(index)


def _check_against_simulator(report: dict[str, Any], bms: SimulatedBms, profile: str) -> None:
    """Every decoded value equals the model's, every raw word the simulator's register."""
    expected = bms.model.measurements().model_dump(mode="json")
    served = _served(bms)
    numeric = [r for r in report["points"] if r["kind"] == "numeric"]
    assert {r["name"] for r in numeric} >= {"pack_voltage_v", "current_a", "soc_pct", "cell_voltage_max_v",
                                            "temperature_max_c"}
    for row in numeric:
        assert row["error"] is None, row
        assert row["value"] == pytest.approx(expected[row["name"]], abs=_tolerance(profile, row["name"])), row
    for row in report["points"]:
        assert row["raw"] == [served[(t, a)] for t, a in row["addresses"]], row
        if row["kind"] == "location":
            assert row["value"] == _expected_location(profile, row["name"], bms, row), row
        if row["kind"] in ("alarm", "warning"):
            assert row["value"] is expected[f"{row['kind']}s"][row["name"]], row
    for row in (r for r in report["points"] if r["kind"] == "contactor"):  # when the map has one
        assert row["value"] == expected["contactor"], row
    reading = report["reading"]
    assert reading["accepted"], reading
    for row in numeric:  # the reading the agent would publish carries the same values
        name = row["name"]
        assert reading["measurements"][name] == pytest.approx(row["value"], abs=1e-9), name


def _unit_args(bms: SimulatedBms) -> list[str]:
    """What an installer gives the probe for this unit beyond its profile (a make's capacity)."""
    return ["--capacity-ah", str(bms.config.capacity_ah)] if bms.make is not None else []


@pytest.mark.parametrize("profile", PROFILES)
async def test_tcp_profile_values_are_what_the_simulator_serves(
    procs: ProcessGroup, unit_of: SimulatedBms, profile: str
) -> None:
    bms = unit_of
    target = await _tcp(bms)
    args = ["tcp", target, "--device-id", "1", "--profile", profile, "--framer", _framer(bms),
            *_unit_args(bms)]
    code, report = await _probe_json(procs, *args)
    assert code == 0, report
    assert report["profile"] == profile and report["error"] is None
    _check_against_simulator(report, bms, profile)
    # The table a person reads shows the same values, with units, registers and raw words.
    code, out, _ = await _probe(procs, *args)
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    for data in report["points"]:
        row = Row(**data)
        name = row.name if row.kind not in ("alarm", "warning") else f"{row.kind}s.{row.name}"
        assert format_value(row) in lines[name], (name, lines[name])
        assert format_raw(row, RAW_SHOWN_WORDS) in lines[name], (name, lines[name])
    assert "reading: accepted" in out


@pytest.mark.parametrize("profile", PROFILES)
async def test_rtu_profile_values_are_what_the_simulator_serves(
    procs: ProcessGroup, unit_of: SimulatedBms, serial_pair: SerialPair, profile: str
) -> None:
    bms = unit_of
    baudrate = MAKES[profile].baudrate if profile in MAKES else 19200
    # A pty refuses parity settings (EINVAL), so the line is 8N1 here.
    await bms.start_rtu(serial_pair.a, baudrate=baudrate)
    code, report = await _probe_json(procs, "rtu", serial_pair.b, "--baudrate", str(baudrate),
                                     "--device-id", "1", "--profile", profile, *_unit_args(bms))
    assert code == 0, report
    assert report["target"]["line"] == f"{baudrate} 8N1"
    _check_against_simulator(report, bms, profile)


async def test_sunspec_scan_lists_the_models_with_their_points(
    procs: ProcessGroup, bms: SimulatedBms
) -> None:
    code, report = await _probe_json(procs, "tcp", await _tcp(bms), "--sunspec")
    assert code == 0, report
    assert report["sunspec_base"] == SUNSPEC_BASE_ADDRESS
    models = {m["model_id"]: m for m in report["sunspec_models"]}
    assert list(models) == [1, 802, 803]
    points = {r["name"]: r for r in models[802]["rows"]}
    expected = bms.model.measurements()
    assert points["V"]["value"] == pytest.approx(expected.pack_voltage_v, abs=0.01)
    assert points["V"]["unit"] == "V"
    assert points["State"]["unit"] == "CONNECTED"  # the enum's symbol, as SunSpec names it
    assert points["SoH"]["value"] == pytest.approx(expected.soh_pct)
    assert points["DisChaRte"]["error"] == "not implemented"
    common = {r["name"]: r["value"] for r in models[1]["rows"]}
    assert common["SN"] == "PROBE-1" and common["Mn"] == "bmslink"
    bank = {r["name"]: r for r in models[803]["rows"]}
    assert bank["string[0].StrSoC"]["value"] == pytest.approx(expected.soc_pct)
    served = _served(bms)
    for row in points.values():
        assert row["raw"] == [served[(t, a)] for t, a in row["addresses"]], row


async def test_register_dumps_are_the_raw_registers(procs: ProcessGroup, bms: SimulatedBms) -> None:
    target = await _tcp(bms)
    code, report = await _probe_json(procs, "tcp", target, "--registers", "holding:0+21",
                                     "--registers", "holding:0x9C40+4")
    assert code == 0, report
    served = _served(bms)
    first, second = report["dumps"]
    assert (first["table"], first["address"], first["count"]) == ("holding", 0, 21)
    assert first["values"] == [served[("holding", a)] for a in range(21)]
    assert second["address"] == 40000 and second["values"][:2] == [0x5375, 0x6E53]  # "SunS"
    code, out, _ = await _probe(procs, "tcp", target, "--registers", "holding:0x9C40+2")
    assert code == 0 and "0x5375" in out and "21365" in out and "40000" in out


async def test_coil_dumps_are_the_alarm_coils(procs: ProcessGroup) -> None:
    quiet_pymodbus_logging()
    sim = _simulator("seplos_v3")
    sim.faults.raise_alarm("cell_over_voltage")  # Seplos voltage events: coil 0x1248 + bit 1
    try:
        target = await _tcp(sim)
        code, report = await _probe_json(procs, "tcp", target, "--registers", "coils:0x1248+8",
                                         "--registers", "input:0x1000+2")
        assert code == 0, report
        coils, inputs = report["dumps"]
        served = _served(sim)
        assert coils["table"] == "coil"
        assert coils["values"] == [served[("coil", 0x1248 + i)] for i in range(8)]
        assert coils["values"][1] == 1
        assert inputs["values"] == [served[("input", 0x1000)], served[("input", 0x1001)]]
        code, report = await _probe_json(procs, "tcp", target, "--profile", "seplos_v3", *_unit_args(sim))
        rows = {(r["kind"], r["name"]): r for r in report["points"]}
        alarm = rows[("alarm", "cell_over_voltage")]
        assert alarm["value"] is True and alarm["addresses"][0] == ["coil", 0x1248]
        assert alarm["registers"] == ["coil:4680-4681 (0x1248) bit 1"]
        # The reading the agent would publish carries the flag.
        assert report["reading"]["measurements"]["alarms"]["cell_over_voltage"] is True
    finally:
        await sim.stop()


async def test_pylontech_console_unit_is_read_through_its_driver(
    procs: ProcessGroup, serial_pair: SerialPair, tmp_path: Path
) -> None:
    from sim.pylontech_console import PylontechConsoleSim  # noqa: PLC0415

    sim = PylontechConsoleSim.with_packs(1, first_address=2)
    await sim.start(serial_pair.a, baudrate=115200)
    try:
        config = tmp_path / "agent.toml"
        config.write_text(f"""\
site_id = "site-t"
rack_id = "rack-01"

[polling]
interval_ms = 500
request_timeout_ms = 300

[[links]]
type = "pylontech_console"
name = "rs485"
device = "{serial_pair.b}"
baudrate = 115200

[[units]]
name = "pack-2"
link = "rs485"
device_id = 2
profile = "pylontech_lv"
""")
        code, report = await _probe_json(procs, "--config", str(config), "--unit", "pack-2")
        assert code == 0, report
        assert any("no registers" in note for note in report["notes"])
        values = {r["name"]: r["value"] for r in report["points"]}
        expected = sim.pack(2).model.measurements()
        assert values["pack_voltage_v"] == pytest.approx(expected.pack_voltage_v, abs=0.01)
        assert values["cell_voltage_max_v"] == pytest.approx(expected.cell_voltage_max_v, abs=0.001)
        code, _, err = await _probe(procs, "--config", str(config), "--unit", "pack-2", "--sunspec")
        assert code == 2 and "no registers" in err
        code, _, err = await _probe(procs, "--config", str(config), "--unit", "pack-2",
                                    "--profile", "acme_flat")
        assert code == 2 and "pylontech_console" in err
    finally:
        await sim.stop()


async def test_config_unit_is_read_with_its_profile_and_current_sign(
    procs: ProcessGroup, bms: SimulatedBms, tmp_path: Path
) -> None:
    bms.set_current(20.0)  # charging, as the simulator (and acme_flat) sign it
    host, port = (await _tcp(bms)).split(":")
    config = tmp_path / "agent.toml"
    config.write_text(f"""\
site_id = "site-t"
rack_id = "rack-01"

[polling]
interval_ms = 500
request_timeout_ms = 300

[[links]]
type = "modbus_tcp"
name = "lan"
host = "{host}"
port = {port}

[[units]]
name = "bms-a"
link = "lan"
profile = "acme_flat"
current_sign = "positive_discharging"
cells_in_series = 16
""")
    code, report = await _probe_json(procs, "--config", str(config), "--unit", "bms-a")
    assert code == 0, report
    assert report["target"]["unit"] == "bms-a" and report["profile"] == "acme_flat"
    rows = {r["name"]: r for r in report["points"]}
    # The row shows what the device says; the reading, what the agent publishes (+ = charging),
    # after current_sign says this device counts discharge as positive.
    assert rows["current_a"]["value"] == pytest.approx(20.0, abs=0.1)
    assert report["reading"]["measurements"]["current_a"] == pytest.approx(-20.0, abs=0.1)
    code, _, err = await _probe(procs, "--config", str(config), "--unit", "bms-x")
    assert code == 2 and "no unit 'bms-x'" in err and "bms-a" in err


async def test_can_unit_is_read_through_its_driver(procs: ProcessGroup, tmp_path: Path) -> None:
    with CanBridge(tmp_path / "can") as bridge:
        sim = SimulatedBms(SimRackConfig(seed=5))
        try:
            await sim.start_can(interface="remote", channel=bridge.channel, period_s=0.2)
            config = tmp_path / "agent.toml"
            config.write_text(f"""\
site_id = "site-t"
rack_id = "rack-01"

[[links]]
type = "can"
name = "bmscan"
interface = "remote"
channel = "{bridge.channel}"
stale_after_ms = 1000

[[units]]
name = "pylon"
link = "bmscan"
""")
            code, report = await _probe_json(procs, "--config", str(config), "--unit", "pylon")
            assert code == 0, report
            assert any("no registers" in note for note in report["notes"])
            values = {r["name"]: r["value"] for r in report["points"]}
            expected = sim.model.measurements()
            assert values["pack_voltage_v"] == pytest.approx(expected.pack_voltage_v, abs=0.01)
            assert values["soc_pct"] == pytest.approx(expected.soc_pct, abs=1.0)
            code, _, err = await _probe(procs, "--config", str(config), "--unit", "pylon",
                                        "--registers", "holding:0+2")
            assert code == 2 and "no registers" in err
        finally:
            await sim.stop()


# -- what goes wrong on site -------------------------------------------------------------------


async def test_nothing_listening_is_connection_refused(procs: ProcessGroup) -> None:
    port = free_port()
    code, report = await _probe_json(procs, "tcp", f"127.0.0.1:{port}", "--profile", "acme_flat",
                                     "--timeout-ms", "200")
    assert code == 1
    assert report["error"]["status"] == "connection_refused"
    assert f"connection refused by 127.0.0.1:{port}" in report["error"]["detail"]
    code, out, _ = await _probe(procs, "tcp", f"127.0.0.1:{port}", "--sunspec", "--timeout-ms", "200")
    assert code == 1 and "Connection Refused" in out


async def test_sunspec_scan_of_a_device_without_sunspec_says_so(procs: ProcessGroup) -> None:
    quiet_pymodbus_logging()
    sim = _simulator("pace")  # its map only: anything else is answered "illegal data address"
    try:
        code, report = await _probe_json(procs, "tcp", await _tcp(sim), "--sunspec")
    finally:
        await sim.stop()
    assert code == 1
    assert report["error"]["status"] == "invalid_data"
    assert "no SunS marker at any of [40000, 0, 50000]" in report["error"]["detail"]


async def test_missing_serial_device_says_why(procs: ProcessGroup, tmp_path: Path) -> None:
    code, report = await _probe_json(procs, "rtu", str(tmp_path / "ttyUSB9"), "--profile", "acme_flat",
                                     "--timeout-ms", "200")
    assert code == 1
    assert report["error"]["status"] == "connection_refused"
    assert "does not exist" in report["error"]["detail"]


async def test_wrong_device_id_behind_a_tcp_gateway_is_a_timeout(
    procs: ProcessGroup, bms: SimulatedBms
) -> None:
    code, report = await _probe_json(procs, "tcp", await _tcp(bms), "--device-id", "7",
                                     "--profile", "acme_flat")
    assert code == 1
    error = report["error"]
    assert (error["status"], error["code"]) == ("timeout", 0x0B)
    assert "device 7" in error["detail"] and "device id" in error["advice"]


async def test_wrong_device_id_on_rtu_is_silence(
    procs: ProcessGroup, bms: SimulatedBms, serial_pair: SerialPair
) -> None:
    await bms.start_rtu(serial_pair.a)
    code, report = await _probe_json(procs, "rtu", serial_pair.b, "--device-id", "9",
                                     "--profile", "acme_flat", "--timeout-ms", "300")
    assert code == 1
    assert report["error"]["status"] == "timeout"
    assert "did not answer" in report["error"]["detail"] and "baud rate" in report["error"]["advice"]


async def test_corrupt_frames_on_rtu_are_crc_errors(
    procs: ProcessGroup, bms: SimulatedBms, serial_pair: SerialPair
) -> None:
    await bms.start_rtu(serial_pair.a)
    bms.faults.set_corrupt_crc(True)
    code, report = await _probe_json(procs, "rtu", serial_pair.b, "--registers", "holding:0+4",
                                     "--timeout-ms", "300")
    assert code == 1
    assert report["error"]["status"] == "crc_error" and "parity" in report["error"]["advice"]


@pytest.mark.parametrize(("code_sent", "advice"), [(2, "illegal data address"), (1, "illegal function")])
async def test_exception_code_is_reported_with_its_meaning(
    procs: ProcessGroup, bms: SimulatedBms, code_sent: int, advice: str
) -> None:
    bms.faults.set_exception(code_sent)
    code, report = await _probe_json(procs, "tcp", await _tcp(bms), "--registers", "holding:0x10+4")
    assert code == 1
    error = report["error"]
    assert (error["status"], error["code"]) == ("modbus_exception", code_sent)
    assert advice in error["advice"] and "holding registers (FC3) 16+4" in error["detail"]


async def test_a_reading_the_agent_would_refuse_is_shown_and_exit_1(
    procs: ProcessGroup, bms: SimulatedBms, tmp_path: Path
) -> None:
    # A profile whose pack voltage is read with the wrong scale: every point still shows, and the
    # agent's verdict says which check fails.
    base = (Path(__file__).parents[2] / "rack_agent" / "profiles" / "acme_flat.toml").read_text()
    wrong = tmp_path / "wrong_scale.toml"
    wrong.write_text(base.replace("pack_voltage_v = { address = 0, type = \"u16\", scale = 0.01 }",
                                  "pack_voltage_v = { address = 0, type = \"u16\", scale = 0.001 }"))
    code, report = await _probe_json(procs, "tcp", await _tcp(bms), "--profile", str(wrong),
                                     "--cells-in-series", "16")
    assert code == 1
    assert report["error"] is None
    assert report["reading"]["accepted"] is False and report["reading"]["status"] == "invalid_data"
    assert "pack" in report["reading"]["detail"]
    rows = {r["name"]: r["value"] for r in report["points"]}
    assert rows["pack_voltage_v"] == pytest.approx(bms.model.measurements().pack_voltage_v / 10, abs=0.01)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tcp", "127.0.0.1:1", "--profile", "no_such_make"], "no shipped profile of that name"),
        (["tcp", "127.0.0.1:1", "--profile", "/nonexistent/dir/x.toml"], "file not found"),
        (["tcp", "127.0.0.1:1", "--registers", "holding"], "expected TABLE:START[+COUNT]"),
        (["tcp", "127.0.0.1:1", "--registers", "holdng:0+2"], "unknown table 'holdng'"),
        (["tcp", "127.0.0.1:1", "--registers", "holding:0x+2"], "expected TABLE:START[+COUNT]"),
        (["tcp", "127.0.0.1:1", "--registers", "holding:65535+2"], "runs past register 65535"),
        (["tcp", "127.0.0.1:1", "--registers", "input:0+0"], "count must be at least 1"),
        (["tcp", "127.0.0.1:1"], "say what to read"),
        (["udp", "127.0.0.1:1", "--sunspec"], "name the unit"),
        (["tcp", "127.0.0.1:x", "--sunspec"], "the port must be a number"),
        (["tcp", "127.0.0.1:1", "--sunspec", "--baudrate", "9600"], "--baudrate is for rtu"),
        (["rtu", "/dev/ttyUSB0", "--sunspec", "--baudrate", "1234"], "baudrate"),
        (["tcp", "127.0.0.1:1", "--sunspec", "--device-id", "300"], "device_id"),
        (["--config", "/nonexistent/agent.toml", "--unit", "x"], "file not found"),
    ],
)
async def test_usage_and_config_errors_exit_2_before_anything_is_opened(
    procs: ProcessGroup, args: list[str], message: str
) -> None:
    code, out, err = await _probe(procs, *args)
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
