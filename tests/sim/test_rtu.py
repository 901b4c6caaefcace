"""SimulatedBms over Modbus RTU on a socat pty pair: the faults a serial line adds (bad CRC, silence)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerRTU

from sim.bms_server import SimStartError, SimulatedBms, invert_crc, shorten_read_answer
from tests.sim.helpers import quiet_pymodbus

CLIENT_TIMEOUT_S = 0.25
SOCAT_START_S = 5.0


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two pty paths joined by socat (a null-modem cable); socat is stopped and reaped at teardown."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat not installed")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + SOCAT_START_S
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"socat did not create {a} and {b}")
            time.sleep(0.01)
        yield str(a), str(b)
    finally:
        proc.terminate()
        try:
            proc.wait(3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3.0)


class RxCounter:
    """Client-side ``trace_packet``: counts the raw bytes received, as an agent tells CRC from silence."""

    def __init__(self) -> None:
        self.rx_bytes = 0

    def __call__(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.rx_bytes = max(self.rx_bytes, len(data))  # pymodbus hands the whole buffer so far
        return data


@pytest.fixture
async def rig(
    ptys: tuple[str, str],
) -> AsyncIterator[tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter]]:
    bms = SimulatedBms()
    await bms.start_rtu(ptys[0], baudrate=19200)
    rx = RxCounter()
    client = AsyncModbusSerialClient(ptys[1], baudrate=19200, timeout=CLIENT_TIMEOUT_S, retries=0,
                                     reconnect_delay=0, trace_packet=rx)
    try:
        assert await client.connect()
        yield bms, client, rx
    finally:
        client.close()
        await bms.stop()


async def test_rtu_serves_both_maps(rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter]) -> None:
    bms, client, _ = rig
    bms.set_current(-12.5)
    flat = await client.read_holding_registers(0, count=21, device_id=1)
    assert not flat.isError()
    assert flat.registers[1] == (-125) & 0xFFFF  # 0.1 A, s16
    suns = await client.read_holding_registers(40000, count=4, device_id=1)
    assert suns.registers == [0x5375, 0x6E53, 1, 66]


async def test_corrupt_crc_arrives_full_length_and_is_dropped(
    rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter],
) -> None:
    bms, client, rx = rig
    bms.faults.set_corrupt_crc(True)
    started = time.monotonic()
    with pytest.raises(ModbusIOException):
        await client.read_holding_registers(0, count=4, device_id=1)
    assert time.monotonic() - started == pytest.approx(CLIENT_TIMEOUT_S, abs=0.1)
    assert rx.rx_bytes == 3 + 2 * 4 + 2  # unit, fc, byte count, 4 registers, CRC: a whole frame came
    bms.faults.set_corrupt_crc(False)
    assert not (await client.read_holding_registers(0, count=4, device_id=1)).isError()


async def test_no_answer_sends_no_byte(rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter]) -> None:
    bms, client, rx = rig
    bms.faults.set_no_answer(True)
    with pytest.raises(ModbusIOException):
        await client.read_holding_registers(0, count=4, device_id=1)
    assert rx.rx_bytes == 0


async def test_exception_over_rtu(rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter]) -> None:
    bms, client, _ = rig
    bms.faults.set_exception(4)
    response = await client.read_holding_registers(0, count=4, device_id=1)
    assert response.isError() and response.exception_code == 4


async def test_other_unit_on_the_line_gets_silence(
    rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter],
) -> None:
    _, client, rx = rig
    with pytest.raises(ModbusIOException):
        await client.read_holding_registers(0, count=4, device_id=2)
    assert rx.rx_bytes == 0


def test_invert_crc_breaks_the_crc_only() -> None:
    body = bytes([1, 3, 2, 0, 7])
    good = body + FramerRTU.compute_CRC(body).to_bytes(2, "big")
    bad = invert_crc(good)
    assert bad[:-2] == body and len(bad) == len(good)
    assert not FramerRTU.check_CRC(bad[:-2], int.from_bytes(bad[-2:], "big"))


async def test_missing_device_is_a_typed_start_error(tmp_path: Path) -> None:
    async with SimulatedBms() as bms:
        with pytest.raises(SimStartError) as caught:
            await bms.start_rtu(str(tmp_path / "no-such-tty"))
        assert caught.value.transport == "modbus rtu"


async def test_short_read_over_rtu_has_a_valid_crc(
    rig: tuple[SimulatedBms, AsyncModbusSerialClient, RxCounter],
) -> None:
    bms, client, rx = rig
    bms.faults.set_short_read(2)
    response = await client.read_holding_registers(0, count=6, device_id=1)
    assert not response.isError()
    assert len(response.registers) == 4
    assert rx.rx_bytes == 3 + 2 * 4 + 2


def test_shorten_read_answer_fixes_byte_count_length_and_crc() -> None:
    body = bytes([1, 3, 6, 0, 1, 0, 2, 0, 3])
    rtu = body + FramerRTU.compute_CRC(body).to_bytes(2, "big")
    cut = shorten_read_answer(rtu, 1, rtu=True)
    assert cut[:7] == bytes([1, 3, 4, 0, 1, 0, 2])
    assert FramerRTU.check_CRC(cut[:-2], int.from_bytes(cut[-2:], "big"))
    tcp = bytes([0, 9, 0, 0, 0, 9, 1]) + body[1:]
    assert shorten_read_answer(tcp, 2, rtu=False) == bytes([0, 9, 0, 0, 0, 5, 1, 3, 2, 0, 1])
    # More registers cut than the answer holds: an empty (still well-formed) answer.
    assert shorten_read_answer(tcp, 9, rtu=False) == bytes([0, 9, 0, 0, 0, 3, 1, 3, 0])
    exception = bytes([1, 0x83, 2])
    assert shorten_read_answer(exception + b"\0\0", 1, rtu=True) == exception + b"\0\0"
