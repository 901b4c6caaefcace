"""``python -m bmslink bridge`` as a process on a real Mosquitto: msgpack in from an agent and a controller
(played by real MQTT clients), JSON and Home Assistant discovery out, read back by a real subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bmslink.bridge.entities import BANK_ENTITIES, RACK_ENTITIES
from bmslink.processes import MosquittoBroker, ProcessGroup
from shared.codec import encode
from shared.topics import Topics
from tests.bridge.ha_schema import problems
from tests.bridge.helpers import SITE, Peer, consolidated, controller_status, reading, until, view

REPO = Path(__file__).resolve().parents[2]

BRIDGE_TOML = """\
site_id = "{site}"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{prefix}"
keepalive_s = 5

[publish]
rack_interval_ms = 200
rack_expiry_s = {rack_expiry_s}
bank_expiry_s = 3
stats_interval_s = 0.5

[discovery]
prefix = "{prefix}-ha"
expire_after_s = 20
"""


class FakeSite:
    """An agent per rack and an active controller, as real MQTT clients publishing real msgpack."""

    def __init__(self, peer: Peer, topics: Topics, racks: list[str]) -> None:
        self.peer, self.topics, self.racks = peer, topics, racks
        self.telemetry = True
        self.seq = 0

    def announce(self) -> None:
        for rack in self.racks:
            self.peer.publish(self.topics.rack_status(rack), b"online", retain=True)
        self.peer.publish(self.topics.controller_status("ctl-a"), encode(controller_status()), retain=True)

    async def run(self) -> None:
        while True:
            self.seq += 1
            if self.telemetry:
                for rack in self.racks:
                    payload = encode(reading(rack, self.seq))
                    self.peer.publish(self.topics.rack_telemetry(rack), payload, qos=0)
            if self.seq % 2 == 0:
                state = consolidated(*(view(r, reason=f"{r} ok") for r in self.racks))
                self.peer.publish(self.topics.cluster_state, encode(state), qos=0)
            await asyncio.sleep(0.15)


@contextlib.asynccontextmanager
async def running(site: FakeSite) -> AsyncIterator[None]:
    task = asyncio.create_task(site.run(), name="fake-site")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def start_bridge(procs: ProcessGroup, tmp_path: Path, broker: MosquittoBroker, prefix: str,
                 *, rack_expiry_s: int = 2) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(BRIDGE_TOML.format(site=SITE, port=broker.port, prefix=prefix,
                                         rack_expiry_s=rack_expiry_s))
    procs.start("bridge", [sys.executable, "-m", "bmslink", "bridge", "--config", str(config)], cwd=REPO)


VALUE_PATH = re.compile(r"value_json((?:\.[a-z_]+)+)")


def resolve(doc: dict[str, Any], template: str) -> None:
    """Every ``value_json.a.b`` a template reads exists in ``doc`` (HA would render nothing otherwise)."""
    for match in VALUE_PATH.finditer(template):
        node: Any = doc
        for key in match.group(1).strip(".").split("."):
            assert isinstance(node, dict) and key in node, f"{template!r}: {key!r} is not in {node!r}"
            node = node[key]


async def test_the_bridge_republishes_json_and_home_assistant_discovery(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup, tmp_path: Path,
) -> None:
    prefix, discovery = unique_topic_prefix, f"{unique_topic_prefix}-ha"
    topics = Topics(prefix, SITE)
    json_base = f"{prefix}/{SITE}/json"
    async with Peer(mqtt_broker.port, f"{prefix}-site") as site_peer, \
            Peer(mqtt_broker.port, f"{prefix}-ha", (f"{discovery}/#", f"{json_base}/#")) as ha:
        site = FakeSite(site_peer, topics, ["rack-01", "rack-02"])
        site.announce()
        start_bridge(procs, tmp_path, mqtt_broker, prefix)
        heard = ha.heard
        async with running(site):
            rack_state = await until(lambda: heard.json(f"{json_base}/rack/rack-01/state"), 20.0, "rack JSON")
            bank = await until(lambda: heard.json(f"{json_base}/bank/state"), 5.0, "bank JSON")
            assert rack_state["rack_id"] == "rack-01" and rack_state["soc_pct"] == 64.0
            assert rack_state["controller"]["reason"] == "rack-01 ok"
            assert rack_state["cell_voltage_min_location"] == "cell 9"
            assert bank["limits"]["charge_current_a"]["value"] == 200.0
            assert bank["eligible_racks"] == ["rack-01", "rack-02"]
            assert bank["controllers"] == {"ctl-a": {"online": True, "role": "active", "epoch": 3}}

            expected = len(RACK_ENTITIES) * 2 + len(BANK_ENTITIES)
            configs = await until(lambda: (found := heard.topics(lambda t: t.startswith(f"{discovery}/")
                                                                 and t.endswith("/config")))
                                  and len(found) == expected and found, 10.0, "every discovery config")
            unique_ids = set()
            for topic, payload in configs.items():
                component = topic.split("/")[1]
                config = json.loads(payload)
                assert problems(topic, component, config) == [], (topic, config)
                unique_ids.add(config["unique_id"])
                doc = bank if config["state_topic"].endswith("/bank/state") else rack_state
                resolve(doc, config["value_template"])
                resolve(doc, config.get("json_attributes_template", ""))
                assert config["availability"][0]["topic"] == f"{json_base}/bridge/status"
                assert config["expire_after"] == 20
            assert len(unique_ids) == expected
            retained = [m for m in heard.messages if m.topic.endswith("/config") and m.payload]
            assert retained and all(m.topic in configs for m in retained)

            # Availability: the bridge, the agent, the active controller.
            assert heard.last(f"{json_base}/bridge/status").payload == b"online"  # type: ignore[union-attr]
            await until(lambda: (m := heard.last(f"{json_base}/rack/rack-01/availability"))
                        and m.payload == b"online", 5.0, "rack online")
            await until(lambda: (m := heard.last(f"{json_base}/bank/availability"))
                        and m.payload == b"online", 5.0, "bank online")
            site_peer.publish(topics.rack_status("rack-01"), b"offline", retain=True)
            await until(lambda: (m := heard.last(f"{json_base}/rack/rack-01/availability"))
                        and m.payload == b"offline", 5.0, "rack-01 unavailable after its agent went offline")
            site_peer.publish(topics.controller_status("ctl-a"), b"offline", retain=True)
            await until(lambda: (m := heard.last(f"{json_base}/bank/availability"))
                        and m.payload == b"offline", 5.0, "bank unavailable without an active controller")

            # Garbage on the site's topics: counted, never a JSON state.
            for junk in (b"\xc1garbage", b"", b"{\"json\": true}", b"\x93\x01\x02\x03"):
                site_peer.publish(topics.rack_telemetry("rack-01"), junk, qos=0)
            site_peer.publish(topics.rack_telemetry("rack-01"), encode(reading("rack-01", 10**9,
                              timestamp_s=4_000_000_000.0)), qos=0)
            site_peer.publish(topics.rack_telemetry("rack-09"), encode(reading("rack-09", 1)), qos=0)
            site_peer.publish(topics.cluster_state, b"\xff\xfe", qos=0)
            stats = await until(lambda: (s := heard.json(f"{json_base}/bridge/stats"))
                                and s["counters"].get("rejected_malformed", 0) >= 4
                                and s["counters"].get("future_timestamp", 0) >= 1
                                and s["counters"].get("unknown_rack", 0) >= 1
                                and s["counters"].get("state_rejected_malformed", 0) >= 1 and s,
                                10.0, "the refusals counted on the stats topic")
            assert stats["counters"]["accepted"] > 0
            for m in heard.messages:
                if m.topic.startswith(f"{json_base}/rack/") and m.topic.endswith("/state") and m.payload:
                    doc = json.loads(m.payload)
                    assert doc["seq"] < 10**9 and doc["timestamp_s"] < 4_000_000_000.0

            # A dashboard that starts later gets the current state, retained.
            async with Peer(mqtt_broker.port, f"{prefix}-late", (f"{json_base}/rack/rack-02/state",)) as late:
                first = await until(lambda: late.heard.last(f"{json_base}/rack/rack-02/state"), 5.0,
                                    "the retained state")
                assert first.retain and json.loads(first.payload)["rack_id"] == "rack-02"

            # rack-02 leaves the roster: its entities, state and availability are removed.
            site.racks = ["rack-01"]
            rack02 = [t for t in configs if "rack_rack-02_" in t]
            await until(lambda: all((m := heard.last(t)) is not None and m.payload == b"" for t in rack02),
                        5.0, "rack-02's discovery configs removed")
            await until(lambda: (m := heard.last(f"{json_base}/rack/rack-02/state")) and m.payload == b"",
                        5.0, "rack-02's retained state cleared")
        assert procs.stop("bridge") == 0
        await until(lambda: (m := heard.last(f"{json_base}/bridge/status")) and m.payload == b"offline",
                    5.0, "the bridge says offline when stopped")
    assert "Traceback" not in procs.stderr("bridge")


async def test_a_killed_bridge_goes_unavailable_and_its_json_expires(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup, tmp_path: Path,
) -> None:
    prefix = unique_topic_prefix
    json_base = f"{prefix}/{SITE}/json"
    async with Peer(mqtt_broker.port, f"{prefix}-site") as site_peer, \
            Peer(mqtt_broker.port, f"{prefix}-ha", (f"{json_base}/bridge/status",)) as ha:
        site = FakeSite(site_peer, Topics(prefix, SITE), ["rack-01"])
        site.announce()
        start_bridge(procs, tmp_path, mqtt_broker, prefix, rack_expiry_s=1)
        async with running(site):
            await until(lambda: (m := ha.heard.last(f"{json_base}/bridge/status")) and m.payload == b"online",
                        20.0, "bridge online")
            async with Peer(mqtt_broker.port, f"{prefix}-a", (f"{json_base}/rack/rack-01/state",)) as early:
                await until(lambda: early.heard.last(f"{json_base}/rack/rack-01/state"), 10.0, "rack JSON")
            site.telemetry = False
            procs.send_signal("bridge", signal.SIGKILL)
            await until(lambda: (m := ha.heard.last(f"{json_base}/bridge/status"))
                        and m.payload == b"offline", 5.0, "the Last Will: every entity unavailable")
        await asyncio.sleep(2.2)  # past the rack state's 1 s Message Expiry
        async with Peer(mqtt_broker.port, f"{prefix}-b", (f"{json_base}/rack/rack-01/state",)) as late:
            await asyncio.sleep(0.5)
            assert late.heard.on(f"{json_base}/rack/rack-01/state") == [], "a stale JSON state was delivered"


@pytest.mark.parametrize(("toml", "complaint"), [
    ('site_id = "s"\n[mqtt]\nprotocol = "3.1.1"\n', "needs MQTT 5"),
    ('site_id = "s"\n[publish]\nrack_intervall_ms = 100\n', "publish.rack_intervall_ms: Extra inputs"),
    ('site_id = "s"\n[discovery]\nprefix = "a b"\n', "discovery.prefix"),
    ('site_id = "s"\n[checks]\nmax_clock_ahead_s = 0\n', "checks.max_clock_ahead_s"),
])
async def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path, toml: str, complaint: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(toml)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bmslink", "bridge", "--config", str(path), "--check-config", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert complaint in err.decode() and str(path) in err.decode()
    assert "Traceback" not in err.decode()
