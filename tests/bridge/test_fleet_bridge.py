"""The shipped Mosquitto bridge (deploy/mosquitto/bridge-to-central.conf.example) between two real brokers:
a site's broker loads the example (its placeholders filled with this test's site and the central broker's
127.0.0.1 port, its TLS lines left out: the test brokers speak plaintext on loopback) and forwards to a
central one. Monitoring crosses under ``fleet/``; commands and replies never leave the site, and nothing
published centrally reaches the site."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.codec import encode
from shared.mqtt import Message
from shared.topics import Topics
from tests.bridge.helpers import Peer, consolidated, controller_status, reading, until, view
from tests.conftest import BrokerFactory

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy/mosquitto/bridge-to-central.conf.example"
SITE = "site-c"
TLS_OPTIONS = ("bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_insecure", "bridge_tls_version")


def site_bridge_config(central_port: int) -> list[str]:
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if not line.startswith(TLS_OPTIONS):
            line_here = line.replace("SITE_ID", SITE)
            lines.append(line_here.replace("CENTRAL_HOST:8883", f"127.0.0.1:{central_port}"))
    return lines


FORWARDED_PATTERNS = {"SITE_ID/rack/+/telemetry", "SITE_ID/rack/+/status", "SITE_ID/cluster/state",
                      "SITE_ID/controller/#", "SITE_ID/json/#"}


def test_the_example_forwards_out_only_and_never_commands() -> None:
    topic_lines = [line.split() for line in EXAMPLE.read_text().splitlines() if line.startswith("topic ")]
    assert {pattern for _, pattern, *_ in topic_lines} == FORWARDED_PATTERNS
    for _, pattern, direction, _qos, local, remote in topic_lines:
        assert direction == "out", pattern
        assert (local, remote) == ("bmslink/", "fleet/bmslink/")


def central(topic: str) -> str:
    return f"fleet/{topic}"


def seen(messages: list[Message], topic: str) -> list[bytes]:
    return [m.payload for m in messages if m.topic == topic]


async def test_a_site_forwards_monitoring_to_the_central_broker_and_keeps_its_commands(
    broker_factory: BrokerFactory,
) -> None:
    hub = broker_factory()
    site_broker = broker_factory(extra_config=site_bridge_config(hub.port))
    t = Topics("bmslink", SITE)
    async with Peer(hub.port, "central-ops", ("fleet/#", "bmslink/#")) as ops, \
            Peer(site_broker.port, "site-local", ("bmslink/#",)) as local:
        await until(lambda: seen(ops.heard.messages, f"fleet/bridges/{SITE}/state") == [b"1"], 15.0,
                    "the bridge's connection notice on the central broker")
        status = encode(controller_status("ctl-a", site_id=SITE))
        state = encode(consolidated(view("rack-01"), site_id=SITE))
        forwarded = {
            t.rack_telemetry("rack-01"): encode(reading("rack-01", 1, site_id=SITE)),
            t.rack_status("rack-01"): b"online",
            t.cluster_state: state,
            t.controller_status("ctl-a"): status,
            t.leader: b"leader record",
            f"bmslink/{SITE}/json/rack/rack-01/state": b'{"rack_id": "rack-01"}',
        }
        kept = {t.command_request: b"signed command", t.command_reply("c0ffee"): b"reply"}
        for topic, payload in kept.items():
            local.publish(topic, payload)
        for topic, payload in forwarded.items():
            local.publish(topic, payload, retain=topic.endswith("/status"))
        for topic, payload in forwarded.items():
            await until(lambda: seen(ops.heard.messages, central(topic)) == [payload],  # noqa: B023 (awaited here)
                        5.0, f"{topic} under fleet/ centrally")
        await asyncio.sleep(0.5)  # the commands went first: had they crossed, they would be here by now
        crossed = [m.topic for m in ops.heard.messages if "/cmd/" in m.topic or "/reply/" in m.topic]
        assert crossed == []
        assert not any(m.topic.startswith("bmslink/") for m in ops.heard.messages)

        # Nothing goes the other way: neither a command nor anything else published centrally.
        for topic in (central(t.command_request), t.command_request, central(t.rack_telemetry("rack-01")),
                      central(t.cluster_state)):
            ops.publish(topic, b"from the centre")
        marker = f"bmslink/{SITE}/json/marker"
        local.publish(marker, b"after")
        await until(lambda: seen(ops.heard.messages, central(marker)) == [b"after"], 5.0, "the marker")
        await asyncio.sleep(0.5)
        assert b"from the centre" not in [m.payload for m in local.heard.messages]


async def test_a_retained_json_state_expires_centrally_too(broker_factory: BrokerFactory) -> None:
    hub = broker_factory()
    site_broker = broker_factory(extra_config=site_bridge_config(hub.port))
    topic = f"bmslink/{SITE}/json/bank/state"
    async with Peer(hub.port, "central-watch", (f"fleet/bridges/{SITE}/state",)) as watch, \
            Peer(site_broker.port, "site-bridge", ()) as local:
        await until(lambda: seen(watch.heard.messages, f"fleet/bridges/{SITE}/state") == [b"1"], 15.0,
                    "bridge connected")
        assert local.session.publish(topic, b'{"soc_pct": 50}', retain=True, expiry_s=1)
        async with Peer(hub.port, "central-early", (central(topic),)) as early:
            await until(lambda: seen(early.heard.messages, central(topic)), 5.0, "the state centrally")
        await asyncio.sleep(2.0)
        async with Peer(hub.port, "central-late", (central(topic),)) as late:
            await asyncio.sleep(0.5)
            assert seen(late.heard.messages, central(topic)) == [], "the central broker kept a stale state"
