"""One way every service opens Redis: a bounded pool that waits for a free connection.

redis-py's default pool raises ``MaxConnectionsError`` as soon as 100 commands are in
flight at once, which a burst of concurrent HTTP requests reaches easily; a blocking pool
instead queues the command for up to ``wait_s`` and keeps the number of sockets bounded.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from services import keys
from services.backoff import retry_until_up

MAX_CONNECTIONS = 64
WAIT_FOR_CONNECTION_S = 5.0


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS, wait_s: float = WAIT_FOR_CONNECTION_S,
            socket_timeout_s: float | None = None) -> aioredis.Redis:
    """A client on ``url`` (no I/O until first use) over a blocking pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait_s,
        socket_connect_timeout=socket_timeout_s, socket_timeout=socket_timeout_s)
    return aioredis.Redis(connection_pool=pool)


def set_marker(pipe: Pipeline, request_id: str, marker: str, value: str, ttl_s: int, *,
               nx: bool = False) -> None:
    """Queue on ``pipe``: set one of a request's markers (``nx``: only if it is unset) and
    keep all of them ``ttl_s`` from now."""
    key = keys.request_markers(request_id)
    if nx:
        pipe.hsetnx(key, marker, value)
    else:
        pipe.hset(key, marker, value)
    pipe.expire(key, ttl_s)


async def wait_until_up(client: aioredis.Redis) -> None:
    """Return once Redis answers a PING, retrying with backoff: a service that starts
    before Redis (any start order, a Redis restart during a rollout) waits, not exits."""
    await retry_until_up(client.ping, (RedisError, OSError), "waiting_for_redis")
