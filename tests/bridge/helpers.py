"""Builders and a recording MQTT peer shared by the bridge tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.cluster import ConsolidatedState, ControllerStatus, RackState, RackView
from shared.config import MqttConfig
from shared.models import ProtectionFlags
from shared.mqtt import Message, MqttSession
from tests.contract import samples

SITE = "site-b"


def reading(rack_id: str, seq: int, *, timestamp_s: float | None = None, site_id: str = SITE,
            stream_id: str = "5eed0000000000aa", **measured: Any) -> Any:
    """A valid RackTelemetry of ``rack_id`` (measurement fields overridable)."""
    return samples.telemetry(site_id=site_id, rack_id=rack_id, seq=seq, stream_id=stream_id,
                             timestamp_s=time.time() if timestamp_s is None else timestamp_s,
                             measurements=samples.measurements(**measured))


def view(rack_id: str, *, state: RackState = RackState.OK, reason: str = "", maintenance: bool = False,
         ccl_a: float = 100.0) -> RackView:
    eligible = state is RackState.OK and not maintenance
    return RackView(rack_id=rack_id, state=state, eligible=eligible, share=1.0 if eligible else 0.0,
                    charge_current_limit_a=ccl_a if eligible else 0.0,
                    discharge_current_limit_a=150.0 if eligible else 0.0, reason=reason,
                    maintenance=maintenance)


def consolidated(*views: RackView, timestamp_s: float | None = None, site_id: str = SITE,
                 node_id: str = "ctl-a", ccl_reason: str = "CCL 200 A = 2 × rack-01 100 A",
                 alarms: ProtectionFlags | None = None) -> ConsolidatedState:
    eligible = sum(1 for v in views if v.eligible)
    return ConsolidatedState(
        site_id=site_id, node_id=node_id, timestamp_s=time.time() if timestamp_s is None else timestamp_s,
        charge_current_limit_a=100.0 * eligible, discharge_current_limit_a=150.0 * eligible,
        charge_voltage_limit_v=55.2, discharge_voltage_limit_v=46.4, charge_enabled=True,
        discharge_enabled=True, ccl_reason=ccl_reason, dcl_reason="DCL: n × min", cvl_reason="CVL: min",
        dvl_reason="DVL: max", soc_pct=64.0, soh_pct=98.0, pack_voltage_v=52.8, current_a=25.0,
        alarms=alarms or ProtectionFlags(), roster_size=len(views), eligible_racks=eligible,
        racks=tuple(views),
    )


def controller_status(node_id: str = "ctl-a", role: str = "active", site_id: str = SITE) -> ControllerStatus:
    return ControllerStatus(site_id=site_id, node_id=node_id, role=role, epoch=3, timestamp_s=time.time())


@dataclass
class Heard:
    """Everything a recording peer heard, by topic, in order."""

    messages: list[Message] = field(default_factory=list)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> Message | None:
        found = self.on(topic)
        return found[-1] if found else None

    def json(self, topic: str) -> dict[str, Any] | None:
        last = self.last(topic)
        if last is None or not last.payload:
            return None
        parsed: dict[str, Any] = json.loads(last.payload)
        return parsed

    def topics(self, predicate: Callable[[str], bool]) -> dict[str, bytes]:
        """The last payload of every topic that satisfies ``predicate``."""
        return {m.topic: m.payload for m in self.messages if predicate(m.topic)}


class Peer:
    """A real MQTT 5 client on the test broker that records what it hears and publishes what it is told:
    the agent, the controller, Home Assistant or a dashboard, as a test needs."""

    def __init__(self, port: int, name: str, subscribe: tuple[str, ...] = ()) -> None:
        self.heard = Heard()
        self.session = MqttSession(MqttConfig(port=port, reconnect_min_s=0.1, reconnect_max_s=0.5), name,
                                   on_message=self.heard.messages.append)
        for topic in subscribe:
            self.session.subscribe(topic, qos=1)

    async def __aenter__(self) -> Peer:
        await self.session.start()
        assert await self.session.wait_connected(5.0), "the test peer cannot connect"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        assert self.session.publish(topic, payload, qos=qos, retain=retain)


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
