"""A BMS that answers with a reading that contradicts itself: invalid data, not a lost link (issue 12).

A real pymodbus simulated BMS serves the ``acme_flat`` map; a test subclass overwrites chosen points
of its register image with what a device gone wrong would say (a pack at 0 V next to cells at 3.3 V,
a charge voltage limit below the discharge one, a SOC of 150 %, ...). For each contradiction: the
unit is reported ``invalid_data`` with a reason naming it, the counter rises, the rack stays "heard"
(comm ok) but grants no current, the Modbus TCP connection is kept (no new connect), the controller's
classification of what was published is ``invalid: ...`` (not ``comm_lost``), and once the device
says something plausible again the readings are published as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import pytest

from controller.core.classify import read_rack
from controller.core.snapshot import RackInput
from rack_agent.agent import RackAgent
from rack_agent.profiles.plan import encode_numeric
from shared.cluster import RackState
from shared.controller_config import RosterRack
from shared.models import LinkStatus, RackCommState, RackTelemetry
from shared.records import record_of
from sim.bms_server import SimulatedBms
from sim.registers import FLAT_BASE_ADDRESS, flat_register_plan
from tests.agent.helpers import SimPeer, agent_config, served, started_links, stop_links, wait_until
from tests.agent.test_publishing import Listener
from tests.fixtures.broker import MosquittoBroker

COMM_LOST_AFTER = 3
# More polls than comm_lost_after: an implausible reading must never add up to a comm loss.
BAD_POLLS = COMM_LOST_AFTER + 3


class TamperedBms(SimulatedBms):
    """The simulated BMS, with chosen points of its flat map overwritten (physical values)."""

    def __init__(self) -> None:
        super().__init__()
        self._plan = flat_register_plan()
        self._says: dict[str, float] = {}

    def say(self, **values: float) -> None:
        """Serve these values for these points from now on (nothing: serve the model again)."""
        self._says = dict(values)

    def _flat_image(self) -> list[int]:
        image = list(super()._flat_image())
        for name, value in self._says.items():
            point = self._plan.numeric[name]
            assert point.ref is not None
            at = point.ref.address - FLAT_BASE_ADDRESS
            words = encode_numeric(point, value)
            image[at:at + len(words)] = words
        return image


@dataclass(frozen=True)
class Case:
    says: dict[str, float]
    reason: str  # a part of the unit's reason
    unit: dict[str, Any] | None = None  # unit config additions
    plausibility: dict[str, Any] | None = None


# The simulated rack: 16 LFP cells near 3.3 V (pack ~52.8 V), CVL 55.2 V, DVL 46.4 V, 20..30 °C.
CASES = {
    "pack_0v_next_to_cells": Case(
        {"pack_voltage_v": 0.0},
        "pack_voltage_v 0.00 V below 1 cell (cells_in_series not configured) at cell_voltage_min_v",
    ),
    "pack_below_cells_in_series": Case(
        {"pack_voltage_v": 40.0}, "pack_voltage_v 40.00 V below 16 cells at cell_voltage_min_v",
        unit={"cells_in_series": 16},
    ),
    "pack_above_cells_in_series": Case(
        {"pack_voltage_v": 65.0}, "pack_voltage_v 65.00 V above 16 cells at cell_voltage_max_v",
        unit={"cells_in_series": 16},
    ),
    "cell_min_above_max": Case(
        {"cell_voltage_max_v": 3.2, "cell_voltage_min_v": 3.4},
        "cell_voltage_min_v 3.400 V above cell_voltage_max_v 3.200 V",
    ),
    "temperature_min_above_max": Case(
        {"temperature_max_c": 30.0, "temperature_min_c": 40.0},
        "°C above temperature_max_c",  # (the map's 0.1 K steps make the values 30.05 and 40.05 °C)
    ),
    "cvl_not_above_dvl": Case(
        {"charge_voltage_limit_v": 46.0, "discharge_voltage_limit_v": 48.0},
        "charge_voltage_limit_v 46.00 V not above discharge_voltage_limit_v 48.00 V",
    ),
    "pack_outside_nominal_range": Case(
        {"pack_voltage_v": 61.0}, "pack_voltage_v 61.00 V above the rack's maximum 60.00 V",
        plausibility={"pack_voltage_min_v": 44.0, "pack_voltage_max_v": 60.0},
    ),
    "soc_150_pct": Case({"soc_pct": 150.0}, "soc_pct: Input should be less than or equal to 100"),
}


Peer: TypeAlias = SimPeer[TamperedBms]


@pytest.fixture
async def tcp_peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    async with served(TamperedBms(), "tcp", request) as served_peer:
        yield served_peer


@pytest.fixture(params=["tcp", "rtu"])
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    async with served(TamperedBms(), request.param, request) as served_peer:
        yield served_peer


def _agent(peer: Peer, case: Case | None = None, *, extra: dict[str, Any] | None = None,
           **kwargs: Any) -> RackAgent:
    sections = dict(extra or {})
    if case is not None and case.plausibility:
        sections["plausibility"] = {**sections.get("plausibility", {}), **case.plausibility}
    return RackAgent(agent_config(
        peer.link, comm_lost_after=COMM_LOST_AFTER, extra=sections,
        unit_extra=case.unit if case is not None else None, **kwargs,
    ))


def _controller_sees(telemetry: RackTelemetry) -> tuple[RackState | None, str]:
    """The controller's first classification step applied to what the agent published."""
    rack_input = RackInput(telemetry.rack_id, telemetry=record_of(telemetry), received_s=100.0)
    reading = read_rack(rack_input, RosterRack(rack_id=telemetry.rack_id, capacity_ah=100.0),
                        telemetry.site_id, 100.0)
    return reading.link_state, reading.reason


