"""Per-tenant rate limits: the headers and errors as pure functions, and the token
buckets on a real Redis, taken in the admission step, shared by gateways, and settled to
the tokens a request used."""

from __future__ import annotations

import asyncio
import json

import pytest

from services import keys
from services import messages as m
from services.gateway.auth import KeyStore, hash_key, load_keys_file
from services.gateway.backend import Backend, token_cost
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.gateway.rate_limits import (
    NO_LIMITS,
    RateLimits,
    RateState,
    format_duration,
    over_token_rate,
    rate_limit_headers,
    rate_limited,
)
from services.settings import Settings


def backend(redis_url: str, **settings) -> Backend:
    return Backend(Settings(redis_url=redis_url, model_name="tiny", **settings), GatewayMetrics("tiny"))


async def refused(b: Backend, tenant: str, costs: dict[str, int], limits: RateLimits) -> ApiError:
    with pytest.raises(ApiError) as err:
        await b._try_admit(tenant, costs, limits)
    return err.value


async def bucket(redis_client, tenant: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in (await redis_client.hgetall(keys.tenant_rate(tenant))).items()}


# --- pure ------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "written"), [
    (0.0, "0ms"), (0.0201, "21ms"), (0.999, "999ms"), (1.0, "1s"), (1.04, "1.1s"), (17.28, "17.3s"),
    (59.99, "60s"), (60.0, "1m0s"), (360.0, "6m0s"), (61.2, "1m2s"),
])
def test_waits_are_written_as_openai_writes_them(seconds, written):
    assert format_duration(seconds) == written


def test_headers_say_each_limit_what_is_left_and_when_it_is_full_again():
    state = RateState(RateLimits(requests_per_minute=60, tokens_per_minute=6000), 41.7, -120.0)
    assert rate_limit_headers(state) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "41",
        "x-ratelimit-reset-requests": "18.3s",  # 18.3 requests at one a second
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m2s",  # 6120 tokens at 100 a second
    }
    tokens_only = RateState(RateLimits(tokens_per_minute=600), 0.0, 600.0)
    assert rate_limit_headers(tokens_only) == {
        "x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "0ms"}
    assert rate_limit_headers(RateState(NO_LIMITS, 0.0, 0.0)) == {}


def test_a_refusal_says_which_limit_and_how_long_to_wait():
    limits = RateLimits(requests_per_minute=6, tokens_per_minute=1200)
    by_requests = rate_limited(RateState(limits, 0.25, 900.0), "rpm", 100)
    assert by_requests.status == 429 and by_requests.code == "rate_limit_exceeded"
    assert by_requests.type == "rate_limit_error" and by_requests.reason == "rate_limit_requests"
    assert "6 requests per minute (RPM)" in by_requests.message
    assert "try again in 7.5s" in by_requests.message  # 0.75 of a request at one per 10 s
    assert by_requests.headers["Retry-After"] == "8" and by_requests.headers["retry-after-ms"] == "7500"
    assert by_requests.headers["x-ratelimit-remaining-requests"] == "0"
    by_tokens = rate_limited(RateState(limits, 5.0, 50.0), "tpm", 250)
    assert by_tokens.reason == "rate_limit_tokens"
    assert "1200 tokens per minute (TPM); this request counts 250" in by_tokens.message
    assert by_tokens.headers["retry-after-ms"] == "10000"  # 200 tokens at 20 a second
    assert by_tokens.headers["Retry-After"] == "10"


def test_a_request_larger_than_a_minutes_tokens_is_400():
    err = over_token_rate(RateLimits(tokens_per_minute=100), 300, 3)
    assert err.status == 400 and err.param == "max_tokens" and err.code == "tokens_per_minute_exceeded"
    assert "its 3 choices (300 tokens)" in err.message and "100 tokens per minute" in err.message


def test_the_keys_file_sets_a_tenants_own_limits_over_the_gateways():
    store = KeyStore(default_limits=RateLimits(requests_per_minute=100, tokens_per_minute=50_000))
    load_keys_file(store, {"tenants": {
        "acme": {"key_sha256": hash_key("a"), "requests_per_minute": 10},
        "globex": {"key_sha256": hash_key("g"), "tokens_per_minute": 0},
        "initech": {"key_sha256": hash_key("i")},
    }})
    assert store.limits_for("acme") == RateLimits(10, 50_000)
    assert store.limits_for("globex") == RateLimits(100, 0)  # 0: no token limit
    assert store.limits_for("initech") == RateLimits(100, 50_000)
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match="requests_per_minute must be a whole number"):
            load_keys_file(KeyStore(), {"tenants": {"x": {"key_sha256": hash_key("x"), "requests_per_minute": bad}}})


