"""Configuration of ``bmslink bridge``: one site's msgpack topics republished as JSON, with Home
Assistant MQTT discovery for them (bmslink/bridge/).

The expiry defaults are the msgpack side's own: a rack's JSON state lives as long as the agent's
telemetry does (``[publish] message_expiry_s`` of the agent, 2 s), the bank's as long as the active
controller's consolidated state (5 s, controller/control_loop.py). A dashboard that subscribes later
gets the retained state while it is current, never a stale one.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from shared.agent_config import PublishConfig
from shared.config import Frozen, MqttConfig
from shared.models import Identifier

# What controller/control_loop.py gives the consolidated state it publishes (Message Expiry, seconds).
CLUSTER_STATE_EXPIRY_S = 5
# Home Assistant's discovery topic levels are [a-zA-Z0-9_-] (https://www.home-assistant.io/integrations/mqtt/,
# "Discovery topic"); the prefix may have several levels.
DISCOVERY_PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"


class BridgeMqttConfig(MqttConfig):
    """The broker connection; MQTT 5 is required (see the validator)."""

    @model_validator(mode="after")
    def _needs_v5(self) -> BridgeMqttConfig:
        if self.protocol != "5":
            raise ValueError(
                f"protocol {self.protocol}: the bridge needs MQTT 5, whose Message Expiry keeps its "
                "retained JSON states from being delivered stale (MQTT 3.1.1 has none)")
        return self


class PublishOptions(Frozen):
    """What the bridge publishes, and how often."""

    # At most one JSON state per rack in this interval (0: every reading). A change that matters
    # (alarms, warnings, link, contactor, the controller's verdict) goes at once; the latest reading
    # held back goes when the interval is over. Home Assistant records every state it is sent.
    rack_interval_ms: Annotated[int, Field(ge=0, le=60_000)] = 1000
    rack_expiry_s: Annotated[int, Field(ge=1, le=3600)] = PublishConfig().message_expiry_s
    bank_expiry_s: Annotated[int, Field(ge=1, le=3600)] = CLUSTER_STATE_EXPIRY_S
    # The bridge's counters (received, refused by reason, published) as JSON on
    # ``{prefix}/{site}/json/bridge/stats`` this often, and in the log.
    stats_interval_s: Annotated[float, Field(ge=0.5, le=3600.0)] = 60.0


class DiscoveryOptions(Frozen):
    """Home Assistant MQTT discovery."""

    enabled: bool = True
    prefix: Annotated[str, Field(pattern=DISCOVERY_PREFIX_PATTERN)] = "homeassistant"
    # Home Assistant shows a sensor as unavailable when no state came for this long (0: never):
    # a hung agent or bridge that keeps its connection still goes grey.
    expire_after_s: Annotated[int, Field(ge=0, le=86_400)] = 30


class InputChecks(Frozen):
    """What the bridge refuses (counted, logged throttled, never republished)."""

    max_payload_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    # A reading or state stamped further ahead of this clock is a lie or a broken clock (as the
    # controller's max_clock_ahead_s) ...
    max_clock_ahead_s: Annotated[float, Field(ge=0.1, le=3600.0)] = 5.0
    # ... and one stamped further behind it is not what the rack is doing now.
    max_clock_behind_s: Annotated[float, Field(ge=1.0, le=86_400.0)] = 300.0


class BridgeConfig(Frozen):
    site_id: Identifier
    mqtt: BridgeMqttConfig = BridgeMqttConfig()
    publish: PublishOptions = PublishOptions()
    discovery: DiscoveryOptions = DiscoveryOptions()
    checks: InputChecks = InputChecks()

    @model_validator(mode="after")
    def _expiry_outlasts_interval(self) -> BridgeConfig:
        expire_ms = self.discovery.expire_after_s * 1000
        if self.discovery.enabled and 0 < expire_ms <= 2 * self.publish.rack_interval_ms:
            raise ValueError(
                f"discovery.expire_after_s ({self.discovery.expire_after_s}) must be more than twice "
                f"publish.rack_interval_ms ({self.publish.rack_interval_ms} ms), or 0: sensors would go "
                "unavailable between two states")
        return self
