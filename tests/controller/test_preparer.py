"""The preparer's scheduling: racks noted are computed on the loop in slices, after what is ready;
a failing computation is counted and loses only the shortcut; a full cycle spends what is left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from controller.core.engine import Prepared
from controller.preparer import Preparer


def _marker(rack_id: str) -> Prepared:
    return cast(Prepared, ("outcome", rack_id))  # the preparer only stores what compute returns


def _recording(noted: list[str]) -> Callable[[str], Prepared | None]:
    def compute(rack_id: str) -> Prepared | None:
        noted.append(rack_id)
        return _marker(rack_id)

    return compute


async def test_noted_racks_are_computed_after_what_is_ready_in_slices() -> None:
    order: list[str] = []

    def compute(rack_id: str) -> Prepared | None:
        order.append(rack_id)
        return _marker(rack_id)

    preparer = Preparer(compute, slice_s=0.0, delay_s=0.0)  # one rack per slice, started at once
    loop = asyncio.get_running_loop()
    preparer.note("r1")
    preparer.note("r2")
    preparer.note("r1")  # noted again before it was computed: once, with its latest input
    loop.call_soon(order.append, "ready before")
    await asyncio.sleep(0)
    assert order == ["r1", "ready before"]  # the first slice, then the loop's other callbacks
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["r1", "ready before", "r2"]
    assert dict(preparer.prepared) == {"r1": _marker("r1"), "r2": _marker("r2")}
    assert preparer.computed == 2
    preparer.consumed()
    assert not preparer.prepared


async def test_a_failing_computation_is_counted_and_drops_only_that_rack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def compute(rack_id: str) -> Any:
        if rack_id == "bad":
            raise ValueError("defect")
        return None if rack_id == "none" else _marker(rack_id)

    preparer = Preparer(compute, delay_s=0.0)
    preparer.note("ok")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        preparer.note("bad")
        preparer.note("none")
        await asyncio.sleep(0)
    assert dict(preparer.prepared) == {"ok": _marker("ok")}
    assert preparer.errors == 1
    assert "computing rack bad ahead of the cycle failed" in caplog.text


def test_without_a_running_loop_nothing_is_kept_pending() -> None:
    preparer = Preparer(_marker)
    preparer.note("r1")
    assert not preparer.prepared and not preparer._pending


async def test_racks_noted_within_the_delay_are_computed_together() -> None:
    noted: list[str] = []
    compute = _recording(noted)
    preparer = Preparer(compute, delay_s=0.02)
    for rack_id in ("r1", "r2", "r3"):
        preparer.note(rack_id)
        await asyncio.sleep(0.002)
    assert noted == []  # still gathering
    await asyncio.sleep(0.03)
    assert noted == ["r1", "r2", "r3"]  # one run, back to back
    assert set(preparer.prepared) == {"r1", "r2", "r3"}


async def test_a_rack_computed_since_the_last_full_cycle_is_left_to_that_cycle() -> None:
    noted: list[str] = []
    compute = _recording(noted)
    preparer = Preparer(compute, delay_s=0.0)
    preparer.note("r1")
    await asyncio.sleep(0)
    preparer.note("r1")  # a second payload before the full cycle: that cycle computes it
    await asyncio.sleep(0)
    assert noted == ["r1"]
    preparer.consumed()
    preparer.note("r1")
    await asyncio.sleep(0)
    assert noted == ["r1", "r1"]
