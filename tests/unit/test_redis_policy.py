"""A service says so, loudly, when its Redis may evict keys once full; and which Redis
errors mean "wait, it cannot serve now" rather than "this is wrong"."""

from __future__ import annotations

from redis import exceptions as e
from structlog.testing import capture_logs

from services.redis_client import cannot_serve, check_eviction_policy


async def test_an_evicting_redis_is_reported_and_noeviction_is_not(redis_client):
    before = (await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await redis_client.config_set("maxmemory-policy", "allkeys-lru")
        with capture_logs() as logs:
            assert await check_eviction_policy(redis_client) == "allkeys-lru"
        assert [(e["event"], e["log_level"], e["maxmemory_policy"]) for e in logs] == [
            ("redis_may_evict_keys", "error", "allkeys-lru")]
        await redis_client.config_set("maxmemory-policy", "noeviction")
        with capture_logs() as logs:
            assert await check_eviction_policy(redis_client) == "noeviction"
        assert logs == []
    finally:
        await redis_client.config_set("maxmemory-policy", before)


def test_what_counts_as_redis_cannot_serve_now():
    for exc in (e.ConnectionError("refused"), e.BusyLoadingError("loading"), e.TimeoutError(),
                e.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
                e.ReadOnlyError("read only replica"), e.MaxConnectionsError(), TimeoutError(),
                ConnectionResetError(),
                e.ResponseError("MISCONF Errors writing to the AOF file: No space left on device")):
        assert cannot_serve(exc), exc
    for exc in (e.ResponseError("NOTLEADER"), e.ResponseError("ERR wrong number of arguments"),
                e.DataError("bad value"), ValueError("a bug"), KeyError("x")):
        assert not cannot_serve(exc), exc
