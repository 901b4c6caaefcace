"""``bmslink agent --check-config`` says which serial device of a Modbus RTU link this user cannot
open, why, and what to do; it stays a warning (exit 0): an adapter may be plugged in later.

Run through the installed command. The permission case needs a process that file permissions apply
to: as root, the command runs under ``setpriv`` without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (what
lets root open anything), so a device with mode 000 is refused to it as to any other user.
"""

from __future__ import annotations

import grp
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.procs import ProcessGroup, bmslink_cli
from tests.fixtures.serial_pair import SerialPair

AGENT_TOML = """\
site_id = "site-t"
rack_id = "rack-01"

[mqtt]
host = "127.0.0.1"
port = 1

[polling]
interval_ms = 500
request_timeout_ms = 100

[[links]]
type = "modbus_rtu"
name = "rs485"
device = "{device}"
baudrate = 115200

[[units]]
name = "bms"
link = "rs485"
profile = "acme_flat"
"""


def _as_unprivileged(argv: list[str]) -> list[str]:
    """argv run so that file permissions apply to it, also when the tests run as root."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *argv]


def _check(
    procs: ProcessGroup, tmp_path: Path, device: str, *, unprivileged: bool = False
) -> tuple[str, str]:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML.format(device=device))
    argv = bmslink_cli("agent", "--config", str(path), "--check-config")
    procs.start("check", _as_unprivileged(argv) if unprivileged else argv)
    assert procs.wait("check", 30.0) == 0, procs.output("check")
    assert "ok (site site-t" in procs.stdout("check")
    return procs.stdout("check"), procs.stderr("check")


@pytest.fixture(params=[0o000, 0o060], ids=["mode-000", "group-only"])
def locked_pty(serial_pair: SerialPair, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(real path, mode) of a pty its owner may not open: no one at all, or its group only."""
    real = os.path.realpath(serial_pair.a)
    original = os.stat(real).st_mode
    mode: int = request.param
    os.chmod(real, mode)
    yield real, mode
    if os.path.exists(real):
        os.chmod(real, original & 0o7777)


def test_missing_device_is_named_with_what_to_do(procs: ProcessGroup, tmp_path: Path) -> None:
    device = "/dev/ttyUSB-bmslink-test-absent"
    _, err = _check(procs, tmp_path, device)
    assert f"warning: {tmp_path / 'agent.toml'}: link rs485: serial device {device} does not exist" in err
    assert "plugged in" in err and "/dev/serial/by-id/" in err


def test_a_pylontech_console_device_is_checked_too(procs: ProcessGroup, tmp_path: Path) -> None:
    device = "/dev/ttyUSB-bmslink-test-pylontech"
    path = tmp_path / "agent.toml"
    path.write_text(f"""\
site_id = "site-t"
rack_id = "rack-01"

[[links]]
type = "pylontech_console"
name = "console"
device = "{device}"

[[units]]
name = "pack-2"
link = "console"
device_id = 2
profile = "pylontech_lv"
""")
    procs.start("check", bmslink_cli("agent", "--config", str(path), "--check-config"))
    assert procs.wait("check", 30.0) == 0, procs.output("check")
    assert f"link console: serial device {device} does not exist" in procs.stderr("check")


def test_a_file_that_is_no_serial_port_is_named(procs: ProcessGroup, tmp_path: Path) -> None:
    device = tmp_path / "ttyUSB0"
    device.write_text("not a tty")
    _, err = _check(procs, tmp_path, str(device))
    assert f"serial device {device} is not a character device" in err


def test_device_this_user_cannot_open_says_group_and_udev(
    procs: ProcessGroup, tmp_path: Path, locked_pty: tuple[str, int]
) -> None:
    device, mode = locked_pty
    _, err = _check(procs, tmp_path, device, unprivileged=True)
    assert f"serial device {device} is not readable and writable by user" in err
    assert "udev rule" in err and "dialout" in err and "udevadm trigger" in err
    if mode == 0:
        assert "c---------" in err and "Its group may not read and write it either" in err
        assert "usermod" not in err
    else:
        group = grp.getgrgid(os.stat(device).st_gid).gr_name
        assert "c---rw----" in err and f"usermod -aG {group} " in err


def test_device_in_a_directory_this_user_cannot_search(procs: ProcessGroup, tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "ttyUSB0").write_text("")
    closed.chmod(0)
    try:
        _, err = _check(procs, tmp_path, str(closed / "ttyUSB0"), unprivileged=True)
    finally:
        closed.chmod(0o755)
    assert f"serial device {closed / 'ttyUSB0'} cannot be examined by user" in err


def test_a_usable_device_gives_no_warning(
    procs: ProcessGroup, tmp_path: Path, serial_pair: SerialPair
) -> None:
    _, err = _check(procs, tmp_path, serial_pair.a, unprivileged=True)
    assert "warning" not in err


def test_a_pyserial_url_is_not_checked(procs: ProcessGroup, tmp_path: Path) -> None:
    _, err = _check(procs, tmp_path, "socket://127.0.0.1:1")
    assert "warning" not in err


def test_agent_start_logs_the_same_warning(procs: ProcessGroup, tmp_path: Path) -> None:
    device = "/dev/ttyUSB-bmslink-test-absent"
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML.format(device=device))
    procs.start("agent", bmslink_cli("agent", "--config", str(path)))
    out = procs.wait_for_output("agent", "does not exist", 30.0)
    line = next(x for x in out.splitlines() if "does not exist" in x)
    assert "WARNING" in line and f"link rs485: serial device {device}" in line
    assert procs.stop("agent") == 0
