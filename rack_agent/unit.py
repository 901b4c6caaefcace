"""Per-unit runtime: its config, its profile, its resolved register plan and its health."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from rack_agent.errors import DeviceLayoutError, PollError
from rack_agent.health import UnitHealth
from rack_agent.plausibility import PlausibilityRules
from rack_agent.profiles import FlatProfile, SunSpecProfile, flat_plan
from rack_agent.profiles.plan import RegisterPlan
from rack_agent.profiles.pylontech import PylontechProfile
from shared.agent_config import CurrentSign, PlausibilityConfig, PollingConfig, UnitConfig


@dataclass(slots=True)
class DiscoveryRetry:
    """When a unit whose layout was refused may be discovered again: bounded exponential backoff.

    After the n-th failed discovery in a row the next one waits ``min(max_s, initial_s · 2^(n-1))``
    scaled by a jitter factor in [0.5, 1) (units refused at the same moment, e.g. after a site-wide
    firmware update, do not all retry together). Pure: the caller supplies the clock readings.
    """

    initial_s: float
    max_s: float
    jitter: Callable[[], float] = random.random
    failures: int = 0
    attempts: int = 0
    not_before_s: float = 0.0
    last_reason: str | None = None

    def due(self, now_s: float) -> bool:
        return now_s >= self.not_before_s

    def remaining_s(self, now_s: float) -> float:
        return max(0.0, self.not_before_s - now_s)

    def started(self) -> None:
        self.attempts += 1

    def failed(self, error: PollError, now_s: float) -> float:
        """Record a refused layout; return the delay before the next discovery may run."""
        self.failures += 1
        self.last_reason = error.detail
        ceiling_s = min(self.max_s, self.initial_s * 2.0 ** min(self.failures - 1, 60))
        delay_s = ceiling_s * (0.5 + 0.5 * self.jitter())
        self.not_before_s = now_s + delay_s
        return delay_s

    def succeeded(self) -> None:
        self.failures = 0
        self.last_reason = None
        self.not_before_s = 0.0

    def waiting_error(self, now_s: float) -> DeviceLayoutError:
        """What a poll inside the backoff reports: the last refusal, without asking the device again."""
        reason = self.last_reason or "layout refused"
        return DeviceLayoutError(f"{reason} (next discovery in {self.remaining_s(now_s):.2f} s)")


@dataclass(slots=True)
class UnitRuntime:
    config: UnitConfig
    profile: FlatProfile | SunSpecProfile | PylontechProfile | None
    health: UnitHealth
    # Discovery is this unit's connect step: a refused layout is retried on the link's reconnect
    # backoff (polling.reconnect_initial_s .. reconnect_max_s), never at every poll.
    discovery: DiscoveryRetry
    # What its readings are held to before they are believed (rack_agent/plausibility.py).
    rules: PlausibilityRules
    # For SunSpec the plan is known only after discovery on the device, and is redone after a reconnect.
    plan: RegisterPlan | None = field(default=None)

    @classmethod
    def create(
        cls,
        config: UnitConfig,
        profile: FlatProfile | SunSpecProfile | PylontechProfile | None,
        polling: PollingConfig,
        plausibility: PlausibilityConfig,
    ) -> UnitRuntime:
        plan = flat_plan(profile) if isinstance(profile, FlatProfile) else None
        return cls(
            config,
            profile,
            UnitHealth(config.name, polling.comm_lost_after),
            DiscoveryRetry(polling.reconnect_initial_s, polling.reconnect_max_s),
            PlausibilityRules.for_unit(config, plausibility),
            plan,
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def invert_current(self) -> bool:
        return self.config.current_sign is CurrentSign.POSITIVE_DISCHARGING
