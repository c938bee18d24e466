"""Gateway admission on a real Redis: per-tenant request and token limits, the global cap,
idempotent release, slots that free themselves when a release never comes, and a dead
gateway's slots freed and its requests cancelled by the gateways that outlive it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services import keys
from services import messages as m
from services.gateway.backend import Backend, dead_gateways, token_cost
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.settings import Settings


def backend(redis_url: str, **limits) -> Backend:
    settings = Settings(redis_url=redis_url, model_name="tiny", **limits)
    return Backend(settings, GatewayMetrics("tiny"))


async def slots_held(redis_client, tenant: str) -> tuple[int, int, int]:
    """Requests, token total and global entries a tenant's admissions hold."""
    return (await redis_client.zcard(keys.tenant_inflight(tenant)),
            int(await redis_client.get(keys.tenant_tokens_total(tenant)) or 0),
            await redis_client.zcard(keys.GATEWAY_INFLIGHT))


async def admit(b: Backend, tenant: str, rid: str, cost: int = 10) -> int | None:
    """The HTTP status admission answered, or None when admitted."""
    try:
        await b._try_admit(tenant, {rid: cost})
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


async def test_choices_are_admitted_all_or_none(redis_client, redis_url):
    """A request's n choices take their slots together: a tenant with room for some but
    not all of them is refused before any runs, and holds nothing for the attempt."""
    b = backend(redis_url, max_queued_per_tenant=4, max_queued_tokens_per_tenant=100)
    try:
        assert await admit(b, "acme", "r1") is None
        with pytest.raises(ApiError) as refused:
            await b._try_admit("acme", dict.fromkeys(["n-0", "n-1", "n-2", "n-3"], 10))
        assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
        assert await slots_held(redis_client, "acme") == (1, 10, 1)
        with pytest.raises(ApiError) as tokens:  # 3 slots are free, 3 x 31 more tokens are not
            await b._try_admit("acme", dict.fromkeys(["t-0", "t-1", "t-2"], 31))
        assert tokens.value.status == 429 and tokens.value.headers.get("Retry-After")
        assert await slots_held(redis_client, "acme") == (1, 10, 1)
        await b._try_admit("acme", {"n-0": 20, "n-1": 25, "n-2": 15})  # a batch's own costs
        assert await slots_held(redis_client, "acme") == (4, 70, 4)
        await b._release_slot("acme", "n-1")
        assert await slots_held(redis_client, "acme") == (3, 45, 3)
    finally:
        await b.redis.aclose()


async def test_choices_that_together_exceed_the_whole_token_budget_are_400(redis_client, redis_url):
    """Retrying could never admit them: a 400 that says the choices' costs add up."""
    b = backend(redis_url, max_queued_tokens_per_tenant=100)
    try:
        with pytest.raises(ApiError) as refused:
            await b._try_admit("acme", dict.fromkeys(["c-0", "c-1", "c-2"], 40))
        assert refused.value.status == 400 and refused.value.param == "max_tokens"
        assert "its 3 choices (120 tokens)" in refused.value.message
        assert await slots_held(redis_client, "acme") == (0, 0, 0)
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
        assert b._pending_releases == {"r1": ("acme", 0, 0)}
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


async def test_a_redis_that_refuses_writes_is_503_saying_why_until_a_write_goes_through(
        redis_client, redis_url):
    b = backend(redis_url)
    try:
        # A replica of a master that is not there: it answers, and refuses every write.
        await redis_client.execute_command("REPLICAOF", "127.0.0.1", "1")
        try:
            with pytest.raises(ApiError) as refused:
                await b._try_admit("acme", {"r1": 10})
        finally:
            await redis_client.execute_command("REPLICAOF", "NO", "ONE")
        assert refused.value.status == 503 and refused.value.headers.get("Retry-After")
        assert refused.value.message == (
            "Redis is read-only (a replica that is not promoted yet), so no request can be "
            "queued; retry later.")
        assert await admit(b, "acme", "r1") == 503  # up front: no script run against it
        await b._housekeeping(time.time())  # this gateway's next write goes through
        assert await admit(b, "acme", "r1") is None
    finally:
        await b.redis.aclose()


async def _raise_connection_error(*_, **__):
    raise ConnectionError("redis went away")


