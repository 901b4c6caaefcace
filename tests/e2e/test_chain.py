"""End-to-end scenarios: what the inverter receives in each failure mode, with every part real.

Each test asserts on the frames recorded on the inverter CAN bus (decoded with the shipped DBC) and on
the simulated inverter's own verdict (BMS communication status, protocol violations).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from shared.codec import encode
from shared.config import MqttConfig
from shared.mqtt import MqttSession
from shared.topics import Topics
from sim.battery import SimRackConfig
from tests.contract.samples import measurements, telemetry
from tests.e2e.rig import HEARTBEAT_MS, STALE_AFTER_MS, Chain
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.procs import ProcessGroup

pytestmark = pytest.mark.slow
SIM_MAX_A = 140.0  # the simulated rack's own nameplate limit
PERIOD_S = HEARTBEAT_MS / 1000.0


@pytest.fixture
async def chain(tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
                procs: ProcessGroup, request: pytest.FixtureRequest) -> AsyncIterator[Chain]:
    options = getattr(request, "param", {})
    c = Chain(tmp_path, mqtt_broker, unique_topic_prefix, procs, **options)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()
    status = c.inverter()
    # Whatever happened, the inverter never saw a protocol violation from us.
    assert status.get("violations", 0) == 0, status.get("violation_kinds")


async def test_healthy_chain_grants_n_times_min(chain: Chain) -> None:
    ccl = await chain.settle()
    assert ccl == pytest.approx(3 * SIM_MAX_A, abs=0.2)
    assert chain.recorder.dcl() == pytest.approx(3 * SIM_MAX_A, abs=0.2)
    assert chain.inverter()["status"] == "Normal"
    assert chain.recorder.max_gap() <= PERIOD_S + 0.25
    assert not chain.recorder.foreign


@pytest.mark.parametrize("chain", [{"sim_configs": {1: SimRackConfig(ambient_c=35.0)}}], indirect=True)
async def test_heating_rack_lowers_bank_ccl_before_its_alarm(chain: Chain) -> None:
    await chain.settle()
    hot = chain.sims[1]
    hot.faults.set_over_temperature(1.0)
    started = time.monotonic()
    fell = await chain.wait_for(lambda: chain.recorder.ccl() < 3 * SIM_MAX_A - 10, 30.0, "bank CCL to fall")
    truth = hot.model.measurements()
    # The controller acted on the projected temperature: the rack itself still allowed its full current
    # and was far from its 55 °C over-temperature alarm.
    assert not truth.alarms.charge_over_temperature
    assert truth.temperature_max_c < 50.0
    alarm_at = await chain.wait_for(lambda: hot.model.measurements().alarms.charge_over_temperature, 60.0,
                                    "the rack's own over-temperature alarm")
    assert fell < alarm_at
    await chain.wait_for(lambda: chain.recorder.ccl() == 0.0, 5.0, "bank CCL 0 on the charge-side alarm")
    assert chain.recorder.dcl() >= 0.0
    assert started < fell


async def test_open_contactor_excludes_the_rack(chain: Chain) -> None:
    await chain.settle()
    chain.sims[2].faults.open_contactor()
    opened = time.monotonic()
    at = await chain.wait_for(lambda: abs(chain.recorder.ccl() - 2 * SIM_MAX_A) < 0.2, 5.0, "CCL for 2 racks")
    assert at - opened < 1.0  # a decrease is sent at once, not at the next heartbeat
    chain.sims[2].faults.close_contactor()
    # Re-admitted after its hold time, ramping in: never a step back up to 3 racks.
    back = await chain.wait_for(
        lambda: abs(chain.recorder.ccl() - 3 * SIM_MAX_A) < 0.2, 15.0, "CCL for 3 racks"
    )
    ramp = [ccl for t, ccl, _, _ in chain.recorder.limits(at) if t <= back]
    steps = [b - a for a, b in itertools.pairwise(ramp)]
    assert max(steps) < SIM_MAX_A * 0.9, steps


async def test_stale_rack_is_excluded_within_stale_after_plus_a_period(chain: Chain) -> None:
    await chain.settle()
    chain.procs.send_signal("agent-0", signal.SIGSTOP)  # hangs: no telemetry, no Last Will yet
    frozen = time.monotonic()
    try:
        at = await chain.wait_for(
            lambda: abs(chain.recorder.ccl() - 2 * SIM_MAX_A) < 0.2, 5.0, "CCL for 2 racks"
        )
        assert at - frozen <= STALE_AFTER_MS / 1000.0 + PERIOD_S + 0.5
    finally:
        chain.procs.send_signal("agent-0", signal.SIGCONT)
    await chain.wait_for(lambda: abs(chain.recorder.ccl() - 3 * SIM_MAX_A) < 0.2, 15.0, "re-admission")


@pytest.mark.parametrize("chain", [{"sim_configs": {0: SimRackConfig(initial_soc_pct=100.0)}}], indirect=True)
async def test_rack_with_ccl_zero_and_contactor_closed_zeroes_the_bank_ccl(tmp_path: Path,
                                                                           chain: Chain) -> None:
    # rack-01 is full: its BMS allows no charge while its contactor is closed. Charging the bank would push
    # current into it, so the bank CCL is 0 while discharge stays allowed.
    await asyncio.sleep(2.0)
    assert chain.sims[0].model.measurements().charge_current_limit_a == 0.0
    assert chain.recorder.ccl() == 0.0
    assert chain.recorder.dcl() > 0.0
    request = chain.recorder.last(0x35C)
    assert request is not None and request["ChargeEnable"] == 0 and request["DischargeEnable"] == 1


@pytest.mark.parametrize("chain", [{"min_racks": 2}], indirect=True)
async def test_all_racks_lost_gives_zero_limits_with_alarm_and_frames_never_stop(chain: Chain) -> None:
    await chain.settle()
    for i in range(3):
        chain.procs.send_signal(f"agent-{i}", signal.SIGKILL)
    lost = time.monotonic()
    await chain.wait_for(
        lambda: chain.recorder.ccl() == 0.0 and chain.recorder.dcl() == 0.0, 5.0, "zero limits"
    )
    await asyncio.sleep(2.0)
    after = chain.recorder.limits(lost)
    assert after and all(t for t, *_ in after)
    assert chain.recorder.max_gap(lost) <= PERIOD_S + 0.25  # silence is never the failure mode
    assert after[-1][1] == 0.0 and after[-1][2] == 0.0
    assert after[-1][3] > 40.0  # CVL never 0
    protection = chain.recorder.last(0x359)
    assert protection is not None and protection["ProtSystemError"] == 1
    assert chain.inverter()["status"] == "Normal"


class Publisher:
    def __init__(self, broker: MosquittoBroker, prefix: str) -> None:
        self.topics = Topics(prefix, "site-e")
        self.session = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix),
                                   f"rogue-{prefix}")

    async def __aenter__(self) -> Publisher:
        await self.session.start()
        assert await self.session.wait_connected(5.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.stop()


async def test_invalid_telemetry_excludes_the_rack(chain: Chain) -> None:
    await chain.settle()
    async with Publisher(chain.broker, chain.prefix) as rogue:
        raw = msgpack.unpackb(encode(telemetry(site_id="site-e", rack_id="rack-02", seq=10**9,
                                               timestamp_s=time.time())), raw=False)
        raw["measurements"]["charge_current_limit_a"] = -5.0  # impossible
        bad = msgpack.packb(raw)
        sent = time.monotonic()
        for _ in range(30):
            rogue.session.publish(rogue.topics.rack_telemetry("rack-02"), bad)
            await asyncio.sleep(0.05)
            if abs(chain.recorder.ccl() - 2 * SIM_MAX_A) < 0.2:
                break
        assert abs(chain.recorder.ccl() - 2 * SIM_MAX_A) < 0.2
        assert time.monotonic() - sent < 2.0


async def test_a_poisoning_payload_is_refused_and_the_genuine_agent_never_interrupted(chain: Chain) -> None:
    """seq 2**63-1 stamped 4e9 with 1000 A limits: refused, the rack stays counted, nothing rises."""
    before = await chain.settle()
    watch_from = time.monotonic()
    async with Publisher(chain.broker, chain.prefix) as rogue:
        poison = telemetry(
            site_id="site-e", rack_id="rack-02", seq=2**63 - 1, timestamp_s=4e9,
            measurements=measurements(charge_current_limit_a=1000.0, discharge_current_limit_a=1000.0),
        )
        for _ in range(20):
            rogue.session.publish(rogue.topics.rack_telemetry("rack-02"), encode(poison))
            await asyncio.sleep(0.1)
    await asyncio.sleep(STALE_AFTER_MS / 1000.0 + 1.0)  # long enough for a locked-out rack to go stale
    seen = chain.recorder.limits(watch_from)
    assert seen
    assert max(ccl for _, ccl, _, _ in seen) <= before + 0.2
    assert min(ccl for _, ccl, _, _ in seen) >= before - 0.2  # rack-02 was never excluded
    assert chain.recorder.ccl() == pytest.approx(before, abs=0.2)


async def test_unknown_rack_is_never_counted(chain: Chain) -> None:
    before = await chain.settle()
    async with Publisher(chain.broker, chain.prefix) as rogue:
        generous = telemetry(
            site_id="site-e", rack_id="rack-99",
            measurements=measurements(charge_current_limit_a=5000.0, discharge_current_limit_a=5000.0),
        )
        for _ in range(10):
            rogue.session.publish(rogue.topics.rack_telemetry("rack-99"), encode(generous))
            await asyncio.sleep(0.1)
    assert chain.recorder.ccl() == pytest.approx(before, abs=0.2)
    assert chain.recorder.last(0x359)["ModuleCount"] == 3  # type: ignore[index]


async def test_broker_restart_fail_safe_while_away_then_recovery(
    tmp_path: Path, private_broker: MosquittoBroker, unique_topic_prefix: str, procs: ProcessGroup
) -> None:
    c = Chain(tmp_path, private_broker, unique_topic_prefix, procs)
    try:
        await c.start()
        await c.settle()
        await asyncio.to_thread(private_broker.kill)
        gone = time.monotonic()
        await c.wait_for(lambda: c.recorder.ccl() == 0.0 and c.recorder.dcl() == 0.0,
                         STALE_AFTER_MS / 1000.0 + 2.0, "fail-safe zero limits while the broker is away")
        await asyncio.sleep(1.0)
        assert c.recorder.max_gap(gone) <= PERIOD_S + 0.25
        await asyncio.to_thread(private_broker.restart)
        await c.wait_for(
            lambda: abs(c.recorder.ccl() - 3 * SIM_MAX_A) < 0.2, 20.0, "recovery after the broker"
        )
        assert c.recorder.max_gap(gone) <= PERIOD_S + 0.25
    finally:
        await c.stop()
    assert c.inverter().get("violations", 0) == 0
