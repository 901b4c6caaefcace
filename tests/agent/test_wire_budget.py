"""Wire time of a serial line's poll against the poll interval: the arithmetic as tables, the SunSpec
estimate against a real discovery, and the warning as an installer sees it (CLI, agent start)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rack_agent.profiles import FlatProfile, SunSpecProfile, flat_plan, load_profile, shipped_profiles
from rack_agent.profiles.plan import Block
from rack_agent.profiles.spec import Table
from rack_agent.profiles.sunspec import discover, sunspec_plan
from rack_agent.wire_budget import (
    FAST_LINE_GAP_MS,
    TURNAROUND_MS,
    SerialFraming,
    answer_data_bytes,
    estimated_sunspec_blocks,
    line_budget,
    request_wire_ms,
    unit_blocks,
    unit_wire_time,
)
from sim.battery import BatteryModel, SimRackConfig
from sim.registers import SUNSPEC_BASE_ADDRESS, Identity, sunspec_image
from tests.fixtures.procs import ProcessGroup, bmslink_cli


@pytest.mark.parametrize(
    ("framing", "bits"),
    [
        (SerialFraming(9600, "N", 1, 8), 10),
        (SerialFraming(9600, "E", 1, 8), 11),
        (SerialFraming(9600, "N", 2, 8), 11),
        (SerialFraming(9600, "O", 2, 8), 12),
        (SerialFraming(9600, "N", 1, 7), 9),
    ],
)
def test_bits_per_character(framing: SerialFraming, bits: int) -> None:
    assert framing.bits_per_char == bits


@pytest.mark.parametrize(
    ("baudrate", "parity", "registers", "expected_ms"),
    [
        # 8N1 at 9600: 1.0417 ms per character; frames 8 + 5 + 2N characters; two 3.5-character gaps.
        (9600, "N", 2, (8 + 9) * 10 / 9.6 + 2 * 3.5 * 10 / 9.6),  # 25.0 ms
        (9600, "N", 64, (8 + 133) * 10 / 9.6 + 2 * 3.5 * 10 / 9.6),  # 154.2 ms: a whole 802
        (9600, "N", 125, (8 + 255) * 10 / 9.6 + 2 * 3.5 * 10 / 9.6),  # 281.3 ms: the FC3 maximum
        (19200, "E", 10, (8 + 25) * 11 / 19.2 + 2 * 3.5 * 11 / 19.2),  # 22.9 ms
        # Above 19200 baud the gap is fixed at 1.75 ms.
        (38400, "N", 10, (8 + 25) * 10 / 38.4 + 2 * FAST_LINE_GAP_MS),
        (115200, "N", 125, (8 + 255) * 10 / 115.2 + 2 * FAST_LINE_GAP_MS),  # 26.3 ms
    ],
)
def test_request_wire_time(baudrate: int, parity: str, registers: int, expected_ms: float) -> None:
    framing = SerialFraming(baudrate, parity)
    data_bytes = answer_data_bytes(Block(Table.HOLDING, 0, registers))
    assert data_bytes == 2 * registers
    assert request_wire_ms(framing, data_bytes, turnaround_ms=0) == pytest.approx(expected_ms)
    assert request_wire_ms(framing, data_bytes) == pytest.approx(expected_ms + TURNAROUND_MS)


@pytest.mark.parametrize(("coils", "data_bytes"), [(1, 1), (8, 1), (9, 2), (69, 9), (2000, 250)])
def test_coil_reads_answer_a_byte_per_eight(coils: int, data_bytes: int) -> None:
    assert answer_data_bytes(Block(Table.COIL, 0x1248, coils)) == data_bytes
    assert answer_data_bytes(Block(Table.DISCRETE, 0, coils)) == data_bytes
    # Seplos V3's alarm coils 0x1248..0x128C (69 coils) at 19200 8N1: 8 + 5 + 9 characters.
    assert request_wire_ms(SerialFraming(19200), data_bytes, 0) == pytest.approx(
        (13 + data_bytes) * 10 / 19.2 + 2 * 3.5 * 10 / 19.2)


def test_a_unit_pays_per_block_and_the_line_adds_its_units() -> None:
    framing = SerialFraming(9600)
    blocks = (Block(Table.HOLDING, 0, 21), Block(Table.INPUT, 0x1000, 18))
    unit = unit_wire_time("bms", blocks, framing)
    assert unit.requests == 2 and unit.registers == 39
    assert unit.wire_ms == pytest.approx(request_wire_ms(framing, 42) + request_wire_ms(framing, 36))
    budget = line_budget("rs485", framing, 100, [("a", blocks[:1], False), ("b", blocks, False)])
    assert budget.total_ms == pytest.approx(request_wire_ms(framing, 42) + unit.wire_ms)
    assert budget.slowest is not None and budget.slowest.unit == "b"
    assert not budget.fits  # 70 + 134 ms > 100 ms
    assert line_budget("rs485", framing, 1000, [("b", blocks, False)]).fits


@pytest.mark.parametrize(
    ("units", "baudrate", "interval_ms", "fits"),
    [
        (1, 9600, 100, True),  # one acme_flat read: 70 ms
        (2, 9600, 100, False),  # 139 ms
        (16, 9600, 1000, False),  # 1113 ms
        (16, 115200, 500, True),  # 212 ms
        (16, 115200, 200, False),
        (4, 38400, 100, True),  # 4 × 18.6 ms
    ],
)
def test_acme_flat_units_on_one_line(units: int, baudrate: int, interval_ms: int, fits: bool) -> None:
    profile = load_profile("acme_flat")
    assert isinstance(profile, FlatProfile)
    blocks, estimated = unit_blocks(profile)
    assert not estimated and [b.count for b in blocks] == [21]
    budget = line_budget("rs485", SerialFraming(baudrate), interval_ms,
                         [(f"u{i}", blocks, False) for i in range(units)])
    assert budget.fits is fits
    text = budget.describe()
    assert "link rs485" in text and f"polling.interval_ms is {interval_ms}" in text
    assert ("overrun" in text) is not fits


@pytest.mark.parametrize("name", [n for n in shipped_profiles() if isinstance(load_profile(n), FlatProfile)])
def test_every_shipped_flat_profile_is_timed_by_its_own_read_plan(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, FlatProfile)
    framing = SerialFraming(19200)
    plan_blocks = flat_plan(profile).blocks
    blocks, estimated = unit_blocks(profile)
    assert blocks == plan_blocks and not estimated
    unit = unit_wire_time(name, blocks, framing)
    assert unit.requests == len(plan_blocks)
    assert unit.wire_ms == pytest.approx(sum(request_wire_ms(framing, answer_data_bytes(b)) for b in blocks))


async def test_sunspec_estimate_is_the_plan_discovery_finds_on_the_simulator() -> None:
    profile = load_profile("sunspec")
    assert isinstance(profile, SunSpecProfile)
    config = SimRackConfig()
    image = sunspec_image(BatteryModel(config).snapshot(), config, Identity())

    async def read(address: int, count: int) -> list[int]:
        await asyncio.sleep(0)
        start = address - SUNSPEC_BASE_ADDRESS
        return image[start:start + count]

    layout = await discover(read, profile.base_addresses)
    real = sunspec_plan(profile, layout).blocks
    estimate = estimated_sunspec_blocks(profile)
    # Addresses differ (the estimate does not know where the chain starts), the reads do not.
    assert [b.count for b in estimate] == [b.count for b in real]
    assert [b.address - estimate[0].address for b in estimate] == [b.address - real[0].address for b in real]


AGENT_TOML = """\
site_id = "site-t"
rack_id = "rack-01"

