"""The Pylon HV frame set against an independent decoder (tests/controller/frames/hv_wire.py, struct
arithmetic from the public descriptions), real traces, and the configuration that describes the bank."""

from __future__ import annotations

import logging
from typing import Any

import can
import pytest
from hypothesis import HealthCheck, given, settings

from controller.control_loop import fail_safe, polled_dialect_warnings
from controller.frames import (
    ID_HV_LIMITS,
    FrameDecoder,
    FrameEncoder,
    HvRequest,
    decode_frames,
    decoded_limits,
    hv_request_frame,
    inverter_request,
    location_number,
)
from shared.cluster import ClusterFlags, ConsolidatedState
from shared.config import ConfigError, validate_config
from shared.controller_config import ControllerConfig, Dialect, InverterCanConfig, PylonHvConfig
from shared.models import PROTECTION_FLAG_NAMES
from tests.controller.frames.hv_wire import (
    ENSEMBLE,
    FORBIDDEN,
    WORD_BIT,
    amps,
    celsius,
    check_hv_equipment,
    check_hv_set,
    u16,
)
from tests.controller.frames.states import consolidated_states, flags, state
from tests.controller.frames.wire import by_id

CELLS, MODULES = 240, 15  # one 768 V rack: 15 modules of 16 LFP cells
HV = PylonHvConfig(cells_in_series=CELLS, modules_in_series=MODULES)


def encoder(hv: PylonHvConfig = HV, capacity_ah: float = 4 * 280.0,
            manufacturer: str = "PYLON") -> FrameEncoder:
    config = InverterCanConfig(dialect=Dialect.PYLON_HV, pylon_hv=hv, manufacturer=manufacturer)
    return FrameEncoder(config, module_count=4, capacity_ah=capacity_ah)


def bank(**overrides: Any) -> ConsolidatedState:
    """4 racks × 768 V in parallel: 4 × 140 A, CVL 240 × 3.45 V, DVL 240 × 2.90 V."""
    values: dict[str, Any] = {
        "pack_voltage_v": 768.4, "charge_voltage_limit_v": 828.0, "discharge_voltage_limit_v": 696.0,
        "charge_current_limit_a": 560.0, "discharge_current_limit_a": 560.0, "current_a": 412.7,
        "soc_pct": 64.6, "soh_pct": 97.0, "temperature_avg_c": 23.4,
        "cell_voltage_max_v": 3.341, "cell_voltage_max_location": "rack-02: cell 117",
        "cell_voltage_min_v": 3.198, "cell_voltage_min_location": "rack-04: cell 3",
        "temperature_max_c": 27.5, "temperature_max_location": "rack-01: string 1 module 9",
        "temperature_min_c": 19.0, "temperature_min_location": "rack-03: string 1 module 1",
        "capacity_ah": 1120.0, "roster_size": 4, "eligible_racks": 4, "racks": (),
    }
    values.update(overrides)
    return state(**values)


def answer(s: ConsolidatedState, enc: FrameEncoder | None = None) -> dict[int, bytes]:
    messages = (enc or encoder()).encode(s)
    check_hv_set(messages, s, modules_in_series=MODULES)
    return by_id(messages)


# -- real traces -------------------------------------------------------------------------------------


def test_limits_frame_matches_a_real_pylon_hv_battery() -> None:
    """Battery-Emulator issue #2019: a real 0x4220 `A4 10 20 0D 2A 76 36 74` = 426.0 V / 336.0 V /
    +25.0 A / -25.0 A (little-endian, -3000 A offset, the discharge limit negative)."""
    s = bank(charge_voltage_limit_v=426.0, discharge_voltage_limit_v=336.0, charge_current_limit_a=25.0,
             discharge_current_limit_a=25.0, pack_voltage_v=400.0)
    assert answer(s)[ID_HV_LIMITS] == bytes.fromhex("A4 10 20 0D 2A 76 36 74")


