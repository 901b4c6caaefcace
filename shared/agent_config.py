"""Configuration of one rack agent (one rack, one or more BMS units, one or more links)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.config import CanInterfaceName, Frozen, MetricsConfig, MqttConfig, Port
from shared.models import PACK_VOLTAGE_MAX_V, Identifier

POLL_INTERVAL_MIN_MS = 100
POLL_INTERVAL_MAX_MS = 1000


class ModbusTcpLink(Frozen):
    type: Literal["modbus_tcp"]
    name: Identifier
    host: str
    port: Port = 502
    # How requests are framed on the TCP stream: "socket" is Modbus TCP (MBAP header); "rtu" is RTU
    # frames (unit id, PDU, CRC) over the stream, as a BYD Battery-Box BMU speaks on port 8080.
    framer: Literal["socket", "rtu"] = "socket"


class ModbusRtuLink(Frozen):
    type: Literal["modbus_rtu"]
    name: Identifier
    # A device path or a pyserial URL (e.g. socket://host:port for an RTU-over-TCP gateway).
    device: str
    baudrate: Literal[9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class CanLink(Frozen):
    type: Literal["can"]
    name: Identifier
    interface: CanInterfaceName = "socketcan"
    channel: str = "can0"
    bitrate: Annotated[int, Field(ge=10_000, le=1_000_000)] = 500_000
    # A CAN BMS broadcasts about once a second; frames older than this are not a reading.
    stale_after_ms: Annotated[int, Field(ge=100, le=60_000)] = 3000


class PylontechConsoleLink(Frozen):
    """An RS-485 line to Pylontech LV packs speaking their own protocol (rack_agent/pylontech), not
    Modbus. Each unit on it is one pack; its device_id is the pack's address."""

    type: Literal["pylontech_console"]
    name: Identifier
    # A device path or a pyserial URL with a file descriptor (e.g. socket://host:port).
    device: str
    # The protocol's rate (V3.3: 9600 8N1); packs switch to 115200 by DIP switch. Framing is fixed 8N1.
    baudrate: Literal[9600, 115200] = 9600


Link = Annotated[
    ModbusTcpLink | ModbusRtuLink | CanLink | PylontechConsoleLink, Field(discriminator="type")
]


class CurrentSign(StrEnum):
    """How the BMS signs its current; telemetry is always positive = charging."""

    POSITIVE_CHARGING = "positive_charging"
    POSITIVE_DISCHARGING = "positive_discharging"


class UnitConfig(Frozen):
    name: Identifier
    link: Identifier
    device_id: Annotated[int, Field(ge=0, le=247)] = 1
    # A shipped profile name (see rack_agent/profiles) or a path to a TOML profile file.
    profile: str = "sunspec"
    current_sign: CurrentSign = CurrentSign.POSITIVE_CHARGING
    # Installed capacity, used when the BMS does not report it (profile has no capacity point).
    capacity_ah: Annotated[float, Field(gt=0, le=100_000)] | None = None
    # Cells (series elements) in the unit's string; no profile point carries it. With it, the pack
    # voltage must lie between this many times the lowest and the highest cell (see
    # rack_agent/plausibility.py); without it, only "at least one cell" is checked.
    cells_in_series: Annotated[int, Field(ge=1, le=1000)] | None = None


class PollingConfig(Frozen):
    interval_ms: Annotated[int, Field(ge=POLL_INTERVAL_MIN_MS, le=POLL_INTERVAL_MAX_MS)] = 500
    request_timeout_ms: Annotated[int, Field(ge=10, le=5000)] = 250
    comm_lost_after: Annotated[int, Field(ge=1, le=100)] = 3
    reconnect_initial_s: Annotated[float, Field(gt=0, le=10)] = 0.1
    reconnect_max_s: Annotated[float, Field(gt=0, le=120)] = 5.0

    @model_validator(mode="after")
    def _fits(self) -> PollingConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class PublishConfig(Frozen):
    # Telemetry older than this is worthless: the broker drops it instead of delivering it late.
    message_expiry_s: Annotated[int, Field(ge=1, le=3600)] = 2
    max_payload_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024


class PlausibilityConfig(Frozen):
    """How far a reading's fields may disagree before the reading is refused as invalid data."""

    # The pack voltage may stray this far from cells_in_series × the lowest/highest cell: the cell
    # and pack voltages are sampled at different instants, by different ADCs, across busbars that
    # drop volts under load.
    pack_tolerance_pct: Annotated[float, Field(ge=0, le=50)] = 5.0
    pack_margin_v: Annotated[float, Field(ge=0, le=100)] = 2.0
    # The rack's nominal pack voltage range; a reading outside it is refused (None: not checked).
    pack_voltage_min_v: Annotated[float, Field(ge=0, le=PACK_VOLTAGE_MAX_V)] | None = None
    pack_voltage_max_v: Annotated[float, Field(ge=0, le=PACK_VOLTAGE_MAX_V)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> PlausibilityConfig:
        low, high = self.pack_voltage_min_v, self.pack_voltage_max_v
        if low is not None and high is not None and low >= high:
            raise ValueError(f"pack_voltage_min_v ({low}) must be below pack_voltage_max_v ({high})")
        return self


class AgentConfig(Frozen):
    site_id: Identifier
    rack_id: Identifier
    mqtt: MqttConfig = MqttConfig()
    polling: PollingConfig = PollingConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    plausibility: PlausibilityConfig = PlausibilityConfig()
    links: Annotated[tuple[Link, ...], Field(min_length=1)]
    units: Annotated[tuple[UnitConfig, ...], Field(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _references(self) -> AgentConfig:
        link_names = [link.name for link in self.links]
        if len(set(link_names)) != len(link_names):
            raise ValueError(f"link names must be unique, got {link_names}")
        unit_names = [unit.name for unit in self.units]
        if len(set(unit_names)) != len(unit_names):
            raise ValueError(f"unit names must be unique, got {unit_names}")
        for unit in self.units:
            if unit.link not in link_names:
                raise ValueError(f"unit {unit.name!r} names link {unit.link!r}; defined links: {link_names}")
        for link in self.links:
            users = [u.name for u in self.units if u.link == link.name]
            if isinstance(link, CanLink) and len(users) > 1:
                # Pylon-family frames carry no unit address: one broadcasting BMS per bus.
                raise ValueError(f"CAN link {link.name!r} can serve one unit, not {users}")
        if self.polling.request_timeout_ms >= self.polling.interval_ms:
            raise ValueError(
                f"polling.request_timeout_ms ({self.polling.request_timeout_ms}) must be shorter than "
                f"polling.interval_ms ({self.polling.interval_ms})"
            )
        return self

    def listeners(self) -> list[tuple[str, str]]:
        """(what, address) of every enabled listener, for the warning about exposed ones."""
        return [("metrics", self.metrics.host)] if self.metrics.enabled else []

    def link(self, name: str) -> ModbusTcpLink | ModbusRtuLink | CanLink | PylontechConsoleLink:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)
