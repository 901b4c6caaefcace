"""Profiles are data: the shipped ones load, decode correctly, and mistakes are rejected clearly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from rack_agent.errors import InvalidDataError, ProfileError
from rack_agent.profiles import flat_plan, load_profile, shipped_profiles
from rack_agent.profiles.plan import RegRef, decode_measurements, encode_numeric, encode_raw, read_raw
from rack_agent.profiles.spec import RegisterType, Table
from shared.models import ContactorState


def test_shipped_profiles_load() -> None:
    assert {"sunspec", "acme_flat"} <= set(shipped_profiles())
    for name in shipped_profiles():
        load_profile(name)


def _acme_image(**overrides: float) -> dict[tuple[Table, int], int]:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    values = {
        "pack_voltage_v": 53.12, "current_a": -42.5, "soc_pct": 77.7, "soh_pct": 99.0,
        "cell_voltage_max_v": 3.345, "cell_voltage_min_v": 3.301, "temperature_max_c": 31.4,
        "temperature_min_c": 22.1, "charge_current_limit_a": 150.0, "discharge_current_limit_a": 200.0,
        "charge_voltage_limit_v": 55.2, "discharge_voltage_limit_v": 46.4, "capacity_ah": 280.0,
    }
    values.update(overrides)
    image: dict[tuple[Table, int], int] = {(Table.HOLDING, a): 0 for a in range(21)}
    for name, value in values.items():
        point = plan.numeric[name]
        assert point.ref is not None
        for i, reg in enumerate(encode_numeric(point, value)):
            image[(Table.HOLDING, point.ref.address + i)] = reg
    image[(Table.HOLDING, 5)] = 7  # cell 7 is the highest
    # alarms: charge over-temperature (6) + discharge over-temp (8)
    image[(Table.HOLDING, 18)] = 0b1_0100_0000
    image[(Table.HOLDING, 20)] = 1  # contactor closed
    return image


def test_flat_profile_decodes_scale_offset_sign_and_word_order() -> None:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    assert len(plan.blocks) == 1 and plan.blocks[0].count == 21
    m = decode_measurements(plan, _acme_image())
    assert m.pack_voltage_v == pytest.approx(53.12)
    assert m.current_a == pytest.approx(-42.5)
    assert m.temperature_max_c == pytest.approx(31.4, abs=0.05)
    assert m.capacity_ah == pytest.approx(280.0)
    assert m.cell_voltage_max_location == "cell 7"
    assert m.alarms.raised() == ("charge_over_temperature", "discharge_over_temperature")
    assert m.contactor is ContactorState.CLOSED


def test_current_sign_can_be_inverted_per_unit() -> None:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    assert decode_measurements(plan, _acme_image(), invert_current=True).current_a == pytest.approx(42.5)


def test_not_available_marker_is_invalid_data() -> None:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    image = _acme_image()
    image[(Table.HOLDING, 8)] = 0xFFFF
    with pytest.raises(InvalidDataError, match="not-available"):
        decode_measurements(plan, image)


def test_a_location_the_device_does_not_give_is_blank_not_a_lost_reading() -> None:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    where = plan.locations["cell_voltage_max_location"]
    marked = replace(where, refs=tuple(replace(r, invalid_raw=frozenset({0xFFFF})) for r in where.refs))
    plan = replace(plan, locations={**plan.locations, "cell_voltage_max_location": marked})
    image = _acme_image()
    image[(Table.HOLDING, 5)] = 0xFFFF  # "not implemented"
    m = decode_measurements(plan, image)
    assert m.cell_voltage_max_location == ""
    assert m.charge_current_limit_a == pytest.approx(150.0)
    assert m.cell_voltage_min_location == "cell 0"


def test_physically_impossible_value_is_invalid_data() -> None:
    plan = flat_plan(load_profile("acme_flat"))  # type: ignore[arg-type]
    with pytest.raises(InvalidDataError, match="temperature_max_c"):
        decode_measurements(plan, _acme_image(temperature_max_c=200.0))


@pytest.mark.parametrize("rtype", list(RegisterType))
@pytest.mark.parametrize("order", ["big", "little"])
def test_register_types_round_trip(rtype: RegisterType, order: str) -> None:
    ref = RegRef(Table.INPUT, 10, rtype, order)
    value = -12345 if rtype in (RegisterType.S16, RegisterType.S32) else 54321 if rtype.words == 2 else 4321
    if rtype is RegisterType.F32:
        value = 1.5  # type: ignore[assignment]
    regs = encode_raw(ref, value)
    image = {(Table.INPUT, 10 + i): r for i, r in enumerate(regs)}
    assert read_raw(ref, image) == value


BAD_PROFILES = {
    "unknown_field": ('kind = "flat"\n[profile]\nname = "x"\n[points]\nvoltage = { address = 0 }\n',
                      "unknown point field"),
    "missing_required": ('kind = "flat"\n[profile]\nname = "x"\n[points]\npack_voltage_v = { address = 0 }\n',
                         "missing required point"),
    "bad_type": ('kind = "flat"\n[profile]\nname = "x"\n[points]\n'
                 'pack_voltage_v = { address = 0, type = "u17" }\n',
                 "points.pack_voltage_v"),
    "bad_kind": ('kind = "json"\n[profile]\nname = "x"\n', "kind"),
    "bad_toml": ('kind = "flat\n', "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_profile_with_a_mistake_is_rejected_with_a_clear_message(tmp_path: Path, case: str) -> None:
    text, expected = BAD_PROFILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unknown_shipped_profile_lists_the_choices() -> None:
    with pytest.raises(ProfileError, match="acme_flat"):
        load_profile("nosuch")


def test_unknown_alarm_flag_is_rejected(tmp_path: Path) -> None:
    base = (Path(__file__).parents[2] / "rack_agent/profiles/acme_flat.toml").read_text()
    path = tmp_path / "p.toml"
    path.write_text(base.replace("cell_imbalance = { address = 18", "cell_imbalanced = { address = 18"))
    with pytest.raises(ProfileError, match="unknown alarms flag"):
        load_profile(str(path))
