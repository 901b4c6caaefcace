"""A serial device the RTU link cannot open is named in a warning with the operating system's reason.

pymodbus only returns False from connect(); the operator must learn which device failed and why
(unplugged adapter, a path that is no serial device, another program holding the port, permissions).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import pytest

from rack_agent.links.modbus import ModbusRtuBmsLink, serial_open_problem
from shared.agent_config import ModbusRtuLink
from tests.agent.helpers import wait_until
from tests.fixtures.serial_pair import SerialPair

LOGGER = "rack_agent.links"


async def _warning_after_a_failed_open(device: str, caplog: pytest.LogCaptureFixture) -> str:
    link = ModbusRtuBmsLink(
        ModbusRtuLink(type="modbus_rtu", name="rs485", device=device, baudrate=19200),
        request_timeout_s=0.1, reconnect_initial_s=0.05, reconnect_max_s=0.1,
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    await link.start()
    try:
        await wait_until(lambda: "cannot open serial device" in caplog.text, 5.0, "the open warning")
        assert not link.connected
    finally:
        await link.stop()
    lines = [r.getMessage() for r in caplog.records if "cannot open serial device" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "cannot open" in r.getMessage())
    return lines[0]


async def test_a_missing_device_is_named_with_its_os_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = str(tmp_path / "ttyUSB-unplugged")
    line = await _warning_after_a_failed_open(device, caplog)
    assert device in line
    assert "No such file or directory [ENOENT]" in line


async def test_a_path_that_is_no_serial_device_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = tmp_path / "notes.txt"
    device.write_text("not a tty\n")
    line = await _warning_after_a_failed_open(str(device), caplog)
    assert str(device) in line
    assert "not a serial device" in line and "[ENOTTY]" in line


async def test_a_port_held_by_another_program_says_in_use(
    serial_pair: SerialPair, caplog: pytest.LogCaptureFixture
) -> None:
    fd = os.open(serial_pair.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what pyserial's exclusive open takes
        line = await _warning_after_a_failed_open(serial_pair.b, caplog)
    finally:
        os.close(fd)
    assert serial_pair.b in line
    assert "in use: another program holds its lock" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file whatever its mode")
async def test_a_device_without_permission_says_permission_denied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = tmp_path / "ttyS-locked-down"
    device.write_text("")
    device.chmod(0)
    line = await _warning_after_a_failed_open(str(device), caplog)
    assert "Permission denied [EACCES]" in line


def test_a_device_that_opens_is_not_blamed(serial_pair: SerialPair) -> None:
    assert serial_open_problem(serial_pair.b).startswith("it opens now")
    assert "pyserial URL" in serial_open_problem("socket://127.0.0.1:1")
