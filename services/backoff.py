"""Waiting for a dependency at start: retry with exponential backoff until it answers.

Services may start in any order (compose, a rollout, ``fairway up``): one that comes up
before RabbitMQ or Redis waits for it instead of exiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0


async def retry_until_up(
    attempt: Callable[[], Awaitable[T]],
    retry_on: tuple[type[BaseException], ...],
    event: str,
    *,
    fatal: tuple[type[BaseException], ...] = (),
    max_delay_s: float = MAX_DELAY_S,
) -> T:
    """``await attempt()`` until it returns, logging ``event`` and sleeping 0.1 s, 0.2 s,
    ... up to ``max_delay_s`` after each error of ``retry_on``; an error of ``fatal``
    (checked first: no retry fixes it) or of any other type is raised at once."""
    delay = FIRST_DELAY_S
    while True:
        try:
            return await attempt()
        except fatal:
            raise
        except retry_on as exc:
            log.warning(event, error=repr(exc), retry_in_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)
