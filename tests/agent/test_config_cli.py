"""Config is validated once at the edge.

A bad file exits 2 naming the file, the key path and the expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bmslink.cli import main

GOOD = """\
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


def _run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code = main(["agent", "--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_config_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(tmp_path, GOOD, capsys)
    assert code == 0
    assert "ok" in out and "rack-01" in out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace('port = 1502', 'port = 70000'), "links[0].modbus_tcp.port"),
        (lambda t: t.replace('type = "modbus_tcp"', 'type = "modbus_udp"'), "links[0]"),
        (lambda t: t + '\n[polling]\ninterval_ms = 50\n', "polling.interval_ms"),
        (lambda t: t + '\n[polling]\ninterval_ms = 2000\n', "polling.interval_ms"),
        (lambda t: t.replace('link = "lan"', 'link = "wan"'), "names link 'wan'"),
        (lambda t: t.replace('rack_id = "rack-01"', 'rack_id = "rack 01"'), "rack_id"),
        (lambda t: t + '\n[mqtt]\nhostname = "x"\n', "mqtt.hostname"),
        (lambda t: t.replace('profile = "acme_flat"', 'profile = "nosuch"'), "units.bms.profile"),
        (lambda t: t + '\n[polling]\nrequest_timeout_ms = 600\n', "request_timeout_ms"),
        (lambda t: t.replace("site_id", "# site_id"), "site_id"),
        (lambda t: t.replace('[[units]]', '[[unit]]'), "unit"),
        (lambda t: "this is = not toml ]", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_with_file_key_and_expectation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[str], str], expected: str
) -> None:
    code, _, err = _run(tmp_path, edit(GOOD), capsys)
    assert code == 2
    assert str(tmp_path / "agent.toml") in err
    assert expected in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["agent", "--config", str(tmp_path / "nope.toml"), "--check-config"])
    assert code == 2
    assert "file not found" in capsys.readouterr().err


def test_can_link_serves_exactly_one_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD + '\n[[links]]\ntype = "can"\nname = "bmscan"\ninterface = "virtual"\nchannel = "x"\n' \
        '\n[[units]]\nname = "c1"\nlink = "bmscan"\n\n[[units]]\nname = "c2"\nlink = "bmscan"\n'
    code, _, err = _run(tmp_path, text, capsys)
    assert code == 2
    assert "one unit" in err
