"""The Pylon HV dialect in a running controller (real broker, python-can virtual bus): the inverter
asks (0x4200) and the active answers at once from the current cycle, the fail-safe set when the
cycle cannot be computed; nothing unasked but decreases (unless it broadcasts); a standby never
answers; the inverter's requests are not a foreign transmitter, another battery's answers are."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import can
import pytest

from controller.frames import FrameDecoder, FrameEncoder, HvRequest, hv_request_frame
from controller.service import ControllerService
from shared.codec import encode
from shared.config import MqttConfig, validate_config
from shared.controller_config import ControllerConfig, Dialect
from shared.models import ProtectionFlags
from shared.mqtt import MqttSession
from shared.topics import Topics
from tests.agent.helpers import wait_until
from tests.contract.samples import measurements, telemetry
from tests.controller.frames.hv_wire import ENSEMBLE, EQUIPMENT, FORBIDDEN, amps, check_hv_equipment
from tests.fixtures.broker import MosquittoBroker, free_port

RACKS = ("rack-01", "rack-02")
PERIOD_MS = 200
CELLS, MODULES = 240, 15


def hv_config(broker: MosquittoBroker, prefix: str, channel: str, *, node: str = "n1",
              failover: dict[str, Any] | None = None, **pylon_hv: Any) -> ControllerConfig:
    return validate_config({
        "site_id": "site-a", "node_id": node,
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
        "roster": [{"rack_id": rack, "capacity_ah": 280} for rack in RACKS],
        "aggregation": {"readmit_hold_s": 0, "readmit_ramp_s": 0, "ramp_up_a_per_s": 10_000,
                        "fallback_voltage_v": 768.0},
        "can": {"interface": "virtual", "channel": channel, "period_ms": PERIOD_MS, "dialect": "pylon_hv",
                "pylon_hv": {"cells_in_series": CELLS, "modules_in_series": MODULES, **pylon_hv}},
        "failover": failover or {},
    }, ControllerConfig, "<test>")


class Inverter:
    """The HV inverter's side of the bus: asks, and records every frame it hears with its time."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.decoder = FrameDecoder(Dialect.PYLON_HV)
        self.heard: list[tuple[float, can.Message]] = []
        self.notifier = can.Notifier(self.bus, [self._rx], loop=asyncio.get_running_loop())

    def _rx(self, msg: can.Message) -> None:
        self.heard.append((time.monotonic(), msg))

    def ask(self, kind: int = HvRequest.ENSEMBLE, tail: bytes = b"") -> float:
        sent = time.monotonic()
        self.bus.send(hv_request_frame(kind, tail))
        return sent

    def since(self, t: float, frame_id: int | None = None) -> list[can.Message]:
        return [m for at, m in self.heard if at >= t and (frame_id is None or m.arbitration_id == frame_id)]

    def answer_after(self, t: float, ids: tuple[int, ...] = ENSEMBLE) -> list[can.Message] | None:
        """The first complete answer heard after ``t``, in order, or None."""
        frames = [m for m in self.since(t) if m.arbitration_id in ids]
        for start in range(len(frames) - len(ids) + 1):
            window = frames[start:start + len(ids)]
            if tuple(m.arbitration_id for m in window) == ids:
                return window
        return None

    async def ask_and_wait(self, kind: int = HvRequest.ENSEMBLE, timeout_s: float = 1.0,
                           tail: bytes = b"") -> tuple[float, list[can.Message]]:
        """Ask; (seconds to the last frame of the answer, the answer)."""
        sent = self.ask(kind, tail)
        ids = ENSEMBLE if kind == HvRequest.ENSEMBLE else EQUIPMENT
        await wait_until(lambda: self.answer_after(sent, ids) is not None, timeout_s, f"an answer to {kind}")
        answer = self.answer_after(sent, ids)
        assert answer is not None
        last = max(at for at, m in self.heard if m is answer[-1])
        return last - sent, answer

    def limits(self, answer: list[can.Message]) -> dict[str, float]:
        return self.decoder.decode(0x4220, answer[1].data)

    def close(self) -> None:
        self.notifier.stop()
        self.bus.shutdown()


