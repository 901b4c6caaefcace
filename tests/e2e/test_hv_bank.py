"""A high-voltage bank end to end, in the Pylon HV dialect: 4 simulated racks of 240 LFP cells (768 V)
→ agents (processes, SunSpec over Modbus TCP) → Mosquitto → controller (process, ``dialect =
"pylon_hv"``) → the python-can-remote bridge (process) → the simulated inverter (process), which asks
for the set (0x4200) twice a second and judges the answers; a recorder on the bus decodes every frame.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import pytest

from controller.frames import ID_HV_LIMITS, ID_HV_REQUEST, FrameDecoder
from shared.controller_config import Dialect
from sim.battery import SimRackConfig
from sim.bms_server import SimulatedBms
from tests.e2e.rig import AGENT_INTERVAL_MS, AGENT_TOML, STALE_AFTER_MS
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.can_bridge import CanBridge
from tests.fixtures.procs import ProcessGroup, bmslink_cli

pytestmark = pytest.mark.slow
RACKS = 4
CELLS, CELLS_PER_MODULE = 240, 16
RACK_MAX_A = 140.0  # the simulated rack's nameplate current
REQUEST_PERIOD_S = 0.5
RACK = SimRackConfig(cells_in_series=CELLS, cells_per_module=CELLS_PER_MODULE)

CONTROLLER_TOML = """\
site_id = "site-e"
node_id = "controller"
state_dir = "{state_dir}"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "{prefix}"
keepalive_s = 2
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[can]
interface = "remote"
channel = "{can}"
dialect = "pylon_hv"
period_ms = 200

[can.pylon_hv]
cells_in_series = {cells}
modules_in_series = {modules}

[aggregation]
readmit_hold_s = 1
readmit_ramp_s = 1
ramp_up_a_per_s = 1000
fallback_voltage_v = 768