def _assert_published_normally(telemetry: RackTelemetry) -> None:
    assert telemetry.comm_state is RackCommState.OK
    assert telemetry.units[0].status is LinkStatus.OK
    m = telemetry.measurements
    assert m is not None and m.charge_current_limit_a > 0 and m.discharge_current_limit_a > 0
    assert _controller_sees(telemetry) == (None, "")


@pytest.mark.parametrize("name", list(CASES))
async def test_contradiction_is_invalid_data_and_the_link_is_kept(tcp_peer: Peer, name: str) -> None:
    case = CASES[name]
    agent = _agent(tcp_peer, case)
    link = agent.links["lan"]
    health = agent.units["bms"].health
    try:
        await started_links(agent)
        _assert_published_normally(await agent.poll_once())
        connects = link.connect_attempts
        tcp_peer.sim.say(**case.says)
        bad = [await agent.poll_once() for _ in range(BAD_POLLS)]
        # Still the first connection, still up: the BMS is heard, only its reading is refused.
        assert link.connected
        assert link.connect_attempts == connects
        for t in bad:
            unit = t.units[0]
            assert unit.status is LinkStatus.INVALID_DATA
            # Heard, but granting nothing while its reading cannot be believed.
            assert t.comm_state is RackCommState.OK
            assert t.measurements is not None
            assert (t.measurements.charge_current_limit_a, t.measurements.discharge_current_limit_a) == (0, 0)
            state, reason = _controller_sees(t)
            assert state is RackState.INVALID
            # The contradiction itself reaches the controller (UnitLink.detail, schema 1.2).
            assert reason.startswith("invalid: the agent refuses the data of unit bms: ")
            assert case.reason in reason and unit.detail in reason
        assert [t.units[0].counters.invalid_data for t in bad] == list(range(1, BAD_POLLS + 1))
        assert bad[-1].units[0].consecutive_failures == BAD_POLLS
        assert health.invalid_reason is not None and case.reason in health.invalid_reason
        assert health.last_error is not None and "Invalid Data" in health.last_error
        assert not health.comm_lost
        counted = agent.metrics.registry.get_sample_value(
            "bmslink_agent_polls_total", {"rack": "rack-01", "unit": "bms", "outcome": "invalid_data"}
        )
        assert counted == BAD_POLLS
        tcp_peer.sim.say()  # the device says something plausible again
        good = await agent.poll_once()
        _assert_published_normally(good)
        assert good.units[0].counters.invalid_data == BAD_POLLS
        assert health.invalid_reason is None
        assert link.connect_attempts == connects
    finally:
        await stop_links(agent)


async def test_configured_checks_change_what_is_accepted(tcp_peer: Peer) -> None:
    # The same device reading is plausible or not depending on the rack's configuration alone.
    tcp_peer.sim.say(pack_voltage_v=40.0)
    strict = _agent(tcp_peer, CASES["pack_below_cells_in_series"])
    lenient = _agent(tcp_peer)  # no cells_in_series: only "at least one cell" is checked
    tolerant = _agent(tcp_peer, CASES["pack_below_cells_in_series"], extra={
        "plausibility": {"pack_tolerance_pct": 20.0, "pack_margin_v": 3.0}})  # ≥ 16 × 3.28 × 0.8 − 3
    try:
        for agent in (strict, lenient, tolerant):
            await started_links(agent)
        assert (await strict.poll_once()).units[0].status is LinkStatus.INVALID_DATA
        assert (await lenient.poll_once()).units[0].status is LinkStatus.OK
        assert (await tolerant.poll_once()).units[0].status is LinkStatus.OK
    finally:
        for agent in (strict, lenient, tolerant):
            await stop_links(agent)


