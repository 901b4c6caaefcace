"""Named makes end to end: the agent, configured by naming a shipped profile and a link, reads a
simulated unit of that make over the make's own transport and publishes what the unit's battery says.

Transports as the makes have them: Modbus RTU over a socat pty pair for Seplos V3, JK PB and Pace;
RTU framing over TCP for a BYD Battery-Box BMU. The simulated unit serves the register image the
make's profile describes (sim/registers.py make_image), so these tests check the agent's reading of
each map's quirks (input registers and coils, byte addressing, byte fields, reduced cell extremes,
RTU-over-TCP), not the profile's addresses against hardware: tests/agent/test_make_profile_format.py
decodes public captures of real Seplos frames for that.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bmslink.processes import free_port
from rack_agent.agent import RackAgent
from shared.agent_config import AgentConfig
from shared.config import ConfigError, validate_config
from shared.models import ContactorState, LinkStatus, RackCommState, RackMeasurements
from sim.bms_server import SimulatedBms, SimulatedLine
from sim.registers import MAKES
from tests.agent.helpers import agent_config, started_links, stop_links
from tests.fixtures.serial_pair import SerialPair

ILLEGAL_ADDRESS = 2
FC_READ_COILS = 1


@dataclass(frozen=True)
class Make:
    name: str
    transport: str  # "rtu" (socat pty pair) or "rtu_over_tcp"
    # Resolution of the map's registers: what the decoded value may differ from the battery's by.
    pack_v: float
    cell_v: float
    temperature_c: float
    soc_pct: float
    current_a: float
    limit_a: float
    # Limits the profile gives as constants (the BMS does not report them): name -> value.
    constants: dict[str, float] = field(default_factory=dict)
    has_contactor: bool = True
    capacity_ah: float | None = None  # unit config, for a map without a capacity register


MAKE_CASES = {
    m.name: m
    for m in (
        Make("seplos_v3", "rtu", 0.01, 0.001, 0.06, 0.1, 0.01, 1.0),
        Make("jk_pb", "rtu", 0.001, 0.001, 0.1, 1.0, 0.001, 0.001,
             constants={"charge_voltage_limit_v": 55.2, "discharge_voltage_limit_v": 46.4}),
        Make("pace", "rtu", 0.01, 0.001, 0.1, 1.0, 0.01, 1.0),
        Make("byd_hvs", "rtu_over_tcp", 0.01, 0.01, 1.0, 1.0, 0.1, 0.0,
             constants={"charge_current_limit_a": 25.0, "discharge_current_limit_a": 25.0,
                        "charge_voltage_limit_v": 441.6, "discharge_voltage_limit_v": 371.2},
             has_contactor=False, capacity_ah=50.0),
    )
}


@contextlib.asynccontextmanager
async def served_make(
    sim: SimulatedBms, transport: str, pair: SerialPair | None
) -> AsyncIterator[dict[str, Any]]:
    """``sim`` served over its make's transport; yields the agent's link config that reaches it."""
    assert sim.make is not None
    spec = MAKES[sim.make]
    if transport == "rtu":
        assert pair is not None
        await sim.start_rtu(pair.a, baudrate=spec.baudrate)
        link: dict[str, Any] = {"type": "modbus_rtu", "name": "rs485", "device": pair.b,
                                "baudrate": spec.baudrate}
    else:
        port = free_port()
        await sim.start_tcp("127.0.0.1", port, framer="rtu")
        link = {"type": "modbus_tcp", "name": "bmu", "host": "127.0.0.1", "port": port, "framer": "rtu"}
    try:
        yield link
    finally:
        await sim.stop()


def _assert_reads_the_battery(make: Make, m: RackMeasurements, truth: RackMeasurements) -> None:
    assert m.pack_voltage_v == pytest.approx(truth.pack_voltage_v, abs=make.pack_v + 0.02)
    assert m.current_a == pytest.approx(truth.current_a, abs=make.current_a + 0.05)
    assert m.soc_pct == pytest.approx(truth.soc_pct, abs=make.soc_pct)
    assert m.cell_voltage_max_v == pytest.approx(truth.cell_voltage_max_v, abs=make.cell_v)
    assert m.cell_voltage_min_v == pytest.approx(truth.cell_voltage_min_v, abs=make.cell_v)
    assert m.temperature_max_c == pytest.approx(truth.temperature_max_c, abs=make.temperature_c)
    assert m.temperature_min_c == pytest.approx(truth.temperature_min_c, abs=make.temperature_c)
    for name in ("charge_current_limit_a", "discharge_current_limit_a", "charge_voltage_limit_v",
                 "discharge_voltage_limit_v"):
        expected = make.constants.get(name, getattr(truth, name))
        assert getattr(m, name) == pytest.approx(expected, abs=max(make.limit_a, 0.01)), name


@pytest.mark.parametrize("name", sorted(MAKE_CASES))
async def test_agent_reads_each_make_by_profile_name(name: str, serial_pair: SerialPair) -> None:
    make = MAKE_CASES[name]
    sim = SimulatedBms(make=name)
    async with served_make(sim, make.transport, serial_pair) as link:
        agent = RackAgent(agent_config(link, profile=name, capacity_ah=make.capacity_ah, timeout_ms=80))
        try:
            await started_links(agent)
            sim.set_current(30.0)  # charging
            telemetry = await agent.poll_once()
            assert telemetry.units[0].status is LinkStatus.OK, telemetry.units[0]
            assert telemetry.comm_state is RackCommState.OK
            m = telemetry.measurements
            assert m is not None
            _assert_reads_the_battery(make, m, sim.model.measurements())
            assert m.current_a > 0  # charging is positive end to end
            assert m.alarms.raised() == ()
            assert m.contactor is (ContactorState.CLOSED if make.has_contactor else ContactorState.UNKNOWN)

            sim.set_current(-20.0)  # discharging
            sim.faults.raise_alarm("cell_over_voltage")
            sim.faults.raise_alarm("internal_fault")
            if make.has_contactor:
                sim.faults.open_contactor()
            m = (await agent.poll_once()).measurements
            assert m is not None
            truth = sim.model.measurements()
            assert m.current_a < 0
            assert m.current_a == pytest.approx(truth.current_a, abs=make.current_a + 0.05)
            assert m.alarms.cell_over_voltage and m.alarms.internal_fault
            assert not m.alarms.pack_over_voltage
            if make.has_contactor:
                assert m.contactor is ContactorState.OPEN
        finally:
            await stop_links(agent)


async def test_seplos_warning_coils_reach_the_warning_flags(serial_pair: SerialPair) -> None:
    sim = SimulatedBms(make="seplos_v3")
    async with served_make(sim, "rtu", serial_pair) as link:
        agent = RackAgent(agent_config(link, profile="seplos_v3", timeout_ms=80))
        try:
            await started_links(agent)
            sim.faults.raise_warning("cell_imbalance")  # TB06 bit 4: coil 0x1274
            sim.faults.raise_warning("charge_over_temperature")  # TB03 bit 0: coil 0x1250
            m = (await agent.poll_once()).measurements
            assert m is not None
            assert m.warnings.raised() == ("charge_over_temperature", "cell_imbalance")
            assert m.alarms.raised() == ()
        finally:
            await stop_links(agent)


def _rack_config(links: list[dict[str, Any]], units: list[dict[str, Any]]) -> AgentConfig:
    data: dict[str, Any] = {
        "site_id": "site-t", "rack_id": "rack-01",
        "mqtt": {"host": "127.0.0.1", "port": 1, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "polling": {"interval_ms": 400, "request_timeout_ms": 80, "comm_lost_after": 3,
                    "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
        "links": links, "units": units,
    }
    return validate_config(data, AgentConfig, "<test>")


async def test_a_rack_of_mixed_makes_reads_every_unit_and_one_odd_answer_stays_its_own(
    serial_pair: SerialPair, tmp_path: Path
) -> None:
    """A Seplos (id 1) and a Pace (id 2) on one RS-485 line, a JK on a second line and a BYD BMU over
    TCP, in one rack. A pty has no baud timing; on a real line the Seplos and the Pace must be set to
    one speed (the Pace's is "subject to the BMS specification", the Seplos's fixed at 19200)."""
    seplos, pace = SimulatedBms(make="seplos_v3", device_id=1), SimulatedBms(make="pace", device_id=2)
    jk, byd = SimulatedBms(make="jk_pb", device_id=3), SimulatedBms(make="byd_hvs")
    line = SimulatedLine([seplos, pace])
    with SerialPair(tmp_path / "jk-line") as jk_pair:
        await line.start_rtu(serial_pair.a, baudrate=19200)
        await jk.start_rtu(jk_pair.a, baudrate=115200)
        byd_port = free_port()
        await byd.start_tcp("127.0.0.1", byd_port, framer="rtu")
        config = _rack_config(
            [{"type": "modbus_rtu", "name": "line-a", "device": serial_pair.b, "baudrate": 19200},
             {"type": "modbus_rtu", "name": "line-b", "device": jk_pair.b, "baudrate": 115200},
             {"type": "modbus_tcp", "name": "bmu", "host": "127.0.0.1", "port": byd_port, "framer": "rtu"}],
            [{"name": "seplos", "link": "line-a", "device_id": 1, "profile": "seplos_v3"},
             {"name": "pace", "link": "line-a", "device_id": 2, "profile": "pace"},
             {"name": "jk", "link": "line-b", "device_id": 3, "profile": "jk_pb"},
             {"name": "byd", "link": "bmu", "device_id": 1, "profile": "byd_hvs", "capacity_ah": 50.0}],
        )
        agent = RackAgent(config)
        sims = {"seplos": seplos, "pace": pace, "jk": jk, "byd": byd}
        try:
            await started_links(agent)
            for sim in sims.values():
                sim.set_current(10.0)
            telemetry = await agent.poll_once()
            assert {u.unit: u.status for u in telemetry.units} == dict.fromkeys(sims, LinkStatus.OK)
            for name, sim in sims.items():
                reading = agent.units[name].health.last_good
                assert reading is not None
                assert sim.make is not None
                _assert_reads_the_battery(MAKE_CASES[sim.make], reading, sim.model.measurements())

            # The Seplos's firmware refuses the coil read: classified and counted for it alone.
            seplos.refuse_function(FC_READ_COILS, ILLEGAL_ADDRESS)
            telemetry = await agent.poll_once()
            units = {u.unit: u for u in telemetry.units}
            assert units["seplos"].status is LinkStatus.MODBUS_EXCEPTION
            assert units["seplos"].last_exception_code == ILLEGAL_ADDRESS
            assert units["seplos"].counters.modbus_exception == 1
            assert "coils (FC1)" in agent.units["seplos"].health.last_error  # type: ignore[operator]
            for name in ("pace", "jk", "byd"):
                assert units[name].status is LinkStatus.OK, units[name]
            seplos.refuse_function(FC_READ_COILS, None)
            telemetry = await agent.poll_once()
            assert {u.unit: u.status for u in telemetry.units}["seplos"] is LinkStatus.OK
        finally:
            await stop_links(agent)
            await line.stop()
            await jk.stop()
            await byd.stop()


async def test_tcp_framer_option_decides_whether_an_rtu_over_tcp_bmu_is_heard() -> None:
    """framer = "rtu" reads the BYD BMU; the default Modbus TCP framing gets no valid answer from it."""
    sim = SimulatedBms(make="byd_hvs")
    port = free_port()
    await sim.start_tcp("127.0.0.1", port, framer="rtu")
    try:
        for framer, expected in (("socket", LinkStatus.TIMEOUT), ("rtu", LinkStatus.OK)):
            link = {"type": "modbus_tcp", "name": "bmu", "host": "127.0.0.1", "port": port, "framer": framer}
            agent = RackAgent(agent_config(link, profile="byd_hvs", capacity_ah=50.0, timeout_ms=80))
            try:
                await started_links(agent)
                unit = (await agent.poll_once()).units[0]
                assert unit.status is expected, (framer, unit)
            finally:
                await stop_links(agent)
    finally:
        await sim.stop()


def test_tcp_framer_takes_only_the_framings_pymodbus_speaks() -> None:
    link = {"type": "modbus_tcp", "name": "lan", "host": "127.0.0.1", "port": 502, "framer": "ascii"}
    with pytest.raises(ConfigError, match="framer"):
        agent_config(link)
    link["framer"] = "socket"
    assert agent_config(link).links[0].framer == "socket"  # type: ignore[union-attr]
