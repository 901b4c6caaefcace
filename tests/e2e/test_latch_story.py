"""A latched alarm's whole story, with every part real and separate: simulated BMS racks, agents, the
broker, two controllers with failover, the CAN bridge, the simulated inverter, and the operator's
``bmslink cmd`` and ``bmslink events``. Judged by what the inverter receives.

alarm latches (CCL 0) → its condition clears (still 0) → the active is killed and the standby takes
over (still 0) → both controllers restart (still 0) → forged, replayed, expired and unsigned clears are
refused and journaled (still 0) → a signed clear is accepted → current returns through hold and ramp.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import msgpack
import pytest

from shared.commands import CommandAction, body_bytes, encode_request, new_command, new_key
from shared.config import MqttConfig
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.e2e.rig import Chain
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.procs import ProcessGroup

pytestmark = pytest.mark.slow
SITE = "site-e"
ALARM = "charge_over_temperature"


def key_file(path: Path, key: str) -> Path:
    path.write_text(f'[keys]\nalice = "{key}"\n')
    path.chmod(0o600)
    return path


async def run(*argv: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bmslink", *argv,
                                                stdout=pipe, stderr=pipe)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_latched_alarm_is_released_only_by_a_signed_clear(
    tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup,
) -> None:
    key = new_key()
    keys = key_file(tmp_path / "keys.toml", key)
    chain = Chain(tmp_path, mqtt_broker, unique_topic_prefix, procs, racks=2, controllers=2, failover=True,
                  keys_file=keys)
    operator = ["--host", "127.0.0.1", "--port", str(mqtt_broker.port), "--prefix", unique_topic_prefix,
                "--site", SITE, "--key-id", "alice", "--timeout", "8"]
    topics = Topics(unique_topic_prefix, SITE)
    pub = MqttSession(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, topic_prefix=unique_topic_prefix),
                      "attacker")
    try:
        await chain.start(ctl_1_active_first=True)
        granted = await chain.settle()
        assert granted > 0

        # The alarm latches: CCL 0.
        chain.sims[0].faults.raise_alarm(ALARM)
        await chain.wait_for(lambda: chain.recorder.ccl() == 0.0, 10.0, "CCL 0 on the alarm")
        # A clear while the condition is present is accepted and releases nothing; its bytes are kept
        # for a replay later.
        early = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id=SITE)
        code, out, err = await run("cmd", "clear", *operator, "--key-file", str(keys), "--all", "--json")
        assert code == 0, err
        assert json.loads(out)["released"] == [] and json.loads(out)["held"]
        await pub.start()
        assert await pub.wait_connected(5)
        pub.publish(topics.command_request, encode_request(early, bytes.fromhex(key)), qos=1)
        await asyncio.sleep(1.0)

        # The condition clears: still 0.
        chain.sims[0].faults.clear_alarm(ALARM)
        cleared = time.monotonic()
        await asyncio.sleep(2.5)
        assert max(ccl for _, ccl, _, _ in chain.recorder.limits(cleared)) == 0.0

        # The active is killed; the standby takes over: still 0.
        active = chain.recorder.active_node()
        assert active in (1, 2)
        standby = 3 - active
        killed = time.monotonic()
        chain.procs.send_signal(f"ctl-{active}", signal.SIGKILL)
        await chain.wait_for(lambda: chain.recorder.active_node() == standby, 5.0, "the takeover")
        await asyncio.sleep(2.0)
        assert max(ccl for _, ccl, _, _ in chain.recorder.limits(killed)) == 0.0

        # Both controllers restart: still 0.
        chain.procs.stop(f"ctl-{standby}")
        restarted = time.monotonic()
        chain.start_controller("ctl-1", node_number=1, rank=0)
        chain.start_controller("ctl-2", node_number=2, rank=1)
        await chain.wait_for(lambda: chain.recorder.active_node() in (1, 2) and
                             chain.recorder.limits(restarted + 0.5) != [], 20.0, "an active after restarting")
        await asyncio.sleep(3.0)
        assert max(ccl for _, ccl, _, _ in chain.recorder.limits(restarted)) == 0.0

        # Forged, replayed, expired and unsigned clears: refused (or, replayed, not run), still 0.
        refused_from = time.monotonic()
        forged = key_file(tmp_path / "forged.toml", new_key())
        code, out, _ = await run("cmd", "clear", *operator, "--key-file", str(forged), "--all")
        assert code == 1 and "bad_signature" in out
        pub.publish(topics.command_request, encode_request(early, bytes.fromhex(key)), qos=1)  # replayed
        expired = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id=SITE,
                              issued_s=time.time() - 300)
        pub.publish(topics.command_request, encode_request(expired, bytes.fromhex(key)), qos=1)
        unsigned = new_command(CommandAction.CLEAR_LATCHES, key_id="alice", site_id=SITE)
        pub.publish(topics.command_request, msgpack.packb(
            {"v": 1, "key_id": "alice", "body": body_bytes(unsigned), "signature": b""}), qos=1)
        await asyncio.sleep(2.0)
        assert max(ccl for _, ccl, _, _ in chain.recorder.limits(refused_from)) == 0.0

        # The signed clear: accepted, and current returns through the hold and the ramp.
        accepted_at = time.monotonic()
        code, out, err = await run("cmd", "clear", *operator, "--key-file", str(keys), "--rack", "rack-01",
                                   "--json")
        assert code == 0, err
        assert json.loads(out)["released"] == [{"rack_id": "rack-01", "flag": ALARM, "why": ""}]
        await chain.wait_for(lambda: chain.recorder.ccl() > 0.0, 10.0, "current back after the clear")
        first_back = next(ccl for _, ccl, _, _ in chain.recorder.limits(accepted_at) if ccl > 0.0)
        assert first_back < granted  # ramping up, not at once
        assert await chain.settle() == pytest.approx(granted, abs=1.0)

        # bmslink events shows the whole story, on the node that is active now.
        now_active = chain.recorder.active_node()
        code, out, err = await run("events", "--config", str(tmp_path / f"ctl-{now_active}.toml"), "--json")
        assert code == 0, err
        story = [json.loads(line) for line in out.splitlines()]
        texts = [f"{e['kind']} {e['rack_id']} {e['text']}" for e in story]
        for needle in (f"latch rack-01 {ALARM} latched", "role  active", "refused (bad_signature)",
                       "refused (stale)", "refused (bad_signature): signature of 0 bytes",
                       "not run again", "accepted; released rack-01/" + ALARM, f"release rack-01 {ALARM}"):
            assert any(needle in text for text in texts), (needle, texts)
    finally:
        await pub.stop()
        await chain.stop()


async def test_a_standby_started_3_s_before_the_actives_sigkill_takes_over_with_unchanged_limits(
    tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup,
) -> None:
    # Hold and ramp longer than the standby's 3 s: a cold takeover would send 0 A, then ramp.
    chain = Chain(tmp_path, mqtt_broker, unique_topic_prefix, procs, racks=2, controllers=2, failover=True,
                  hold_s=5.0, ramp_s=5.0)
    try:
        await chain.start(ctl_1_active_first=True)
        await asyncio.sleep(chain.ramp_s)
        granted = await chain.settle()
        assert granted > 0
        active = chain.recorder.active_node()
        assert active in (1, 2)
        standby = 3 - active
        chain.procs.send_signal(f"ctl-{standby}", signal.SIGKILL)
        chain.procs.get(f"ctl-{standby}").popen.wait(5)
        started = time.monotonic()
        chain.start_controller(f"ctl-{standby}", node_number=standby, rank=standby - 1)
        await chain.wait_for(lambda: any(b.node == standby and b.role == 2 for b in chain.recorder.beats
                                         if b.t > started), 15.0, "the young standby")
        await asyncio.sleep(max(0.0, started + 3.0 - time.monotonic()))
        before = chain.recorder.ccl()
        killed = time.monotonic()
        chain.procs.send_signal(f"ctl-{active}", signal.SIGKILL)
        await chain.wait_for(lambda: chain.recorder.active_node() == standby, 5.0, "the takeover")
        first_beat = next(b for b in chain.recorder.active_beats(killed) if b.node == standby)
        await asyncio.sleep(1.5)
        after = [ccl for _, ccl, _, _ in chain.recorder.limits(first_beat.t)]
        assert after, "no limits from the new active"
        assert after[0] == pytest.approx(before, abs=0.1)
        assert min(after) == pytest.approx(before, abs=0.1)
    finally:
        await chain.stop()
