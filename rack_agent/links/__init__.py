"""BMS transports, chosen from config by type name (the config union is the registry)."""

from __future__ import annotations

from rack_agent.links.base import BmsLink
from shared.agent_config import CanLink, ModbusRtuLink, ModbusTcpLink, PollingConfig, PylontechConsoleLink


def make_link(
    config: ModbusTcpLink | ModbusRtuLink | CanLink | PylontechConsoleLink, polling: PollingConfig
) -> BmsLink:
    """Build the driver for one configured link. Drivers are imported lazily (python-can is heavy)."""
    backoff = {"reconnect_initial_s": polling.reconnect_initial_s, "reconnect_max_s": polling.reconnect_max_s}
    if isinstance(config, CanLink):
        from rack_agent.links.can_link import CanBmsLink  # noqa: PLC0415

        return CanBmsLink(config, **backoff)
    if isinstance(config, PylontechConsoleLink):
        from rack_agent.links.pylontech_console import PylontechConsoleBmsLink  # noqa: PLC0415

        return PylontechConsoleBmsLink(config, **backoff)
    from rack_agent.links.modbus import ModbusRtuBmsLink, ModbusTcpBmsLink  # noqa: PLC0415

    timeout = {"request_timeout_s": polling.request_timeout_ms / 1000.0}
    if isinstance(config, ModbusTcpLink):
        return ModbusTcpBmsLink(config, **timeout, **backoff)
    return ModbusRtuBmsLink(config, **timeout, **backoff)


__all__ = ["BmsLink", "make_link"]
