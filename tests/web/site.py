"""A site for the web page's tests: a real broker, a python-can virtual bus, controller services with
their page on a free 127.0.0.1 port, and racks whose telemetry is published (10 Hz) until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from controller.service import ControllerService
from shared.codec import encode
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.contract.samples import measurements, telemetry
from tests.fixtures.broker import MosquittoBroker, free_port

FEED_PERIOD_S = 0.1
RACK_CCL_A = 100.0
RACK_DCL_A = 120.0


def controller_config(broker: MosquittoBroker, prefix: str, channel: str, *, node: int = 1,
                      racks: int = 3, failover: bool = False, web: dict[str, Any] | None = None,
                      state_dir: Path | None = None) -> ControllerConfig:
    """A controller of ``racks`` racks (rack-01 ...) that admits a rack at once and does not ramp, its
    page on a free port unless ``web`` says otherwise (``web=None``: no [web] table at all)."""
    data: dict[str, Any] = {
        "site_id": "site-a", "node_id": f"n{node}",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": rack_id(i), "capacity_ah": 280} for i in range(1, racks + 1)],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000},
        "can": {"interface": "virtual", "channel": channel, "period_ms": 200},
    }
    if failover:
        data["failover"] = {"enabled": True, "node_number": node, "rank": node - 1}
    if web is not None:
        data["web"] = {"enabled": True, "port": free_port(), **web}
    if state_dir is not None:
        data["state_dir"] = str(state_dir)
    return validate_config(data, ControllerConfig, "<test>")


def rack_id(i: int) -> str:
    return f"rack-{i:02d}"


class WebSite:
    def __init__(self, broker: MosquittoBroker, prefix: str, tmp: Path) -> None:
        self.broker, self.prefix, self.tmp = broker, prefix, tmp
        self.channel = f"web-{free_port()}"
        self.topics = Topics(prefix, "site-a")
        self.nodes: dict[int, ControllerService] = {}
        self.pub = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix), "pub")
        self.publishing: set[str] = set()
        self.seq = 1
        self._feeder: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.pub.start()
        assert await self.pub.wait_connected(5)
        self._feeder = asyncio.create_task(self._feed(), name="web-site-feeder")

    async def start(self, node: int = 1, **kwargs: Any) -> ControllerService:
        kwargs.setdefault("web", {})
        config = controller_config(self.broker, self.prefix, self.channel, node=node, **kwargs)
        svc = ControllerService(config)
        await svc.start()
        self.nodes[node] = svc
        return svc

    async def stop(self, node: int) -> None:
        await self.nodes.pop(node).stop()

    def url(self, node: int = 1, path: str = "/") -> str:
        web = self.nodes[node].web
        assert web is not None
        return f"http://127.0.0.1:{web.port}{path}"

    async def _feed(self) -> None:
        while True:
            for rid in sorted(self.publishing):
                t = telemetry(rack_id=rid, seq=self.seq, timestamp_s=time.time(),
                              measurements=measurements(charge_current_limit_a=RACK_CCL_A,
                                                        discharge_current_limit_a=RACK_DCL_A))
                self.pub.publish(self.topics.rack_telemetry(rid), encode(t))
            self.seq += 1
            await asyncio.sleep(FEED_PERIOD_S)

    async def close(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        for svc in self.nodes.values():
            await svc.stop()
        self.nodes.clear()
        await self.pub.stop()
