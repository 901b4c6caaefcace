"""Builders for agent configs and small waits shared by the agent tests."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

from bmslink.processes import free_port
from rack_agent.agent import RackAgent
from shared.agent_config import AgentConfig
from shared.config import validate_config
from sim.bms_server import SimulatedBms
from tests.fixtures.serial_pair import SerialPair


def agent_config(
    link: dict[str, Any],
    *,
    profile: str = "acme_flat",
    mqtt_port: int = 1,
    prefix: str = "bmslink",
    interval_ms: int = 100,
    timeout_ms: int = 60,
    comm_lost_after: int = 3,
    extra: dict[str, Any] | None = None,
    capacity_ah: float | None = None,
    unit_extra: dict[str, Any] | None = None,
) -> AgentConfig:
    unit: dict[str, Any] = {"name": "bms", "link": link["name"], "device_id": 1, "profile": profile}
    if capacity_ah is not None:
        unit["capacity_ah"] = capacity_ah
    unit.update(unit_extra or {})
    data: dict[str, Any] = {
        "site_id": "site-t",
        "rack_id": "rack-01",
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic_prefix": prefix, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5},
        "polling": {"interval_ms": interval_ms, "request_timeout_ms": timeout_ms,
                    "comm_lost_after": comm_lost_after, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
        "links": [link],
        "units": [unit],
    }
    if extra:
        for key, value in extra.items():
            data[key] = {**data.get(key, {}), **value}
    return validate_config(data, AgentConfig, "<test>")


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def started_links(agent: RackAgent, timeout_s: float = 5.0) -> None:
    """Start only the BMS links (no MQTT) and wait until all are connected."""
    for link in agent.links.values():
        await link.start()
    await wait_until(
        lambda: all(link.connected for link in agent.links.values()), timeout_s, "links connected"
    )


async def stop_links(agent: RackAgent) -> None:
    for link in agent.links.values():
        await link.stop()


async def scrape_metrics(port: int) -> str:
    """The text a Prometheus scrape of 127.0.0.1:``port`` gets (blocking HTTP, off the loop)."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


S = TypeVar("S", bound=SimulatedBms)


@dataclass
class SimPeer(Generic[S]):
    """A simulated BMS being served, and the agent's link config that reaches it."""

    sim: S
    link: dict[str, Any]


@contextlib.asynccontextmanager
async def served(sim: S, transport: str, request: pytest.FixtureRequest) -> AsyncIterator[SimPeer[S]]:
    """``sim`` served over Modbus TCP on 127.0.0.1 (``transport`` "tcp") or RTU over a socat pair
    (``"rtu"``, from the ``serial_pair`` fixture); stopped on exit."""
    if transport == "tcp":
        port = free_port()
        await sim.start_tcp("127.0.0.1", port)
        link: dict[str, Any] = {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": port}
    else:
        pair: SerialPair = request.getfixturevalue("serial_pair")
        await sim.start_rtu(str(pair.a), baudrate=19200)
        link = {"type": "modbus_rtu", "name": "rs485", "device": str(pair.b), "baudrate": 19200}
    try:
        yield SimPeer(sim, link)
    finally:
        await sim.stop()
