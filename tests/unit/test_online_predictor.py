"""Online length predictor shared through a real Redis: persistence, replicas, failures."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import redis.asyncio as aioredis

from services import keys
from services.scorer import online as online_module
from services.scorer.online import ARTIFACT_FIELD, OnlinePredictor
from services.scorer.predictor import LengthPredictor

MODEL = "Meta-Llama-3-8B-Instruct"
PROMPTS = [
    "Write a poem about the sea.",
    "What is the capital of Peru?",
    "Explain how a transistor works.",
    "List ten uses for a paperclip.",
    "Translate 'good morning' into German.",
    "Write a Python function that reverses a list.",
]
PROBES = ["Describe your favourite city.", "Name a prime number.", "Write a story about a fox."]


@pytest.fixture(scope="module")
def base() -> LengthPredictor:
    return LengthPredictor.default()


def predictions(online: OnlinePredictor) -> list[tuple[float, float, float]]:
    return [(p.p10, p.p50, p.p90) for p in map(online.predict, PROBES)]


async def test_observations_move_predictions_and_reach_redis(base, redis_client):
    online = OnlinePredictor(base, redis_client, MODEL)
    await online.start()
    before = online.predict(PROMPTS[0])
    for _ in range(20):
        for prompt in PROMPTS:
            await online.observe(prompt, 4000)
    after = online.predict(PROMPTS[0])
    assert after.p50 > 3 * before.p50
    assert after.p10 <= after.p50 <= after.p90
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert float(stored[b"n"]) == 20 * len(PROMPTS)
    assert stored[ARTIFACT_FIELD.encode()].decode().startswith(base.artifact_id)
    assert len(stored) < 1000


async def test_state_survives_a_restart(base, redis_client, redis_url):
    first = OnlinePredictor(base, redis_client, MODEL)
    await first.start()
    for i, prompt in enumerate(PROMPTS * 5):
        await first.observe(prompt, 50 + 40 * i)
    expected = predictions(first)

    other_client = aioredis.from_url(redis_url)
    try:
        restarted = OnlinePredictor(LengthPredictor.default(), other_client, MODEL)
        await restarted.start()
        assert restarted.observations == first.observations == 5 * len(PROMPTS)
        np.testing.assert_allclose(predictions(restarted), expected, rtol=1e-9)
    finally:
        await other_client.aclose()


async def test_two_replicas_learning_concurrently_both_see_every_update(
    base, redis_client, redis_url
):
    other_client = aioredis.from_url(redis_url)
    try:
        a = OnlinePredictor(base, redis_client, MODEL)
        b = OnlinePredictor(base, other_client, MODEL)
        await asyncio.gather(a.start(), b.start())

        async def learn(replica: OnlinePredictor, tokens: int) -> None:
            for prompt in PROMPTS * 10:
                await replica.observe(prompt, tokens)

        await asyncio.gather(learn(a, 1500), learn(b, 30))
        await asyncio.gather(a.refresh(), b.refresh())
        assert a.observations == b.observations == 2 * 10 * len(PROMPTS)
        np.testing.assert_allclose(predictions(a), predictions(b), rtol=1e-9)

        # Order-free sums equal those of one learner that saw every update in another
        # order (the prequential parts, residual bins and word-memory inputs, depend on
        # the order by design).
        single = LengthPredictor.default()
        for prompt in PROMPTS * 10:
            single.observe(prompt, MODEL, 30)
            single.observe(prompt, MODEL, 1500)
        reference = single.state(MODEL)
        np.testing.assert_allclose(a.state.lexical.counts, reference.lexical.counts)
        np.testing.assert_allclose(a.state.lexical.sums, reference.lexical.sums, atol=1e-9)
        assert a.state.head.hist.sum() == reference.head.hist.sum() == 120
    finally:
        await other_client.aclose()


async def test_models_have_separate_state(base, redis_client):
    big = OnlinePredictor(base, redis_client, "big-model")
    small = OnlinePredictor(base, redis_client, "small-model")
    await big.start()
    await small.start()
    fresh = predictions(small)
    for prompt in PROMPTS * 5:
        await big.observe(prompt, 5000)
    await small.refresh()
    assert predictions(small) == fresh
    assert await redis_client.exists(keys.predictor_state("big-model"))


async def test_state_from_another_artifact_is_reset(base, redis_client):
    key = keys.predictor_state(MODEL)
    await redis_client.hset(
        key, mapping={ARTIFACT_FIELD: "some-older-artifact", "n": 50, "ee": 1e4, "zy:0": 300}
    )
    online = OnlinePredictor(base, redis_client, MODEL)
    await online.start()
    assert online.observations == 0
    assert predictions(online) == predictions(OnlinePredictor(base, redis_client, MODEL))
    stored = await redis_client.hgetall(key)
    assert stored == {ARTIFACT_FIELD.encode(): online.state_tag.encode()}


async def test_updates_made_while_redis_is_down_are_kept_and_sent_later(base, redis_client):
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    online = OnlinePredictor(base, dead, MODEL)
    before = online.predict(PROMPTS[0]).p50
    for prompt in PROMPTS * 3:
        await online.observe(prompt, 3000)  # must not raise
    assert online.predict(PROMPTS[0]).p50 > before
    await dead.aclose()

    online.redis = redis_client
    await online.refresh()
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert float(stored[b"n"]) == 3 * len(PROMPTS)
    assert online.observations == 3 * len(PROMPTS)


async def test_echoed_features_are_used_for_learning(base, redis_client):
    online = OnlinePredictor(base, redis_client, MODEL)
    await online.start()
    pred = online.predict(PROMPTS[2])
    # The worker sends back a truncated prompt but the full feature vector.
    await online.observe(PROMPTS[2][:5], 700, features=pred.features)
    reference = LengthPredictor.default()
    reference.observe(PROMPTS[2], MODEL, 700)
    expected = reference.predict(PROBES[0], MODEL)
    assert math.isclose(online.predict(PROBES[0]).p50, expected.p50, rel_tol=1e-9)


async def test_a_burst_of_concurrent_observations_is_fully_persisted(base, redis_client, redis_url):
    online = OnlinePredictor(base, redis_client, MODEL)
    await online.start()
    burst = [online.observe(prompt, 100 + 10 * i) for i, prompt in enumerate(PROMPTS * 25)]
    await asyncio.gather(*burst)
    assert online.observations == len(burst)
    other_client = aioredis.from_url(redis_url)
    try:
        restarted = OnlinePredictor(base, other_client, MODEL)
        await restarted.start()
        assert restarted.observations == len(burst)
        np.testing.assert_allclose(predictions(restarted), predictions(online), rtol=1e-9)
    finally:
        await other_client.aclose()


async def test_an_old_replica_cannot_write_into_a_newer_artifacts_state(base, redis_client):
    old = OnlinePredictor(base, redis_client, MODEL)
    await old.start()
    # A new artifact's replica takes the key over (as in a rolling deploy).
    await redis_client.hset(keys.predictor_state(MODEL), ARTIFACT_FIELD, "newer-artifact/s9")
    await old.observe(PROMPTS[0], 900)
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert stored == {ARTIFACT_FIELD.encode(): b"newer-artifact/s9"}
    assert old.observations == 1  # it still learned locally


async def test_a_redelivered_completion_is_learned_once(base, redis_client, redis_url):
    """A scorer that dies between learning a completion and acking it gets the event
    again (itself after a restart, or another replica): it must not be learned twice."""
    first = OnlinePredictor(base, redis_client, MODEL)
    await first.start()
    for i, prompt in enumerate(PROMPTS):
        await first.observe(prompt, 2000 + i, request_id=f"req-{i}")
    expected = predictions(first)
    assert await redis_client.hexists(keys.request_markers("req-0"), keys.MARKER_LEARNED)

    other_client = aioredis.from_url(redis_url)
    try:
        second = OnlinePredictor(base, other_client, MODEL)
        await second.start()
        await second.observe(PROMPTS[0], 2000, request_id="req-0")  # the redelivery
        await first.observe(PROMPTS[1], 2001, request_id="req-1")  # and on the same replica
    finally:
        await other_client.aclose()
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert float(stored[b"n"]) == len(PROMPTS)
    assert second.observations == first.observations == len(PROMPTS)
    np.testing.assert_allclose(predictions(second), expected, rtol=1e-9)
    np.testing.assert_allclose(predictions(first), expected, rtol=1e-9)


async def test_a_write_retried_after_its_reply_was_lost_is_applied_once(base, redis_client):
    online = OnlinePredictor(base, redis_client, MODEL)
    await online.start()
    increment = online._increment

    async def applied_then_reply_lost(**kwargs):
        await increment(**kwargs)
        raise ConnectionError("connection reset by peer")

    online._increment = applied_then_reply_lost
    await online.observe(PROMPTS[0], 800, request_id="req-a")
    assert online._pending  # kept for a retry
    online._increment = increment
    await online.refresh()
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert float(stored[b"n"]) == 1
    assert online.observations == 1


async def test_unsent_observations_stay_bounded_during_a_long_outage(
    base, redis_client, monkeypatch
):
    cap = 20
    monkeypatch.setattr(online_module, "MAX_PENDING_REQUESTS", cap)
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    online = OnlinePredictor(base, dead, MODEL)
    total = cap + 15
    try:
        for i in range(total):
            await online.observe(PROMPTS[i % len(PROMPTS)], 300, request_id=f"r{i}")
            assert len(online._pending) <= cap
    finally:
        await dead.aclose()
    online.redis = redis_client
    await online.refresh()
    stored = await redis_client.hgetall(keys.predictor_state(MODEL))
    assert float(stored[b"n"]) == total
    assert online.observations == total
