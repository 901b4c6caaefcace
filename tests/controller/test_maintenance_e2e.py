"""Maintenance mode through the process boundary: ``bmslink cmd maintenance on|off`` (a separate process)
against a running controller on a real broker, judged by the reply, the exit status, the metrics, the
journal and what the inverter bus carries — across a restart of the controller too."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from controller.journal import read_events
from shared.codec import encode
from shared.commands import new_key
from shared.models import ContactorState, ProtectionFlags
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import scrape_metrics, wait_until
from tests.contract.samples import measurements, telemetry
from tests.controller.test_commands_e2e import KEY_ID, bmslink_cmd, config_maker, write_keys
from tests.controller.test_service import running_service
from tests.fixtures.broker import MosquittoBroker


async def _feed(pub: MqttSession, topics: Topics, seconds: float, start_seq: int, *,
                rack_02_open: bool = False, rack_02_alarm: bool = False) -> int:
    """Both racks at 100 A; rack-02 with its contactor open and/or an alarm when asked."""
    seq = start_seq
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for rack in ("rack-01", "rack-02"):
            mine = rack == "rack-02"
            m = measurements(
                charge_current_limit_a=100.0,
                contactor=ContactorState.OPEN if mine and rack_02_open else ContactorState.CLOSED,
                alarms=ProtectionFlags(internal_fault=mine and rack_02_alarm),
            )
            payload = telemetry(rack_id=rack, seq=seq, timestamp_s=1_790_000_000.0 + seq, measurements=m)
            pub.publish(topics.rack_telemetry(rack), encode(payload))
        seq += 1
        await asyncio.sleep(0.1)
    return seq


async def test_maintenance_takes_a_rack_out_of_the_bank_and_survives_a_restart(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tmp_path: Path,
) -> None:
    keys = write_keys(tmp_path / "keys.toml", new_key())
    state = tmp_path / "state"
    state.mkdir()
    make_config = config_maker(keys, state)
    operator = ["--site", "site-a", "--key-file", str(keys), "--key-id", KEY_ID, "--json"]

    async def maintenance(port: int, prefix: str, *args: str) -> tuple[int, str, str]:
        return await bmslink_cmd(port, prefix, *operator, *args, action="maintenance")

    async with running_service(mqtt_broker, unique_topic_prefix, make_config) as rig:
        svc, bus, pub, topics = rig
        port = svc.config.mqtt.port
        seq = await _feed(pub, topics, 1.0, 1)
        await wait_until(lambda: bus.ccl() == pytest.approx(200.0), 2.0, "both racks admitted")

        code, out, err = await maintenance(port, topics.prefix, "on", "rack-02")
        assert code == 0, err
        reply = json.loads(out)
        assert reply["accepted"] and reply["maintenance"] == ["rack-02"], reply
        assert "rack-02 put in maintenance" in reply["reason"]
        # Its contactor still closed: it adds nothing, and the bank drops to one rack's share at once.
        await wait_until(lambda: bus.ccl() == pytest.approx(100.0), 1.0, "rack-02 out of the capacity")
        assert svc.state is not None and [v.maintenance for v in svc.state.racks] == [False, True]
        text = await scrape_metrics(svc.config.metrics.port)
        assert 'bmslink_controller_rack_maintenance{rack="rack-02"} 1.0' in text

        # The technician opens its contactor and works on it: its alarms are not the bank's.
        seq = await _feed(pub, topics, 1.0, seq, rack_02_open=True, rack_02_alarm=True)
        assert bus.ccl() == pytest.approx(100.0)
        assert bus.limits[-1][1]["DischargeCurrentLimit"] == pytest.approx(200.0)  # rack-01 alone
        assert svc.state is not None and not svc.state.cluster.latched_alarm

        # The operator mistypes: refused or rejected, nothing changes.
        code, out, _ = await maintenance(port, topics.prefix, "on", "rack-09")
        assert code == 1 and "unknown_rack" in out
        code, _, err = await maintenance(port, topics.prefix, "maybe", "rack-01")
        assert code == 2 and "invalid choice" in err
        code, _, err = await maintenance(port, topics.prefix, "on")
        assert code == 2 and "RACK" in err
        seq = await _feed(pub, topics, 0.3, seq)

    # Restarted: rack-02 is still in maintenance, the bank never above one rack's 100 A.
    async with running_service(mqtt_broker, unique_topic_prefix, make_config) as rig:
        svc, bus, pub, topics = rig
        assert svc.maintenance == frozenset({"rack-02"})
        seq = await _feed(pub, topics, 1.5, seq)
        assert bus.limits and max(limits["ChargeCurrentLimit"] for _, limits in bus.limits) <= 100.0
        assert bus.ccl() == pytest.approx(100.0)

        code, out, err = await maintenance(svc.config.mqtt.port, topics.prefix, "off", "rack-02")
        assert code == 0, err
        reply = json.loads(out)
        assert reply["maintenance"] == [] and reply["maintenance_ended"] == ["rack-02"], reply
        await _feed(pub, topics, 0.6, seq)
        await wait_until(lambda: bus.ccl() == pytest.approx(200.0), 2.0, "rack-02 back in the bank")

    journal = read_events(state / "controller-n1.sqlite3")
    events = [(kind, rack, text) for _, _, _, kind, rack, text in journal]
    assert [(k, r) for k, r, _ in events if k == "maintenance"] == [("maintenance", "rack-02")] * 2
    assert any(k == "command" and "put in maintenance" in t for k, _, t in events)