[mqtt]
host = "127.0.0.1"
port = 1

[polling]
interval_ms = {interval_ms}
request_timeout_ms = 50

[[links]]
type = "modbus_rtu"
name = "rs485"
device = "socket://127.0.0.1:1"     # a URL: its device is not checked here
baudrate = {baudrate}
"""


def _config(
    tmp_path: Path, *, units: int, baudrate: int, interval_ms: int, profile: str = "acme_flat"
) -> Path:
    text = AGENT_TOML.format(interval_ms=interval_ms, baudrate=baudrate) + "".join(
        f'\n[[units]]\nname = "bms-{i:02d}"\nlink = "rs485"\ndevice_id = {i + 1}\nprofile = "{profile}"\n'
        for i in range(units)
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_check_config_warns_when_16_units_at_9600_baud_cannot_fit_100_ms(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    path = _config(tmp_path, units=16, baudrate=9600, interval_ms=100)
    procs.start("check", bmslink_cli("agent", "--config", str(path), "--check-config"))
    assert procs.wait("check", 30.0) == 0  # a warning, not an error
    err = procs.stderr("check")
    assert "warning" in err and "link rs485" in err
    assert "1113 ms of wire time at 9600 baud 8N1" in err
    assert "polling.interval_ms is 100" in err
    assert "slowest unit bms-00: 70 ms" in err
    assert "ok (site site-t" in procs.stdout("check")


def test_check_config_is_quiet_when_the_line_keeps_up(tmp_path: Path, procs: ProcessGroup) -> None:
    path = _config(tmp_path, units=2, baudrate=115200, interval_ms=100, profile="sunspec")
    procs.start("check", bmslink_cli("agent", "--config", str(path), "--check-config"))
    assert procs.wait("check", 30.0) == 0
    assert "wire time" not in procs.stderr("check")


def test_check_config_estimates_sunspec_units_before_discovery(tmp_path: Path, procs: ProcessGroup) -> None:
    path = _config(tmp_path, units=2, baudrate=9600, interval_ms=200, profile="sunspec")
    procs.start("check", bmslink_cli("agent", "--config", str(path), "--check-config"))
    assert procs.wait("check", 30.0) == 0
    err = procs.stderr("check")
    assert "estimated before SunSpec discovery" in err and "polling.interval_ms is 200" in err


def test_agent_start_logs_the_warning(tmp_path: Path, procs: ProcessGroup) -> None:
    path = _config(tmp_path, units=16, baudrate=9600, interval_ms=100)
    procs.start("agent", bmslink_cli("agent", "--config", str(path)))
    out = procs.wait_for_output("agent", "wire time", 30.0)
    line = next(x for x in out.splitlines() if "wire time" in x)
    assert "WARNING" in line and "rack rack-01: link rs485" in line and "slowest unit bms-00" in line
    assert procs.stop("agent") == 0
