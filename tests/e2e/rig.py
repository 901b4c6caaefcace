"""The whole chain with real parts: simulated BMS racks (in this process, so tests can inject faults) →
agents (processes) → Mosquitto → controller (process) → CAN bridge (process) → simulated inverter (process),
plus a recorder on the CAN bus that decodes every frame the inverter hears."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from controller.frames import FrameDecoder
from shared.controller_config import Dialect
from sim.battery import SimRackConfig
from sim.bms_server import SimulatedBms
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.can_bridge import CanBridge
from tests.fixtures.procs import ProcessGroup, bmslink_cli

HEARTBEAT_MS = 200
AGENT_INTERVAL_MS = 200
STALE_AFTER_MS = 1000


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    arbitration_id: int
    values: dict[str, float]


CONTROLLER_HEARTBEAT_ID = 0x6E0


@dataclass(frozen=True, slots=True)
class Beat:
    t: float
    node: int
    role: int  # 1 active, 2 standby, 3 releasing
    epoch: int


def _bus_time(msg: can.Message) -> float:
    """When the frame was on the bus, on this process's monotonic clock.

    The recorder's callback runs on the test's event loop, which may be busy when the frame arrives;
    stamping it then would bunch frames sent far apart (and could count two transmitters at once
    that never were). The bridge's virtual bus stamps each frame with the wall clock when it takes
    it; the delay since is taken off. A stamp that makes no sense (in the future, or seconds old) is
    not used.
    """
    now = time.monotonic()
    late_s = time.time() - msg.timestamp
    return now - late_s if 0.0 <= late_s < 5.0 else now


@dataclass
class Recorder:
    """Every frame on the inverter bus, decoded, with the time this process received it."""

    dialect: Dialect = Dialect.PYLON
    samples: list[Sample] = field(default_factory=list)
    foreign: list[int] = field(default_factory=list)
    beats: list[Beat] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._decoder = FrameDecoder(self.dialect)

    def __call__(self, msg: can.Message) -> None:
        if msg.is_error_frame:
            return
        t = _bus_time(msg)
        if msg.arbitration_id == CONTROLLER_HEARTBEAT_ID:
            d = msg.data
            self.beats.append(Beat(t, d[0], d[1] & 0x0F, int.from_bytes(d[2:6], "little")))
            return
        if not self._decoder.knows(msg.arbitration_id):
            self.foreign.append(msg.arbitration_id)
            return
        values = self._decoder.decode(msg.arbitration_id, msg.data)
        self.samples.append(Sample(t, msg.arbitration_id, values))

    def limits(self, since: float = 0.0) -> list[tuple[float, float, float, float]]:
        """(t, CCL, DCL, CVL) of every 0x351 since ``since``."""
        return [
            (
                s.t,
                s.values["ChargeCurrentLimit"],
                s.values["DischargeCurrentLimit"],
                s.values["ChargeVoltageLimit"],
            )
            for s in self.samples if s.arbitration_id == 0x351 and s.t >= since
        ]

    def last(self, arbitration_id: int) -> dict[str, float] | None:
        for s in reversed(self.samples):
            if s.arbitration_id == arbitration_id:
                return s.values
        return None

    def ccl(self) -> float:
        v = self.last(0x351)
        return -1.0 if v is None else v["ChargeCurrentLimit"]

    def dcl(self) -> float:
        v = self.last(0x351)
        return -1.0 if v is None else v["DischargeCurrentLimit"]

    def active_beats(self, since: float = 0.0) -> list[Beat]:
        return [b for b in self.beats if b.role in (1, 3) and b.t >= since]

    def active_node(self) -> int | None:
        beats = self.active_beats()
        return beats[-1].node if beats else None

    def overlaps(self, window_s: float, since: float = 0.0) -> list[tuple[Beat, Beat]]:
        """Pairs of active beats from two nodes closer than ``window_s``: two transmitters at once.

        A releasing beat (role 3) is the old active's last frame in an orderly handover: the successor
        starting right after it is the handover working, not an overlap. Any frame of the old node
        after the successor's first is one.
        """
        beats = self.active_beats(since)
        return [(a, b) for a, b in itertools.pairwise(beats)
                if a.node != b.node and b.t - a.t < window_s and a.role != 3]

    def max_gap(self, since: float = 0.0) -> float:
        times = [t for t, *_ in self.limits(since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


AGENT_TOML = """\
site_id = "site-e"
rack_id = "{rack}"

[mqtt]
host = "127.0.0.1"
port = {broker}
topic_prefix = "{prefix}"
keepalive_s = 2
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[polling]
interval_ms = {interval}
request_timeout_ms = 100

[[links]]
type = "modbus_tcp"
name = "lan"
host = "127.0.0.1"
port = {bms}

[[units]]
name = "bms"
link = "lan"
profile = "acme_flat"
"""

CONTROLLER_TOML = """\
site_id = "site-e"
node_id = "{node}"
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
dialect = "pylon"
period_ms = {heartbeat}

[aggregation]
min_racks = {min_racks}
readmit_hold_s = {hold}
readmit_ramp_s = {ramp}
ramp_up_a_per_s = {ramp_rate}

[aggregation.thermal_derate]
window_s = 5
horizon_s = 10

