"""The installed commands as an installer runs them: ``bmslink sim bms`` and ``bmslink agent`` as
separate processes, a real Mosquitto in between, and the Last Will when an agent dies."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from shared.models import RackCommState
from tests.agent.helpers import wait_until
from tests.agent.test_publishing import Listener
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.procs import ProcessGroup, bmslink_cli

AGENT_TOML = """\
site_id = "site-t"
rack_id = "{rack}"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "{prefix}"
keepalive_s = 2

[polling]
interval_ms = 200
request_timeout_ms = 100

[[links]]
type = "modbus_tcp"
name = "lan"
host = "127.0.0.1"
port = {bms}

[[units]]
name = "bms"
link = "lan"
profile = "{profile}"
"""


async def test_sim_and_agents_as_processes_publish_and_will_fires_on_kill(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    bms_port = free_port()
    procs.start("sim", bmslink_cli("sim", "bms", "--racks", "2", "--transport", "tcp", "--host", "127.0.0.1",
                                   "--port", str(bms_port), "--current", "25"))
    await asyncio.to_thread(procs.wait_for_output, "sim", "sim rack 1 ready", 15.0)
    for i, profile in enumerate(("sunspec", "acme_flat")):
        cfg = tmp_path / f"agent{i}.toml"
        cfg.write_text(AGENT_TOML.format(
            rack=f"rack-0{i + 1}", broker=mqtt_broker.port, prefix=unique_topic_prefix,
            bms=bms_port + i, profile=profile,
        ))
        procs.start(f"agent{i}", bmslink_cli("agent", "--config", str(cfg)))
    async with Listener(mqtt_broker, unique_topic_prefix) as listener:
        def racks_seen() -> set[str]:
            return {t.rack_id for _, t in listener.telemetry if t.comm_state is RackCommState.OK}

        await wait_until(lambda: racks_seen() == {"rack-01", "rack-02"}, 15.0, "both racks publishing")
        for _, t in listener.telemetry[-4:]:
            assert t.measurements is not None
            assert t.measurements.current_a > 0
        procs.send_signal("agent0", signal.SIGKILL)
        # The broker notices the dead socket at once and publishes the Last Will (retained "offline").
        await wait_until(lambda: any(s == "offline" for _, s, _ in listener.status), 5.0, "last will")
        procs.send_signal("agent1", signal.SIGTERM)
        assert await asyncio.to_thread(procs.wait, "agent1", 10.0) == 0
    assert "Traceback" not in procs.stderr("agent1")


TWO_UNIT_AGENT_TOML = """\
site_id = "site-t"
rack_id = "rack-01"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "{prefix}"
keepalive_s = 2

[polling]
interval_ms = 100
request_timeout_ms = 60

[[links]]
type = "modbus_tcp"
name = "rack0"
host = "127.0.0.1"
port = {bms0}

[[links]]
type = "modbus_tcp"
name = "rack1"
host = "127.0.0.1"
port = {bms1}

[[units]]
name = "sunspec-bms"
link = "rack0"
profile = "sunspec"

[[units]]
name = "flat-bms"
link = "rack1"
profile = "acme_flat"
"""


async def test_agent_process_stays_up_and_publishes_when_a_device_has_no_model_803(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    # Two racks whose SunSpec map ends after 802 (their flat maps are fine): the SunSpec unit is
    # refused, the flat one is read, and the agent process keeps running and publishing.
    bms_port = free_port()
    procs.start("sim", bmslink_cli("sim", "bms", "--racks", "2", "--transport", "tcp", "--host", "127.0.0.1",
                                   "--port", str(bms_port), "--sunspec-layout", "no_803"))
    await asyncio.to_thread(procs.wait_for_output, "sim", "sim rack 1 ready", 15.0)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(TWO_UNIT_AGENT_TOML.format(
        broker=mqtt_broker.port, prefix=unique_topic_prefix, bms0=bms_port, bms1=bms_port + 1))
    async with Listener(mqtt_broker, unique_topic_prefix) as listener:
        procs.start("agent", bmslink_cli("agent", "--config", str(cfg)))

        def unit_status() -> dict[str, str]:
            if not listener.telemetry:
                return {}
            return {u.unit: u.status.value for u in listener.telemetry[-1][1].units}

        await wait_until(
            lambda: unit_status() == {"sunspec-bms": "invalid_data", "flat-bms": "ok"}, 15.0,
            "the SunSpec unit refused and the flat unit read",
        )
        published = len(listener.telemetry)
        await asyncio.sleep(3.0)  # well past comm_lost_after and several discovery retries
        assert procs.get("agent").poll() is None, procs.stderr("agent")
        assert len(listener.telemetry) >= published + 15
        latest = listener.telemetry[-1][1]
        units = {u.unit: u for u in latest.units}
        assert units["sunspec-bms"].status.value == "invalid_data"
        assert units["sunspec-bms"].counters.invalid_data >= 20
        assert units["flat-bms"].status.value == "ok"
        assert latest.measurements is not None
        assert latest.comm_state is RackCommState.COMM_LOST  # one string unread: no current granted
        assert "online" in [s for _, s, _ in listener.status]
        assert "offline" not in [s for _, s, _ in listener.status]
    stderr = procs.stderr("agent")
    assert "model 803 instance 0 not on the device" in stderr
    assert "Traceback" not in stderr
    # ~40 refused polls and a dozen discoveries: a few lines, not one per poll.
    assert stderr.count("Invalid Data") <= 6, stderr
    procs.send_signal("agent", signal.SIGTERM)
    assert await asyncio.to_thread(procs.wait, "agent", 10.0) == 0