class Racks:
    """Both racks' telemetry (768 V racks) through the broker."""

    def __init__(self, pub: MqttSession, topics: Topics) -> None:
        self.pub, self.topics, self.seq = pub, topics, 0
        self.ccl, self.alarms = 100.0, ProtectionFlags()

    def publish(self) -> None:
        self.seq += 1
        m = measurements(pack_voltage_v=768.0, charge_voltage_limit_v=828.0, discharge_voltage_limit_v=696.0,
                         charge_current_limit_a=self.ccl, discharge_current_limit_a=120.0, alarms=self.alarms,
                         warnings=ProtectionFlags())
        for rack in RACKS:
            t = telemetry(site_id="site-a", rack_id=rack, seq=self.seq, timestamp_s=time.time(),
                          measurements=m)
            self.pub.publish(self.topics.rack_telemetry(rack), encode(t))

    async def feed(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.publish()
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def hv_rig(broker: MosquittoBroker, prefix: str,
                 **options: Any) -> AsyncIterator[tuple[ControllerService, Inverter, Racks]]:
    channel = f"hv-{free_port()}"
    inverter = Inverter(channel)
    svc = ControllerService(hv_config(broker, prefix, channel, **options))
    pub = MqttSession(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix), "pub")
    await svc.start()
    await pub.start()
    try:
        assert await pub.wait_connected(5) and await svc.mqtt.wait_connected(5)
        yield svc, inverter, Racks(pub, Topics(prefix, "site-a"))
    finally:
        await pub.stop()
        await svc.stop()
        inverter.close()


@pytest.fixture
async def rig(mqtt_broker: MosquittoBroker,
              unique_topic_prefix: str) -> AsyncIterator[tuple[ControllerService, Inverter, Racks]]:
    async with hv_rig(mqtt_broker, unique_topic_prefix) as parts:
        yield parts


async def test_a_request_is_answered_at_once_from_a_cycle_run_for_it(rig: Any) -> None:
    svc, inverter, racks = rig
    await racks.feed(1.0)
    cycles = svc.stats.cycles
    latency, answer = await inverter.ask_and_wait()
    assert latency < 0.25, latency
    assert svc.stats.cycles > cycles
    assert all(m.is_extended_id for m in answer)
    limits = inverter.limits(answer)
    assert (limits["ChargeCurrentLimit"], limits["DischargeCurrentLimit"]) == (200.0, -240.0)
    assert svc.last_sent is svc.state  # the answer is the state of the cycle run for it
    assert svc.can_events["values_clamped"] == 0
    assert svc.can_events["answers_sent"] >= 1 and svc.can_events["requests_ensemble"] >= 1
    # Racks gone quiet: the next answer is computed now (stale racks grant nothing), not remembered.
    await asyncio.sleep(2.0)
    _latency, answer = await inverter.ask_and_wait()
    assert inverter.limits(answer)["ChargeCurrentLimit"] == 0.0
    assert answer[7].data[:2] == bytes([FORBIDDEN, FORBIDDEN])


async def test_quiet_unasked_but_a_decrease_goes_at_once(rig: Any) -> None:
    _svc, inverter, racks = rig
    await racks.feed(1.0)
    await inverter.ask_and_wait()
    quiet_from = time.monotonic()
    await racks.feed(1.2)  # steady: heartbeat deadlines pass (every 200 ms), nothing is sent unasked
    assert inverter.since(quiet_from) == []
    lowered = time.monotonic()
    racks.ccl = 40.0
    racks.publish()
    await wait_until(lambda: inverter.answer_after(lowered) is not None, 0.5, "the lowered limits, unasked")
    answer = inverter.answer_after(lowered)
    assert answer is not None and inverter.limits(answer)["ChargeCurrentLimit"] == 80.0
    # And the next answer says the same.
    _latency, answer = await inverter.ask_and_wait()
    assert inverter.limits(answer)["ChargeCurrentLimit"] == 80.0


async def test_an_alarm_goes_out_at_once_with_the_charge_forbidden(rig: Any) -> None:
    _svc, inverter, racks = rig
    await racks.feed(1.0)
    raised = time.monotonic()
    racks.alarms = ProtectionFlags(cell_over_voltage=True)
    racks.publish()
    await wait_until(lambda: inverter.answer_after(raised) is not None, 0.5, "the alarm, unasked")
    answer = inverter.answer_after(raised)
    assert answer is not None
    assert amps(answer[1].data, 4) == 0.0 and amps(answer[1].data, 6) < 0  # charge 0, discharge kept
    assert answer[4].data[6] & 0x02  # protection word bit 1: cell over-voltage
    assert answer[7].data[:2] == bytes([FORBIDDEN, 0x00])


async def test_equipment_information_and_requests_it_does_not_serve(rig: Any) -> None:
    svc, inverter, _racks = rig
    _latency, answer = await inverter.ask_and_wait(HvRequest.EQUIPMENT)
    check_hv_equipment(answer, cells=CELLS, modules=MODULES, voltage_level_v=768, capacity_ah=560.0,
                       name="PYLON", software=(0, 1))
    asked = inverter.ask(HvRequest.CELL_VOLTAGES)
    await asyncio.sleep(0.3)
    assert inverter.since(asked) == []  # cell voltages (0x5xxx) are not served: no answer at all
    assert svc.can_events["requests_unsupported"] == 1
    # A request with a clock in bytes 1-7 is still a request for the ensemble information.
    _latency, answer = await inverter.ask_and_wait(tail=bytes([26, 12, 3, 10, 30, 0, 0]))
    assert len(answer) == len(ENSEMBLE)


