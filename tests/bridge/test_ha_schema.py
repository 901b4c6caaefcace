"""The documented-schema checker itself finds what it is there to find (else the discovery test proves
nothing)."""

from __future__ import annotations

from typing import Any

from tests.bridge.ha_schema import problems

TOPIC = "homeassistant/sensor/bmslink_site/rack_r1_soc/config"
GOOD: dict[str, Any] = {
    "name": "State of charge", "unique_id": "u", "state_topic": "s", "value_template": "{{ value_json.x }}",
    "availability": [{"topic": "a"}], "availability_mode": "all", "origin": {"name": "bmslink"},
    "device": {"identifiers": ["d"], "name": "n", "manufacturer": "bmslink", "model": "m", "sw_version": "1"},
    "device_class": "battery", "unit_of_measurement": "%", "state_class": "measurement",
}


def test_a_good_config_passes() -> None:
    assert problems(TOPIC, "sensor", GOOD) == []


def test_each_departure_is_named() -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        (TOPIC, {**GOOD, "unit": "%"}, "unknown key 'unit'"),
        (TOPIC, {**GOOD, "device": {**GOOD["device"], "serial": "1"}}, "unknown device key 'serial'"),
        (TOPIC, {**GOOD, "availability": [{"topic": "a", "payload": "x"}]}, "unknown availability key"),
        (TOPIC, {k: v for k, v in GOOD.items() if k != "unique_id"}, "missing unique_id"),
        (TOPIC, {**GOOD, "unit_of_measurement": "V"}, "unit 'V' for device_class battery"),
        (TOPIC, {**GOOD, "device_class": "enum", "options": ["a"]}, "options with state_class"),
        (TOPIC, {**GOOD, "entity_category": "config"}, "entity_category 'config'"),
        (TOPIC, {**GOOD, "availability_mode": "some"}, "availability_mode 'some'"),
        (TOPIC, {**GOOD, "platform": "sensor"}, "unknown key 'platform'"),
        (TOPIC.replace("rack_r1", "rack_r.1"), GOOD, "breaks <component>"),
    ]
    for topic, config, expected in cases:
        assert any(expected in p for p in problems(topic, "sensor", config)), (expected, config)
    binary = {k: v for k, v in GOOD.items() if k not in ("unit_of_measurement", "state_class")}
    assert problems(TOPIC, "binary_sensor", {**binary, "device_class": "battery"}) == []
    assert "unknown key 'state_class'" in problems(TOPIC, "binary_sensor", {**binary, "state_class": "x",
                                                                          "device_class": "problem"})
