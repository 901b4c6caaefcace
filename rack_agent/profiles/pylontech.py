"""Profiles of kind ``pylontech_console``: a Pylontech LV pack read over its RS-485 protocol.

The protocol fixes what is read (rack_agent/pylontech), so such a profile says only what differs
between pack models and what the protocol does not carry:

* ``[pack]``: the cells a pack reports (15 for US2000/US3000/US5000), which of the 0x42 temperature
  sensors measure cells (sensor 1 is the BMS board; some packs add MOSFET sensors after the cell
  groups), and the state of health to publish, since no answer carries one;
* ``[read]``: whether to read the alarm info (0x44) at every poll, and whether to ask the pack's
  manufacturer info (0x51) once per connection to log what it is.

Used with a ``pylontech_console`` link only (rack_agent/agent.py refuses any other pairing).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from rack_agent.profiles.spec import ProfileHeader
from shared.config import Frozen

SensorIndex = Annotated[int, Field(ge=1, le=64)]


class PackSpec(Frozen):
    # Series cells one pack reports in its 0x42 answer; a pack reporting another count does not fit
    # the profile (invalid data, with both counts). None: any count.
    cells: Annotated[int, Field(ge=1, le=64)] | None = None
    # 1-based positions in the 0x42 temperature list that measure cells: only these make
    # temperature_min_c/max_c (a BMS board or MOSFET sensor is no cell temperature).
    cell_temperature_sensors: Annotated[tuple[SensorIndex, ...], Field(min_length=1, max_length=64)]
    # The protocol carries no state of health; this value is published as soh_pct.
    assumed_soh_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 100.0

    @model_validator(mode="after")
    def _distinct(self) -> PackSpec:
        sensors = self.cell_temperature_sensors
        if len(set(sensors)) != len(sensors):
            raise ValueError(f"cell_temperature_sensors names a sensor twice: {list(sensors)}")
        return self


class ReadSpec(Frozen):
    # Read the alarm info (0x44) at every poll: alarms, warnings and the MOSFET (contactor) state.
    # Without it those are not known: no flags, contactor "unknown".
    alarms: bool = True
    # Ask the manufacturer info (0x51) once per connection and log it (model, software version).
    identify: bool = True


class PylontechProfile(Frozen):
    kind: Literal["pylontech_console"]
    profile: ProfileHeader
    pack: PackSpec
    read: ReadSpec = ReadSpec()


LINK_TYPE = "pylontech_console"


def link_mismatch(profile: object, profile_name: str, link_name: str, link_type: str) -> str | None:
    """Why a profile cannot read a unit on a link of ``link_type``, or None when they fit: a
    ``pylontech_console`` profile speaks the Pylontech protocol and a register-map profile Modbus,
    so each needs its own kind of link."""
    kind = getattr(profile, "kind", "?")
    if isinstance(profile, PylontechProfile) and link_type != LINK_TYPE:
        return (
            f"profile {profile_name!r} (kind {kind}) speaks the Pylontech RS-485 protocol; "
            f"link {link_name!r} is of type {link_type}: use a link of type {LINK_TYPE}"
        )
    if link_type == LINK_TYPE and not isinstance(profile, PylontechProfile):
        return (
            f"link {link_name!r} is of type {LINK_TYPE} and needs a profile of kind {LINK_TYPE} "
            f"(shipped: pylontech_lv); profile {profile_name!r} is of kind {kind} (Modbus registers)"
        )
    return None
