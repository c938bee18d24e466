"""A service says so, loudly, when its Redis may evict keys once full."""

from __future__ import annotations

from structlog.testing import capture_logs

from services.redis_client import check_eviction_policy


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
