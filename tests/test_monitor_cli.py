"""``bmslink monitor`` as a process on a real broker carrying two sites: JSON output, several sites (named
or by wildcard), and a terminal view that stays readable when stdout is not a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bmslink.processes import MosquittoBroker, free_port
from shared.codec import encode
from shared.topics import Topics
from tests.bridge.helpers import Peer, consolidated, controller_status, reading, view

REPO = Path(__file__).resolve().parents[1]
LONG_REASON = "CCL 120 A = rack-02 (cell 3.43 V taper) × 2 eligible; " + "derated because " * 20 + "THE-END"


@contextlib.asynccontextmanager
async def two_sites(broker: MosquittoBroker, prefix: str) -> AsyncIterator[None]:
    """site-a (racks 01, 02) and site-b (rack 01) publishing as agents and an active controller would."""
    racks = {"site-a": ["rack-01", "rack-02"], "site-b": ["rack-01"]}
    async with Peer(broker.port, f"{prefix}-sites") as peer:
        for site, ids in racks.items():
            t = Topics(prefix, site)
            for rack in ids:
                peer.publish(t.rack_status(rack), b"online", retain=True)
            peer.publish(t.controller_status("ctl-a"), encode(controller_status(site_id=site)), retain=True)

        async def publish() -> None:
            seq = 0
            while True:
                seq += 1
                for site, ids in racks.items():
                    t = Topics(prefix, site)
                    for rack in ids:
                        peer.publish(t.rack_telemetry(rack), encode(reading(rack, seq, site_id=site,
                                                                            soc_pct=50.0 + len(site))), qos=0)
                    state = consolidated(*(view(r) for r in ids), site_id=site, ccl_reason=LONG_REASON)
                    peer.publish(t.cluster_state, encode(state), qos=0)
                await asyncio.sleep(0.2)

        task = asyncio.create_task(publish(), name="two-sites")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def monitor(broker: MosquittoBroker, prefix: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bmslink", "monitor", "--port", str(broker.port), "--prefix", prefix, *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30.0)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def site(snapshot: dict[str, Any], site_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in snapshot["sites"] if s["site_id"] == site_id]
    assert len(found) == 1, snapshot["sites"]
    return found[0]


async def test_json_once_gives_one_object_per_broker_with_a_section_per_site(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
) -> None:
    prefix = unique_topic_prefix
    async with two_sites(mqtt_broker, prefix):
        for sites in (("--site", "site-a", "--site", "site-b"), ("--site", "+")):
            rc, out, err = await monitor(mqtt_broker, prefix, "--once", "--json", *sites)
            assert rc == 0, err
            lines = out.strip().splitlines()
            assert len(lines) == 1, out
            snapshot = json.loads(lines[0])
            assert snapshot["prefix"] == prefix
            assert [s["site_id"] for s in snapshot["sites"]] == ["site-a", "site-b"]
            a, b = site(snapshot, "site-a"), site(snapshot, "site-b")
            assert [r["rack_id"] for r in a["racks"]] == ["rack-01", "rack-02"]
            assert [r["rack_id"] for r in b["racks"]] == ["rack-01"]
            rack = a["racks"][0]
            assert rack["soc_pct"] == 56.0 and rack["agent"] == "online" and rack["age_s"] < 3.0
            assert rack["controller"]["state"] == "ok" and b["racks"][0]["soc_pct"] == 56.0
            assert a["bank"]["limits"]["charge_current_a"]["reason"] == LONG_REASON  # JSON is never cut
            assert a["bank"]["eligible_racks"] == ["rack-01", "rack-02"]
            assert a["controllers"] == {"ctl-a": {"online": True, "role": "active", "epoch": 3}}
        rc, out, _ = await monitor(mqtt_broker, prefix, "--once", "--json", "--site", "site-b")
        assert [s["site_id"] for s in json.loads(out)["sites"]] == ["site-b"]


async def test_json_mode_streams_one_object_per_interval(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
) -> None:
    prefix = unique_topic_prefix
    async with two_sites(mqtt_broker, prefix):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bmslink", "monitor", "--port", str(mqtt_broker.port), "--prefix", prefix,
            "--site", "+", "--json", "--interval", "0.3", cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            objects = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 15.0)) for _ in range(4)]
            elapsed = loop.time() - started
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 15.0)
        assert proc.returncode == 0, err.decode()
        assert all(isinstance(o["sites"], list) for o in objects)
        assert len(site(objects[-1], "site-a")["racks"]) == 2
        assert elapsed < 4 * 0.3 + 10.0  # not the 3 s of --once per object


async def test_piped_terminal_view_is_wide_and_cuts_long_reasons(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
) -> None:
    prefix = unique_topic_prefix
    async with two_sites(mqtt_broker, prefix):
        for width_args, width in (((), 160), (("--width", "100"), 100)):
            rc, out, err = await monitor(mqtt_broker, prefix, "--once", "--site", "+", *width_args)
            assert rc == 0, err
            lines = out.splitlines()
            assert max(len(line) for line in lines) <= width
            assert "bmslink site-a: racks" in out and "bmslink site-b: racks" in out
            assert "THE-END" not in out  # cut, not wrapped onto the next lines
            # The value once, then why (the reason's own "CCL 120 A =" head is not repeated).
            assert "CCL 120 A =" not in out
            ccl = [line for line in lines if line.lstrip("│ ").startswith("CCL ") and "A  rack-02" in line]
            assert len(ccl) == 2 and all(line.rstrip(" │").endswith("…") for line in ccl), ccl
            assert "rack-02" in out and "\x1b[" not in out  # the racks, and no terminal escapes


async def test_operator_mistakes_are_clear(unique_topic_prefix: str) -> None:
    closed = MosquittoBroker.__new__(MosquittoBroker)
    closed.port = free_port()
    rc, _, err = await monitor(closed, unique_topic_prefix, "--once", "--json", "--site", "x")
    assert rc == 1 and "cannot connect to the broker" in err
    rc, _, err = await monitor(closed, unique_topic_prefix, "--once", "--site", "x", "--width", "10")
    assert rc == 2 and "--width 10" in err and "Traceback" not in err
    rc, _, err = await monitor(closed, unique_topic_prefix, "--json", "--site", "x", "--interval", "0")
    assert rc == 2 and "--interval 0" in err
