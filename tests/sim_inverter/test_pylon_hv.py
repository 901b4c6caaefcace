"""The simulated inverter speaks Pylon HV: it asks (0x4200) on its own period, reads the answers
through the shared decoder, and judges the BMS side: Normal with no violation on a healthy bank; an
unanswered request, a wrong sign, a bad mark, an 11-bit frame, an alarm beside a permission each a
violation."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import can
import pytest

from controller.frames import ID_HV_REQUEST, FrameEncoder, HvRequest, inverter_request
from shared.cluster import ConsolidatedState
from shared.controller_config import Dialect, InverterCanConfig, PylonHvConfig
from shared.dbc import load_dbc
from sim.inverter import ChargeProfile, InverterStatus, SimulatedInverter, ViolationKind
from sim.inverter_cli import add_inverter_parser, serve
from tests.controller.frames.states import flags, state
from tests.sim_inverter.helpers import unique_channel, wait_for

HV = PylonHvConfig(cells_in_series=240, modules_in_series=15)


def hv_state(**overrides: Any) -> ConsolidatedState:
    values: dict[str, Any] = {"pack_voltage_v": 768.0, "charge_voltage_limit_v": 828.0,
                              "discharge_voltage_limit_v": 696.0, "charge_current_limit_a": 420.0,
                              "discharge_current_limit_a": 380.0}
    values.update(overrides)
    return state(**values)


def hv_frame(frame_id: int, **signals: float) -> can.Message:
    """A Pylon HV frame with the given raw values (others 0), packed without checks."""
    message = load_dbc("pylon_hv").get_message_by_frame_id(frame_id)
    raw = {s.name: 0 for s in message.signals} | signals
    return can.Message(arbitration_id=frame_id, data=message.encode(raw, scaling=False, strict=False),
                       is_extended_id=True)


class Battery:
    """The BMS side: answers each request with the encoder's frames, through ``tamper`` if given."""

    def __init__(self, channel: str, s: ConsolidatedState) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.encoder = FrameEncoder(InverterCanConfig(dialect=Dialect.PYLON_HV, pylon_hv=HV), 4,
                                    capacity_ah=1120.0)
        self.state = s
        self.mute = False
        self.requests: list[int] = []
        self.tamper: Callable[[list[can.Message]], list[can.Message]] = list
        self.notifier = can.Notifier(self.bus, [self._rx], loop=asyncio.get_running_loop())

    def _rx(self, msg: can.Message) -> None:
        kind = inverter_request(Dialect.PYLON_HV, msg)
        if kind is None:
            return
        self.requests.append(kind)
        if self.mute:
            return
        if kind == HvRequest.ENSEMBLE:
            frames = self.encoder.encode(self.state)
        else:
            frames = self.encoder.equipment_frames()
        for frame in self.tamper(frames):
            self.bus.send(frame)

    def close(self) -> None:
        self.notifier.stop()
        self.bus.shutdown()


@contextlib.asynccontextmanager
async def hv_rig(s: ConsolidatedState | None = None,
                 **inverter_kw: Any) -> AsyncIterator[tuple[SimulatedInverter, Battery]]:
    channel = unique_channel()
    battery = Battery(channel, s or hv_state())
    kw: dict[str, Any] = {"request_period_s": 0.1, "answer_timeout_s": 0.3, "equipment_every": 5,
                          "heartbeat_timeout_s": 1.0} | inverter_kw
    inverter = SimulatedInverter(dialect=Dialect.PYLON_HV, **kw)
    try:
        await inverter.start(interface="virtual", channel=channel)
        yield inverter, battery
    finally:
        await inverter.stop()
        battery.close()