{roster}
"""


@dataclass
class Bus:
    """Every frame on the inverter bus with the time this process got it, decoded where it can be."""

    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(Dialect.PYLON_HV))
    frames: list[tuple[float, can.Message]] = field(default_factory=list)

    def __call__(self, msg: can.Message) -> None:
        if not msg.is_error_frame:
            self.frames.append((time.monotonic(), msg))

    def limits(self, since: float = 0.0) -> list[tuple[float, dict[str, float]]]:
        return [(t, self.decoder.decode(ID_HV_LIMITS, m.data)) for t, m in self.frames
                if t >= since and m.is_extended_id and m.arbitration_id == ID_HV_LIMITS]

    def requests(self, since: float = 0.0) -> int:
        return sum(1 for t, m in self.frames if t >= since and m.arbitration_id == ID_HV_REQUEST)

    def standard_ids(self) -> set[int]:
        return {m.arbitration_id for _, m in self.frames if not m.is_extended_id}


@dataclass
class HvChain:
    tmp: Path
    broker: MosquittoBroker
    prefix: str
    procs: ProcessGroup
    bus: Bus = field(default_factory=Bus)
    sims: list[SimulatedBms] = field(default_factory=list)
    bridge: CanBridge | None = None
    status_file: Path = Path("/nonexistent")  # set by start()
    _can: can.BusABC | None = None
    _notifier: can.Notifier | None = None

    async def start(self) -> None:
        self.bridge = CanBridge(self.tmp / "can")
        await asyncio.to_thread(self.bridge.start)
        self._can = can.Bus(interface="remote", channel=self.bridge.channel)
        self._notifier = can.Notifier(self._can, [self.bus], loop=asyncio.get_running_loop())
        roster = []
        for i in range(RACKS):
            sim = SimulatedBms(RACK.model_copy(update={"seed": i, "serial_number": f"HV-{i:04d}"}))
            port = free_port()
            await sim.start_tcp("127.0.0.1", port)
            sim.set_current(20.0)
            self.sims.append(sim)
            rack = f"rack-{i + 1:02d}"
            agent = self.tmp / f"agent-{i}.toml"
            agent.write_text(AGENT_TOML.format(rack=rack, broker=self.broker.port, prefix=self.prefix,
                                               interval=AGENT_INTERVAL_MS, bms=port)
                             .replace('profile = "acme_flat"', 'profile = "sunspec"'))
            self.procs.start(f"agent-{i}", bmslink_cli("agent", "--config", str(agent)))
            roster.append(f'[[roster]]\nrack_id = "{rack}"\ncapacity_ah = 280\n'
                          f'stale_after_ms = {STALE_AFTER_MS}\n')
        state_dir = self.tmp / "state"
        state_dir.mkdir()
        controller = self.tmp / "controller.toml"
        controller.write_text(CONTROLLER_TOML.format(
            state_dir=state_dir, broker=self.broker.port, prefix=self.prefix, can=self.bridge.channel,
            cells=CELLS, modules=CELLS // CELLS_PER_MODULE, roster="\n".join(roster)))
        self.procs.start("controller", bmslink_cli("controller", "--config", str(controller)))
        # The inverter starts asking once the controller is on the bus (its first set goes out unasked
        # at start): a request made before that is the inverter's start-up, not the battery's fault.
        self.status_file = self.tmp / "inverter.json"
        await self.wait_for(lambda: bool(self.bus.limits()), 20.0, "the controller on the bus")
        self.procs.start("inverter", bmslink_cli(
            "sim", "inverter", "--interface", "remote", "--channel", self.bridge.channel,
            "--dialect", "pylon_hv",
            "--request-period", str(REQUEST_PERIOD_S), "--answer-timeout", "1", "--heartbeat-timeout", "2",
            "--equipment-every", "4", "--profile", "100:3600", "--status-file", str(self.status_file),
        ))

    def inverter(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; inverter: "
                                     f"{self.inverter()}\n{self.procs.describe()}")
            await asyncio.sleep(0.05)
        return time.monotonic()

    async def stop(self) -> None:
        self.procs.stop_all()
        if self._notifier is not None:
            self._notifier.stop()
        if self._can is not None:
            self._can.shutdown()
        for sim in self.sims:
            await sim.stop()
        if self.bridge is not None:
            await asyncio.to_thread(self.bridge.stop)


@pytest.fixture
async def chain(tmp_path: Path, mqtt_broker: MosquittoBroker, unique_topic_prefix: str,
                procs: ProcessGroup) -> AsyncIterator[HvChain]:
    c = HvChain(tmp_path, mqtt_broker, unique_topic_prefix, procs)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()


def _full_bank(status: dict[str, Any]) -> bool:
    limits = status.get("limits") or {}
    return status.get("status") == "Normal" and limits.get("charge_current_limit_a") == RACKS * RACK_MAX_A


async def test_a_768v_bank_is_normal_and_told_the_banks_limits(chain: HvChain) -> None:
    await chain.wait_for(lambda: _full_bank(chain.inverter()), 40.0, "Normal with 4 racks' limits")
    await asyncio.sleep(2 * REQUEST_PERIOD_S + 1.1)  # a few more requests, and a status-file rewrite
    status = chain.inverter()
    limits = status["limits"]
    truth = [sim.model.measurements() for sim in chain.sims]
    assert limits["charge_current_limit_a"] == RACKS * min(m.charge_current_limit_a for m in truth)
    assert limits["discharge_current_limit_a"] == RACKS * min(m.discharge_current_limit_a for m in truth)
    assert limits["charge_voltage_limit_v"] == pytest.approx(
        min(m.charge_voltage_limit_v for m in truth), abs=0.05)
    assert limits["discharge_voltage_limit_v"] == pytest.approx(
        max(m.discharge_voltage_limit_v for m in truth), abs=0.05)
    assert limits["charge_voltage_limit_v"] == pytest.approx(828.0, abs=0.05)  # 240 × 3.45 V
    assert limits["charge_enabled"] and limits["discharge_enabled"] and limits["alarms"] == []
    assert status["violations"] == 0, status["violation_kinds"]
    assert status["current_a"] == 100.0  # the profile's request, within the limits
    assert status["equipment"]["CellsInSeries"] == CELLS and status["equipment"]["VoltageLevel"] == 768
    assert status["equipment"]["CapacityAh"] == RACKS * 280
    assert status["max_answer_latency_s"] < 1.0
    assert status["answers"] >= status["requests_sent"]["ensemble"] - 1  # one may be under way
    # On the bus: the inverter's requests and 29-bit answers only (and no low-voltage frame).
    assert chain.bus.requests() >= 4 and chain.bus.standard_ids() == set()
    answered = chain.bus.limits()
    assert answered and answered[-1][1]["DischargeCurrentLimit"] == -RACKS * RACK_MAX_A


async def test_an_alarm_forbids_charging_and_the_controller_killed_goes_unanswered(chain: HvChain) -> None:
    await chain.wait_for(lambda: _full_bank(chain.inverter()), 40.0, "Normal with 4 racks' limits")
    chain.sims[2].faults.raise_alarm("cell_over_voltage")
    raised = time.monotonic()

    def charge_forbidden() -> bool:
        limits = chain.inverter().get("limits") or {}
        return not limits.get("charge_enabled", True)

    await chain.wait_for(charge_forbidden, 10.0, "charge forbidden")
    status = chain.inverter()
    limits = status["limits"]
    assert limits["charge_current_limit_a"] == 0.0
    assert limits["discharge_enabled"] and limits["discharge_current_limit_a"] > 0.0
    assert "ProtectCellOverVoltage" in limits["alarms"]
    assert status["violations"] == 0, status["violation_kinds"]  # consistent marks, bits and limits
    assert status["current_a"] == 0.0  # the inverter stopped charging
    # The lowered limits went out unasked, before the inverter's next request could fetch them.
    lowered = [t for t, v in chain.bus.limits(raised) if v["ChargeCurrentLimit"] == 0.0]
    assert lowered
    # Now the controller dies: the inverter's requests go unanswered and it disconnects.
    chain.procs.send_signal("controller", signal.SIGKILL)
    killed = time.monotonic()

    def disconnected() -> bool:
        status = chain.inverter()
        return status.get("status") == "Disconnected" and status["violation_kinds"].get("no_answer", 0) >= 2

    await chain.wait_for(disconnected, 10.0, "unanswered requests, then Disconnected")
    status = chain.inverter()
    assert set(status["violation_kinds"]) <= {"no_answer", "heartbeat_gap"}
    assert status["current_a"] == 0.0
    assert chain.bus.requests(killed) >= 3 and chain.bus.limits(killed + 0.2) == []
