"""docs/profiles.md shows only what the real loader accepts and commands the real CLI parses.

Every ```toml block is loaded: a whole profile (``kind``) or a variant (``extends``) as a file of its
own through ``rack_agent.profiles.load_profile``; an agent-config fragment (``[[links]]``,
``[[units]]``, ``[plausibility]``) into an agent config validated as the agent validates it; any
other fragment laid over the worked example and loaded. Every ``bmslink probe`` command, in a ```sh
block or inline, is parsed by the ``bmslink`` argument parser; every key of the reference table is a
field of the profile models.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bmslink.cli import build_parser
from rack_agent.profiles import FlatProfile, flat_plan, load_profile
from rack_agent.profiles import spec as profile_spec
from shared.agent_config import AgentConfig
from shared.config import validate_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "profiles.md"
AGENT_KEYS = frozenset({"links", "units", "polling", "plausibility", "mqtt", "publish", "metrics"})
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(DOC.read_text()) if lang == language]


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _toml_blocks() -> list[dict[str, Any]]:
    return [tomllib.loads(body) for body in _blocks("toml")]


def _worked_example() -> dict[str, Any]:
    """The first whole flat profile of the page: the Seplos walk-through."""
    return next(b for b in _toml_blocks() if b.get("kind") == "flat")


def _write(tmp_path: Path, name: str, data_text: str) -> Path:
    path = tmp_path / name
    path.write_text(data_text)
    return path


def test_the_page_has_the_examples_this_test_relies_on() -> None:
    blocks = _toml_blocks()
    profiles = [b for b in blocks if "kind" in b or "extends" in b]
    agent = [b for b in blocks if AGENT_KEYS & set(b)]
    fragments = [b for b in blocks if b not in profiles and b not in agent]
    assert len(profiles) >= 3 and len(agent) >= 2 and len(fragments) >= 3


def test_whole_profiles_and_variants_load(tmp_path: Path) -> None:
    loaded = 0
    for i, body in enumerate(_blocks("toml")):
        data = tomllib.loads(body)
        if "kind" in data or "extends" in data:
            load_profile(str(_write(tmp_path, f"example{i}.toml", body)))
            loaded += 1
    assert loaded >= 3


def test_fragments_load_over_the_worked_example(tmp_path: Path) -> None:
    base = _worked_example()
    checked = 0
    for i, data in enumerate(_toml_blocks()):
        if "kind" in data or "extends" in data or AGENT_KEYS & set(data):
            continue
        merged = _merged(base, data)
        text = _toml_text(merged)
        profile = load_profile(str(_write(tmp_path, f"fragment{i}.toml", text)))
        assert isinstance(profile, FlatProfile)
        checked += 1
    assert checked >= 3


def _toml_text(data: dict[str, Any]) -> str:
    """A profile dict back as TOML (two levels deep, inline tables for points): enough for profiles."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {_value(value)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def test_agent_config_fragments_validate() -> None:
    checked = 0
    for data in _toml_blocks():
        if not AGENT_KEYS & set(data):
            continue
        config: dict[str, Any] = {
            "site_id": "site-doc",
            "rack_id": "rack-01",
            "links": [{"type": "modbus_tcp", "name": "rs485", "host": "127.0.0.1"}],
            "units": [{"name": "pack-1", "link": "rs485"}],
        }
        validate_config(_merged(config, data), AgentConfig, "docs/profiles.md")
        checked += 1
    assert checked >= 2


def test_worked_example_matches_what_the_page_says_of_it(tmp_path: Path) -> None:
    profile = load_profile(str(_write(tmp_path, "seplos_v3_site.toml", _toml_text(_worked_example()))))
    assert isinstance(profile, FlatProfile)
    # "this file costs three requests per poll"
    assert len(flat_plan(profile).blocks) == 3
    assert "costs three requests per poll" in DOC.read_text()
    # "0x0B80 = 2944 -> 294.4 - 273.1 = 21.3 °C", through the file's own scale and offset.
    temperature = profile.points["temperature_max_c"]
    assert isinstance(temperature, profile_spec.FlatNumeric)
    assert 0x0B80 * temperature.scale + temperature.offset == pytest.approx(21.3)


def _probe_commands() -> list[list[str]]:
    commands: list[list[str]] = []
    for body in _blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip().startswith("bmslink probe"):
                commands.append(shlex.split(line.split("#")[0]))
    for inline in re.findall(r"`(bmslink probe [^`]+)`", DOC.read_text()):
        commands.append(shlex.split(inline))
    return commands


def test_probe_commands_parse() -> None:
    commands = _probe_commands()
    assert len(commands) >= 4
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv[1:])  # exits (failing the test) on an option it does not know
        assert args.command == "probe"


def test_reference_table_keys_are_fields_of_the_profile_models() -> None:
    text = DOC.read_text()
    section = text[text.index("## 5. Reference"):text.index("## 6. Traps")]
    fields: set[str] = {"kind"}
    for model in (profile_spec.FlatProfile, profile_spec.FlatNumeric, profile_spec.FlatReduce,
                  profile_spec.FlatBit, profile_spec.FlatContactor, profile_spec.FlatLocation,
                  profile_spec.Constant, profile_spec.ProfileHeader):
        fields |= set(model.model_fields)
    fields.add("extends")  # resolved by the loader before validation (rack_agent/profiles/__init__.py)
    shown = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            shown |= {k for k in re.findall(r"`([a-z_]+)`", first_cell) if k != "profile"}
    assert len(shown) >= 15
    assert shown <= fields, shown - fields