async def test_a_healthy_hv_bank_is_normal_without_violations() -> None:
    async with hv_rig(profile=ChargeProfile.constant(500.0)) as (inverter, battery):
        await wait_for(lambda: inverter.status is InverterStatus.NORMAL, what="Normal")
        await wait_for(lambda: inverter.current_a == 420.0, what="charging at the CCL")
        limits = inverter.limits
        assert limits is not None
        assert (limits.charge_voltage_limit_v, limits.discharge_voltage_limit_v) == (828.0, 696.0)
        assert (limits.charge_current_limit_a, limits.discharge_current_limit_a) == (420.0, 380.0)
        assert limits.charge_enabled and limits.discharge_enabled and limits.alarms == ()
        await asyncio.sleep(0.6)
        assert inverter.violations == []
        assert HvRequest.EQUIPMENT in battery.requests and battery.requests.count(HvRequest.ENSEMBLE) >= 6
        assert inverter.requests_sent["ensemble"] >= 6 and inverter.requests_sent["equipment"] >= 1
        assert inverter.answers >= 6 and max(inverter.answer_latencies) < 0.3
        equipment = inverter.latest(0x7320)
        assert equipment is not None
        assert (equipment["CellsInSeries"], equipment["VoltageLevel"]) == (240, 768)
        battery.state = hv_state(discharge_current_limit_a=100.0)
        inverter.profile = ChargeProfile.constant(-500.0)
        await wait_for(lambda: inverter.current_a == -100.0, what="discharging at the new DCL")


async def test_no_answer_is_a_violation_and_silence_disconnects() -> None:
    async with hv_rig() as (inverter, battery):
        await wait_for(lambda: inverter.status is InverterStatus.NORMAL, what="Normal")
        battery.mute = True
        await wait_for(lambda: ViolationKind.HEARTBEAT_GAP in inverter.violation_kinds(), timeout_s=2.0,
                       what="the silence noticed")
        assert inverter.status is InverterStatus.DISCONNECTED
        kinds = inverter.violation_kinds()
        assert kinds[ViolationKind.NO_ANSWER] >= 3
        assert kinds[ViolationKind.HEARTBEAT_GAP] == 1
        assert any("0x4220" in v.detail for v in inverter.violations if v.kind is ViolationKind.HEARTBEAT_GAP)
        assert inverter.current_a == 0.0


async def test_an_incomplete_answer_is_no_answer() -> None:
    async with hv_rig() as (inverter, battery):
        battery.tamper = lambda frames: [f for f in frames if f.arbitration_id != 0x4290]
        await wait_for(lambda: ViolationKind.NO_ANSWER in inverter.violation_kinds(), what="no_answer")
        assert "0x4290" in next(v.detail for v in inverter.violations if v.kind is ViolationKind.NO_ANSWER)
        assert inverter.status is InverterStatus.DISCONNECTED  # never a full set


Tamper = Callable[[list[can.Message]], list[can.Message]]


def _replace(frame_id: int, make: Callable[[], can.Message]) -> Tamper:
    return lambda frames: [make() if f.arbitration_id == frame_id else f for f in frames]


@pytest.mark.parametrize(("tamper", "kind"), [
    # The discharge limit sent positive (raw > 30000): a wrong sign.
    (_replace(0x4220, lambda: hv_frame(0x4220, ChargeVoltageLimit=8280, DischargeVoltageLimit=6960,
                                       ChargeCurrentLimit=34200, DischargeCurrentLimit=33800)),
     ViolationKind.NEGATIVE_LIMIT),
    (_replace(0x4280, lambda: hv_frame(0x4280, ChargeForbiddenMark=0x55)), ViolationKind.INVALID_MARK),
    # Charge allowed (0x00) next to a 0 A charge limit.
    (_replace(0x4220, lambda: hv_frame(0x4220, ChargeVoltageLimit=8280, DischargeVoltageLimit=6960,
                                       ChargeCurrentLimit=30000, DischargeCurrentLimit=26200)),
     ViolationKind.ENABLE_WITH_ZERO_LIMIT),
    # Charge forbidden (0xAA) next to a granted charge limit.
    (_replace(0x4280, lambda: hv_frame(0x4280, ChargeForbiddenMark=0xAA)),
     ViolationKind.LIMIT_WITHOUT_ENABLE),
    # Cell over-voltage protection while charging is allowed.
    (_replace(0x4250, lambda: hv_frame(0x4250, BasicStatus=3, ProtectCellOverVoltage=1)),
     ViolationKind.ALARM_WITH_PERMISSION),
    (_replace(0x4250, lambda: hv_frame(0x4250, BasicStatus=5)), ViolationKind.RESERVED_BITS),
    # Bit 12 of the alarm word (byte 5, bit 4) is reserved.
    (_replace(0x4250, lambda: can.Message(arbitration_id=0x4250, data=bytes([3, 0, 0, 0, 0, 0x10, 0, 0]),
                                          is_extended_id=True)),
     ViolationKind.RESERVED_BITS),
    (lambda frames: [*frames, can.Message(arbitration_id=0x351, data=bytes(8), is_extended_id=False)],
     ViolationKind.STANDARD_ID),
    (lambda frames: [*frames, can.Message(arbitration_id=0x4211, data=bytes(8), is_extended_id=True)],
     ViolationKind.UNEXPECTED_ID),
])
async def test_the_bms_side_is_judged(tamper: Tamper, kind: ViolationKind) -> None:
    async with hv_rig() as (inverter, battery):
        battery.tamper = tamper
        await wait_for(lambda: kind in inverter.violation_kinds(), what=kind.value)


