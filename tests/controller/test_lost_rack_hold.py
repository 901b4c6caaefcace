"""Losing sight of the weakest rack never raises what the inverter is told (issue 10, item 4), end to end:
a real broker, the controller service, and the CAN frames on a python-can virtual bus.

rack-01 allows 40 A and rack-02 100 A: 2 × 40 = 80 A. rack-01's payloads stop. It may still be in parallel
with its contactor closed, so the frames stay at 80 A until its isolation time (its roster override, 2 s)
has passed since it was found stale; only then do they ramp to 100 A.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.codec import encode
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import measurements, telemetry
from tests.controller.test_service import Rig, running_service
from tests.fixtures.broker import MosquittoBroker

STALE_AFTER_S = 1.0
ISOLATION_S = 2.0  # rack-01's own; the aggregation default (60 s) would outlast the test
RAMP_A_PER_S = 50.0
LIMIT_FRAME_PERIOD_S = 0.2


def config(broker: MosquittoBroker, prefix: str, channel: str) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": "n1",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [
            {"rack_id": "rack-01", "capacity_ah": 280, "stale_after_ms": 1000, "isolation_s": ISOLATION_S},
            {"rack_id": "rack-02", "capacity_ah": 280, "stale_after_ms": 1000},
        ],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": RAMP_A_PER_S},
        "can": {"interface": "virtual", "channel": channel, "period_ms": int(LIMIT_FRAME_PERIOD_S * 1000)},
    }, ControllerConfig, "<test>")


@pytest.fixture
async def rig(mqtt_broker: MosquittoBroker, unique_topic_prefix: str) -> AsyncIterator[Rig]:
    async with running_service(mqtt_broker, unique_topic_prefix, config) as parts:
        yield parts


LIMITS_A = {"rack-01": 40.0, "rack-02": 100.0}


async def _feed(
    pub: MqttSession, topics: Topics, racks: tuple[str, ...], seconds: float, seq: int
) -> tuple[int, float]:
    """Each rack of ``racks`` publishes its limits every 100 ms for ``seconds``; returns the next seq and
    the time of the last publish."""
    end = time.monotonic() + seconds
    last_s = time.monotonic()
    while time.monotonic() < end:
        last_s = time.monotonic()
        for rack in racks:
            limit = LIMITS_A[rack]
            both = measurements(charge_current_limit_a=limit, discharge_current_limit_a=limit)
            t = telemetry(rack_id=rack, seq=seq, timestamp_s=1_790_000_000.0 + seq, measurements=both)
            pub.publish(topics.rack_telemetry(rack), encode(t))
        seq += 1
        await asyncio.sleep(0.1)
    return seq, last_s


async def test_the_inverter_stays_at_80_a_until_the_lost_rack_is_isolated(rig: Any) -> None:
    svc, bus, pub, topics = rig
    seq, lost_from = await _feed(pub, topics, ("rack-01", "rack-02"), 1.5, seq=1)  # rack-01's last payload
    await wait_until(lambda: bus.ccl() == pytest.approx(80.0), 2, "2 × 40 A")
    first = len(bus.limits)
    seq, _ = await _feed(pub, topics, ("rack-02",), STALE_AFTER_S + 0.6, seq)
    # rack-01 is stale by now, and the inverter is still told 80 A, not 100 A.
    assert [f["ChargeCurrentLimit"] for _, f in bus.limits[first:]] == [80.0] * (len(bus.limits) - first)
    assert svc.state is not None
    assert svc.state.racks[0].state.value == "stale"
    assert "held: rack-01 lost" in svc.state.ccl_reason, svc.state.ccl_reason
    assert "held: rack-01 lost" in svc.state.racks[0].reason
    await _feed(pub, topics, ("rack-02",), ISOLATION_S + 1.0, seq)
    await wait_until(lambda: bus.ccl() == pytest.approx(100.0), 2, "100 A once rack-01 is isolated")
    frames = bus.limits[first:]
    # The frames never stopped, and never said more than the racks last known in parallel allow until rack-01
    # had been stale for its isolation time (stale after 1 s, then 2 s): no step to 100 A, no flap. Its last
    # payload arrived after it was published, so the release comes no earlier than this.
    released = lost_from + STALE_AFTER_S + ISOLATION_S
    held = [(t, f) for t, f in frames if t < released]
    assert len(held) >= (released - lost_from) / LIMIT_FRAME_PERIOD_S - 2
    assert all(f["ChargeCurrentLimit"] == pytest.approx(80.0) for _, f in held), held
    assert all(f["DischargeCurrentLimit"] == pytest.approx(80.0) for _, f in held), held
    rising = [t for t, f in frames if f["ChargeCurrentLimit"] > 80.0]
    assert rising and rising[0] >= released
    # Then it ramps (50 A/s: 0.4 s from 80 to 100 A), it does not step.
    after = [f["ChargeCurrentLimit"] for _, f in frames if f["ChargeCurrentLimit"] > 80.0]
    assert after[0] < 100.0, after
    assert "held" not in svc.state.ccl_reason
