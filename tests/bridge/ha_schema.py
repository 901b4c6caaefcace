"""What Home Assistant's documentation allows in an MQTT discovery config, as key sets, and a checker.

Sources (home-assistant/home-assistant.io, read through the project's search tools):

* https://www.home-assistant.io/integrations/sensor.mqtt/ (source/_integrations/sensor.mqtt.markdown,
  commit 9e4a69ab): the "Configuration Variables" of an MQTT sensor, the ``availability`` and
  ``device`` sub-keys, and the rule that ``options`` needs ``device_class: enum`` and cannot go with
  ``state_class`` or ``unit_of_measurement``; ``entity_category`` must be ``diagnostic`` for sensors.
* https://www.home-assistant.io/integrations/binary_sensor.mqtt/ (binary_sensor.mqtt.markdown,
  commit fbc3a3b3): the same for an MQTT binary sensor.
* https://www.home-assistant.io/integrations/mqtt/ (mqtt.markdown, commit 0a314403), "MQTT Discovery":
  the topic ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`` with levels of
  ``[a-zA-Z0-9_-]``; the ``origin`` block (``name`` required, ``sw_version``, ``support_url``); ``~``
  as a base topic; ``platform`` only in device-based discovery (so not allowed here).
* https://www.home-assistant.io/integrations/sensor/#device-class: the units each device class takes.
"""

from __future__ import annotations

import re
from typing import Any

COMMON_KEYS = frozenset({
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture", "expire_after",
    "force_update", "icon", "json_attributes_template", "json_attributes_topic", "name", "object_id",
    "payload_available", "payload_not_available", "qos", "state_topic", "unique_id", "value_template",
})
DISCOVERY_ONLY_KEYS = frozenset({"origin", "~"})
SENSOR_KEYS = COMMON_KEYS | DISCOVERY_ONLY_KEYS | {
    "last_reset_value_template", "options", "suggested_display_precision", "state_class",
    "unit_of_measurement",
}
BINARY_SENSOR_KEYS = COMMON_KEYS | DISCOVERY_ONLY_KEYS | {"off_delay", "payload_off", "payload_on"}
DEVICE_KEYS = frozenset({
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
})
AVAILABILITY_KEYS = frozenset({"payload_available", "payload_not_available", "topic", "value_template"})
ORIGIN_KEYS = frozenset({"name", "sw_version", "support_url"})
AVAILABILITY_MODES = frozenset({"all", "any", "latest"})
# The units HA accepts for the device classes bmslink uses (sensor integration page, "Device class").
UNITS_OF = {
    "battery": {"%"},
    "voltage": {"V", "mV", "µV", "kV", "MV"},
    "current": {"A", "mA"},
    "power": {"W", "kW", "MW", "GW", "TW", "mW"},
    "temperature": {"°C", "°F", "K"},
}
BINARY_DEVICE_CLASSES = frozenset({"problem", "battery", "battery_charging", "connectivity", "running",
                                   "safety", "power", "plug"})
TOPIC_LEVEL = re.compile(r"^[a-zA-Z0-9_-]+$")


def problems(topic: str, component: str, config: dict[str, Any]) -> list[str]:
    """Every way ``config`` (published on ``topic``) departs from the documented schema."""
    found: list[str] = []
    allowed = SENSOR_KEYS if component == "sensor" else BINARY_SENSOR_KEYS
    found += [f"unknown key {k!r}" for k in sorted(set(config) - allowed)]
    for required in ("state_topic", "unique_id", "name", "device", "availability", "origin"):
        if required not in config:
            found.append(f"missing {required}")
    device = config.get("device", {})
    found += [f"unknown device key {k!r}" for k in sorted(set(device) - DEVICE_KEYS)]
    for required in ("identifiers", "name", "manufacturer", "model", "sw_version"):
        if not device.get(required):
            found.append(f"device without {required}")
    if device.get("manufacturer") != "bmslink":
        found.append(f"manufacturer {device.get('manufacturer')!r}")
    for item in config.get("availability", []):
        found += [f"unknown availability key {k!r}" for k in sorted(set(item) - AVAILABILITY_KEYS)]
        if "topic" not in item:
            found.append("availability item without topic")
    if config.get("availability_mode", "latest") not in AVAILABILITY_MODES:
        found.append(f"availability_mode {config['availability_mode']!r}")
    found += [f"unknown origin key {k!r}" for k in sorted(set(config.get("origin", {})) - ORIGIN_KEYS)]
    if not config.get("origin", {}).get("name"):
        found.append("origin without name")
    if component == "sensor":
        found += _sensor_rules(config)
    elif config.get("device_class") not in (None, *BINARY_DEVICE_CLASSES):
        found.append(f"binary_sensor device_class {config['device_class']!r}")
    levels = topic.split("/")
    if levels[-1] != "config" or not all(TOPIC_LEVEL.match(level) for level in levels[-4:-1]):
        found.append(f"topic {topic!r} breaks <component>/<node_id>/<object_id>/config of [a-zA-Z0-9_-]")
    return found


def _sensor_rules(config: dict[str, Any]) -> list[str]:
    found = []
    device_class = config.get("device_class")
    if "options" in config:
        if device_class != "enum":
            found.append("options without device_class enum")
        if "state_class" in config or "unit_of_measurement" in config:
            found.append("options with state_class or unit_of_measurement")
        if not config["options"]:
            found.append("empty options")
    elif device_class == "enum":
        found.append("device_class enum without options")
    if device_class in UNITS_OF and config.get("unit_of_measurement") not in UNITS_OF[device_class]:
        found.append(f"unit {config.get('unit_of_measurement')!r} for device_class {device_class}")
    if config.get("state_class") not in (None, "measurement", "total", "total_increasing"):
        found.append(f"state_class {config['state_class']!r}")
    if config.get("entity_category") not in (None, "diagnostic"):
        found.append(f"entity_category {config['entity_category']!r} (sensors: diagnostic only)")
    return found