async def test_a_cycle_that_cannot_compute_answers_the_fail_safe_set(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, inverter, racks = rig
    await racks.feed(1.0)
    _latency, answer = await inverter.ask_and_wait()
    assert inverter.limits(answer)["ChargeCurrentLimit"] == 200.0

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("core defect")

    monkeypatch.setattr(svc.engine, "cycle", broken)
    for _ in range(3):
        await asyncio.sleep(0.05)  # beyond ANSWER_MIN_GAP_S: each request runs its own cycle
        _latency, answer = await inverter.ask_and_wait()
        limits = inverter.limits(answer)
        assert (limits["ChargeCurrentLimit"], limits["DischargeCurrentLimit"]) == (0.0, 0.0)
        assert limits["ChargeVoltageLimit"] == 828.0  # kept plausible, never 0
        assert answer[4].data[3] == 0x80  # "other error"
        assert answer[7].data[:2] == bytes([FORBIDDEN, FORBIDDEN])
    assert svc.can_events["answers_failsafe"] >= 3


async def test_broadcast_sends_the_set_every_period_unasked(mqtt_broker: MosquittoBroker,
                                                           unique_topic_prefix: str) -> None:
    async with hv_rig(mqtt_broker, unique_topic_prefix, broadcast=True) as (_svc, inverter, racks):
        await racks.feed(0.5)
        start = time.monotonic()
        await racks.feed(1.5)
        limits = inverter.since(start, 0x4220)
        assert 5 <= len(limits) <= 10, len(limits)  # every 200 ms


async def test_requests_are_not_a_foreign_transmitter_but_another_battery_is(rig: Any) -> None:
    svc, inverter, racks = rig
    await racks.feed(0.5)
    for _ in range(5):
        await inverter.ask_and_wait()
    assert not svc.foreign_transmitter and svc.can_events["foreign_limits_frames"] == 0
    other = FrameEncoder(svc.config.can, module_count=1, capacity_ah=280.0)
    assert svc.state is not None
    for msg in other.encode(svc.state):  # a second battery answering on the same bus
        inverter.bus.send(msg)
    await wait_until(lambda: svc.foreign_transmitter, 1.0, "the foreign-transmitter alarm")
    assert svc.can_events["foreign_limits_frames"] == 1


async def test_a_standby_never_answers(mqtt_broker: MosquittoBroker, unique_topic_prefix: str) -> None:
    channel = f"hv-{free_port()}"
    inverter = Inverter(channel)
    prefix = unique_topic_prefix
    services = [
        ControllerService(hv_config(mqtt_broker, prefix, channel, node=f"ctl-{n}",
                                    failover={"enabled": True, "node_number": n, "rank": n - 1}))
        for n in (1, 2)
    ]
    try:
        await services[0].start()
        await wait_until(lambda: services[0].role.value == "active", 5, "ctl-1 active")
        await services[1].start()
        await asyncio.sleep(0.5)
        assert services[1].role.value == "standby"
        for _ in range(5):
            sent = inverter.ask()
            await asyncio.sleep(0.15)
            assert len(inverter.since(sent, 0x4220)) == 1  # one answer, the active's
        assert services[1].can_events["requests_not_active"] == 5
        assert services[1].can_events.get("answers_sent", 0) == 0
        assert services[0].can_events["answers_sent"] == 5
        assert not services[0].foreign_transmitter and not services[1].foreign_transmitter
    finally:
        for svc in reversed(services):
            await svc.stop()
        inverter.close()


async def test_a_babbling_inverter_is_answered_without_a_cycle_per_request(rig: Any) -> None:
    svc, inverter, racks = rig
    await racks.feed(0.5)
    cycles, start = svc.stats.cycles, time.monotonic()
    for _ in range(50):  # back to back, well within ANSWER_MIN_GAP_S of each other
        inverter.ask()
    await wait_until(lambda: len(inverter.since(start, 0x4220)) >= 50, 2.0, "50 answers")
    assert svc.can_events["requests_coalesced"] >= 25
    assert svc.stats.cycles - cycles < 30
    assert all(inverter.decoder.decode(0x4220, m.data)["ChargeCurrentLimit"] == 200.0
               for m in inverter.since(start, 0x4220))


async def test_what_a_frame_cannot_carry_is_counted_in_the_metrics(mqtt_broker: MosquittoBroker,
                                                                   unique_topic_prefix: str) -> None:
    # One "module" of 768 V: more than 0x4260's 65.535 V.
    async with hv_rig(mqtt_broker, unique_topic_prefix, modules_in_series=1) as (svc, inverter, racks):
        await racks.feed(0.5)
        _latency, answer = await inverter.ask_and_wait()
        assert answer[5].data[:2] == b"\xff\xff"  # saturated, not wrapped
        assert svc.can_events["values_clamped"] >= 1
        assert svc.encoder.clamp_reasons["0x4260.ModuleVoltageMax"] >= 1
