"""Capped Redis lists of recent events (errors, length samples) for the dashboard.

Writers never wait on Redis: :meth:`RecentLog.add` buffers in memory, and one task
appends the buffer with a single ``LPUSH`` + ``LTRIM`` at most every ``flush_interval_s``.
Entries are JSON (ASCII-escaped, so client text with lone surrogates survives); the list
holds the newest first. Losing entries while Redis is down is accepted: best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.logs import get_logger

log = get_logger(__name__)

FLUSH_INTERVAL_S = 0.5


def encode_entry(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def decode_entries(raw: list[bytes | str]) -> list[dict[str, Any]]:
    """Parsed entries of an ``LRANGE``; malformed ones are skipped."""
    out = []
    for item in raw:
        try:
            entry = json.loads(item)
        except (ValueError, TypeError):
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


class RecentLog:
    """Appends entries to the capped list ``key``, batched into one round trip per flush."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        cap: int,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.redis = redis
        self.key = key
        self.cap = cap
        self.flush_interval_s = flush_interval_s
        self._pending: deque[str] = deque(maxlen=cap)
        self._task: asyncio.Task[None] | None = None

    def add(self, entry: dict[str, Any]) -> None:
        """Queue one entry; a flush follows within ``flush_interval_s`` (needs a running loop)."""
        try:
            self._pending.append(encode_entry(entry))
        except ValueError:  # NaN or infinity: not worth an entry
            return
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(self.flush_interval_s)
                await self.flush()
        finally:
            self._task = None

    async def flush(self) -> None:
        """Append what is buffered now, newest at the head, and trim to ``cap``."""
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.key, *batch)
                pipe.ltrim(self.key, 0, self.cap - 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("recent_log_flush_failed", key=self.key, dropped=len(batch), error=repr(exc))

    async def close(self) -> None:
        """Stop the pending timer and flush what is left (before the Redis client closes)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
