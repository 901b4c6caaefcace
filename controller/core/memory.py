"""What the core carries from one cycle to the next: one memory per rack, and the bank's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import NamedTuple

from controller.core.derates import DerateMemory
from controller.core.faults import NO_LATCHES, Latch
from controller.core.policies import Member


def _no_racks() -> Mapping[str, RackMemory]:
    return MappingProxyType({})


# A NamedTuple: one is made per rack per payload (docs/performance.md, "Per-rack values").
class RackMemory(NamedTuple):
    """What one rack carries between cycles."""

    ok_since_s: float | None = None
    latches: Mapping[str, Latch] = NO_LATCHES
    derate: DerateMemory = DerateMemory()
    # The rack's member of its latest ok cycle while it is in parallel or held, and when it was
    # first found lost since (``isolation``).
    in_parallel: Member | None = None
    lost_s: float | None = None


@dataclass(frozen=True, slots=True)
class CoreMemory:
    """Everything a cycle carries to the next (immutable; a new one per cycle).

    ``charge_limit_a``/``discharge_limit_a`` are the slewed bank limits before 0.1 A rounding;
    ``last_pack_voltage_v``/``last_dvl_v`` the latest consolidated values from racks in
    parallel, the fallbacks for CVL/DVL when none is; ``racks`` each roster rack's memory.
    """

    last_now_s: float | None = None
    charge_limit_a: float = 0.0
    discharge_limit_a: float = 0.0
    last_pack_voltage_v: float | None = None
    last_dvl_v: float | None = None
    racks: Mapping[str, RackMemory] = field(default_factory=_no_racks)

    @classmethod
    def initial(cls) -> CoreMemory:
        """The memory of a controller that has just started (every rack goes through the hold)."""
        return cls()


def with_latches(memory: CoreMemory, *, add: Iterable[tuple[str, str]] = (),
                 release: Iterable[tuple[str, str]] = (), now_s: float) -> CoreMemory:
    """``memory`` with the (rack id, alarm) pairs of ``add`` latched (active from ``now_s``; one latched
    already stays as it is) and those of ``release`` released: what another controller knew or did."""
    racks = dict(memory.racks)
    for rack_id, flag in add:
        rack = racks.get(rack_id) or RackMemory()
        if flag not in rack.latches:
            latches = MappingProxyType({**rack.latches, flag: Latch(raised_s=now_s)})
            racks[rack_id] = rack._replace(latches=latches)
    for rack_id, flag in release:
        held = racks.get(rack_id)
        if held is not None and flag in held.latches:
            kept = {name: latch for name, latch in held.latches.items() if name != flag}
            racks[rack_id] = held._replace(latches=MappingProxyType(kept) if kept else NO_LATCHES)
    return replace(memory, racks=MappingProxyType(racks))
