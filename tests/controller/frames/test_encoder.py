"""FrameEncoder output against inverter-can.md §5 checks 1-12, for edge tables and generated states."""

from __future__ import annotations

import math
import time
from typing import Any

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.frames import (
    DIALECT_IDS,
    FLAG_BLOCKS,
    FrameDecoder,
    FrameEncoder,
    UnknownFrameError,
    decode_frames,
    decoded_limits,
)
from shared.cluster import ClusterFlags, ConsolidatedState
from shared.controller_config import Dialect, InverterCanConfig
from shared.models import PROTECTION_FLAG_NAMES
from tests.controller.frames.states import TRACE_0X351, consolidated_states, flags, state
from tests.controller.frames.wire import (
    PYLON_BITS,
    PYLON_WARNING_UNMAPPED,
    SMA_PAIRS,
    by_id,
    check_set,
    pair,
    s16,
    u16,
)

# The low-voltage sets, checked against wire.py; Pylon HV has its own (tests/controller/test_pylon_hv_*).
DIALECTS = [Dialect.PYLON, Dialect.SMA, Dialect.VICTRON]


def encoder(dialect: Dialect, module_count: int = 4, manufacturer: str = "PYLON") -> FrameEncoder:
    period_ms = 1000
    return FrameEncoder(InverterCanConfig(dialect=dialect, period_ms=period_ms, manufacturer=manufacturer),
                        module_count)


def encode(dialect: Dialect, s: ConsolidatedState, **kw: Any) -> dict[int, bytes]:
    return by_id(encoder(dialect, **kw).encode(s))


# -- fixed facts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_trace_regression_0x351(dialect: Dialect) -> None:
    """§5.3: CVL 53.2 V / CCL 370.0 A / DCL 370.0 A / DVL 46.0 V is the real Pylontech trace."""
    assert encode(dialect, state())[0x351] == TRACE_0X351


def test_ids_and_order_per_dialect() -> None:
    assert encoder(Dialect.PYLON).ids == (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E)
    assert encoder(Dialect.SMA).ids == (0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F)
    assert encoder(Dialect.VICTRON).ids == (0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F, 0x372, 0x373, 0x379)
    for dialect in DIALECTS:
        messages = encoder(dialect).encode(state())
        assert tuple(m.arbitration_id for m in messages) == DIALECT_IDS[dialect]


def test_pylon_healthy_set_bytes() -> None:
    """The whole healthy Pylon set, byte by byte (cf. the trace: 0x359 `.. 04 50 4E`, 0x35C `C0`)."""
    frames = encode(Dialect.PYLON, state(), module_count=4)
    assert frames[0x355] == bytes.fromhex("38 00 62 00 00 00 00 00")  # 56 %, 98 %, no HiRes
    assert frames[0x356] == bytes.fromhex("5D 14 85 FF F5 00 00 00")  # 52.13 V, -12.3 A, 24.5 °C
    assert frames[0x359] == bytes.fromhex("00 00 00 00 04 50 4E 00")
    assert frames[0x35C] == bytes.fromhex("C0 00 00 00 00 00 00 00")
    assert frames[0x35E] == b"PYLON   "


def test_sma_padding_is_invalid_marker_and_victron_zero() -> None:
    sma, victron = encode(Dialect.SMA, state()), encode(Dialect.VICTRON, state())
    assert sma[0x355] == bytes.fromhex("38 00 62 00 FE 15 FF FF")  # HiRes 56.30 %, then 0xFFFF
    assert victron[0x355] == bytes.fromhex("38 00 62 00 FE 15 00 00")
    assert sma[0x35F] == bytes.fromhex("FF FF FF FF 90 01 FF FF")  # 400 Ah in bytes 4-5
    assert victron[0x35F] == bytes.fromhex("00 00 00 00 90 01 00 00")
    assert sma[0x35A] == victron[0x35A] == bytes.fromhex("AA AA AA 02 AA AA AA 02")


def test_victron_extension_frames() -> None:
    frames = encode(Dialect.VICTRON, state())
    assert frames[0x372] == bytes.fromhex("03 00 00 00 00 00 01 00")  # 3 online, 1 offline
    # 3251 mV, 3312 mV, 294 K (21 °C), 300 K (27 °C)
    assert frames[0x373] == bytes.fromhex("B3 0C F0 0C 26 01 2C 01")
    assert frames[0x379] == bytes.fromhex("90 01 00 00 00 00 00 00")


