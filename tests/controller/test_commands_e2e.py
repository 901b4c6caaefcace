"""Operator commands through the process boundary: ``bmslink cmd`` (a separate process) against a
running controller on a real broker, judged by the reply, the exit status and what the inverter bus
carries."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import can
import pytest

from controller.frames import FrameDecoder
from shared.codec import encode
from shared.commands import new_key
from shared.config import validate_config
from shared.controller_config import ControllerConfig, Dialect
from shared.models import ProtectionFlags
from tests.agent.helpers import scrape_metrics, wait_until
from tests.contract.samples import measurements, telemetry
from tests.controller.test_service import Rig, _feed, running_service
from tests.fixtures.broker import MosquittoBroker, free_port

KEY_ID = "alice"


def write_keys(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(f'[keys]\n{KEY_ID} = "{key}"\n')
    path.chmod(mode)
    return path


def config_maker(keys: Path, state: Path) -> Callable[[MosquittoBroker, str, str], ControllerConfig]:
    def make_config(broker: MosquittoBroker, prefix: str, channel: str) -> ControllerConfig:
        return validate_config({
            "site_id": "site-a", "node_id": "n1",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
            "roster": [{"rack_id": rack_id, "capacity_ah": 280} for rack_id in ("rack-01", "rack-02")],
            "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000},
            "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
            "commands": {"keys_file": str(keys)},
            "state_dir": str(state),
            "metrics": {"enabled": True, "port": free_port()},
        }, ControllerConfig, "<test>")

    return make_config


@pytest.fixture
async def commanded(mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
                    tmp_path: Path) -> AsyncIterator[tuple[Rig, Path]]:
    keys = write_keys(tmp_path / "controller-keys.toml", new_key())
    state = tmp_path / "state"
    state.mkdir()
    async with running_service(mqtt_broker, unique_topic_prefix, config_maker(keys, state)) as rig:
        yield rig, keys


async def bmslink_cmd(broker_port: int, prefix: str, *args: str, timeout: float = 5.0,
                      action: str = "clear") -> tuple[int, str, str]:
    """``bmslink cmd clear ...`` (or another ``action``) as an operator runs it: (exit status, stdout,
    stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bmslink", "cmd", action, "--host", "127.0.0.1", "--port", str(broker_port),
        "--prefix", prefix, "--timeout", str(timeout), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout + 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _raise_alarm(rig: Rig, seq: int) -> None:
    _svc, bus, pub, topics = rig
    hot = telemetry(rack_id="rack-01", seq=seq, timestamp_s=1_790_000_000.0 + seq,
                    measurements=measurements(alarms=ProtectionFlags(charge_over_temperature=True)))
    pub.publish(topics.rack_telemetry("rack-01"), encode(hot))
    await wait_until(lambda: bus.ccl() == 0.0, 2.0, "CCL 0 on the alarm")


async def test_a_signed_clear_from_the_cli_releases_only_a_cleared_latch(commanded: Any) -> None:
    rig, keys = commanded
    svc, bus, pub, topics = rig
    seq = await _feed(pub, topics, 100.0, 1.0)
    await _raise_alarm(rig, seq)
    operator = ["--site", "site-a", "--key-file", str(keys), "--key-id", KEY_ID, "--json"]

    # While the condition is present, the clear is accepted and the latch stays, with why.
    code, out, err = await bmslink_cmd(svc.config.mqtt.port, topics.prefix, *operator, "--rack", "rack-01")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["accepted"] and reply["released"] == []
    assert reply["held"] == [{"rack_id": "rack-01", "flag": "charge_over_temperature",
                              "why": "the condition is still present"}], reply
    await asyncio.sleep(0.5)
    assert bus.ccl() == 0.0

    # The condition clears in the telemetry: still latched, until the next accepted clear.
    seq = await _feed(pub, topics, 100.0, 1.0, start_seq=seq + 1)
    assert bus.ccl() == 0.0
    code, out, err = await bmslink_cmd(svc.config.mqtt.port, topics.prefix, *operator, "--all")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["released"] == [{"rack_id": "rack-01", "flag": "charge_over_temperature", "why": ""}]
    assert reply["held"] == []
    assert reply["round_trip_s"] < 5
    await _feed(pub, topics, 100.0, 0.6, start_seq=seq + 1)
    await wait_until(lambda: bus.ccl() == pytest.approx(200.0), 2.0, "current back after the clear")
    assert svc.commands.counters["accepted"] == 2


async def test_refused_commands_exit_non_zero_and_release_nothing(commanded: Any, tmp_path: Path) -> None:
    rig, keys = commanded
    svc, bus, pub, topics = rig
    seq = await _feed(pub, topics, 100.0, 1.0)
    await _raise_alarm(rig, seq)
    await _feed(pub, topics, 100.0, 1.0, start_seq=seq + 1)  # the condition clears; the latch holds
    port = svc.config.mqtt.port
    forged = write_keys(tmp_path / "forged.toml", new_key())
    code, out, _ = await bmslink_cmd(port, topics.prefix, "--site", "site-a", "--key-file", str(forged),
                                     "--key-id", KEY_ID, "--all")
    assert code == 1 and "REFUSED" in out and "bad_signature" in out
    code, out, _ = await bmslink_cmd(port, topics.prefix, "--site", "site-a", "--key-file", str(keys),
                                     "--key-id", KEY_ID, "--rack", "rack-09")
    assert code == 1 and "unknown_rack" in out
    assert bus.ccl() == 0.0
    text = await scrape_metrics(svc.config.metrics.port)
    assert 'bmslink_controller_commands_total{outcome="refused_bad_signature"} 1.0' in text
    assert 'bmslink_controller_commands_total{outcome="refused_unknown_rack"} 1.0' in text
    assert 'bmslink_controller_journal_entries_total{outcome="recorded"}' in text
    assert svc.state is not None and svc.state.cluster.latched_alarm


async def test_the_cli_says_why_when_nobody_answers_or_its_input_is_wrong(commanded: Any,
                                                                         tmp_path: Path) -> None:
    rig, keys = commanded
    svc, _bus, _pub, topics = rig
    port = svc.config.mqtt.port
    operator = ["--key-file", str(keys), "--key-id", KEY_ID, "--all"]
    code, _, err = await bmslink_cmd(port, topics.prefix, "--site", "site-b", *operator, timeout=1.5)
    assert code == 1 and "no reply within 1.5 s" in err
    code, _, err = await bmslink_cmd(free_port(), topics.prefix, "--site", "site-a", *operator, timeout=1.0)
    assert code == 1 and "cannot connect to the broker" in err
    exposed = write_keys(tmp_path / "exposed.toml", new_key(), mode=0o644)
    code, _, err = await bmslink_cmd(port, topics.prefix, "--site", "site-a", "--key-file", str(exposed),
                                     "--key-id", KEY_ID, "--all")
    assert code == 2 and "chmod 600" in err
    code, _, err = await bmslink_cmd(port, topics.prefix, "--site", "site-a", "--key-file", str(keys),
                                     "--key-id", "bob", "--all")
    assert code == 2 and "no key 'bob'" in err
    code, _, err = await bmslink_cmd(port, topics.prefix, "--site", "site-a", "--key-file", str(keys),
                                     "--key-id", KEY_ID)
    assert code == 2 and "--all" in err
    assert "Traceback" not in err


async def test_a_latch_outlives_a_restart_and_only_a_clear_releases_it(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    keys = write_keys(tmp_path / "keys.toml", new_key())
    state = tmp_path / "state"
    state.mkdir()
    make_config = config_maker(keys, state)
    async with running_service(mqtt_broker, unique_topic_prefix, make_config) as rig:
        _svc, bus, pub, topics = rig
        seq = await _feed(pub, topics, 100.0, 1.0)
        await _raise_alarm(rig, seq)
        seq = await _feed(pub, topics, 100.0, 0.5, start_seq=seq + 1)  # the condition clears
        assert bus.ccl() == 0.0
    assert "rack rack-01 latch: charge_over_temperature latched" in caplog.text

    # Restarted on clean telemetry: the latch is back from the state database, CCL stays 0.
    async with running_service(mqtt_broker, unique_topic_prefix, make_config) as rig:
        svc, bus, pub, topics = rig
        seq = await _feed(pub, topics, 100.0, 1.5, start_seq=seq + 1)
        assert bus.limits and bus.ccl() == 0.0
        assert max(limits["ChargeCurrentLimit"] for _, limits in bus.limits) == 0.0  # never a moment above
        assert svc.state is not None and svc.state.cluster.latched_alarm
        assert "latched alarms restored" in caplog.text
        code, out, err = await bmslink_cmd(svc.config.mqtt.port, topics.prefix, "--site", "site-a",
                                           "--key-file", str(keys), "--key-id", KEY_ID, "--all", "--json")
        assert code == 0, err
        assert json.loads(out)["released"] == [{"rack_id": "rack-01", "flag": "charge_over_temperature",
                                                "why": ""}]
        seq = await _feed(pub, topics, 100.0, 0.6, start_seq=seq + 1)
        await wait_until(lambda: bus.ccl() == pytest.approx(200.0), 2.0, "current back after the clear")

    # Released for good: a third start holds nothing.
    async with running_service(mqtt_broker, unique_topic_prefix, make_config) as rig:
        svc, bus, pub, topics = rig
        await _feed(pub, topics, 100.0, 1.0, start_seq=seq + 1)
        await wait_until(lambda: bus.ccl() == pytest.approx(200.0), 2.0, "no latch after the release")


async def test_a_lost_state_database_is_said_and_keeps_what_the_racks_show(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    keys = write_keys(tmp_path / "keys.toml", new_key())
    state = tmp_path / "state"
    state.mkdir()
    (state / "controller-n1.sqlite3").write_bytes(b"garbage" * 1000)
    async with running_service(mqtt_broker, unique_topic_prefix, config_maker(keys, state)) as rig:
        svc, bus, pub, topics = rig
        assert svc.state_db.lost
        assert "was unreadable" in caplog.text and "latched alarms held before are not known" in caplog.text
        seq = await _feed(pub, topics, 100.0, 1.0)
        await _raise_alarm(rig, seq)  # what a rack shows still latches
        await _feed(pub, topics, 100.0, 0.5, start_seq=seq + 1)
        assert bus.ccl() == 0.0
    assert [p.name for p in state.iterdir() if ".corrupt-" in p.name]


class RequestFlags:
    """The 0x35C force-charge request bit on the inverter bus, with arrival times."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.decoder = FrameDecoder(Dialect.PYLON)
        self.seen: list[tuple[float, int]] = []
        self.notifier = can.Notifier(self.bus, [self._rx], loop=asyncio.get_running_loop())

    def _rx(self, msg: can.Message) -> None:
        if msg.arbitration_id == 0x35C:
            bit = int(self.decoder.decode(0x35C, msg.data)["ForceChargeRequestI"])
            self.seen.append((time.monotonic(), bit))

    def last(self) -> int:
        return self.seen[-1][1] if self.seen else -1

    def close(self) -> None:
        self.notifier.stop()
        self.bus.shutdown()


async def test_a_force_charge_request_stands_for_its_duration_and_never_with_charging_stopped(
    commanded: Any,
) -> None:
    rig, keys = commanded
    svc, bus, pub, topics = rig
    flags = RequestFlags(svc.config.can.channel)
    operator = ["--site", "site-a", "--key-file", str(keys), "--key-id", KEY_ID, "--duration", "2"]
    try:
        seq = await _feed(pub, topics, 100.0, 1.0)
        assert flags.last() == 0
        code, out, err = await bmslink_cmd(svc.config.mqtt.port, topics.prefix, *operator,
                                           action="force-charge")
        assert code == 0 and "force-charge request set for 2 s" in out, err
        await wait_until(lambda: flags.last() == 1, 2.0, "the request flag on the bus")
        assert bus.ccl() == pytest.approx(200.0)  # the limits are what the racks allow, unchanged
        set_at = next(t for t, bit in flags.seen if bit == 1)
        seq = await _feed(pub, topics, 100.0, 2.0, start_seq=seq)
        await wait_until(lambda: flags.last() == 0, 2.0, "the request expired by itself")
        cleared_at = next(t for t, bit in flags.seen if t > set_at and bit == 0)
        assert 1.5 < cleared_at - set_at < 3.0

        # With charging stopped (a latched charge-side alarm: CCL 0), a request is accepted but never
        # asks the inverter to charge.
        await _raise_alarm(rig, seq)
        code, out, err = await bmslink_cmd(svc.config.mqtt.port, topics.prefix, *operator,
                                           action="force-charge")
        assert code == 0, err
        n = len(flags.seen)
        await _feed(pub, topics, 100.0, 1.0, start_seq=seq + 1)
        assert flags.seen[n:] and all(bit == 0 for _, bit in flags.seen[n:])
        assert bus.ccl() == 0.0
    finally:
        flags.close()
