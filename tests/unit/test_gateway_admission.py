"""Gateway admission on a real Redis: per-tenant request and token limits, the global cap,
idempotent release, and slots that free themselves when a release never comes."""

from __future__ import annotations

import asyncio

import pytest

from services import keys
from services import messages as m
from services.gateway.backend import Backend, token_cost
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.settings import Settings


def backend(redis_url: str, **limits) -> Backend:
    settings = Settings(redis_url=redis_url, model_name="tiny", **limits)
    return Backend(settings, GatewayMetrics("tiny"))


async def admit(b: Backend, tenant: str, rid: str, cost: int = 10) -> int | None:
    """The HTTP status admission answered, or None when admitted."""
    try:
        await b._try_admit(tenant, rid, cost)
    except ApiError as err:
        assert err.status == 400 or err.headers.get("Retry-After")
        return err.status
    return None


async def test_tenant_request_limit_is_429_and_release_frees_a_slot(redis_client, redis_url):
    b = backend(redis_url, max_queued_per_tenant=2)
    try:
        assert await admit(b, "acme", "r1") is None
        assert await admit(b, "acme", "r2") is None
        assert await admit(b, "acme", "r3") == 429
        assert await admit(b, "globex", "g1") is None  # another tenant is not affected
        await b._release_slot("acme", "r1")
        await b._release_slot("acme", "r1")  # idempotent: frees one slot, not two
        assert await admit(b, "acme", "r3") is None
        assert await admit(b, "acme", "r4") == 429
        assert await redis_client.zcard(keys.tenant_inflight("acme")) == 2
    finally:
        await b.redis.aclose()


async def test_token_budget_is_429_and_a_request_over_the_whole_budget_is_400(redis_client, redis_url):
    b = backend(redis_url, max_queued_tokens_per_tenant=100)
    try:
        assert await admit(b, "acme", "r1", cost=60) is None
        assert await admit(b, "acme", "r2", cost=50) == 429
        assert await admit(b, "acme", "r3", cost=40) is None
        assert await admit(b, "acme", "huge", cost=101) == 400
    finally:
        await b.redis.aclose()


async def test_global_cap_is_503_for_every_tenant(redis_client, redis_url):
    b = backend(redis_url, max_queued_total=2)
    try:
        assert await admit(b, "a", "r1") is None
        assert await admit(b, "b", "r2") is None
        assert await admit(b, "c", "r3") == 503
        await b._release_slot("a", "r1")
        assert await admit(b, "c", "r3") is None
    finally:
        await b.redis.aclose()


async def test_a_slot_whose_release_never_came_expires(redis_client, redis_url):
    b = backend(redis_url, max_queued_per_tenant=1, request_timeout_s=0.1)
    try:
        assert await admit(b, "acme", "leaked") is None  # its gateway died: no release
        assert await admit(b, "acme", "next") == 429
        await redis_client.zadd(keys.tenant_inflight("acme"), {"leaked": 1.0})  # past its expiry
        assert await admit(b, "acme", "next") is None
        assert await redis_client.hkeys(keys.tenant_tokens("acme")) == [b"next"]
        assert int(await redis_client.get(keys.tenant_tokens_total("acme"))) == 10  # leaked cost gone
    finally:
        await b.redis.aclose()


async def test_the_token_total_follows_admissions_releases_and_expiries(redis_client, redis_url):
    b = backend(redis_url, max_queued_tokens_per_tenant=1000)
    try:
        for i, cost in enumerate([5, 7, 11, 13]):
            assert await admit(b, "acme", f"r{i}", cost=cost) is None
        await b._release_slot("acme", "r1")
        await b._release_slot("acme", "r1")
        await b._release_slot("acme", "never-admitted")
        await redis_client.zadd(keys.tenant_inflight("acme"), {"r2": 1.0})  # r2's release never came
        assert await admit(b, "acme", "r4", cost=3) is None
        costs = {k.decode(): int(v) for k, v in (await redis_client.hgetall(keys.tenant_tokens("acme"))).items()}
        assert costs == {"r0": 5, "r3": 13, "r4": 3}
        assert int(await redis_client.get(keys.tenant_tokens_total("acme"))) == sum(costs.values())
    finally:
        await b.redis.aclose()


async def test_a_burst_of_concurrent_admissions_waits_for_connections_instead_of_failing(
        redis_client, redis_url):
    """More requests at once than the pool has connections: none fails for want of one."""
    b = backend(redis_url, max_queued_per_tenant=10_000, max_queued_tokens_per_tenant=10**9,
                max_queued_total=10_000)
    try:
        verdicts = await asyncio.gather(*(admit(b, f"t{i % 7}", f"r{i}") for i in range(500)))
        assert verdicts == [None] * 500
        assert await redis_client.zcard(keys.GATEWAY_INFLIGHT) == 500
    finally:
        await b.redis.aclose()


async def test_a_failed_release_is_retried_with_the_next_admission(redis_client, redis_url):
    b = backend(redis_url, max_queued_per_tenant=1)
    try:
        assert await admit(b, "acme", "r1") is None
        real = b._release
        b._release = _raise_connection_error  # type: ignore[assignment]
        await b._release_slot("acme", "r1")  # Redis unreachable at that moment
        b._release = real  # type: ignore[assignment]
        assert b._pending_releases == {"r1": "acme"}
        assert await admit(b, "acme", "r2") is None
        assert b._pending_releases == {}
    finally:
        await b.redis.aclose()


async def test_redis_down_is_503(redis_url):
    b = backend("redis://127.0.0.1:1/0")
    try:
        assert await admit(b, "acme", "r1") == 503
    finally:
        await b.redis.aclose()


async def _raise_connection_error(**_):
    raise ConnectionError("redis went away")


@pytest.mark.parametrize(("prompt", "max_tokens", "cost"), [("", 16, 17), ("abcd" * 10, 5, 16),
                                                            ("é" * 8, 1, 6)])
def test_token_cost_counts_max_tokens_and_a_prompt_estimate(prompt, max_tokens, cost):
    req = m.CompletionRequest(request_id="r", model="tiny", prompt=prompt,
                              sampling=m.SamplingParams(max_tokens=max_tokens))
    assert token_cost(req) == cost
    chat = m.CompletionRequest(request_id="r", model="tiny", kind="chat",
                               messages=[m.ChatMessage(role="user", content=prompt)],
                               sampling=m.SamplingParams(max_tokens=max_tokens))
    assert token_cost(chat) == cost
