"""Home Assistant MQTT discovery: the entities of a rack and of the bank, as tables, and their
config payloads (pure).

Written from Home Assistant's documentation (home-assistant/home-assistant.io,
source/_integrations/mqtt.markdown, sensor.mqtt.markdown, binary_sensor.mqtt.markdown, as published
on https://www.home-assistant.io/integrations/mqtt/ and /integrations/sensor.mqtt/):

* single-component discovery: one retained config per entity on
  ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``; an empty retained payload removes it;
* each entity has a ``unique_id`` and a ``device`` block (``identifiers``, ``name``, ``manufacturer``,
  ``model``, ``sw_version``; a rack's ``via_device`` is its bank), and the ``origin`` block that the
  docs recommend for troubleshooting;
* ``state_topic`` + ``value_template`` read the bridge's JSON states; a template that renders
  ``None`` (a value the rack has not reported) leaves the state unknown;
* ``availability`` lists the bridge's own status and the rack's (or bank's) availability, with
  ``availability_mode: all``: a dead agent, a dead controller or a dead bridge each make the entities
  unavailable; the payloads are HA's defaults, ``online`` / ``offline``;
* numeric sensors: ``device_class`` (battery, voltage, current, power, temperature), a unit HA
  accepts for that class, ``state_class: measurement``; an ``enum`` sensor lists its ``options`` and
  carries no unit or state class; a text sensor's state is cut to HA's 255 characters (with ``…``);
  binary sensors render ``ON`` / ``OFF`` (HA's default payloads), ``device_class: problem`` for alarms.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.cluster import RackState
from shared.models import ContactorState

HA_STATE_MAX_CHARS = 255  # the longest state Home Assistant stores


class Component(StrEnum):
    SENSOR = "sensor"
    BINARY_SENSOR = "binary_sensor"


@dataclass(frozen=True, slots=True)
class Entity:
    """One entity: ``value`` is a Jinja expression over ``value_json`` (the JSON state)."""

    key: str
    component: Component
    name: str
    value: str
    unit: str | None = None
    device_class: str | None = None
    numeric: bool = False  # state_class measurement
    precision: int | None = None
    options: tuple[str, ...] = ()
    text: bool = False  # free text: cut to HA's maximum
    attributes: tuple[tuple[str, str], ...] = ()  # (attribute, Jinja expression) pairs
    diagnostic: bool = False


def measured(key: str, name: str, value: str, unit: str, device_class: str | None = None, *,
             precision: int | None = None, attributes: tuple[tuple[str, str], ...] = ()) -> Entity:
    return Entity(key, Component.SENSOR, name, value, unit=unit, device_class=device_class, numeric=True,
                  precision=precision, attributes=attributes)


def count(key: str, name: str, value: str, *, attributes: tuple[tuple[str, str], ...] = ()) -> Entity:
    return Entity(key, Component.SENSOR, name, value, numeric=True, precision=0, attributes=attributes)


def choice(key: str, name: str, value: str, options: tuple[str, ...]) -> Entity:
    return Entity(key, Component.SENSOR, name, value, device_class="enum", options=options)


def text(key: str, name: str, value: str, *, diagnostic: bool = False) -> Entity:
    return Entity(key, Component.SENSOR, name, value, text=True, diagnostic=diagnostic)


def flag(key: str, name: str, value: str, device_class: str | None = None, *,
         attributes: tuple[tuple[str, str], ...] = ()) -> Entity:
    return Entity(key, Component.BINARY_SENSOR, name, value, device_class=device_class, attributes=attributes)


_J = "value_json"
_CTL = f"{_J}.controller"


def _at(field: str) -> tuple[tuple[str, str], ...]:
    """A ``location`` attribute read from ``field`` (where the cell or sensor is)."""
    return (("location", f"{_J}.{field}"),)


RACK_ENTITIES: tuple[Entity, ...] = (
    measured("soc", "State of charge", f"{_J}.soc_pct", "%", "battery", precision=1),
    measured("soh", "State of health", f"{_J}.soh_pct", "%", precision=1),
    measured("pack_voltage", "Pack voltage", f"{_J}.pack_voltage_v", "V", "voltage", precision=2),
    measured("current", "Current", f"{_J}.current_a", "A", "current", precision=1),
    measured("power", "Power", f"{_J}.power_w", "W", "power", precision=0),
    measured("cell_voltage_max", "Cell voltage max", f"{_J}.cell_voltage_max_v", "V", "voltage",
             precision=3, attributes=_at("cell_voltage_max_location")),
    measured("cell_voltage_min", "Cell voltage min", f"{_J}.cell_voltage_min_v", "V", "voltage",
             precision=3, attributes=_at("cell_voltage_min_location")),
    measured("cell_voltage_delta", "Cell voltage spread", f"{_J}.cell_voltage_delta_mv", "mV", "voltage",
             precision=0),
    measured("temperature_max", "Temperature max", f"{_J}.temperature_max_c", "°C", "temperature",
             precision=1, attributes=_at("temperature_max_location")),
    measured("temperature_min", "Temperature min", f"{_J}.temperature_min_c", "°C", "temperature",
             precision=1, attributes=_at("temperature_min_location")),
    measured("bms_ccl", "BMS charge current limit", f"{_J}.bms.charge_current_limit_a", "A", "current",
             precision=1),
    measured("bms_dcl", "BMS discharge current limit", f"{_J}.bms.discharge_current_limit_a", "A",
             "current", precision=1),
    measured("bms_cvl", "BMS charge voltage limit", f"{_J}.bms.charge_voltage_limit_v", "V", "voltage",
             precision=2),
    measured("bms_dvl", "BMS discharge voltage limit", f"{_J}.bms.discharge_voltage_limit_v", "V",
             "voltage", precision=2),
    measured("granted_ccl", "Granted charge current", f"{_CTL}.charge_current_limit_a", "A", "current",
             precision=1),
    measured("granted_dcl", "Granted discharge current", f"{_CTL}.discharge_current_limit_a", "A",
             "current", precision=1),
    measured("share", "Share", f"({_CTL}.share * 100) | round(1)", "%", precision=0),
    choice("state", "State", f"{_CTL}.state", tuple(s.value for s in RackState)),
    text("reason", "Reason", f"{_CTL}.reason"),
    choice("contactor", "Contactor", f"{_J}.contactor", tuple(c.value for c in ContactorState)),
    text("comm_state", "BMS link", f"{_J}.comm_state", diagnostic=True),
    flag("alarm", "Alarm", f"{_J}.alarm", "problem", attributes=(("alarms", f"{_J}.alarms"),)),
    flag("warning", "Warning", f"{_J}.warning", "problem", attributes=(("warnings", f"{_J}.warnings"),)),
    flag("maintenance", "Maintenance", f"{_CTL}.maintenance"),
    flag("eligible", "Eligible", f"{_CTL}.eligible"),
)

_LIM = f"{_J}.limits"


def _limit(key: str, name: str, limit: str, unit: str, device_class: str) -> Entity:
    """A bank limit, its reason as an attribute."""
    return measured(key, name, f"{_LIM}.{limit}.value", unit, device_class,
                    precision=1 if unit == "A" else 2, attributes=(("reason", f"{_LIM}.{limit}.reason"),))


BANK_ENTITIES: tuple[Entity, ...] = (
    _limit("ccl", "Charge current limit", "charge_current_a", "A", "current"),
    _limit("dcl", "Discharge current limit", "discharge_current_a", "A", "current"),
    _limit("cvl", "Charge voltage limit", "charge_voltage_v", "V", "voltage"),
    _limit("dvl", "Discharge voltage limit", "discharge_voltage_v", "V", "voltage"),
    text("ccl_reason", "Charge current limit reason", f"{_LIM}.charge_current_a.reason"),
    text("dcl_reason", "Discharge current limit reason", f"{_LIM}.discharge_current_a.reason"),
    text("cvl_reason", "Charge voltage limit reason", f"{_LIM}.charge_voltage_v.reason"),
    text("dvl_reason", "Discharge voltage limit reason", f"{_LIM}.discharge_voltage_v.reason"),
    measured("soc", "State of charge", f"{_J}.soc_pct", "%", "battery", precision=1),
    measured("soh", "State of health", f"{_J}.soh_pct", "%", precision=1),
    measured("pack_voltage", "Voltage", f"{_J}.pack_voltage_v", "V", "voltage", precision=2),
    measured("current", "Current", f"{_J}.current_a", "A", "current", precision=1),
    measured("power", "Power", f"{_J}.power_w", "W", "power", precision=0),
    measured("temperature_avg", "Temperature", f"{_J}.temperature_avg_c", "°C", "temperature", precision=1),
    measured("temperature_max", "Temperature max", f"{_J}.temperature_max_c", "°C", "temperature",
             precision=1, attributes=_at("temperature_max_location")),
    measured("temperature_min", "Temperature min", f"{_J}.temperature_min_c", "°C", "temperature",
             precision=1, attributes=_at("temperature_min_location")),
    measured("cell_voltage_max", "Cell voltage max", f"{_J}.cell_voltage_max_v", "V", "voltage",
             precision=3, attributes=_at("cell_voltage_max_location")),
    measured("cell_voltage_min", "Cell voltage min", f"{_J}.cell_voltage_min_v", "V", "voltage",
             precision=3, attributes=_at("cell_voltage_min_location")),
    count("eligible_racks", "Eligible racks", f"{_J}.eligible_count",
          attributes=(("racks", f"{_J}.eligible_racks"),)),
    count("roster_size", "Racks on the roster", f"{_J}.roster_size"),
    text("active_node", "Active controller", f"{_J}.active_node"),
    flag("alarm", "Alarm", f"{_J}.alarm", "problem", attributes=(
        ("alarms", f"{_J}.alarms"), ("cluster_alarms", f"{_J}.cluster_alarms"),
        ("warnings", f"{_J}.warnings"))),
    flag("charge_enabled", "Charge enabled", f"{_J}.charge_enabled"),
    flag("discharge_enabled", "Discharge enabled", f"{_J}.discharge_enabled"),
    flag("force_charge", "Force charge request", f"{_J}.force_charge_request"),
)


def value_template(entity: Entity) -> str:
    if entity.component is Component.BINARY_SENSOR:
        return f"{{{{ 'ON' if {entity.value} else 'OFF' }}}}"
    if entity.text:
        cut = HA_STATE_MAX_CHARS - 1
        return (f"{{% set t = ({entity.value}) | string %}}"
                f"{{{{ t if t | length <= {HA_STATE_MAX_CHARS} else t[:{cut}] ~ '…' }}}}")
    return f"{{{{ {entity.value} }}}}"


def attributes_template(entity: Entity) -> str:
    pairs = ", ".join(f"'{name}': {expression}" for name, expression in entity.attributes)
    return f"{{{{ {{{pairs}}} | tojson }}}}"


@dataclass(frozen=True, slots=True)
class Device:
    identifier: str
    name: str
    model: str
    via: str | None = None


def config_payload(entity: Entity, *, unique_id: str, state_topic: str, availability: tuple[str, ...],
                   device: Device, sw_version: str, expire_after_s: int) -> dict[str, Any]:
    """The discovery config of one entity (a dict, JSON-encoded by the caller)."""
    dev: dict[str, Any] = {"identifiers": [device.identifier], "name": device.name, "manufacturer": "bmslink",
                           "model": device.model, "sw_version": sw_version}
    if device.via is not None:
        dev["via_device"] = device.via
    config: dict[str, Any] = {
        "name": entity.name,
        "unique_id": unique_id,
        "state_topic": state_topic,
        "value_template": value_template(entity),
        "availability": [{"topic": topic} for topic in availability],
        "availability_mode": "all",
        "device": dev,
        "origin": {"name": "bmslink", "sw_version": sw_version},
    }
    if entity.device_class is not None:
        config["device_class"] = entity.device_class
    if entity.unit is not None:
        config["unit_of_measurement"] = entity.unit
    if entity.numeric:
        config["state_class"] = "measurement"
    if entity.precision is not None:
        config["suggested_display_precision"] = entity.precision
    if entity.options:
        config["options"] = list(entity.options)
    if entity.attributes:
        config["json_attributes_topic"] = state_topic
        config["json_attributes_template"] = attributes_template(entity)
    if entity.diagnostic:
        config["entity_category"] = "diagnostic"
    if expire_after_s > 0:
        config["expire_after"] = expire_after_s
    return config
