"""Waiting on observable state instead of sleeping a guessed time: the machine may be slow,
the test must not be flaky, and a condition never reached fails with its description."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_S = 0.005


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds. The bound is
    generous on purpose: it is reached only when the code under test is wrong."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"not reached within {timeout} s: {what or condition}")
        await asyncio.sleep(POLL_S)