{failover}
{commands}
{roster}
"""


@dataclass
class Chain:
    tmp: Path
    broker: MosquittoBroker
    prefix: str
    procs: ProcessGroup
    racks: int = 3
    min_racks: int = 1
    hold_s: float = 1.0
    ramp_s: float = 1.0
    ramp_rate: float = 200.0
    sim_configs: dict[int, SimRackConfig] = field(default_factory=dict)
    controllers: int = 1
    failover: bool = False
    keys_file: Path | None = None  # the operators' key file the controllers read ([commands])
    sims: list[SimulatedBms] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)
    bridge: CanBridge | None = None
    _bus: can.BusABC | None = None
    _notifier: can.Notifier | None = None

    def rack_id(self, i: int) -> str:
        return f"rack-{i + 1:02d}"

    async def start(self, *, wait_ready: bool = True, ctl_1_active_first: bool = False,
                    prepare: Callable[[Chain], Awaitable[None]] | None = None) -> None:
        """Start everything; ``prepare`` runs once the CAN bridge is up, before any controller.

        ``ctl_1_active_first``: the other controllers start once ctl-1 is heard active. Started
        together, the rank stagger (150 ms) decides who is active, and on a loaded machine the
        start-up of one process can lag another's by more than that.
        """
        self.bridge = CanBridge(self.tmp / "can")
        await asyncio.to_thread(self.bridge.start)
        if prepare is not None:
            await prepare(self)
        self._bus = can.Bus(interface="remote", channel=self.bridge.channel)
        self._notifier = can.Notifier(self._bus, [self.recorder], loop=asyncio.get_running_loop())
        for i in range(self.racks):
            sim = SimulatedBms(self.sim_configs.get(i))
            port = free_port()
            await sim.start_tcp("127.0.0.1", port)
            sim.set_current(20.0)
            self.sims.append(sim)
            cfg = self.tmp / f"agent-{i}.toml"
            cfg.write_text(AGENT_TOML.format(
                rack=self.rack_id(i), broker=self.broker.port, prefix=self.prefix,
                interval=AGENT_INTERVAL_MS, bms=port,
            ))
            self.procs.start(f"agent-{i}", bmslink_cli("agent", "--config", str(cfg)))
        if self.controllers == 1 and not self.failover:
            self.start_controller("controller")
        else:
            for k in range(self.controllers):
                self.start_controller(f"ctl-{k + 1}", node_number=k + 1, rank=k)
                if k == 0 and ctl_1_active_first:
                    await self.wait_for(lambda: self.recorder.active_node() == 1, 20.0, "ctl-1 active")
        self.status_file = self.tmp / "inverter.json"
        self.procs.start("inverter", bmslink_cli(
            "sim", "inverter", "--interface", "remote", "--channel", self.bridge.channel,
            "--dialect", "pylon", "--heartbeat-timeout", "2", "--ignore-id", "0x6E0",
            "--status-file", str(self.status_file),
        ))
        if wait_ready:
            await self.wait_for(lambda: self.recorder.ccl() > 0 or self.recorder.dcl() > 0, 20.0,
                                "the inverter to be granted current")

    def controller_config(self, name: str, *, node_number: int = 1, rank: int = 0,
                          can_channel: str | None = None, mqtt_port: int | None = None) -> Path:
        assert self.bridge is not None
        roster = "\n".join(f'[[roster]]\nrack_id = "{self.rack_id(i)}"\ncapacity_ah = 280\nstale_after_ms = '
                           f'{STALE_AFTER_MS}\n' for i in range(self.racks))
        failover = ""
        if self.failover:
            failover = (f"[failover]\nenabled = true\nnode_number = {node_number}\nrank = {rank}\n"
                        f"heartbeat_period_ms = 100\n")
        path = self.tmp / f"{name}.toml"
        state_dir = self.state_dir(name)
        state_dir.mkdir(exist_ok=True)
        # A wide command window: a replay in a slow run must still be refused as a replay, not for age.
        commands = ("" if self.keys_file is None
                    else f'[commands]\nkeys_file = "{self.keys_file}"\nwindow_s = 120\n')
        path.write_text(CONTROLLER_TOML.format(
            state_dir=state_dir, commands=commands,
            node=name, broker=mqtt_port or self.broker.port, prefix=self.prefix,
            can=can_channel or self.bridge.channel,
            heartbeat=HEARTBEAT_MS, min_racks=self.min_racks, hold=self.hold_s, ramp=self.ramp_s,
            ramp_rate=self.ramp_rate, roster=roster, failover=failover))
        return path

    def state_dir(self, name: str) -> Path:
        """Where controller ``name`` keeps its state database (kept across its restarts)."""
        return self.tmp / f"state-{name}"

    def start_controller(self, name: str, **kwargs: Any) -> None:
        config_path = self.controller_config(name, **kwargs)
        self.procs.start(name, bmslink_cli("controller", "--config", str(config_path)))

    def inverter(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                     f"last 0x351: {self.recorder.last(0x351)}\n{self.procs.describe()}")
            await asyncio.sleep(0.02)
        return time.monotonic()

    async def settle(self, seconds: float = 1.5) -> float:
        """Wait until CCL has been steady for ``seconds``; return it."""
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            recent = [ccl for t, ccl, _, _ in self.recorder.limits(now - seconds)]
            if len(recent) >= 3 and max(recent) - min(recent) < 0.05 and \
                    self.recorder.limits() and self.recorder.limits()[0][0] < now - seconds:
                return recent[-1]
            await asyncio.sleep(0.1)
        raise AssertionError(f"CCL never settled: {[c for _, c, _, _ in self.recorder.limits()[-10:]]}")

    async def stop(self) -> None:
        self.procs.stop_all()
        if self._notifier is not None:
            self._notifier.stop()
        if self._bus is not None:
            self._bus.shutdown()
        for sim in self.sims:
            await sim.stop()
        if self.bridge is not None:
            await asyncio.to_thread(self.bridge.stop)