async def test_implausible_reading_on_every_transport_keeps_the_link(peer: Peer) -> None:
    agent = _agent(peer)
    link = next(iter(agent.links.values()))
    try:
        await started_links(agent)
        _assert_published_normally(await agent.poll_once())
        connects = link.connect_attempts
        peer.sim.say(pack_voltage_v=0.0)
        bad = [await agent.poll_once() for _ in range(BAD_POLLS)]
        assert {t.units[0].status for t in bad} == {LinkStatus.INVALID_DATA}
        assert {t.comm_state for t in bad} == {RackCommState.OK}
        assert link.connected and link.connect_attempts == connects
        peer.sim.say()
        _assert_published_normally(await agent.poll_once())
    finally:
        await stop_links(agent)


async def test_link_failures_and_implausible_readings_do_not_add_up_to_comm_loss(tcp_peer: Peer) -> None:
    # Silence, then an implausible answer: the answer shows the link works, so the silence streak ends.
    agent = _agent(tcp_peer)
    try:
        await started_links(agent)
        _assert_published_normally(await agent.poll_once())
        connects = agent.links["lan"].connect_attempts
        tcp_peer.sim.say(soc_pct=150.0)
        for streak in (1, 2):
            tcp_peer.sim.faults.set_no_answer(True)
            for _ in range(COMM_LOST_AFTER - 1):
                t = await agent.poll_once()
                assert t.units[0].status is LinkStatus.TIMEOUT
                assert t.comm_state is RackCommState.OK
            tcp_peer.sim.faults.set_no_answer(False)
            t = await agent.poll_once()
            assert t.units[0].status is LinkStatus.INVALID_DATA
            assert t.comm_state is RackCommState.OK
            # Every failed poll is on the wire; only the link failures count towards comm loss.
            assert t.units[0].consecutive_failures == streak * COMM_LOST_AFTER
        assert not agent.units["bms"].health.comm_lost
        assert agent.links["lan"].connect_attempts == connects
        tcp_peer.sim.say()
        _assert_published_normally(await agent.poll_once())
    finally:
        await stop_links(agent)


async def test_published_rack_is_invalid_then_ok_again(
    mqtt_broker: MosquittoBroker, unique_topic_prefix: str, tcp_peer: Peer
) -> None:
    agent = _agent(tcp_peer, mqtt_port=mqtt_broker.port, prefix=unique_topic_prefix)
    stop = asyncio.Event()
    async with Listener(mqtt_broker, unique_topic_prefix) as listener:
        task = asyncio.create_task(agent.run(stop), name="agent-under-test")
        try:

            def last() -> RackTelemetry | None:
                return listener.telemetry[-1][1] if listener.telemetry else None

            def status_is(status: LinkStatus) -> bool:
                t = last()
                return t is not None and t.units[0].status is status

            await wait_until(lambda: status_is(LinkStatus.OK), 10.0, "a plausible reading published")
            connects = agent.links["lan"].connect_attempts
            tcp_peer.sim.say(pack_voltage_v=0.0)
            await wait_until(lambda: status_is(LinkStatus.INVALID_DATA), 10.0, "the unit published invalid")
            invalid_seen = len(listener.telemetry)
            await wait_until(lambda: len(listener.telemetry) >= invalid_seen + BAD_POLLS, 10.0, "more polls")
            published = last()
            assert published is not None
            assert published.comm_state is RackCommState.OK
            assert published.units[0].counters.invalid_data >= BAD_POLLS
            state, reason = _controller_sees(published)
            assert state is RackState.INVALID
            assert reason.startswith("invalid: the agent refuses the data of unit bms: ")
            assert agent.links["lan"].connect_attempts == connects
            tcp_peer.sim.say()
            await wait_until(lambda: status_is(LinkStatus.OK), 10.0, "plausible readings published again")
            recovered = last()
            assert recovered is not None
            _assert_published_normally(recovered)
        finally:
            stop.set()
            await task


async def test_lasting_nonsense_from_a_sunspec_device_is_rediscovered_on_the_same_link(
    tcp_peer: Peer,
) -> None:
    # Readings that stay implausible may come from a device re-addressed under us: after
    # comm_lost_after of them the SunSpec layout is discovered again, without a new connection.
    agent = _agent(tcp_peer, profile="sunspec", extra={"plausibility": {"pack_voltage_max_v": 50.0}})
    link = agent.links["lan"]
    unit = agent.units["bms"]
    try:
        await started_links(agent)
        connects = link.connect_attempts
        bad = [await agent.poll_once() for _ in range(COMM_LOST_AFTER + 1)]
        assert {t.units[0].status for t in bad} == {LinkStatus.INVALID_DATA}
        assert unit.health.invalid_reason is not None
        assert "above the rack's maximum 50.00 V" in unit.health.invalid_reason
        assert unit.discovery.attempts == 2  # the first, and one after comm_lost_after refusals
        assert link.connected and link.connect_attempts == connects
    finally:
        await stop_links(agent)
