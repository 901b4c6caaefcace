"""A warm standby: on taking over, continue where the active left off instead of starting cold.

A standby computes every cycle from the same telemetry, but its own history is shorter than the
active's: a rack it has heard for 3 s is still in its re-admission hold, and its bank limits ramp from
0 A. Taking over cold would cut the inverter's current for the length of a hold and a ramp although
nothing changed. So the standby follows

- the active's admission state: the racks the active's published consolidated state shows fully
  admitted (eligible, share 1); and
- the limits the inverter was last told: the active's 0x351 frames, heard on the CAN bus.

On taking over (:meth:`WarmStandby.takeover_memory`), a rack the active had fully admitted, and that
this node itself finds ``ok`` (fresh, valid, healthy, in parallel), skips the hold and the ramp; the
bank's slew starts from the limits in force, so the first set equals the old active's when nothing
else changed. Nothing here can raise a limit: the slew only ever moves down to what this node computes
at once, and up from the limits in force at the configured ramp. What is older than
``FOLLOW_MAX_AGE_S`` is not followed (the node then takes over cold, as before).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from types import MappingProxyType
from typing import NamedTuple

from controller.core.memory import CoreMemory, RackMemory
from controller.frames import FrameDecodeError, FrameDecoder
from shared.cluster import ConsolidatedState, RackState
from shared.codec import DecodeError, Decoder
from shared.controller_config import ControllerConfig
from shared.logthrottle import ThrottledLog

log = logging.getLogger(__name__)

ID_LIMITS = 0x351
FOLLOW_MAX_AGE_S = 3.0  # the active's state and frames are followed only this fresh


class HeardLimits(NamedTuple):
    charge_a: float
    discharge_a: float
    heard_s: float  # this node's monotonic time


class Followed(NamedTuple):
    admitted: frozenset[str]  # racks the active had fully admitted
    node_id: str
    heard_s: float


class WarmStandby:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._frames = FrameDecoder(config.can.dialect)
        self._states: Decoder[ConsolidatedState] = Decoder(ConsolidatedState, max_payload_bytes=16 << 20)
        self.limits: HeardLimits | None = None
        self.followed: Followed | None = None
        self.counters = {"states": 0, "frames": 0, "rejected": 0, "warm_takeovers": 0, "cold_takeovers": 0}
        self._log = ThrottledLog(log)

    def on_limits_frame(self, data: bytes, now_s: float) -> None:
        """A 0x351 another node sent (we are not the active)."""
        try:
            values = self._frames.decode(ID_LIMITS, data)
            charge, discharge = float(values["ChargeCurrentLimit"]), float(values["DischargeCurrentLimit"])
        except (FrameDecodeError, KeyError, ValueError) as exc:
            self.counters["rejected"] += 1
            self._log.warning("frame", "limits frame not followed: %s", exc)
            return
        self.limits = HeardLimits(charge, discharge, now_s)
        self.counters["frames"] += 1

    def on_cluster_state(self, payload: bytes, topic: str, now_s: float) -> None:
        """The active's published state: which racks it had fully admitted."""
        try:
            state = self._states.decode(payload, topic)
        except DecodeError as exc:
            self.counters["rejected"] += 1
            self._log.warning("state", "cluster state not followed: %s", exc)
            return
        if state.node_id == self.config.node_id or state.site_id != self.config.site_id:
            return
        self.counters["states"] += 1
        admitted = frozenset(view.rack_id for view in state.racks if view.eligible and view.share == 1.0)
        self.followed = Followed(admitted, state.node_id, now_s)

    def takeover_memory(self, memory: CoreMemory, own: ConsolidatedState | None,
                        now_s: float) -> CoreMemory | None:
        """The memory to take over with, or None to take over cold (nothing fresh enough to follow)."""
        limits, followed = self.limits, self.followed
        if (limits is None or followed is None or own is None or now_s - limits.heard_s > FOLLOW_MAX_AGE_S
                or now_s - followed.heard_s > FOLLOW_MAX_AGE_S):
            self.counters["cold_takeovers"] += 1
            return None
        self.counters["warm_takeovers"] += 1
        ok_here = {view.rack_id for view in own.racks if view.state is RackState.OK}
        return warm_memory(memory, admitted=followed.admitted & ok_here, charge_a=limits.charge_a,
                           discharge_a=limits.discharge_a, now_s=now_s, config=self.config)


def warm_memory(memory: CoreMemory, *, admitted: frozenset[str], charge_a: float, discharge_a: float,
                now_s: float, config: ControllerConfig) -> CoreMemory:
    """``memory`` with ``admitted`` racks past their hold and ramp, and the bank's slew at the limits
    in force (``charge_a``, ``discharge_a``)."""
    agg = config.aggregation
    admitted_since = now_s - agg.readmit_hold_s - agg.readmit_ramp_s
    racks = dict(memory.racks)
    for rack_id in admitted:
        rack = racks.get(rack_id) or RackMemory()
        if rack.ok_since_s is None or rack.ok_since_s > admitted_since:
            racks[rack_id] = rack._replace(ok_since_s=admitted_since)
    return replace(memory, racks=MappingProxyType(racks), charge_limit_a=charge_a,
                   discharge_limit_a=discharge_a)
