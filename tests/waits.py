"""Waiting in tests for something another process or task does."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float,
                interval_s: float = 0.02) -> None:
    """Return once ``condition()`` (or what it awaits to) holds; raise TimeoutError if it
    does not within ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not await _holds(condition):
            await asyncio.sleep(interval_s)


async def _holds(condition: Callable[[], bool | Awaitable[bool]]) -> bool:
    held = condition()
    return await held if inspect.isawaitable(held) else held