def test_equipment_frame_matches_a_real_sc0500_trace() -> None:
    """eevblog "Pylontech sc0500 protocol hacking": 0x7320 `2D 00 03 0F 90 00 32 00` from an SC0500 with
    3 × H48050 (45 cells, 3 modules of 15, 144 V, 50 Ah)."""
    hv = PylonHvConfig(cells_in_series=45, modules_in_series=3, nominal_voltage_v=144)
    frames = by_id(encoder(hv, capacity_ah=50.0).equipment_frames())
    assert frames[0x7320] == bytes.fromhex("2D 00 03 0F 90 00 32 00")


def test_equipment_answer_describes_the_bank() -> None:
    enc = encoder(manufacturer="PYLONHV")
    check_hv_equipment(enc.equipment_frames(), cells=CELLS, modules=MODULES, voltage_level_v=768,
                       capacity_ah=1120.0, name="PYLONHV", software=(0, 1))
    # The configured nominal voltage wins over cells × 3.2 V; the capacity saturates at the u16.
    hv = PylonHvConfig(cells_in_series=CELLS, modules_in_series=MODULES, nominal_voltage_v=750)
    frames = by_id(encoder(hv, capacity_ah=100_000.0).equipment_frames())
    assert u16(frames[0x7320], 4) == 750 and u16(frames[0x7320], 6) == 0xFFFF


# -- every field, for the states a site meets --------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="4x768V-charging-412A"),
    pytest.param({"current_a": -455.3}, id="discharging-455A"),
    pytest.param({"current_a": 0.2}, id="idle"),
    pytest.param({"pack_voltage_v": 1000.0, "charge_voltage_limit_v": 1000.0,
                  "discharge_voltage_limit_v": 820.0, "charge_current_limit_a": 800.0,
                  "discharge_current_limit_a": 950.0, "current_a": -930.0},
                 id="1000V-950A"),
    pytest.param({"temperature_avg_c": -12.3, "temperature_min_c": -18.6, "temperature_max_c": -4.0},
                 id="negative-temperatures"),
    pytest.param({"temperature_min_c": -40.0, "temperature_max_c": 125.0, "temperature_avg_c": 120.0},
                 id="temperatures-saturate"),
    pytest.param({"charge_current_limit_a": 0.0, "charge_enabled": False}, id="charge-stopped"),
    pytest.param({"discharge_current_limit_a": 0.04}, id="dcl-rounds-to-zero"),
    pytest.param({"force_charge_request": True}, id="force-charge"),
    pytest.param({"force_charge_request": True, "charge_enabled": False},
                 id="force-charge-without-permission"),
    pytest.param({"cluster": ClusterFlags(not_enough_racks=True)}, id="not-enough-racks"),
    pytest.param({"cell_voltage_max_v": 3.1, "cell_voltage_min_v": 3.3}, id="cell-order-swapped"),
    pytest.param({"cell_voltage_max_location": "rack-02", "temperature_max_location": ""}, id="no-locations"),
    pytest.param({"charge_voltage_limit_v": 0.0}, id="cvl-zero-holds-pack-voltage"),
])
def test_fields_for_site_states(overrides: dict[str, Any]) -> None:
    answer(bank(**overrides))


@pytest.mark.parametrize("flag", PROTECTION_FLAG_NAMES)
def test_each_alarm_sets_its_bit_and_forbids_its_direction(flag: str) -> None:
    frames = answer(bank(alarms=flags(flag), warnings=flags(flag)))
    status, marks = frames[0x4250], frames[0x4280]
    if flag in WORD_BIT:
        assert u16(status, 6) == 1 << WORD_BIT[flag] and u16(status, 4) == 1 << WORD_BIT[flag]
        assert status[3] == 0
    else:  # internal, insulation, imbalance: "other error", both directions stop; no warning bit
        assert status[3] == 0x80 and u16(status, 6) == 0 and u16(status, 4) == 0
        assert marks[:2] == bytes([FORBIDDEN, FORBIDDEN])
    assert FORBIDDEN in marks[:2]