def test_every_protection_flag_has_a_blocking_rule() -> None:
    assert set(FLAG_BLOCKS) == set(PROTECTION_FLAG_NAMES)


# -- §5 checks over generated states --------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=consolidated_states(), module_count=st.integers(min_value=1, max_value=1000),
       manufacturer=st.sampled_from(["PYLON", "PYLONDIY", "BMSLINK", "A"]))
def test_section5_holds_for_any_state(dialect: Dialect, s: ConsolidatedState, module_count: int,
                                      manufacturer: str) -> None:
    enc = encoder(dialect, module_count=module_count, manufacturer=manufacturer)
    messages = enc.encode(s)
    check_set(dialect, messages, s, module_count=module_count, manufacturer=manufacturer)
    # Same state, byte-identical frames, from this encoder and from a fresh one.
    again = [bytes(m.data) for m in enc.encode(s)]
    fresh = [bytes(m.data) for m in encoder(dialect, module_count, manufacturer).encode(s)]
    assert [bytes(m.data) for m in messages] == again == fresh


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(max_examples=60, deadline=None)
@given(s=consolidated_states())
def test_decoder_reads_back_what_the_test_decoder_reads(dialect: Dialect, s: ConsolidatedState) -> None:
    """The DBC-based FrameDecoder agrees with the struct-based test decoder on every limit."""
    messages = encoder(dialect).encode(s)
    raw = by_id(messages)
    limits = decoded_limits(dialect, decode_frames(dialect, messages))
    assert limits is not None
    assert limits.charge_voltage_limit_v == pytest.approx(u16(raw[0x351], 0) / 10)
    assert limits.charge_current_limit_a == pytest.approx(s16(raw[0x351], 2) / 10)
    assert limits.discharge_current_limit_a == pytest.approx(s16(raw[0x351], 4) / 10)
    assert limits.discharge_voltage_limit_v == pytest.approx(u16(raw[0x351], 6) / 10)
    assert limits.charge_enabled == (limits.charge_current_limit_a > 0)
    assert limits.discharge_enabled == (limits.discharge_current_limit_a > 0)
    assert limits.unblocked_alarms() == ()


# -- edge tables ----------------------------------------------------------------------------------

