"""One way every service opens Redis: a bounded pool that waits for a free connection.

redis-py's default pool raises ``MaxConnectionsError`` as soon as 100 commands are in
flight at once, which a burst of concurrent HTTP requests reaches easily; a blocking pool
instead queues the command for up to ``wait_s`` and keeps the number of sockets bounded.
Also here: which errors mean "Redis cannot serve now" (wait, do not give up), and the
check that Redis keeps what Fairway writes (no eviction when full, an append-only file).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_exc
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from services import keys
from services.backoff import retry_until_up
from services.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# A lease is a key whose value is its holder, with a TTL: taken with SET NX PX, renewed
# and let go only by its holder (KEYS[1]: the lease; ARGV[1]: the holder; ARGV[2]: ms).
RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

CANNOT_SERVE: tuple[type[Exception], ...] = (
    redis_exc.ConnectionError,  # refused, reset, loading its data, no free connection
    redis_exc.TimeoutError,
    redis_exc.OutOfMemoryError,  # maxmemory reached under noeviction: writes refused
    redis_exc.ReadOnlyError,  # a replica that is not promoted yet
    redis_exc.TryAgainError,
    redis_exc.ClusterDownError,
    ConnectionError,
    TimeoutError,  # a client-side deadline around a Redis call
)
"""Errors that say Redis cannot serve a command now (wait and try again), not that the
command or its data is wrong."""


def cannot_serve(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot serve now: one of :data:`CANNOT_SERVE`, or a
    ``MISCONF`` error (it refuses writes because it could not persist them, a full disk
    under its append-only file), which redis-py has no class for."""
    return isinstance(exc, CANNOT_SERVE) or refuses_writes(exc)


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis answers but stores nothing now: full (maxmemory under
    noeviction), read-only (a replica not promoted yet), or unable to persist (``MISCONF``)."""
    return isinstance(exc, (redis_exc.OutOfMemoryError, redis_exc.ReadOnlyError)) or (
        isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("MISCONF"))


def why_unavailable(exc: BaseException) -> str:
    """Why Redis failed a command, in words for the client that gets a 503 for it."""
    if isinstance(exc, redis_exc.OutOfMemoryError):
        return "Redis is out of memory (its maxmemory is reached)"
    if isinstance(exc, redis_exc.ReadOnlyError):
        return "Redis is read-only (a replica that is not promoted yet)"
    if refuses_writes(exc):
        return "Redis refuses writes because it cannot persist them (MISCONF)"
    if isinstance(exc, redis_exc.BusyLoadingError):
        return "Redis is loading its data"
    if isinstance(exc, (redis_exc.TimeoutError, TimeoutError)):
        return "Redis did not answer in time"
    return "Redis is not reachable"


MAX_CONNECTIONS = 64
WAIT_FOR_CONNECTION_S = 5.0
SOCKET_TIMEOUT_S = 10.0
"""A command (or connect) Redis does not answer in this long fails with a TimeoutError,
instead of hanging its caller for as long as a silent link (a partition, a host gone
without a reset) lasts. Fairway sends no blocking commands."""


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS, wait_s: float = WAIT_FOR_CONNECTION_S,
            socket_timeout_s: float = SOCKET_TIMEOUT_S) -> aioredis.Redis:
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


async def when_up(attempt: Callable[[], Awaitable[T]]) -> T:
    """``await attempt()``, a step of a service's start that needs Redis, retried with
    backoff while Redis cannot serve: Redis going away between :func:`wait_until_up` and
    the step must not end the process, leaving its queue unserved until a supervisor
    restarts it."""
    return await retry_until_up(attempt, CANNOT_SERVE, "waiting_for_redis")


async def wait_until_up(client: aioredis.Redis) -> None:
    """Return once Redis answers a PING, retrying with backoff: a service that starts
    before Redis (any start order, a Redis restart during a rollout) waits, not exits."""
    await when_up(client.ping)
    await check_durability(client)


SAFE_EVICTION_POLICY = "noeviction"


async def check_durability(client: aioredis.Redis) -> list[str]:
    """Log an error for each way this Redis could lose what Fairway keeps in it (see
    :func:`durability_problems`); returns their event names. Read from ``INFO``, which
    managed Redis services allow where ``CONFIG`` is disabled."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.info("memory")
            pipe.info("persistence")
            memory, persistence = await pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("redis_durability_unknown", error=repr(exc))
        return []
    problems = durability_problems(memory, persistence)
    for event, fields in problems:
        log.error(event, **fields)
    return [event for event, _ in problems]


def durability_problems(memory: dict, persistence: dict) -> list[tuple[str, dict[str, str]]]:
    """How a Redis with this ``INFO memory`` and ``INFO persistence`` could lose queued
    requests, fairness counters and the markers that keep a request from running twice:

    - a ``maxmemory-policy`` other than ``noeviction``: once full, Redis drops keys. With
      ``noeviction`` it refuses writes instead, which Fairway waits out (see
      :mod:`services.amqp`);
    - no append-only file: a restart loses every write since the last snapshot, or all.
    """
    problems = []
    policy = memory.get("maxmemory_policy")
    if policy is not None and policy != SAFE_EVICTION_POLICY:
        problems.append(("redis_may_evict_keys", {
            "maxmemory_policy": policy,
            "advice": f"set maxmemory-policy {SAFE_EVICTION_POLICY}: when Redis is full it "
                      "would drop queued requests, counters and markers"}))
    if persistence.get("aof_enabled") == 0:
        problems.append(("redis_without_append_only_file", {
            "advice": "set appendonly yes (appendfsync everysec): a Redis restart would lose "
                      "the queued requests and markers written since its last snapshot"}))
    return problems