def test_the_gateway_wide_limits_come_from_settings(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": {"acme": {"key_sha256": hash_key("a"), "tokens_per_minute": 9}}}))
    settings = Settings(tenant_requests_per_minute=30, api_keys="globex:g", api_keys_file=path)
    store = KeyStore.from_config(settings.api_keys, settings.api_keys_file,
                                 RateLimits(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute))
    assert store.limits_for("globex") == RateLimits(30, 0)
    assert store.limits_for("acme") == RateLimits(30, 9)


# --- on Redis --------------------------------------------------------------------------


async def test_requests_per_minute_refuse_past_the_burst_and_spare_other_tenants(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(requests_per_minute=3)
    try:
        left = [(await b._try_admit("acme", {f"r{i}": 10}, limits)).requests_left for i in range(3)]
        assert [round(x) for x in left] == [2, 1, 0]
        err = await refused(b, "acme", {"r3": 10}, limits)
        assert err.status == 429 and err.reason == "rate_limit_requests"
        assert b.metrics.registry.get_sample_value(
            "fairway:tenant_rate_limited_requests_total", {"tenant": "acme", "limit": "requests"}) == 1.0
        assert 19 <= int(err.headers["retry-after-ms"]) / 1000 <= 20  # one request per 20 s
        assert await b._try_admit("globex", {"g": 10}, limits) is not None
        # Its admission slots were not taken for the refused request either.
        assert await redis_client.zcard(keys.tenant_inflight("acme")) == 3
    finally:
        await b.redis.aclose()


async def test_tokens_per_minute_refill_at_a_sixtieth_a_second(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(tokens_per_minute=6000)  # 100 tokens a second
    try:
        state = await b._try_admit("acme", {"big": 6000}, limits)
        assert state is not None and state.tokens_left < 1
        err = await refused(b, "acme", {"more": 50}, limits)
        assert err.reason == "rate_limit_tokens" and 400 <= int(err.headers["retry-after-ms"]) <= 500
        await asyncio.sleep(0.6)
        assert await b._try_admit("acme", {"more": 50}, limits) is not None
    finally:
        await b.redis.aclose()


async def test_a_refusal_takes_nothing_from_either_limit_or_the_slots(redis_client, redis_url):
    b = backend(redis_url, max_queued_per_tenant=1)
    limits = RateLimits(requests_per_minute=10, tokens_per_minute=1000)
    try:
        await b._try_admit("acme", {"r1": 100}, limits)
        before = await bucket(redis_client, "acme")
        err = await refused(b, "acme", {"r2": 100}, limits)  # no in-flight slot free
        assert err.reason == "tenant_limit"
        assert await bucket(redis_client, "acme") == before
        await b._release_slot("acme", "r1")
        err = await refused(b, "acme", {"r2": 950}, limits)  # the requests fit, the tokens do not
        assert err.reason == "rate_limit_tokens"
        assert (await bucket(redis_client, "acme"))["rl"] == before["rl"]
        assert await redis_client.zcard(keys.tenant_inflight("acme")) == 0
    finally:
        await b.redis.aclose()


async def test_choices_count_as_one_request_and_all_their_tokens(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(requests_per_minute=5, tokens_per_minute=1000)
    try:
        state = await b._try_admit("acme", {"c-0": 100, "c-1": 150, "c-2": 50}, limits)
        assert round(state.requests_left) == 4 and 699 <= state.tokens_left <= 701
        err = await refused(b, "acme", {"d-0": 1000, "d-1": 1}, limits)
        assert err.status == 400 and "its 2 choices (1001 tokens)" in err.message
    finally:
        await b.redis.aclose()


async def test_gateways_share_a_tenants_limits(redis_client, redis_url):
    one, two = backend(redis_url, instance_id="g1"), backend(redis_url, instance_id="g2")
    limits = RateLimits(requests_per_minute=2)
    try:
        await one._try_admit("acme", {"a": 1}, limits)
        await two._try_admit("acme", {"b": 1}, limits)
        assert (await refused(one, "acme", {"c": 1}, limits)).status == 429
        assert (await refused(two, "acme", {"c": 1}, limits)).status == 429
    finally:
        await one.redis.aclose()
        await two.redis.aclose()


async def test_a_tenant_without_limits_is_not_charged(redis_client, redis_url):
    b = backend(redis_url)
    try:
        assert await b._try_admit("acme", {"r": 100_000}, NO_LIMITS) is None
        assert await b.take_rate("acme", [], NO_LIMITS) is None
        assert not await redis_client.exists(keys.tenant_rate("acme"))
    finally:
        await b.redis.aclose()


async def test_a_release_settles_the_tokens_once(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(tokens_per_minute=6000)
    try:
        await b._try_admit("acme", {"r1": 5000}, limits)
        await b._release_slot("acme", "r1", 6000, 4000)  # it used 1000 of its 5000
        await b._release_slot("acme", "r1", 6000, 4000)  # a second release gives nothing back
        state = await b._try_admit("acme", {"r2": 10}, limits)
        assert 4990 <= state.tokens_left <= 5100  # 6000 - 1000 - 10, plus what refilled since
        await b._release_slot("acme", "r2", 6000, -12_000)  # it used far more than its estimate
        assert (await bucket(redis_client, "acme"))["tl"] == -6000  # at most a minute's debt
    finally:
        await b.redis.aclose()


async def test_a_failed_release_settles_when_it_is_retried(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(tokens_per_minute=6000)
    try:
        await b._try_admit("acme", {"r1": 3000}, limits)
        real = b._release

        async def unreachable(*_, **__):
            raise ConnectionError("redis went away")

        b._release = unreachable  # type: ignore[assignment]
        await b._release_slot("acme", "r1", 6000, 2500)
        b._release = real  # type: ignore[assignment]
        assert b._pending_releases == {"r1": ("acme", 6000, 2500)}
        state = await b._try_admit("acme", {"r2": 1}, limits)
        # Retried before this admission: the 2500 tokens are back before it is charged.
        assert 5499 <= state.tokens_left <= 5600
    finally:
        await b.redis.aclose()


def request(rid: str, max_tokens: int) -> m.CompletionRequest:
    return m.CompletionRequest(request_id=rid, tenant="acme", model="tiny", prompt="hi",
                               sampling=m.SamplingParams(max_tokens=max_tokens), reply_to="q")


async def test_a_background_response_is_charged_when_it_is_queued(redis_client, redis_url):
    b = backend(redis_url)
    limits = RateLimits(requests_per_minute=1, tokens_per_minute=600)
    try:
        state = await b.take_rate("acme", [request("bg", 100)], limits)
        assert round(state.requests_left) == 0 and 497 <= state.tokens_left <= 500
        assert (await refused(b, "acme", {"next": 1}, limits)).reason == "rate_limit_requests"
        with pytest.raises(ApiError) as too_big:
            await b.take_rate("acme", [request("huge", 700)], limits)
        assert too_big.value.status == 400
        # A response refused after its charge (its tenant's background queue was full) gets it back.
        await b.give_back_rate("acme", state, token_cost(request("bg", 100)))
        after = await b.take_rate("acme", [request("again", 100)], limits)
        assert round(after.requests_left) == 0 and 497 <= after.tokens_left <= 501
    finally:
        await b.redis.aclose()
