"""The Pylontech LV RS-485 codec against frames recorded from real packs, and against every way a frame
can be wrong.

Recorded frames (with the values their sources document):

* Tomcat42/pylontech-python ``examples/1st_justSendAndReceive/output.txt``: a US2000 at address 2
  (requests and answers for 0x4F, 0x51, 0x42, 0x47, 0x44, 0x92, 0x96);
* Frankkkkk/python-pylontech ``tests/test_basic.py``: a UP2500 (0x42, 0x92 with the values asserted
  there) and a US3000 stack whose answer uses the 24-bit capacities;
* the pylontech PyPI package's decoded output quoted in a public project (a 0x92 answer with CVL
  53.25 V, DVL 45.0 V, CCL 25.0 A, DCL -25.0 A and a 33-byte 0x44 answer, one byte longer than its
  fields);
* aquarat.co.za's US3000 console note: the frame ``~20014682C0048520FCC3\\r`` sent at 1200 baud.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rack_agent.errors import CrcError, InvalidDataError, ModbusExceptionError
from rack_agent.pylontech.codec import (
    Command,
    Frame,
    FrameAssembler,
    FrameChecksumError,
    FramingError,
    InfoFormatError,
    LengthChecksumError,
    LengthMismatchError,
    ReturnCodeError,
    answer_info,
    decode_frame,
    encode_frame,
    encode_request,
    frame_checksum,
    length_checksum,
    length_field,
)
from rack_agent.pylontech.info import (
    AlarmInfo,
    AnalogValues,
    ManagementInfo,
    ManagementStatus,
    ManufacturerInfo,
    ProtectionStatus,
    SwitchStatus,
    decode_alarm_info,
    decode_analog_values,
    decode_management_info,
    decode_manufacturer_info,
    encode_alarm_info,
    encode_analog_values,
    encode_management_info,
    encode_manufacturer_info,
)
from shared.models import LinkStatus

# Tomcat42 output.txt: (request, answer) pairs of a US2000 at address 2.
US2000_PROTOCOL_VERSION = (b"~2002464FC0048520FCB2\r", b"~200246000000FDB2\r")
US2000_MANUFACTURER = (
    b"~20024651C0040000FCD5\r",
    b"~20024600C0405553324B42504C000000020350796C6F6E2D2D2D2D2D2D2D2D2D2D2D2D2D2D2DEF98\r",
)
US2000_ANALOG = (
    b"~20024642C0040202FCD1\r",
    b"~20024600C06E00020F0D1F0D200D200D200D200D200D210D200D200D210D220D200D220D220D21050BCD0BAF0BAF0BAF0BAF"
    b"0015C4E88AAC02C350004FE594\r",
)
US2000_ALARM = (
    b"~20024644C0040202FCCF\r",
    b"~20024600C04000020F000000000000000000000000000000050000000000000000000E800000F161\r",
)
US2000_MANAGEMENT = (b"~20024692C0040202FCCC\r", b"~20024600B01402D002B79800FAFF06C0F92D\r")
US2000_SYSTEM_PARAMETERS = b"~20024600B032110E420BEA0B540D0D0A3D03FCD2F0B3B0ADD40D0D0A3DFC18F23D\r"
US2000_FIRMWARE = b"~20024600400C020203000605FB49\r"
# python-pylontech tests/test_basic.py
UP2500_ANALOG = (
    b"~20024600D05E1002080D020D020D020D030D000D010D010D03050B7D0B690B690B690B73FFFA680EFFFF04FFFF00000174E4"
    b"01B198E906\r"
)
UP2500_MANAGEMENT = b"~20024600B014026EF05AA0022BFDD5C0F915\r"
US3000_STACK = (
    b"~2002460061DC11040F0CFD0CFC0CFC0CFB0CFC0CFB0CFD0CFC0CFC0CFB0CFA0CFD0CFB0CFE0CFA050BE10BCD0BCD0BCD0BCD"
    b"0000C2C1FFFF04FFFF002F00EFEC0121100F0CEB0CEB0CEB0CEA0CEA0CEC0CEB0CEB0CE90CE80CE60CE90CE90CEA0CE8050BE1"
    b"0BCD0BCD0BCD0BCDFFBCC1B2FFFF04FFFF002800F2D00121100F0CE80CE90CEA0CEA0CEA0CE90CEA0CEA0CEB0CEC0CEB0CEB"
    b"0CEB0CEA0CEA050BE10BC30BC30BC30BC3FFB7C1B8FFFF04FFFF007100E7400121100F0CE90CEC0CEB0CEA0CEA0CEB0CE90CE8"
    b"0CEA0CEA0CEA0CEB0CEC0CEA0CEA050BD70BC30BC30BC30BB9FFBBC1B9FFFF04FFFF006B00ED080121108D63\r"
)
# The pylontech PyPI package's output, as quoted by a user (payloads only; framed here).
PYPI_MANAGEMENT_INFO = bytes.fromhex("02D002AFC800FAFF06C0")
PYPI_ALARM_INFO_33 = bytes.fromhex("00020F000000000000000000000000000000050000000000000000000E00000000")
CONSOLE_SWITCH = b"~20014682C0048520FCC3\r"


@pytest.mark.parametrize("wire", [
    *US2000_PROTOCOL_VERSION, *US2000_MANUFACTURER, *US2000_ANALOG, *US2000_ALARM, *US2000_MANAGEMENT,
    US2000_SYSTEM_PARAMETERS, US2000_FIRMWARE, UP2500_ANALOG, UP2500_MANAGEMENT, US3000_STACK, CONSOLE_SWITCH,
])
def test_recorded_frames_verify_and_encode_back_identically(wire: bytes) -> None:
    frame = decode_frame(wire)
    assert frame.cid1 == 0x46 and frame.version == 0x20
    assert encode_frame(frame) == wire


def test_checksums_of_recorded_frames() -> None:
    assert frame_checksum(b"2002464FC0048520") == 0xFCB2
    assert frame_checksum(b"200246000000") == 0xFDB2
    # LENGTH fields seen on the wire: LENID 4 -> C004, 0 -> 0000, 20 -> B014, 110 -> C06E, 476 -> 61DC.
    assert [length_field(n) for n in (4, 0, 20, 110, 476, 94)] == [
        0xC004, 0x0000, 0xB014, 0xC06E, 0x61DC, 0xD05E]
    assert length_checksum(0x142) == 0x9  # python-pylontech's 3-module answer: LENGTH 9142


def test_requests_are_encoded_as_packs_are_asked() -> None:
    assert encode_request(2, Command.MANUFACTURER_INFO, b"\x00\x00") == US2000_MANUFACTURER[0]
    assert encode_request(2, Command.ANALOG_VALUES, b"\x02\x02") == US2000_ANALOG[0]
    assert encode_request(2, Command.MANAGEMENT_INFO, b"\x02\x02") == US2000_MANAGEMENT[0]
    assert encode_request(1, 0x82, bytes.fromhex("8520")) == CONSOLE_SWITCH
    # What the agent sends: INFO = the pack address alone.
    assert encode_request(3, Command.ANALOG_VALUES, b"\x03") == b"~20034642E00203FD31\r"
    assert decode_frame(b"~20034642E00203FD31\r") == Frame(3, 0x42, b"\x03")


def test_us2000_analog_answer_has_its_documented_values() -> None:
    values = decode_analog_values(answer_info(decode_frame(US2000_ANALOG[1]), address=2, command=0x42), 2)
    assert values.cell_voltages_v[:3] == pytest.approx((3.359, 3.360, 3.360))
    assert len(values.cell_voltages_v) == 15 and max(values.cell_voltages_v) == pytest.approx(3.362)
    assert values.temperatures_c == pytest.approx((29.0, 26.0, 26.0, 26.0, 26.0))
    assert values.current_a == pytest.approx(2.1)  # charging, as status 3 of its 0x44 answer says
    assert values.pack_voltage_v == pytest.approx(50.408)
    assert (values.remaining_ah, values.total_ah, values.cycles) == pytest.approx((35.5, 50.0, 79))


def test_up2500_analog_answer_matches_python_pylontech() -> None:
    values = decode_analog_values(decode_frame(UP2500_ANALOG).info, 2)
    assert values.cell_voltages_v == pytest.approx((3.33, 3.33, 3.33, 3.331, 3.328, 3.329, 3.329, 3.331))
    assert values.temperatures_c == pytest.approx((21.0, 19.0, 19.0, 19.0, 20.0))
    assert values.current_a == pytest.approx(-0.6)
    assert values.pack_voltage_v == pytest.approx(26.638)
    assert values.remaining_ah == pytest.approx(95.460) and values.total_ah == pytest.approx(111.0)
    assert values.remaining_ah / values.total_ah == pytest.approx(0.86, abs=0.001)
    assert values.info_flag == 0x10


def test_us3000_module_block_with_24_bit_capacities() -> None:
    # The stack answer (INFOFLAG 0x11, 4 modules) holds module blocks as a single-pack answer does
    # after its address: the first block, behind flag and address, is what pack 2 alone would answer.
    info = decode_frame(US3000_STACK).info
    block_end = 2 + 1 + 15 * 2 + 1 + 5 * 2 + 2 + 2 + 2 + 1 + 2 + 2 + 3 + 3
    values = decode_analog_values(bytes([0x11, 2]) + info[2:block_end], 2)
    assert values.cell_voltages_v[0] == pytest.approx(3.325)
    assert values.pack_voltage_v == pytest.approx(49.857)
    assert values.current_a == 0.0
    assert (values.remaining_ah, values.total_ah, values.cycles) == pytest.approx((61.42, 74.0, 47))
    assert encode_analog_values(values) == bytes([0x11, 2]) + info[2:block_end]


def test_alarm_answers_decode_and_extra_bytes_are_ignored() -> None:
    alarm = decode_alarm_info(decode_frame(US2000_ALARM[1]).info, 2)
    assert alarm.cell_states == (0,) * 15 and alarm.temperature_states == (0,) * 5
    assert alarm.protection == ProtectionStatus(0)
    assert alarm.switches == (
        SwitchStatus.CHARGE_MOSFET | SwitchStatus.DISCHARGE_MOSFET | SwitchStatus.USING_BATTERY_POWER)
    assert alarm.status3 == 0x80  # effective charge current: the analog answer shows +2.1 A
    longer = decode_alarm_info(PYPI_ALARM_INFO_33, 2)
    assert longer.switches == SwitchStatus(0x0E) and longer.failed_cells == 0


def test_management_answers_have_their_documented_values() -> None:
    us2000 = decode_management_info(decode_frame(US2000_MANAGEMENT[1]).info, 2)
    assert (us2000.charge_voltage_limit_v, us2000.discharge_voltage_limit_v) == pytest.approx((53.25, 47.0))
    assert (us2000.charge_current_limit_a, us2000.discharge_current_limit_a) == pytest.approx((25.0, -25.0))
    up2500 = decode_management_info(decode_frame(UP2500_MANAGEMENT).info, 2)
    assert (up2500.charge_voltage_limit_v, up2500.discharge_voltage_limit_v) == pytest.approx((28.4, 23.2))
    assert (up2500.charge_current_limit_a, up2500.discharge_current_limit_a) == pytest.approx((55.5, -55.5))
    assert up2500.charge_enabled and up2500.discharge_enabled
    assert ManagementStatus.FULL_CHARGE_REQUEST not in up2500.status
    pypi = decode_management_info(PYPI_MANAGEMENT_INFO, 2)
    assert (pypi.charge_voltage_limit_v, pypi.discharge_voltage_limit_v) == pytest.approx((53.25, 45.0))
    assert encode_management_info(pypi) == PYPI_MANAGEMENT_INFO


def test_manufacturer_answer_names_the_pack() -> None:
    info = decode_manufacturer_info(decode_frame(US2000_MANUFACTURER[1]).info)
    assert info == ManufacturerInfo("US2KBPL", (2, 3), "Pylon---------------")
    assert str(info) == "US2KBPL software 2.3 by Pylon---------------"
    assert decode_manufacturer_info(encode_manufacturer_info(info)) == info


def _corrupt(wire: bytes, at: int, char: bytes) -> bytes:
    return wire[:at] + char + wire[at + 1:]


def _reframe(body: bytes) -> bytes:
    """``~`` + body + a checksum that fits it + ``\\r`` (for frames wrong in one field only)."""
    return b"~" + body + f"{frame_checksum(body):04X}".encode() + b"\r"


def test_a_changed_character_is_a_checksum_error_with_both_sums() -> None:
    bad = _corrupt(US2000_MANAGEMENT[1], 16, b"7")  # CVL D002 -> D702
    with pytest.raises(FrameChecksumError) as caught:
        decode_frame(bad)
    assert caught.value.received == 0xF92D and caught.value.expected != 0xF92D
    assert caught.value.status is LinkStatus.CRC_ERROR
    assert "CRC Error" in str(caught.value)  # the words operators grep for


def test_a_wrong_length_checksum_is_its_own_error() -> None:
    body = US2000_MANAGEMENT[1][1:-5]
    with pytest.raises(LengthChecksumError) as caught:
        decode_frame(_reframe(body[:8] + b"C" + body[9:]))  # LENGTH C014 instead of B014
    assert (caught.value.lenid, caught.value.expected, caught.value.received) == (20, 0xB, 0xC)
    assert isinstance(caught.value, CrcError)


def test_a_length_that_does_not_match_the_info_is_an_error() -> None:
    body = US2000_MANAGEMENT[1][1:-5]
    with pytest.raises(LengthMismatchError) as caught:
        decode_frame(_reframe(body[:-2]))  # one INFO byte cut off, LENGTH still says 20 characters
    assert (caught.value.declared_chars, caught.value.actual_chars) == (20, 18)
    assert caught.value.status is LinkStatus.CRC_ERROR


@pytest.mark.parametrize("wire", [
    b"~2002\r", b"2002464FC0048520FCB2\r", b"~2002464FC0048520FCB2",
    _reframe(b"20024600C0040G02"), _reframe(b"2002460XC004"), _reframe(b"20024600E00102F"),
])
def test_bytes_that_are_no_frame_are_framing_errors(wire: bytes) -> None:
    with pytest.raises((FramingError, LengthChecksumError, LengthMismatchError)) as caught:
        decode_frame(wire)
    assert caught.value.status is LinkStatus.CRC_ERROR


@pytest.mark.parametrize(("rtn", "text"), [
    (0x01, "VER error"), (0x02, "CHKSUM error"), (0x90, "ADR error"), (0x91, "internal communication error"),
    (0x77, "unknown return code"),
])
def test_a_return_code_is_a_refusal_carrying_it(rtn: int, text: str) -> None:
    frame = decode_frame(encode_frame(Frame(3, rtn)))
    with pytest.raises(ReturnCodeError) as caught:
        answer_info(frame, address=3, command=Command.ANALOG_VALUES)
    error = caught.value
    assert isinstance(error, ModbusExceptionError)
    assert (error.rtn, error.code, error.address, error.command) == (rtn, rtn, 3, 0x42)
    assert error.status is LinkStatus.MODBUS_EXCEPTION
    assert text in str(error)


def test_info_that_does_not_hold_its_fields_is_invalid_data() -> None:
    info = decode_frame(US2000_ANALOG[1]).info
    with pytest.raises(InfoFormatError, match="before total capacity") as caught:
        decode_analog_values(info[:-3], 2)
    assert isinstance(caught.value, InvalidDataError) and caught.value.status is LinkStatus.INVALID_DATA
    with pytest.raises(InfoFormatError, match="describes pack 2, pack 3 was asked"):
        decode_analog_values(info, 3)
    with pytest.raises(InfoFormatError, match="user-defined item count 3"):
        decode_analog_values(info[:-5] + b"\x03" + info[-4:], 2)
    with pytest.raises(InfoFormatError, match="before status 5"):
        decode_alarm_info(decode_frame(US2000_ALARM[1]).info[:-1], 2)
    with pytest.raises(InfoFormatError, match="management info"):
        decode_management_info(PYPI_MANAGEMENT_INFO, 7)


def test_assembler_cuts_frames_out_of_a_noisy_stream_in_pieces() -> None:
    a, b = US2000_MANAGEMENT[1], US2000_PROTOCOL_VERSION[1]
    stream = b"\x00\xffnoise" + a + b"~2002460" + b + b"junk"
    assembler = FrameAssembler()
    frames = [f for i in range(0, len(stream), 7) for f in assembler.feed(stream[i:i + 7])]
    assert frames == [a, b]
    assert assembler.stray_bytes == len(b"\x00\xffnoise") + len(b"~2002460") + len(b"junk")
    assert assembler.pending_bytes == 0 and assembler.feed(b"") == []


def test_assembler_drops_a_frame_that_never_ends() -> None:
    assembler = FrameAssembler()
    assert assembler.feed(b"~" + b"0" * 5000) == []
    assert assembler.pending_bytes == 0 and assembler.stray_bytes == 5001
    assert assembler.feed(US2000_PROTOCOL_VERSION[1]) == [US2000_PROTOCOL_VERSION[1]]


cell_volts = st.integers(min_value=0, max_value=0xFFFF).map(lambda mv: mv / 1000.0)
temps_c = st.integers(min_value=0, max_value=0xFFFF).map(lambda raw: (raw - 2731) / 10.0)


@given(
    address=st.integers(min_value=0, max_value=255),
    cells=st.lists(cell_volts, max_size=24),
    temperatures=st.lists(temps_c, max_size=8),
    current_deci=st.integers(min_value=-0x8000, max_value=0x7FFF),
    capacities=st.tuples(st.integers(0, 0xFFFFFF), st.integers(0, 0xFFFFFF)),
)
def test_analog_values_round_trip_through_frames(
    address: int, cells: list[float], temperatures: list[float], current_deci: int,
    capacities: tuple[int, int],
) -> None:
    remaining, total = capacities
    values = AnalogValues(address, tuple(cells), tuple(temperatures), current_deci / 10.0, 51.2,
                          remaining / 1000.0, total / 1000.0, 300)
    wire = encode_frame(Frame(address, 0, encode_analog_values(values)))
    decoded = decode_analog_values(answer_info(decode_frame(wire), address=address, command=0x42), address)
    assert decoded.cell_voltages_v == pytest.approx(values.cell_voltages_v)
    assert decoded.temperatures_c == pytest.approx(values.temperatures_c)
    assert (decoded.current_a, decoded.remaining_ah, decoded.total_ah) == pytest.approx(
        (values.current_a, values.remaining_ah, values.total_ah))


@given(states=st.lists(st.sampled_from([0, 1, 2, 0xF0]), min_size=0, max_size=20),
       status=st.tuples(*(st.integers(0, 255),) * 3), failed=st.integers(0, 0xFFFF))
def test_alarm_info_round_trips(states: list[int], status: tuple[int, int, int], failed: int) -> None:
    alarm = AlarmInfo(5, tuple(states), tuple(reversed(states)), 1, 2, 0xF0, ProtectionStatus(status[0]),
                      SwitchStatus(status[1]), status[2], failed)
    assert decode_alarm_info(encode_alarm_info(alarm), 5) == alarm


def test_management_round_trip_keeps_signs() -> None:
    m = ManagementInfo(2, 53.25, 45.0, 25.0, -25.0, ManagementStatus.CHARGE_ENABLE)
    decoded = decode_management_info(encode_management_info(m), 2)
    assert decoded.discharge_current_limit_a == -25.0 and not decoded.discharge_enabled
