"""The agent's metrics through its real HTTP endpoint, one test per family group: each unit's battery
values and the limits it reports, its status, contactor and alarms as enum-style gauges, a gap (not a
stale line) while it is comm-lost, the link gauges, poll rounds, the broker session and its errors."""

from __future__ import annotations

import asyncio

import pytest

from rack_agent.agent import RackAgent
from sim.bms_server import SimulatedBms
from tests.agent.helpers import agent_config, wait_until
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.test_metrics_site import RACK, UNIT, metrics_site, scrape

U = {"rack": RACK, "unit": UNIT}


async def test_each_unit_shows_what_its_bms_reported_in_base_units(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        await wait_until(lambda: site.agent.stats.polls >= 2, 5.0, "two poll rounds")
        got = await scrape(site.agent_port)
        last = site.agent.units[UNIT].health.last_good
        assert last is not None
        # The simulated rack's fixed values (sim/battery.py defaults, 16 cells): exact.
        assert got.value("bmslink_agent_unit_soh_ratio", **U) == pytest.approx(0.98)
        assert got.value("bmslink_agent_unit_current_amperes", **U) == pytest.approx(20.0)
        assert got.value("bmslink_agent_unit_charge_current_limit_amperes", **U) == pytest.approx(140.0)
        assert got.value("bmslink_agent_unit_discharge_current_limit_amperes", **U) == pytest.approx(140.0)
        assert got.value("bmslink_agent_unit_charge_voltage_limit_volts", **U) == pytest.approx(55.2)
        assert got.value("bmslink_agent_unit_discharge_voltage_limit_volts", **U) == pytest.approx(46.4)
        # The moving ones: what the last poll read (a poll may land between the scrape and this read).
        assert got.value("bmslink_agent_unit_soc_ratio", **U) == pytest.approx(last.soc_pct / 100, abs=0.01)
        voltage = got.value("bmslink_agent_unit_voltage_volts", **U)
        assert voltage == pytest.approx(last.pack_voltage_v, abs=0.2)
        for name, field in (("temperature_max_celsius", last.temperature_max_c),
                            ("temperature_min_celsius", last.temperature_min_c),
                            ("cell_voltage_max_volts", last.cell_voltage_max_v),
                            ("cell_voltage_min_volts", last.cell_voltage_min_v)):
            assert got.value(f"bmslink_agent_unit_{name}", **U) == pytest.approx(field, abs=0.5), name
        assert got.value("bmslink_agent_unit_cell_voltage_max_volts", **U) < 4.0  # volts, not millivolts
        assert got.value("bmslink_agent_poll_rounds_total", rack=RACK) >= 2
        assert got.value("bmslink_agent_link_up", link="lan", type="modbus_tcp") == 1.0
        assert got.value("bmslink_agent_link_up", link="mqtt", type="mqtt") == 1.0
        assert got.value("bmslink_agent_mqtt_connects_total") == 1.0
        assert got.value("bmslink_agent_mqtt_messages_published_total") >= 1.0
        assert got.value("bmslink_agent_errors_total", kind="mqtt_connect") == 0.0


async def test_status_contactor_and_alarms_are_enums_and_a_lost_unit_leaves_a_gap(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str
) -> None:
    async with metrics_site(mqtt_broker, unique_topic_prefix) as site:
        got = await scrape(site.agent_port)
        assert got.enum("bmslink_agent_unit_status", "status", **U) == "ok"
        assert got.enum("bmslink_agent_unit_contactor", "state", **U) == "closed"
        assert got.value("bmslink_agent_unit_alarm", flag="cell_over_voltage", **U) == 0.0

        site.sim.faults.raise_alarm("cell_over_voltage")
        site.sim.faults.open_contactor()
        unit = site.agent.units[UNIT]
        await wait_until(lambda: unit.health.last_good is not None
                         and unit.health.last_good.alarms.cell_over_voltage, 5.0, "the alarm read")
        got = await scrape(site.agent_port)
        assert got.value("bmslink_agent_unit_alarm", flag="cell_over_voltage", **U) == 1.0
        assert got.value("bmslink_agent_unit_alarm", flag="cell_under_voltage", **U) == 0.0
        assert got.enum("bmslink_agent_unit_contactor", "state", **U) == "open"

        site.sim.faults.set_no_answer(True)
        await wait_until(lambda: unit.health.comm_lost, 5.0, "comm lost")
        got = await scrape(site.agent_port)
        assert got.enum("bmslink_agent_unit_status", "status", **U) == "timeout"
        assert got.value("bmslink_agent_unit_comm_lost", **U) == 1.0
        assert got.value("bmslink_agent_polls_total", outcome="timeout", **U) >= 3
        # No value drawn on from the last good reading while the unit cannot be heard.
        for family in ("soc_ratio", "voltage_volts", "charge_current_limit_amperes", "contactor", "alarm"):
            assert not got.series(f"bmslink_agent_unit_{family}", **U), family

        site.sim.faults.set_no_answer(False)
        await wait_until(lambda: not unit.health.comm_lost, 5.0, "comm restored")
        got = await scrape(site.agent_port)
        assert got.enum("bmslink_agent_unit_status", "status", **U) == "ok"
        assert got.series("bmslink_agent_unit_soc_ratio", **U)


async def test_a_broker_that_is_away_shows_as_link_down_and_connect_errors() -> None:
    sim = SimulatedBms()
    bms_port, metrics_port = free_port(), free_port()
    await sim.start_tcp("127.0.0.1", bms_port)
    agent = RackAgent(agent_config(
        {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": bms_port},
        mqtt_port=free_port(),  # nobody listens there
        extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port}}))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent-without-broker")
    try:
        await wait_until(lambda: agent.mqtt.stats.connect_failures >= 2 and agent.stats.polls >= 3, 10.0,
                         "polls and failed connection attempts")
        got = await scrape(metrics_port)
        assert got.value("bmslink_agent_link_up", link="mqtt", type="mqtt") == 0.0
        assert got.value("bmslink_agent_link_up", link="lan", type="modbus_tcp") == 1.0
        assert got.value("bmslink_agent_errors_total", kind="mqtt_connect") >= 2
        assert got.value("bmslink_agent_mqtt_connects_total") == 0.0
        assert got.value("bmslink_agent_publish_dropped_total", rack=RACK) >= 1
        assert got.value("bmslink_agent_poll_rounds_total", rack=RACK) >= 3
        # Polling never stops for the broker: the unit's values are there.
        assert got.value("bmslink_agent_unit_soh_ratio", **U) == pytest.approx(0.98)
    finally:
        stop.set()
        await task
        await sim.stop()