EDGE_STATES: list[tuple[str, dict[str, Any]]] = [
    ("zero limits", {"charge_current_limit_a": 0.0, "discharge_current_limit_a": 0.0}),
    ("disabled with limits", {"charge_enabled": False, "discharge_enabled": False}),
    ("limit below one count", {"charge_current_limit_a": 0.04, "discharge_current_limit_a": 0.049}),
    ("cvl zero", {"charge_voltage_limit_v": 0.0}),
    ("cvl zero, no pack voltage", {"charge_voltage_limit_v": 0.0, "pack_voltage_v": 0.0,
                                   "discharge_voltage_limit_v": 0.0}),
    ("cvl zero, dvl above pack", {"charge_voltage_limit_v": 0.0, "pack_voltage_v": 40.0}),
    ("dvl above cvl", {"discharge_voltage_limit_v": 60.0}),
    ("huge values", {"charge_current_limit_a": 10_000.0, "discharge_current_limit_a": 5000.0,
                     "pack_voltage_v": 900.0, "current_a": -10_000.0, "capacity_ah": 99_000.0,
                     "charge_voltage_limit_v": 1000.0, "discharge_voltage_limit_v": 800.0}),
    ("hot and cold", {"temperature_avg_c": 125.0, "temperature_max_c": 125.0, "temperature_min_c": -40.0}),
    ("charging", {"current_a": 45.6}),
    ("discharging", {"current_a": -45.6}),
    ("full and empty soc", {"soc_pct": 100.0, "soh_pct": 0.0}),
    ("not enough racks", {"cluster": ClusterFlags(not_enough_racks=True)}),
    ("latched alarm", {"cluster": ClusterFlags(latched_alarm=True)}),
    ("over-voltage alarm", {"alarms": flags("cell_over_voltage")}),
    ("under-voltage alarm", {"alarms": flags("cell_under_voltage")}),
    ("cold charge alarm", {"alarms": flags("charge_under_temperature")}),
    ("every alarm", {"alarms": flags(*PROTECTION_FLAG_NAMES)}),
    ("every warning", {"warnings": flags(*PROTECTION_FLAG_NAMES)}),
    ("cell extremes swapped", {"cell_voltage_min_v": 3.4, "cell_voltage_max_v": 3.2,
                               "temperature_min_c": 30.0, "temperature_max_c": 20.0}),
    ("empty roster", {"roster_size": 0, "eligible_racks": 0, "racks": (), "capacity_ah": 0.0}),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(("name", "overrides"), EDGE_STATES, ids=[name for name, _ in EDGE_STATES])
def test_section5_holds_for_edge_states(dialect: Dialect, name: str, overrides: dict[str, Any]) -> None:
    s = state(**overrides)
    check_set(dialect, encoder(dialect).encode(s), s, module_count=4)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_current_sign_positive_is_charging(dialect: Dialect) -> None:
    """§5.6 in both directions: +45.6 A charging is 0x01C8, -45.6 A discharging 0xFE38."""
    assert encode(dialect, state(current_a=45.6))[0x356][2:4] == bytes.fromhex("C8 01")
    assert encode(dialect, state(current_a=-45.6))[0x356][2:4] == bytes.fromhex("38 FE")


@pytest.mark.parametrize("dialect", DIALECTS)
def test_huge_values_saturate_and_are_counted(dialect: Dialect) -> None:
    enc = encoder(dialect)
    frames = by_id(enc.encode(state(charge_current_limit_a=10_000.0, discharge_current_limit_a=5000.0,
                                    pack_voltage_v=900.0, current_a=-10_000.0)))
    assert s16(frames[0x351], 2) == s16(frames[0x351], 4) == 32767  # 3276.7 A
    assert s16(frames[0x356], 0) == 32767  # 327.67 V: the most a s16 of 0.01 V carries
    assert s16(frames[0x356], 2) == -32768  # -3276.8 A
    reasons = enc.clamp_reasons
    assert reasons["0x351.ChargeCurrentLimit"] == 1 and reasons["0x351.DischargeCurrentLimit"] == 1
    assert reasons["0x356.PackVoltage"] == 1 and reasons["0x356.PackCurrent"] == 1
    assert enc.clamped == sum(reasons.values())


@pytest.mark.parametrize("dialect", DIALECTS)
def test_cvl_is_never_zero(dialect: Dialect) -> None:
    enc = encoder(dialect)
    frames = by_id(enc.encode(state(charge_voltage_limit_v=0.0, pack_voltage_v=52.14)))
    assert u16(frames[0x351], 0) == 522  # the pack voltage rounded up: CVL >= 0x356 voltage
    assert enc.clamp_reasons == {"cvl_zero": 1}
    frames = by_id(enc.encode(state(charge_voltage_limit_v=0.0, pack_voltage_v=0.0,
                                    discharge_voltage_limit_v=0.0)))
    assert u16(frames[0x351], 0) == 1 and u16(frames[0x351], 6) == 0  # 0.1 V, above DVL 0
    assert enc.clamped == 2


def test_dvl_is_lowered_below_cvl_never_cvl_raised() -> None:
    enc = encoder(Dialect.PYLON)
    frames = by_id(enc.encode(state(charge_voltage_limit_v=50.0, discharge_voltage_limit_v=52.0)))
    assert (u16(frames[0x351], 0), u16(frames[0x351], 6)) == (500, 499)
    assert enc.clamp_reasons == {"dvl_not_below_cvl": 1}


def test_limit_without_permission_is_zeroed_and_counted() -> None:
    enc = encoder(Dialect.PYLON)
    frames = by_id(enc.encode(state(charge_enabled=False)))
    assert s16(frames[0x351], 2) == 0 and frames[0x35C][0] == 0x40
    frames = by_id(enc.encode(state(alarms=flags("cell_over_voltage"))))
    assert s16(frames[0x351], 2) == 0 and frames[0x35C][0] == 0x40 and frames[0x359][0] == 0x02
    assert enc.clamp_reasons == {"charge_limit_without_permission": 1, "charge_limit_despite_alarm": 1}


def test_limit_rounding_to_zero_clears_the_enable() -> None:
    frames = encode(Dialect.PYLON, state(charge_current_limit_a=0.04))
    assert s16(frames[0x351], 2) == 0 and frames[0x35C][0] == 0x40


@pytest.mark.parametrize("dialect", DIALECTS)
def test_nan_and_infinity_never_reach_cantools(dialect: Dialect) -> None:
    """The contract forbids them; a state built without validation must still encode safely."""
    s = state().model_copy(update={
        "charge_current_limit_a": math.nan, "discharge_current_limit_a": math.inf,
        "charge_voltage_limit_v": math.nan, "pack_voltage_v": math.nan, "soc_pct": math.inf,
        "temperature_avg_c": -math.inf, "current_a": math.nan,
    })
    enc = encoder(dialect)
    frames = by_id(enc.encode(s))
    assert s16(frames[0x351], 2) == 0 and s16(frames[0x351], 4) == 32767
    assert u16(frames[0x351], 0) > u16(frames[0x351], 6)  # CVL > DVL, not 0
    assert u16(frames[0x355], 0) == 100
    assert s16(frames[0x356], 4) == -400  # -40.0 °C
    assert enc.clamped > 0


def test_module_count() -> None:
    assert encode(Dialect.PYLON, state(), module_count=1)[0x359][4] == 1
    enc = encoder(Dialect.PYLON, module_count=1000)  # a roster may be larger than the u8 field
    assert by_id(enc.encode(state()))[0x359][4] == 255
    assert enc.clamp_reasons == {"0x359.ModuleCount": 1}
    with pytest.raises(ValueError, match="module_count"):
        encoder(Dialect.PYLON, module_count=0)


def test_manufacturer_is_padded_with_spaces() -> None:
    assert encode(Dialect.PYLON, state(), manufacturer="PYLONDIY")[0x35E] == b"PYLONDIY"
    assert encode(Dialect.VICTRON, state(), manufacturer="BMSLINK")[0x35E] == b"BMSLINK "


# -- each fault sets exactly its spec bit / pair ---------------------------------------------------


@pytest.mark.parametrize("name", PROTECTION_FLAG_NAMES)
def test_pylon_alarm_sets_exactly_its_bit(name: str) -> None:
    """§5.7: e.g. cell over-voltage -> byte 0 = 0x02; system error -> byte 1 = 0x08 (not 0x80)."""
    byte, bit = PYLON_BITS[name]
    expected = bytearray(4)
    expected[byte] = 1 << bit
    assert encode(Dialect.PYLON, state(alarms=flags(name)))[0x359][:4] == bytes(expected)
    warning = bytearray(4)
    if name not in PYLON_WARNING_UNMAPPED:
        warning[byte + 2] = 1 << bit
    assert encode(Dialect.PYLON, state(warnings=flags(name)))[0x359][:4] == bytes(warning)


def test_pylon_cluster_trip_is_system_error() -> None:
    frames = encode(Dialect.PYLON, state(cluster=ClusterFlags(not_enough_racks=True)))
    assert frames[0x359][:4] == bytes.fromhex("00 08 00 00")
    assert frames[0x35C][0] == 0x00 and frames[0x351][2:6] == bytes(4)
    # A latched alarm zeroes its own direction in the core (its flag stays in state.alarms while it
    # does): the flag alone is not a bank-level trip of both directions.
    latched = encode(Dialect.PYLON, state(cluster=ClusterFlags(latched_alarm=True)))
    assert latched[0x359][:4] == bytes(4)
    # An unknown rack seen is not a trip.
    assert encode(Dialect.PYLON, state(cluster=ClusterFlags(unknown_rack_seen=True)))[0x359][:4] == bytes(4)


@pytest.mark.parametrize("dialect", [Dialect.SMA, Dialect.VICTRON])
@pytest.mark.parametrize("name", PROTECTION_FLAG_NAMES)
def test_alarm_pair_raised_at_its_position(dialect: Dialect, name: str) -> None:
    byte, index = SMA_PAIRS[name]
    data = encode(dialect, state(alarms=flags(name)))[0x35A]
    raised = {(b, i) for b in range(8) for i in range(4) if pair(data, b, i) == 1}
    assert raised == {(0, 0), (byte, index)}  # general + the condition
    data = encode(dialect, state(warnings=flags(name)))[0x35A]
    raised = {(b, i) for b in range(8) for i in range(4) if pair(data, b, i) == 1}
    assert raised == {(4, 0), (byte + 4, index)}


@pytest.mark.parametrize("dialect", [Dialect.SMA, Dialect.VICTRON])
def test_alarm_is_cleared_by_10_not_00(dialect: Dialect) -> None:
    enc = encoder(dialect)
    raised = by_id(enc.encode(state(alarms=flags("cell_over_voltage"))))[0x35A]
    cleared = by_id(enc.encode(state()))[0x35A]
    assert pair(raised, 0, 1) == 1 and pair(cleared, 0, 1) == 2
    general_only = by_id(enc.encode(state(cluster=ClusterFlags(not_enough_racks=True))))[0x35A]
    assert general_only == bytes.fromhex("A9 AA AA 02 AA AA AA 02")


# -- decoder --------------------------------------------------------------------------------------


def test_decoder_rejects_foreign_ids_and_drops_unused_pylon_signals() -> None:
    decoder = FrameDecoder(Dialect.PYLON)
    with pytest.raises(UnknownFrameError) as caught:
        decoder.decode(0x35A, bytes(8))
    assert caught.value.arbitration_id == 0x35A
    assert "StateOfChargeHiRes" not in decoder.decode(0x355, bytes(8))
    assert "StateOfChargeHiRes" in FrameDecoder(Dialect.SMA).decode(0x355, bytes(8))
    inverter_frame = can.Message(arbitration_id=0x305, data=bytes(8), is_extended_id=False)
    messages = [inverter_frame, *encoder(Dialect.PYLON).encode(state())]
    with pytest.raises(UnknownFrameError):
        decode_frames(Dialect.PYLON, messages)
    assert set(decode_frames(Dialect.PYLON, messages, ignore_unknown=True)) == set(DIALECT_IDS[Dialect.PYLON])


def test_decoded_limits_name_the_alarms() -> None:
    s = state(alarms=flags("cell_over_voltage"), warnings=flags("charge_over_temperature"))
    pylon = decoded_limits(Dialect.PYLON, decode_frames(Dialect.PYLON, encoder(Dialect.PYLON).encode(s)))
    assert pylon is not None
    assert (pylon.charge_enabled, pylon.discharge_enabled) == (False, True)
    assert pylon.alarms == ("ProtCellOverVoltage",) and pylon.warnings == ("WarnHighTemperature",)
    sma = decoded_limits(Dialect.SMA, decode_frames(Dialect.SMA, encoder(Dialect.SMA).encode(s)))
    assert sma is not None
    assert sma.alarms == ("AlarmGeneral", "AlarmHighVoltage")
    assert sma.warnings == ("WarningGeneral", "WarningHighTemperatureCharge")
    assert decoded_limits(Dialect.PYLON, {}) is None


# -- speed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_encoding_a_full_set_is_fast(dialect: Dialect) -> None:
    """About 0.1 ms per set here; the bound only catches a pathological regression."""
    enc, s = encoder(dialect), state(alarms=flags("cell_over_voltage"))
    rounds = 300
    started = time.perf_counter()
    for _ in range(rounds):
        enc.encode(s)
    per_set_s = (time.perf_counter() - started) / rounds
    assert per_set_s < 0.002


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=st.lists(consolidated_states(), min_size=2, max_size=6))
def test_a_long_lived_encoder_gives_the_bytes_of_a_fresh_one(dialect: Dialect,
                                                           states: list[ConsolidatedState]) -> None:
    """Reused packings never leak from one state into another; frames() is encode() one at a time."""
    long_lived = encoder(dialect)
    for s in [*states, states[0]]:
        fresh = [(m.arbitration_id, bytes(m.data)) for m in encoder(dialect).encode(s)]
        assert [(m.arbitration_id, bytes(m.data)) for m in long_lived.frames(s)] == fresh
