"""A small site with real parts — a simulated BMS on Modbus TCP, a rack agent, Mosquitto, a controller on
a python-can virtual bus — both metrics endpoints scraped over HTTP; and what every endpoint carries:
the build info, the process metrics, names that follow the Prometheus conventions.

The rig (:func:`metrics_site`) and the parsed scrape (:class:`Scrape`) serve the per-process metric
tests and the Grafana dashboard test too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import bmslink
from controller.service import ControllerService
from rack_agent.agent import RackAgent
from shared.config import validate_config
from shared.controller_config import ControllerConfig
from sim.bms_server import SimulatedBms
from tests.agent.helpers import agent_config, scrape_metrics, wait_until
from tests.fixtures.broker import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[1]
RACK = "rack-01"
UNIT = "bms"


class Scrape:
    """One scrape, parsed by prometheus-client's own parser: the families' types and every sample."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """The samples of ``name`` whose labels include ``labels``."""
        return [(got, value) for got, value in self.samples.get(name, [])
                if all(got.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with ``labels`` (an AssertionError names what was there)."""
        found = self.series(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} series; {self.samples.get(name)}"
        return found[0][1]

    def enum(self, name: str, state_label: str, **labels: str) -> str:
        """The state an enum-style gauge says is current: exactly one series at 1, the others at 0."""
        found = self.series(name, **labels)
        current = [got[state_label] for got, value in found if value == 1.0]
        assert len(current) == 1 and all(value in (0.0, 1.0) for _, value in found), found
        return current[0]


async def scrape(port: int) -> Scrape:
    return Scrape(await scrape_metrics(port))


@dataclass
class Site:
    sim: SimulatedBms
    agent: RackAgent
    controller: ControllerService
    agent_port: int
    controller_port: int


def controller_config(broker: MosquittoBroker, prefix: str, metrics_port: int) -> ControllerConfig:
    return validate_config({
        "site_id": "site-t", "node_id": "ctl-t",
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": RACK, "capacity_ah": 280}],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000},
        "can": {"interface": "virtual", "channel": f"inv-{free_port()}", "period_ms": 200},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
    }, ControllerConfig, "<test>")


@contextlib.asynccontextmanager
async def metrics_site(broker: MosquittoBroker, prefix: str) -> AsyncIterator[Site]:
    """Everything running, and the controller's rack admitted, eligible and sent to the inverter."""
    sim = SimulatedBms()
    bms_port = free_port()
    await sim.start_tcp("127.0.0.1", bms_port)
    sim.set_current(20.0)
    agent_port, controller_port = free_port(), free_port()
    agent = RackAgent(agent_config(
        {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": bms_port},
        mqtt_port=broker.port, prefix=prefix,
        extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": agent_port}}))
    controller = ControllerService(controller_config(broker, prefix, controller_port))
    stop = asyncio.Event()
    await controller.start()
    agent_task = asyncio.create_task(agent.run(stop), name="metrics-site-agent")
    try:
        def admitted() -> bool:
            sent = controller.last_sent
            return sent is not None and sent.eligible_racks == 1 and sent.charge_current_limit_a > 0
        await wait_until(admitted, 15.0, "the rack admitted and current granted")
        yield Site(sim, agent, controller, agent_port, controller_port)
    finally:
        stop.set()
        await agent_task
        await controller.stop()
        await sim.stop()


# -- what every endpoint carries ------------------------------------------------------------------------


def pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


_UNIT_SUFFIXES = ("_seconds", "_volts", "_amperes", "_celsius", "_ratio", "_bytes", "_timestamp_seconds")


def _names_follow_the_conventions(scrape: Scrape, prefix: str) -> None:
    """Counters end in _total; no unit hides in a label or in a non-base form in the name."""
    for name, kind in scrape.types.items():
        if not name.startswith(prefix):
            continue
        if kind == "counter":  # the exposition's TYPE line carries the full name
            assert f"# TYPE {name}_total counter" in scrape.text, name
        non_base = r"_(percent|pct|millivolts|mv|ms|milliseconds|amps|volt|amp|c|v|a)(_|$)"
        assert not re.search(non_base, name), name
        if kind == "gauge" and name.endswith(("_limit", "_voltage", "_current", "_temperature", "_soc")):
            raise AssertionError(f"{name}: a gauge of a physical value without its unit")
    for samples in scrape.samples.values():
        for labels, _ in samples:
            assert "limit" not in labels and "unit_of" not in labels, labels


async def test_both_endpoints_carry_build_info_process_metrics_and_conventional_names(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        for port, component, prefix in ((site.agent_port, "agent", "bmslink_agent"),
                                        (site.controller_port, "controller", "bmslink_controller")):
            got = await scrape(port)
            assert got.value("bmslink_build_info", component=component, version=pyproject_version()) == 1.0
            assert bmslink.__version__ == pyproject_version()
            # prometheus-client's process, platform and GC collectors, on this endpoint's own registry.
            assert got.value("process_resident_memory_bytes") > 10 * 1024 * 1024
            assert got.value("process_cpu_seconds_total") > 0.0
            assert got.value("process_open_fds") > 0
            assert got.series("python_info")
            assert got.series("python_gc_collections_total")
            _names_follow_the_conventions(got, prefix)
            # Prometheus' own scrape health is `up`: bmslink's link gauges are <prefix>_link_up.
            assert f"{prefix}_up" not in got.types
            assert got.series(f"{prefix}_link_up", link="mqtt")
            for old in ("bmslink_controller_events_total", "bmslink_controller_limit",
                        "bmslink_controller_up", "bmslink_controller_can_total",
                        "bmslink_controller_mqtt_total"):
                assert old not in got.samples, old
