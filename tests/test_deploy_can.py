"""deploy/can/setup-can.sh and its systemd units: the script parses, takes its settings as options or
from systemd's environment file, and in ``--dry-run`` prints what it would run for each adapter kind
without running anything (a recording ``ip``/``slcand``/``pkill`` first on PATH proves that).

No CAN hardware here: what the commands do to a real interface is not tested (deploy/README.md says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "can" / "setup-can.sh"
ENV_EXAMPLE = ROOT / "deploy" / "can" / "can0.env.example"
UNITS = ROOT / "deploy" / "systemd"
README = ROOT / "deploy" / "README.md"
RECORDED = ("ip", "slcand", "pkill", "modprobe")
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment, log): PATH starts with fake ip/slcand/pkill that log their arguments; the fake
    ``ip link show`` fails (no such interface), every other call succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in RECORDED:
        fake = bin_dir / name
        fake.write_text(
            f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
            '[ "$1 $2" = "link show" ] && exit 1\nexit 0\n'
        )
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LANG": "C"}
    return env, log


def _run(
    env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT), *args], env={**env, **(extra_env or {})}, capture_output=True, text=True,
        timeout=30, check=False,
    )


def _commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_script_parses_and_is_executable() -> None:
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True, timeout=30)
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/bin/bash\n")


def test_help_is_the_header(recorder: tuple[dict[str, str], Path]) -> None:
    env, log = recorder
    done = _run(env, "--help")
    assert done.returncode == 0
    assert "--dry-run" in done.stdout and "CAN_SERIAL_DEVICE" in done.stdout and "set -euo" not in done.stdout
    assert not log.exists()


@pytest.mark.parametrize(
    ("adapter", "args", "expected"),
    [
        # An MCP2515 HAT and a gs_usb adapter are both kernel SocketCAN drivers: same commands.
        ("mcp2515", ["--dry-run"], [
            "ip link set can0 down",
            "ip link set can0 type can bitrate 500000 restart-ms 100",
            "ip link set can0 txqueuelen 32",
            "ip link set can0 up",
        ]),
        ("gs_usb", ["--dry-run", "--kind", "native", "--bitrate", "250000", "--txqueuelen", "16", "can1"], [
            "ip link set can1 down",
            "ip link set can1 type can bitrate 250000 restart-ms 100",
            "ip link set can1 txqueuelen 16",
            "ip link set can1 up",
        ]),
        ("native, no auto-restart", ["--dry-run", "--restart-ms", "0", "can0"], [
            "ip link set can0 down",
            "ip link set can0 type can bitrate 500000",
            "ip link set can0 txqueuelen 32",
            "ip link set can0 up",
        ]),
        ("slcan", ["--dry-run", "--kind", "slcan", "--serial-device", "/dev/serial/by-id/usb-x", "can0"], [
            "slcand -o -c -f -s6 /dev/serial/by-id/usb-x can0",
            "ip link set can0 txqueuelen 32",
            "ip link set can0 up",
        ]),
        ("native down", ["--dry-run", "--down", "can0"], ["ip link set can0 down"]),
        ("slcan down", ["--dry-run", "--down", "--kind", "slcan", "can2"], [
            "ip link set can2 down",
            "pkill -TERM -f '^slcand .* can2$'",
        ]),
    ],
)
def test_dry_run_prints_the_commands_and_runs_none(
    recorder: tuple[dict[str, str], Path], adapter: str, args: list[str], expected: list[str]
) -> None:
    env, log = recorder
    done = _run(env, *args)
    assert done.returncode == 0, done.stderr
    assert _commands(done.stdout) == expected, adapter
    assert not log.exists(), log.read_text()  # nothing was executed


@pytest.mark.parametrize(
    ("bitrate", "code"),
    [("10000", 0), ("20000", 1), ("50000", 2), ("100000", 3), ("125000", 4), ("250000", 5), ("500000", 6),
     ("800000", 7), ("1000000", 8)],
)
def test_slcan_speed_codes(recorder: tuple[dict[str, str], Path], bitrate: str, code: int) -> None:
    env, _ = recorder
    done = _run(env, "--dry-run", "--kind", "slcan", "--serial-device", "/dev/ttyACM0", "--bitrate", bitrate)
    assert done.returncode == 0, done.stderr
    assert _commands(done.stdout)[0] == f"slcand -o -c -f -s{code} /dev/ttyACM0 can0"


def _systemd_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comment lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def test_settings_come_from_the_env_file_and_options_win(recorder: tuple[dict[str, str], Path]) -> None:
    env, log = recorder
    file_env = _systemd_env(ENV_EXAMPLE)
    assert file_env == {"CAN_BITRATE": "500000", "CAN_RESTART_MS": "100", "CAN_TXQUEUELEN": "32"}
    changed = {**file_env, "CAN_BITRATE": "125000", "CAN_TXQUEUELEN": "8"}
    done = _run(env, "--dry-run", "can0", extra_env=changed)
    assert _commands(done.stdout)[1:3] == ["ip link set can0 type can bitrate 125000 restart-ms 100",
                                          "ip link set can0 txqueuelen 8"]
    done = _run(env, "--dry-run", "--bitrate", "1000000", "can0", extra_env=changed)
    assert _commands(done.stdout)[1] == "ip link set can0 type can bitrate 1000000 restart-ms 100"
    slcan = {"CAN_KIND": "slcan", "CAN_SERIAL_DEVICE": "/dev/ttyACM3", "CAN_BITRATE": "250000"}
    done = _run(env, "--dry-run", "can5", extra_env=slcan)
    assert _commands(done.stdout)[0] == "slcand -o -c -f -s5 /dev/ttyACM3 can5"
    assert not log.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--bogus"], "unknown option --bogus"),
        (["--dry-run", "--bitrate"], "--bitrate needs a value"),
        (["--dry-run", "--bitrate", "fast"], "--bitrate must be a number"),
        (["--dry-run", "--bitrate", "2000000"], "up to 1000000"),
        (["--dry-run", "--restart-ms", "-5"], "--restart-ms must be a number"),
        (["--dry-run", "--txqueuelen", "0"], "--txqueuelen must be a number of frames, at least 1"),
        (["--dry-run", "--kind", "usb"], "--kind must be native or slcan"),
        (["--dry-run", "can0;reboot"], "is not an interface name"),
        (["--dry-run", "averyveryverylongname"], "is not an interface name"),
        (["--dry-run", "can0", "can1"], "one interface at a time"),
        (["--dry-run", "--kind", "slcan"], "--kind slcan needs --serial-device"),
        (["--dry-run", "--kind", "slcan", "--serial-device", "/dev/ttyACM0", "--bitrate", "400000"],
         "slcan adapters take 10000"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(
    recorder: tuple[dict[str, str], Path], args: list[str], message: str
) -> None:
    env, log = recorder
    done = _run(env, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert not log.exists()


def test_without_dry_run_a_missing_interface_is_refused(recorder: tuple[dict[str, str], Path]) -> None:
    env, log = recorder
    done = _run(env, "canbmslink9")
    assert done.returncode == 1
    if os.geteuid() == 0:
        assert "no network interface 'canbmslink9'" in done.stderr
        # Only the existence check ran: nothing was configured.
        assert log.read_text().splitlines() == ["ip link show canbmslink9"]
    else:
        assert "needs root" in done.stderr and not log.exists()


def test_units_run_the_script_with_their_instance() -> None:
    native = (UNITS / "can-setup@.service").read_text()
    slcan = (UNITS / "slcan@.service").read_text()
    script = "/opt/bmslink/deploy/can/setup-can.sh"
    assert f"ExecStart={script} --kind native %i" in native
    assert f"ExecStop={script} --kind native --down %i" in native
    assert "BindsTo=sys-subsystem-net-devices-%i.device" in native
    assert "EnvironmentFile=-/etc/bmslink/can-%i.env" in native
    assert f"ExecStart={script} --kind slcan %i" in slcan and "Type=forking" in slcan
    assert "EnvironmentFile=/etc/bmslink/can-%i.env" in slcan  # required: it names the tty
    assert not (UNITS / "can0-setup.service").exists()
    assert not (ROOT / "deploy" / "can" / "setup-can0.sh").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["can-setup@.service", "slcan@.service"])
def test_units_verify(tmp_path: Path, unit: str) -> None:
    shutil.copy(UNITS / unit, tmp_path / unit)
    instance = unit.replace("@", "@can0")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", f"./{instance}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    # The script is not installed under /opt here; anything else (an unknown key, a bad value) is a defect.
    complaints = [line for line in done.stderr.splitlines() if line and "is not executable" not in line]
    assert complaints == []


def test_readme_names_the_new_files() -> None:
    text = README.read_text()
    for needle in ("can-setup@.service", "slcan@.service", "setup-can.sh", "can0.env.example",
                   "dtoverlay=mcp2515-can0,oscillator=", "slcand -o -c -f -s6", "gs_usb", "--dry-run"):
        assert needle in text, needle
    assert "can0-setup.service" not in text and "setup-can0.sh" not in text
