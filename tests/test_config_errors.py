"""Every unusable configuration is exit status 2 with a message naming the file and the reason.

Found by probing as a careless installer would (issue 10, item 7): a non-UTF-8 file, a directory, an
absurdly nested array, a missing TLS file, an address that does not parse and a CAN interface
python-can does not know ended in a traceback (exit 1), or passed ``--check-config`` and then ran.
Each is checked through the CLI, for both processes, with and without ``--check-config``: the
configuration is refused before anything starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bmslink.cli import main

AGENT = """\
site_id = "site-a"
rack_id = "rack-01"

[[links]]
type = "modbus_tcp"
name = "lan"
host = "127.0.0.1"
port = 1502

[[units]]
name = "bms"
link = "lan"
profile = "acme_flat"
"""

CONTROLLER = """\
site_id = "site-a"
node_id = "ctl-a"

[[roster]]
rack_id = "rack-01"
capacity_ah = 280

[can]
interface = "virtual"
channel = "cfg-test"
"""

Writer = Callable[[Path], None]


def _text(text: str) -> Writer:
    def write(path: Path) -> None:
        path.write_text(text)
    return write


def _bytes(data: bytes) -> Writer:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


def _directory(path: Path) -> None:
    path.mkdir()


def _exposed_keys(path: Path) -> None:
    keys = path.with_name("keys.toml")
    keys.write_text(f'[keys]\nalice = "{"ab" * 32}"\n')
    keys.chmod(0o644)
    path.write_text(CONTROLLER + f'\n[commands]\nkeys_file = "{keys}"\n')


CASES: list[tuple[str, str, Writer, str]] = [
    ("agent", "not utf-8", _bytes(AGENT.encode() + b'\nnote = "\xff\xfe"\n'), "not UTF-8"),
    ("controller", "not utf-8", _bytes(b"\xff" + CONTROLLER.encode()), "not UTF-8"),
    ("agent", "a directory", _directory, "is a directory"),
    ("controller", "a directory", _directory, "is a directory"),
    ("agent", "5000-deep array", _text(AGENT + "x = " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    ("controller", "40-deep array", _text("x = " + "[" * 40 + "]" * 40 + "\n" + CONTROLLER),
     "nested too deeply"),
    ("agent", "missing TLS ca_file", _text(AGENT + '\n[mqtt.tls]\nca_file = "/nonexistent/ca.pem"\n'),
     "mqtt.tls.ca_file"),
    ("controller", "missing TLS cert", _text(
        CONTROLLER + '\n[mqtt.tls]\ncert_file = "/nonexistent/c.pem"\nkey_file = "/nonexistent/k.pem"\n'),
     "mqtt.tls.cert_file"),
    ("controller", "allowed client not an address", _text(
        CONTROLLER + '\n[modbus_server]\nenabled = true\nallowed_clients = ["not-an-ip"]\n'),
     "modbus_server.allowed_clients[0]"),
    ("controller", "modbus host not an address", _text(
        CONTROLLER + '\n[modbus_server]\nenabled = true\nhost = "my gateway"\n'), "modbus_server.host"),
    ("agent", "metrics host not an address", _text(AGENT + '\n[metrics]\nenabled = true\nhost = "x y"\n'),
     "metrics.host"),
    ("controller", "unknown CAN interface", _text(CONTROLLER.replace('"virtual"', '"nosuchiface"')),
     "unknown CAN interface 'nosuchiface'"),
    ("controller", "command keys readable by others", _exposed_keys, "commands.keys_file"),
    ("agent", "unknown CAN interface", _text(
        AGENT + '\n[[links]]\ntype = "can"\nname = "bus"\ninterface = "nosuchiface"\n'),
     "unknown CAN interface 'nosuchiface'"),
]


@pytest.mark.parametrize("check_only", [True, False], ids=["check-config", "run"])
@pytest.mark.parametrize(("kind", "label", "write", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_unusable_config_exits_2_naming_file_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, label: str, write: Writer, expected: str,
    check_only: bool,
) -> None:
    path = tmp_path / f"{kind}.toml"
    write(path)
    argv = [kind, "--config", str(path)] + (["--check-config"] if check_only else [])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{label}: exit {code}, stderr {err!r}"
    assert str(path) in err and expected in err
    assert "Traceback" not in err


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        # root reads any file: an unreadable file is simulated by a path through a regular file.
        path = tmp_path / "plain"
        path.write_text("")
        target = path / "controller.toml"
        expected = "cannot be read"
    else:
        target = tmp_path / "controller.toml"
        target.write_text(CONTROLLER)
        target.chmod(0)
        expected = "permission denied"
    assert main(["controller", "--config", str(target), "--check-config"]) == 2
    assert expected in capsys.readouterr().err


def test_the_shipped_command_refuses_before_starting_anything(tmp_path: Path) -> None:
    """Through the process boundary, as an installer runs it: exit 2, one message, no traceback."""
    path = tmp_path / "controller.toml"
    path.write_text(CONTROLLER.replace('"virtual"', '"nosuchiface"'))
    done = subprocess.run(
        [sys.executable, "-m", "bmslink.cli", "controller", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "unknown CAN interface 'nosuchiface'" in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr


def test_good_configs_still_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for kind, text in (("agent", AGENT), ("controller", CONTROLLER)):
        path = tmp_path / f"{kind}.toml"
        path.write_text(text)
        assert main([kind, "--config", str(path), "--check-config"]) == 0, capsys.readouterr().err


def test_a_listener_beyond_loopback_is_a_warning_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Allowed when written in the config, and said at every start; loopback ones pass quietly."""
    from bmslink.cli import _warn_exposed  # noqa: PLC0415
    from shared.config import load_config  # noqa: PLC0415
    from shared.controller_config import ControllerConfig  # noqa: PLC0415

    path = tmp_path / "controller.toml"
    path.write_text(CONTROLLER + '\n[metrics]\nenabled = true\nhost = "::"\n'
                    '\n[modbus_server]\nenabled = true\nhost = "::1"\n')
    config = load_config(path, ControllerConfig)
    with caplog.at_level(logging.WARNING, logger="bmslink"):
        _warn_exposed(config.listeners())
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "metrics listens on ::," in warned[0]