async def cancelled(redis_client, request_id: str) -> bool:
    """Whether the request's cancel marker is set."""
    return await redis_client.hget(keys.request_markers(request_id), keys.MARKER_CANCELLED) == b"1"


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


def test_dead_gateways_are_the_silent_ones_and_earlier_lives_of_an_owned_instance():
    seen = {"gw-a:1": 100.0, "gw-a:2": 99.0, "gw-b:1": 80.0, "gw-c:9": 97.0, "host:8000:5": 70.0}
    # Without the instance's reply queue, only silence counts: gw-a:1 might still be alive.
    assert dead_gateways(seen, 100.0, 15.0, "gw-a:2", owns_instance=False, beating_s=30.0) == [
        "gw-b:1", "host:8000:5"]
    assert dead_gateways(seen, 100.0, 15.0, "gw-a:2", owns_instance=True, beating_s=30.0) == [
        "gw-a:1", "gw-b:1", "host:8000:5"]
    # An instance id may itself contain colons; only the boot id after the last one differs.
    assert dead_gateways(seen, 100.0, 60.0, "host:8000:6", owns_instance=True, beating_s=90.0) == [
        "host:8000:5"]
    assert dead_gateways(seen, 100.0, 60.0, "gw-a:2", owns_instance=False, beating_s=90.0) == []
    # Back from a Redis outage 5 s ago: everyone's last beat is old, nobody is judged yet
    # (but an earlier life of its own instance is certainly gone).
    assert dead_gateways(seen, 100.0, 15.0, "gw-a:2", owns_instance=False, beating_s=5.0) == []
    assert dead_gateways(seen, 100.0, 15.0, "gw-a:2", owns_instance=True, beating_s=5.0) == ["gw-a:1"]


async def test_a_dead_gateways_slots_are_freed_and_its_requests_cancelled(redis_client, redis_url):
    """kill -9 leaves a gateway's slots in Redis with no release to come: a gateway that
    outlives it frees them once its heartbeat is old, and marks its requests cancelled
    (the marker workers check), so its tenants are not refused for a request timeout."""
    dead = backend(redis_url, instance_id="gw-dead", max_queued_per_tenant=2)
    alive = backend(redis_url, instance_id="gw-alive", max_queued_per_tenant=2, gateway_dead_after_s=5)
    try:
        for b in (dead, alive):
            await b._housekeeping(1000.0)
        assert await admit(dead, "acme", "r1", cost=30) is None
        assert await admit(dead, "acme", "r2", cost=40) is None
        assert await admit(alive, "globex", "g1", cost=5) is None
        assert await admit(alive, "acme", "r3") == 429  # the dead gateway's two slots count
        await alive._housekeeping(1004.0)  # 4 s of silence: not dead yet
        assert await slots_held(redis_client, "acme") == (2, 70, 3)
        assert not await cancelled(redis_client, "r1")

        await alive._housekeeping(1006.0)
        assert await slots_held(redis_client, "acme") == (0, 0, 1)
        assert await cancelled(redis_client, "r1") and await cancelled(redis_client, "r2")
        assert not await cancelled(redis_client, "g1")  # the live one's own
        assert await redis_client.zrange(keys.GATEWAYS_SEEN, 0, -1) == [alive.incarnation.encode()]
        assert not await redis_client.exists(keys.gateway_slots(dead.incarnation))
        assert alive.metrics.reaped._value.get() == 2
        assert await admit(alive, "acme", "r3") is None

        await alive._housekeeping(1007.0)  # nothing left to reap: no double release
        assert await slots_held(redis_client, "acme") == (1, 10, 2)
    finally:
        await dead.redis.aclose()
        await alive.redis.aclose()


async def test_a_restarted_gateway_frees_its_previous_lifes_slots_at_once(redis_client, redis_url):
    """Same instance id (a restart): once the new life holds the instance's exclusive reply
    queue, which the broker hands over only when the old life's connection is gone, it
    frees the old life's slots without waiting for its heartbeat to age."""
    before = backend(redis_url, instance_id="gw")
    after = backend(redis_url, instance_id="gw")
    other = backend(redis_url, instance_id="gw-other")
    try:
        for b in (before, other):
            await b._housekeeping(1000.0)
        assert await admit(before, "acme", "old") is None
        assert await admit(other, "acme", "others") is None
        await after._housekeeping(1001.0)  # not connected to the broker yet: may be a twin
        assert await slots_held(redis_client, "acme") == (2, 20, 2)
        after._owns_instance = True
        await after._housekeeping(1001.5)
        assert await slots_held(redis_client, "acme") == (1, 10, 1)
        assert await cancelled(redis_client, "old")
        assert sorted(await redis_client.zrange(keys.GATEWAYS_SEEN, 0, -1)) == sorted(
            [after.incarnation.encode(), other.incarnation.encode()])
    finally:
        for b in (before, after, other):
            await b.redis.aclose()


