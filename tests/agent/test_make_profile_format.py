"""The profile format's extensions for real makes, and the shipped make profiles against public data.

* Recorded Seplos V3 data decoded through seplos_v3.toml: raw RTU frames captured on a bus
  (syssi/esphome-seplos-bms docs/pdus/v3/SG16S200A-SP57B-A-all-frames.txt and
  SP05B2312190075-coil-frames.txt; CRC checked) and a register dump read with pymodbus
  (marcelrv/seplosBMSv3 README.md, a BMS16S200A-SP05B). Expected values are the document's units
  applied to the recorded numbers, e.g. 0x14CD = 5325 x 10 mV = 53.25 V.
* Each extension changes what is decoded, and its misuse is refused when the profile loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pymodbus.framer.rtu import FramerRTU

from rack_agent.errors import InvalidDataError, ProfileError
from rack_agent.profiles import flat_plan, load_profile, shipped_profiles
from rack_agent.profiles.plan import Block, RegisterImage, decode_measurements, image_from_blocks
from rack_agent.profiles.spec import FlatProfile, Table
from shared.models import ContactorState

MAKE_PROFILES = ("seplos_v3", "seplos_v3_300a", "jk_pb", "pace", "byd_hvs")


def _plan(name: str):  # type: ignore[no-untyped-def]
    profile = load_profile(name)
    assert isinstance(profile, FlatProfile)
    return flat_plan(profile)


def _frame_payload(hex_frame: str) -> bytes:
    """The data bytes of a recorded RTU answer (address, function, byte count, data, CRC), CRC checked."""
    frame = bytes.fromhex(hex_frame.replace(".", "").replace("0x", "").replace(" ", ""))
    assert FramerRTU.compute_CRC(frame[:-2]) == int.from_bytes(frame[-2:], "big"), "recorded CRC"
    assert frame[2] == len(frame) - 5
    return frame[3:-2]


def _words(payload: bytes) -> list[int]:
    return [int.from_bytes(payload[i:i + 2], "big") for i in range(0, len(payload), 2)]


def _coils(payload: bytes) -> list[int]:
    return [(byte >> i) & 1 for byte in payload for i in range(8)]  # first coil is bit 0 of byte 0


# SG16S200A-SP57B-A-all-frames.txt: the answer to "01.04.10.00.00.11" (PIA, 17 input registers) and,
# from the same bus, the SPA reads "E0.04.13.00.00.35" and "E0.04.13.35.00.35" (0x1300.., 0x1335..).
SG16_PIA = ("01.04.22.14.CD.FF.77.6B.40.80.E8.01.22.03.40.03.E7.00.0A.0C.FF.0B.7F.0D.00.0C.FF.0B.81.0B.7E"
            ".00.00.00.B4.00.B4.D3.2E")
SG16_SPA_1300 = ("E0.04.6A.00.04.00.10.15.18.15.E0.15.18.16.80.12.C0.12.20.12.C0.10.E0.0D.48.0D.AC.0D.48"
                 ".0E.42.0C.1C.0B.54.0C.1C.0A.8C.07.D0.03.E8.01.F4.00.CB.00.CD.00.D2.00.64.01.2C.01.2C.FF.35.FF.33"
                 ".FF.2E.00.64.FE.A2.01.2C.FE.D4.00.6A.02.58.00.05.0B.B8.00.CD.00.0A.0D.AC.0D.48.05.DC.03.E8"
                 ".03.20.00.C8.00.1E.0C.81.0C.9F.0C.9F.0C.D1.0A.DD.0A.C9.76.16")
SG16_SPA_1335 = ("E0.04.6A.0A.BF.0A.AB.0C.9F.0C.D1.0C.D1.0D.03.0A.C9.0A.AB.0A.B5.0A.8D.0C.81.0C.9F.0C.D1"
                 ".0D.03.0A.C9.0A.AB.0A.AB.0A.47.0D.FD.0E.61.0D.FD.0E.F7.0B.0F.0A.AB.0C.9F.0A.AB.00.0A.0D.48.00.32"
                 ".00.1E.03.C0.00.50.00.32.00.32.00.1E.80.E8.80.E8.6B.40.00.30.00.3C.00.F0.00.0A.00.07.00.00"
                 ".00.0D.00.00.01.F4.01.2C.16.80.00.B4.FF.4C.00.00.00.08.FE.C9")
# SP05B2312190075-coil-frames.txt: the answer to a read of the 144 PIC coils from 0x1200.
SP05_PIC = ("0x01 0x01 0x12 0x00 0x00 0x00 0x00 0x00 0x00 0x00 0x00 0x10 0x00 0x00 0x00 0x00 0x00 0x00 "
            "0x03 0x00 0x00 0x7a 0xf5")
# SG16S200A-SP57B-A-all-frames.txt: a coil read the BMS refused ("01.01.12.00.09.00" -> illegal address).
SG16_COIL_REFUSED = "01.81.02.C1.91"


def _recorded_image() -> RegisterImage:
    blocks = [
        (Block(Table.INPUT, 0x1000, 17), _words(_frame_payload(SG16_PIA))),
        (Block(Table.INPUT, 0x1300, 53), _words(_frame_payload(SG16_SPA_1300))),
        (Block(Table.INPUT, 0x1335, 53), _words(_frame_payload(SG16_SPA_1335))),
        (Block(Table.COIL, 0x1200, 144), _coils(_frame_payload(SP05_PIC))),
    ]
    return image_from_blocks(blocks)


def test_recorded_seplos_frames_decode_to_the_documented_values() -> None:
    m = decode_measurements(_plan("seplos_v3"), _recorded_image())
    assert m.pack_voltage_v == pytest.approx(53.25)  # 0x14CD x 10 mV
    assert m.current_a == pytest.approx(-1.37)  # 0xFF77 = -137 x 10 mA: discharging
    assert m.capacity_ah == pytest.approx(330.00)  # 0x80E8 x 10 mAh
    assert m.soc_pct == pytest.approx(83.2)  # 0x0340 x 0.1 %
    assert m.soh_pct == pytest.approx(99.9)  # 0x03E7
    assert m.cell_voltage_max_v == pytest.approx(3.328)  # 0x0D00 mV
    assert m.cell_voltage_min_v == pytest.approx(3.327)  # 0x0CFF
    assert m.temperature_max_c == pytest.approx(21.35)  # 0x0B81 = 2945 x 0.1 K
    assert m.temperature_min_c == pytest.approx(21.05)  # 0x0B7E = 2942
    assert (m.discharge_current_limit_a, m.charge_current_limit_a) == (180.0, 180.0)  # 0x00B4 A
    assert m.charge_voltage_limit_v == pytest.approx(57.60)  # SPA 0x1365 = 5760 x 10 mV
    assert m.discharge_voltage_limit_v == pytest.approx(46.40)  # SPA 0x1307 = 4640
    # PIC byte 8 = 0x10 (standby), byte 15 = 0x03 (discharge and charge FET on), no event bits.
    assert m.contactor is ContactorState.CLOSED
    assert m.alarms.raised() == () and m.warnings.raised() == ()


def test_the_300a_variant_reads_the_same_frames_with_ten_times_the_current() -> None:
    m = decode_measurements(_plan("seplos_v3_300a"), _recorded_image())
    assert m.current_a == pytest.approx(-13.7)
    assert m.pack_voltage_v == pytest.approx(53.25)  # everything else is the base profile's


def test_recorded_seplos_register_dump_decodes_to_the_documented_values() -> None:
    """marcelrv/seplosBMSv3 README: read_input_registers(0x1000, 0x12) and (0x1300, 0x6a), and
    read_coils(0x1200, 0x90) of a BMS16S200A-SP05B."""
    pia = [5236, 1301, 3800, 30400, 64, 125, 1000, 2, 3272, 2837, 3275, 3268, 2845, 2831, 0, 180, 180]
    spa = {0x1307: 4640, 0x1365: 5760}
    coils = [0] * 144
    for on in (65, 120, 121):  # the True entries: 0x1241 "Charge", 0x1278/0x1279 FETs on
        coils[on] = 1
    image = image_from_blocks([
        (Block(Table.INPUT, 0x1000, 17), pia),
        (Block(Table.INPUT, 0x1307, 1), [spa[0x1307]]),
        (Block(Table.INPUT, 0x1365, 1), [spa[0x1365]]),
        (Block(Table.COIL, 0x1200, 144), coils),
    ])
    m = decode_measurements(_plan("seplos_v3"), image)
    assert (m.pack_voltage_v, m.current_a, m.soc_pct, m.soh_pct) == pytest.approx((52.36, 13.01, 12.5, 100.0))
    assert m.current_a > 0  # the "Charge" state coil is set: positive is charging
    assert (m.cell_voltage_max_v, m.cell_voltage_min_v) == pytest.approx((3.275, 3.268))
    assert (m.temperature_max_c, m.temperature_min_c) == pytest.approx((11.35, 9.95))
    assert m.capacity_ah == pytest.approx(304.0)
    assert m.contactor is ContactorState.CLOSED


def test_recorded_refusal_of_a_coil_read_is_an_exception_response() -> None:
    frame = bytes.fromhex(SG16_COIL_REFUSED.replace(".", ""))
    assert FramerRTU.compute_CRC(frame[:-2]) == int.from_bytes(frame[-2:], "big")
    assert (frame[1], frame[2]) == (0x80 | 1, 2)  # FC1 refused with ILLEGAL ADDRESS: what the sim injects


@pytest.mark.parametrize("name", MAKE_PROFILES)
def test_make_profiles_ship_and_read_what_their_headers_say(name: str) -> None:
    assert name in shipped_profiles()
    tables = {b.table for b in _plan(name).blocks}
    expected = {
        "seplos_v3": {Table.INPUT, Table.COIL}, "seplos_v3_300a": {Table.INPUT, Table.COIL},
        "jk_pb": {Table.HOLDING}, "pace": {Table.HOLDING}, "byd_hvs": {Table.HOLDING},
    }
    assert tables == expected[name]


def test_jk_byte_addressing_reads_each_register_two_addresses_on() -> None:
    plan = _plan("jk_pb")
    blocks = {b.address: b for b in plan.blocks}
    assert blocks[0x1200].count == 32 and blocks[0x1200].stride == 2  # 32 cells, 0x1200..0x123E
    assert blocks[0x1290].count == (0x12C0 - 0x1290) // 2 + 1
    cells = [3300 + i for i in range(16)] + [0] * 16  # a 16S pack: cells 17..32 read 0
    data = [0] * 25
    data[0:2] = [0, 53_000]  # 0x1290 BatVol u32 mV, high word first
    data[4:6] = [0xFFFF, 0xFFFF - 2499]  # 0x1298 BatCurrent s32 mA = -2.5 A
    data[6:8] = [250, 0xFFFF - 49]  # 0x129C TempBat1 25.0, 0x129E TempBat2 -5.0 degC
    data[8:10] = [0, 1 << 4]  # 0x12A0 AlarmBitmask bit 4: cell over-voltage
    data[11] = (2 << 8) | 87  # 0x12A6: balancer state (high byte) / SOC 87 % (low byte)
    data[14:16] = divmod(280_000, 0x10000)  # 0x12AC SOCFullChargeCap u32 mAh
    data[20] = 97 << 8  # 0x12B8: SOH 97 % (high byte) / precharge
    data[24] = 0x0100  # 0x12C0: charge switch on, discharge switch off
    settings = [0] * 8  # 0x102C..0x103A
    settings[0:2] = divmod(150_000, 0x10000)  # 0x102C CurBatCOC u32 mA
    settings[6:8] = divmod(200_000, 0x10000)  # 0x1038 CurBatDcOC u32 mA
    image = image_from_blocks([(blocks[0x1200], cells), (blocks[0x1290], data), (blocks[0x102C], settings)])
    m = decode_measurements(plan, image)
    assert m.capacity_ah == pytest.approx(280.0)
    assert m.pack_voltage_v == pytest.approx(53.0)
    assert m.current_a == pytest.approx(-2.5)
    assert (m.cell_voltage_max_v, m.cell_voltage_min_v) == pytest.approx((3.315, 3.300))  # zeros skipped
    assert (m.temperature_max_c, m.temperature_min_c) == pytest.approx((25.0, -5.0))
    assert (m.soc_pct, m.soh_pct) == (87.0, 97.0)
    assert (m.charge_current_limit_a, m.discharge_current_limit_a) == pytest.approx((150.0, 200.0))
    assert m.alarms.raised() == ("cell_over_voltage",)
    assert m.contactor is ContactorState.CLOSED  # either switch on: connected


def test_a_reduce_whose_every_register_is_skipped_is_invalid_data() -> None:
    plan = _plan("pace")
    image = {(Table.HOLDING, a): 0 for a in range(35)}
    image.update({(Table.HOLDING, a): 0 for a in range(68, 80)})
    image[(Table.HOLDING, 107)] = 55_200
    with pytest.raises(InvalidDataError, match="cell_voltage_max_v: all 16 registers hold a skipped value"):
        decode_measurements(plan, image)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


MINIMAL = """kind = "flat"
[profile]
name = "x"
[points]
pack_voltage_v = { address = 0 }
current_a = { address = 1, type = "s16" }
soc_pct = { address = 2 }
soh_pct = { address = 3 }
cell_voltage_max_v = { address = 4 }
cell_voltage_min_v = { address = 5 }
temperature_max_c = { address = 6 }
temperature_min_c = { address = 7 }
charge_current_limit_a = { address = 8 }
discharge_current_limit_a = { address = 9 }
charge_voltage_limit_v = { address = 10 }
discharge_voltage_limit_v = { address = 11 }
"""


@pytest.mark.parametrize(("extra", "expected"), [
    ('[alarms]\ninternal_fault = { table = "coil", address = 16, type = "s16", bit = 0 }\n',
     "holds single bits"),
    ('[points.soc_pct]\ntable = "coil"\n', "holds one bit, not a number"),
    ('[points.soc_pct]\nbyte = "low"\ntype = "s32"\n', "needs type u16"),
    ('[alarms]\ninternal_fault = { address = 12, bit = 17 }\n', "beyond the 16 bits"),
    ('[alarms]\ninternal_fault = { address = 12, byte = "high", bit = 9 }\n', "beyond the 8 bits"),
    ('[points.pack_voltage_v]\nreduce = "max"\ncount = 1\n', "points.pack_voltage_v"),
    ('[alarms]\ninternal_fault = { address = 12, bit = [] }\n', "alarms.internal_fault"),
])
def test_format_misuse_is_refused_when_the_profile_loads(tmp_path: Path, extra: str, expected: str) -> None:
    _write(tmp_path, "base", MINIMAL)
    with pytest.raises(ProfileError) as info:  # each mistake laid over a good profile
        load_profile(str(_write(tmp_path, "bad", 'extends = "./base.toml"\n' + extra)))
    assert expected in str(info.value)


def test_byte_addressing_refuses_odd_addresses(tmp_path: Path) -> None:
    text = MINIMAL.replace('kind = "flat"', 'kind = "flat"\nregister_addressing = "byte"')
    with pytest.raises(ProfileError, match="odd address"):
        load_profile(str(_write(tmp_path, "odd", text)))


def test_extends_lays_a_variant_over_its_base_and_refuses_a_loop(tmp_path: Path) -> None:
    _write(tmp_path, "base", MINIMAL)
    variant = _write(tmp_path, "variant",
                     'extends = "./base.toml"\n[profile]\nname = "v"\n[points.current_a]\nscale = 0.1\n')
    profile = load_profile(str(variant))
    assert isinstance(profile, FlatProfile)
    assert profile.profile.name == "v"
    current = profile.points["current_a"]
    assert (current.address, current.type.value, current.scale) == (1, "s16", 0.1)  # type: ignore[union-attr]
    _write(tmp_path, "a", 'extends = "./b.toml"\n')
    _write(tmp_path, "b", 'extends = "./a.toml"\n')
    with pytest.raises(ProfileError, match="does not end"):
        load_profile(str(tmp_path / "a.toml"))
    with pytest.raises(ProfileError, match="no shipped profile"):
        load_profile(str(_write(tmp_path, "lost", 'extends = "seplos_v9"\n')))
    with pytest.raises(ProfileError, match=r"extends '\./gone\.toml': file not found"):
        load_profile(str(_write(tmp_path, "gone_base", 'extends = "./gone.toml"\n')))
