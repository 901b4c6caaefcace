"""Per-unit runtime: its config, its profile, its resolved register plan and its health."""

from __future__ import annotations

from dataclasses import dataclass, field

from rack_agent.health import UnitHealth
from rack_agent.profiles import FlatProfile, SunSpecProfile, flat_plan
from rack_agent.profiles.plan import RegisterPlan
from shared.agent_config import CurrentSign, UnitConfig


@dataclass(slots=True)
class UnitRuntime:
    config: UnitConfig
    profile: FlatProfile | SunSpecProfile | None
    health: UnitHealth
    # For SunSpec the plan is known only after discovery on the device, and is redone after a reconnect.
    plan: RegisterPlan | None = field(default=None)

    @classmethod
    def create(
        cls, config: UnitConfig, profile: FlatProfile | SunSpecProfile | None, comm_lost_after: int
    ) -> UnitRuntime:
        plan = flat_plan(profile) if isinstance(profile, FlatProfile) else None
        return cls(config, profile, UnitHealth(config.name, comm_lost_after), plan)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def invert_current(self) -> bool:
        return self.config.current_sign is CurrentSign.POSITIVE_DISCHARGING
