"""Small helpers shared by the simulator tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"


def free_port(span: int = 1) -> int:
    """A port P on 127.0.0.1 such that P..P+span-1 were all free when asked."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port + span - 1 > 65535:
            continue
        try:
            for offset in range(1, span):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((LOOPBACK, port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no run of {span} free ports found")


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