async def test_a_cancel_is_marked_in_redis_without_the_broker_and_retried_without_redis(
        redis_client, redis_url):
    """The marker is what makes a cancel reliable: written with the broker down, and kept
    for the housekeeping loop to retry while Redis is unreachable."""
    b = backend(redis_url)
    try:
        await b.cancel_downstream("r1", "acme")  # never connected to a broker
        assert await cancelled(redis_client, "r1")
        assert 0 < await redis_client.ttl(keys.request_markers("r1")) <= keys.DEFAULT_MARKER_TTL_S
        real = b.redis.connection_pool
        b.redis.connection_pool = aioredis.ConnectionPool.from_url("redis://127.0.0.1:1/0")  # nothing there
        await b.cancel_downstream("r2", "acme")
        assert b._orphaned == {"r2": "acme"}
        b.redis.connection_pool = real
        await b._housekeeping(1000.0)
        assert b._orphaned == {}
        assert await cancelled(redis_client, "r2")
    finally:
        await b.redis.aclose()


async def test_the_housekeeping_loop_beats_in_redis_time(redis_client, redis_url):
    b = backend(redis_url, heartbeat_interval_s=0.05)
    loop = asyncio.create_task(b._housekeeping_loop())
    try:
        await asyncio.sleep(0.3)
        seconds, micros = await redis_client.time()
        beat = await redis_client.zscore(keys.GATEWAYS_SEEN, b.incarnation)
        assert beat is not None and 0 <= seconds + micros / 1e6 - beat < 0.25
    finally:
        loop.cancel()
        await b.redis.aclose()


async def test_a_gateway_unregisters_on_shutdown_only_when_it_holds_nothing(redis_client, redis_url):
    """A clean shutdown leaves nothing to reap; one that could not release a slot stays
    registered, so the gateways that outlive it free the slot."""
    clean, stuck = backend(redis_url, instance_id="clean"), backend(redis_url, instance_id="stuck")
    for b in (clean, stuck):
        await b._housekeeping(1000.0)
    assert await admit(stuck, "acme", "r1") is None
    await clean.close()
    await stuck.close()  # r1's release never happened (its submission is not tracked)
    assert await redis_client.zrange(keys.GATEWAYS_SEEN, 0, -1) == [stuck.incarnation.encode()]


async def test_a_gateway_that_lost_redis_judges_silence_only_after_beating_again_for_long(
        redis_client, redis_url):
    """After a Redis outage every gateway's last beat is old; the first one back must not
    take the others for dead (and cancel their live requests) before they could beat."""
    peer = backend(redis_url, instance_id="peer", gateway_dead_after_s=5)
    back = backend(redis_url, instance_id="back", gateway_dead_after_s=5, heartbeat_interval_s=0.05)
    try:
        await peer._housekeeping(1000.0)
        assert await admit(peer, "acme", "live") is None
        await back._housekeeping(1000.0)
        real = back.redis.time
        back.redis.time = _raise_connection_error  # type: ignore[method-assign]
        loop = asyncio.create_task(back._housekeeping_loop())
        await asyncio.sleep(0.1)
        loop.cancel()
        back.redis.time = real  # type: ignore[method-assign]
        assert back._beating_since is None
        await back._housekeeping(1020.0)  # back after the outage; peer's beat is 20 s old
        assert await redis_client.exists(keys.gateway_slots(peer.incarnation))
        assert not await cancelled(redis_client, "live")
        await back._housekeeping(1026.0)  # 6 s of beats and still nothing from peer: dead
        assert not await redis_client.exists(keys.gateway_slots(peer.incarnation))
    finally:
        await peer.redis.aclose()
        await back.redis.aclose()