def test_the_fail_safe_answer_is_zero_current_forbidden_and_faulted() -> None:
    cfg = validate_config({
        "site_id": "s", "node_id": "n", "roster": [{"rack_id": "r1", "capacity_ah": 280}],
        "can": {"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": CELLS, "modules_in_series": MODULES}},
        "aggregation": {"fallback_voltage_v": 768.0},
    }, ControllerConfig, "<test>")
    for previous in (bank(), None):
        s = fail_safe(previous, cfg, 1_700_000_000.0)
        frames = answer(s)
        limits = frames[0x4220]
        assert amps(limits, 4) == 0.0 and amps(limits, 6) == 0.0
        assert u16(limits, 0) / 10 == (828.0 if previous else 768.0)
        assert frames[0x4280][:2] == bytes([FORBIDDEN, FORBIDDEN])
        assert frames[0x4250][3] == 0x80


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(consolidated_states())
def test_any_state_encodes_to_what_the_independent_decoder_expects(s: ConsolidatedState) -> None:
    enc = encoder()
    messages = enc.encode(s)
    check_hv_set(messages, s, modules_in_series=MODULES)
    # Our own decoder (the simulated inverter's) reads the same limits back as magnitudes.
    limits = decoded_limits(Dialect.PYLON_HV, decode_frames(Dialect.PYLON_HV, messages))
    assert limits is not None
    frames = by_id(messages)
    assert limits.charge_current_limit_a == pytest.approx(amps(frames[0x4220], 4))
    assert limits.discharge_current_limit_a == pytest.approx(-amps(frames[0x4220], 6))
    assert limits.charge_enabled == (frames[0x4280][0] == 0)
    assert not limits.unblocked_alarms()


# -- what a frame cannot carry: saturated and counted, never wrapped ---------------------------------


def test_values_beyond_the_fields_saturate_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    enc = encoder(PylonHvConfig(cells_in_series=240, modules_in_series=1))  # one 768 V "module"
    s = bank(discharge_current_limit_a=3276.0, charge_current_limit_a=3276.0, current_a=-3200.0)
    with caplog.at_level(logging.WARNING, logger="controller.frames"):
        for _ in range(3):
            frames = by_id(enc.encode(s))
    assert -amps(frames[0x4220], 6) == 3000.0  # the most the negative field carries
    assert amps(frames[0x4220], 4) == 3276.0  # fits (up to 3553.5 A)
    assert amps(frames[0x4210], 2) == -3000.0
    assert u16(frames[0x4260], 0) == 65535  # 768 V cannot be a module voltage
    reasons = enc.clamp_reasons
    assert reasons["0x4220.DischargeCurrentLimit"] == 3
    assert reasons["0x4210.PackCurrent"] == 3
    assert reasons["0x4260.ModuleVoltageMax"] == 3
    assert enc.clamped == sum(reasons.values())
    # One line per reason, not one per set.
    lines = [r for r in caplog.records if "0x4220.DischargeCurrentLimit" in r.getMessage()]
    assert len(lines) == 1


def test_temperatures_carry_the_100c_offset() -> None:
    frames = answer(bank(temperature_avg_c=-20.0, temperature_max_c=0.0, temperature_min_c=-20.0))
    assert u16(frames[0x4210], 4) == 800 and celsius(frames[0x4210], 4) == -20.0
    assert u16(frames[0x4240], 0) == 1000 and u16(frames[0x4240], 2) == 800


# -- requests and identities -------------------------------------------------------------------------


