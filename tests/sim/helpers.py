"""Small helpers shared by the simulator tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from bmslink.processes import free_port

__all__ = ["LOOPBACK", "free_port", "quiet_pymodbus", "wait_until"]

LOOPBACK = "127.0.0.1"


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def quiet_pymodbus() -> Iterator[None]:
    """pymodbus logs every client timeout at ERROR with a hex dump; the tests provoke many."""
    logger = logging.getLogger("pymodbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
