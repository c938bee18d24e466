"""Waiting in tests for something another process or task does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> None:
    """Return once ``condition()`` holds; raise TimeoutError if it does not within ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(interval_s)