def test_inverter_request_reads_byte_zero_of_a_29_bit_0x4200_only() -> None:
    assert inverter_request(Dialect.PYLON_HV, hv_request_frame(HvRequest.ENSEMBLE)) == HvRequest.ENSEMBLE
    # Some inverters put a clock into bytes 1-7: still an ensemble request.
    timed = hv_request_frame(HvRequest.ENSEMBLE, tail=bytes([0x1A, 0x07, 0x0F, 0x0C, 0x1E, 0x00, 0x00]))
    assert timed.data[1] == 0x1A and inverter_request(Dialect.PYLON_HV, timed) == HvRequest.ENSEMBLE
    assert inverter_request(Dialect.PYLON_HV, hv_request_frame(HvRequest.EQUIPMENT)) == HvRequest.EQUIPMENT
    standard = can.Message(arbitration_id=0x4200 & 0x7FF, data=bytes(8), is_extended_id=False)
    assert inverter_request(Dialect.PYLON_HV, standard) is None
    assert inverter_request(Dialect.PYLON_HV, can.Message(arbitration_id=0x4200, data=b"",
                                                          is_extended_id=True)) is None
    assert inverter_request(Dialect.PYLON, hv_request_frame(HvRequest.ENSEMBLE)) is None


def test_location_numbers_never_read_the_rack_id() -> None:
    assert location_number("rack-03: cell 17") == 17
    assert location_number("rack-03: string 1 module 9") == 9
    assert location_number("rack-03") == 0
    assert location_number("rack-03: top") == 0
    assert location_number("rack-03: cell 70000") == 0
    assert location_number("") == 0


def test_decoder_knows_the_answers_and_not_the_low_voltage_set() -> None:
    decoder = FrameDecoder(Dialect.PYLON_HV)
    assert decoder.extended and decoder.ids == ENSEMBLE
    assert all(decoder.knows(i) for i in (*ENSEMBLE, 0x7310, 0x7320, 0x7330, 0x7340))
    assert not decoder.knows(0x351)


# -- configuration -------------------------------------------------------------------------------------


def _config(can_section: dict[str, Any]) -> ControllerConfig:
    return validate_config({"site_id": "s", "node_id": "n", "roster": [{"rack_id": "r1", "capacity_ah": 280}],
                            "can": can_section}, ControllerConfig, "controller.toml")


@pytest.mark.parametrize(("can_section", "says"), [
    ({"dialect": "pylon_hv"}, "needs a [can.pylon_hv] table"),
    ({"dialect": "pylon", "pylon_hv": {"cells_in_series": 16, "modules_in_series": 1}}, 'not "pylon"'),
    ({"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": 240, "modules_in_series": 7}},
     "whole multiple of modules_in_series"),
    ({"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": 600, "modules_in_series": 2}}, "exceeds 255"),
    ({"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": 240, "modules_in_series": 15, "cells": 1}},
     "can.pylon_hv.cells"),
    ({"dialect": "pylon-hv"}, "pylon_hv"),
])
def test_configuration_mistakes_are_named(can_section: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(can_section)
    assert says in str(caught.value)


def test_configuration_of_a_768v_bank() -> None:
    cfg = _config({"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": 240, "modules_in_series": 15}})
    assert cfg.can.pylon_hv == HV and HV.voltage_level_v == 768 and HV.cells_per_module == 16
    assert not HV.broadcast


def test_what_an_hv_configuration_gets_wrong_is_said() -> None:
    hv = {"dialect": "pylon_hv", "pylon_hv": {"cells_in_series": 240, "modules_in_series": 15}}
    warnings = polled_dialect_warnings(_config(hv))  # fallback_voltage_v left at 51.2 V
    assert len(warnings) == 1 and "fallback_voltage_v = 51.2 V" in warnings[0]
    base = {"site_id": "s", "node_id": "n", "roster": [{"rack_id": "r1", "capacity_ah": 280}], "can": hv,
            "aggregation": {"fallback_voltage_v": 768.0}}
    assert polled_dialect_warnings(validate_config(base, ControllerConfig, "c.toml")) == []
    silent = {**base, "failover": {"enabled": True, "heartbeat_enabled": False}}
    (warning,) = polled_dialect_warnings(validate_config(silent, ControllerConfig, "c.toml"))
    assert "heartbeat_enabled" in warning
    assert polled_dialect_warnings(_config({"dialect": "pylon"})) == []