async def test_the_encoder_alarm_set_passes_and_draws_nothing_forbidden() -> None:
    s = hv_state(alarms=flags("cell_over_voltage"), charge_current_limit_a=0.0, charge_enabled=False)
    async with hv_rig(s, profile=ChargeProfile.constant(300.0)) as (inverter, _battery):
        await wait_for(lambda: inverter.status is InverterStatus.NORMAL, what="Normal")
        limits = inverter.limits
        assert limits is not None and limits.alarms == ("ProtectCellOverVoltage",)
        assert not limits.charge_enabled and limits.discharge_enabled
        await asyncio.sleep(0.4)
        assert inverter.current_a == 0.0 and inverter.violations == []


async def test_requests_heard_from_another_inverter_are_not_violations() -> None:
    async with hv_rig() as (inverter, battery):
        battery.bus.send(can.Message(arbitration_id=ID_HV_REQUEST, data=bytes(8), is_extended_id=True))
        await wait_for(lambda: inverter.foreign_requests == 1, what="the foreign request counted")
        await wait_for(lambda: inverter.status is InverterStatus.NORMAL, what="Normal")
        assert inverter.violations == []


def test_polled_options_are_checked() -> None:
    for kw in ({"request_period_s": 0.0}, {"answer_timeout_s": float("nan")}, {"equipment_every": 0}):
        with pytest.raises(ValueError, match="must be"):
            SimulatedInverter(dialect=Dialect.PYLON_HV, **kw)


# -- the CLI -------------------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_inverter_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["inverter", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (("--request-period", "0"), "--request-period"),
    (("--answer-timeout", "inf"), "--answer-timeout"),
    (("--equipment-every", "0"), "--equipment-every"),
    (("--heartbeat-timeout", "inf"), "heartbeat_timeout_s"),
])
async def test_cli_refuses_bad_polling_options(argv: tuple[str, ...], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--interface", "virtual", "--channel", unique_channel(), "--dialect", "pylon_hv", *argv)
    assert await serve(args, asyncio.Event()) == 2
    assert message in capsys.readouterr().err


async def test_cli_asks_and_reports_the_answers(tmp_path: Path) -> None:
    channel = unique_channel()
    status_file = tmp_path / "inverter.json"
    args = _parse("--interface", "virtual", "--channel", channel, "--dialect", "pylon_hv",
                  "--request-period", "0.1", "--equipment-every", "3", "--status-file", str(status_file))
    battery = Battery(channel, hv_state())
    stop = asyncio.Event()
    task = asyncio.create_task(serve(args, stop), name="test-hv-inverter-cli")

    def read() -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data

    try:
        await wait_for(lambda: read().get("status") == "Normal" and read().get("answers", 0) >= 3,
                       timeout_s=5.0, what="Normal with answers in the status file")
        data = read()
        assert data["dialect"] == "pylon_hv" and data["violations"] == 0
        assert data["requests_sent"]["ensemble"] >= 3 and data["requests_sent"]["equipment"] >= 1
        assert data["equipment"]["ModulesInSeries"] == 15 and data["max_answer_latency_s"] < 1.0
        assert data["limits"]["discharge_current_limit_a"] == 380.0
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 5.0) == 0
        battery.close()
