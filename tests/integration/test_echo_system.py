"""The whole system with FAIRWAY_ENGINE=echo: real RabbitMQ, Redis and every service.

It runs beside the session's model system, on its own RabbitMQ vhost and Redis database,
so the two never share a queue or a key.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import openai
import pytest
import redis
import redis.asyncio

from services import amqp, keys, topology
from services import messages as m
from services.client import AmqpClient
from services.gateway.auth import hash_key
from services.models import load_tokenizer, resolve_model_path
from services.settings import DEFAULT_MODEL_NAME
from services.worker import claimant_worker_id
from tests.integration.system import ADMIN_KEY, TENANT_KEYS, System, own_redis_db, own_vhost

pytestmark = pytest.mark.integration

VHOST = "fairway-echo"
MARKER_TTL_S = 7200


METERED_KEY = "sk-metered-test"
METERED_LIMITS = {"requests_per_minute": 4, "tokens_per_minute": 1000}
"""A tenant of the keys file with rate limits of its own (no other tenant has any)."""
BILLED_KEY = "sk-billed-test"
"""A tenant only the usage test sends for."""


@pytest.fixture(scope="module")
def echo_system(rabbit_server, redis_server, model_cache, tmp_path_factory) -> Iterator[System]:
    keys_file = tmp_path_factory.mktemp("echo-keys") / "keys.json"
    keys_file.write_text(json.dumps(
        {"tenants": {"metered": {"key_sha256": hash_key(METERED_KEY), **METERED_LIMITS},
                     "billed": {"key_sha256": hash_key(BILLED_KEY)}}}))
    sys_ = System(amqp_url=own_vhost(rabbit_server, VHOST), redis_url=own_redis_db(redis_server, 1),
                  cache_dir=model_cache, log_dir=tmp_path_factory.mktemp("echo-logs"),
                  extra_env={"FAIRWAY_ENGINE": "echo", "FAIRWAY_ECHO_TOKENS_PER_S": "500",
                             "FAIRWAY_MARKER_TTL_S": str(MARKER_TTL_S),
                             "FAIRWAY_API_KEYS_FILE": str(keys_file), "FAIRWAY_TENANTS_RELOAD_S": "0.3"})
    for service in ("scheduler", "scorer", "cpu-worker", "gateway"):
        sys_.start(service, name=f"echo-{service}")
    try:
        sys_.wait_ready()
        yield sys_
    finally:
        sys_.stop_all()


@pytest.fixture(scope="module")
def echo_client(echo_system) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_system.gateway_url}/v1", api_key=TENANT_KEYS["acme"],
                         max_retries=0)


def test_echo_streams_the_prompt_back(echo_system, echo_client):
    prompt = "The quick brown fox jumps over the lazy dog"
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    ids = tokenizer.encode(prompt)
    n = len(ids) + 3  # wraps around the prompt
    chunks = list(echo_client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=n, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = [ids[i % len(ids)] for i in range(n)]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # really streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = [c.usage for c in chunks if c.usage]
    assert usage[0].completion_tokens == n and usage[0].prompt_tokens == len(ids)
    assert '"engine": "echo"' in echo_system.log("echo-cpu-worker")
    # The answer echoes the prompt from its BOS, which comes round again: skipped from the
    # text unless asked.
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token not in text
    spelled = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=n,
                                             extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert spelled.choices[0].text.count(tokenizer.bos_token) == 2
    assert spelled.choices[0].text.replace(tokenizer.bos_token, "") == text


def test_continuous_usage_counts_each_chunks_tokens_so_far(echo_system, echo_client):
    """vLLM's ``continuous_usage_stats``: every chunk's usage is the answer's so far, the
    chunks' token ids adding up to it; the last chunk's is the request's own usage."""
    prompt = "Count every token as it streams"
    n = 12
    chunks = [c.model_dump() for c in echo_client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=n, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})]
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    generated = 0
    for chunk in chunks[:-1]:
        generated += len(chunk["choices"][0]["token_ids"])
        used = {name: chunk["usage"][name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
        assert used == {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                        "total_tokens": prompt_tokens + generated}
    assert generated == n == chunks[-1]["usage"]["completion_tokens"]
    assert len(chunks) > 3  # really streamed


def test_return_token_ids_brings_the_prompts_and_the_answers_ids(echo_system, echo_client):
    """vLLM's ``return_token_ids``: a completion's choice has its prompt's ids and its
    own; streamed, the chunks' ids join to the answer's. A chat's prompt ids are those of
    its rendered template (as /tokenize gives them)."""
    prompt = "Fair queues for every tenant"
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    ids = tokenizer.encode(prompt)
    asked = {"ignore_eos": True, "return_token_ids": True}
    whole = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt,
                                           max_tokens=len(ids), extra_body=asked)
    choice = whole.choices[0].model_dump()
    assert (choice["prompt_token_ids"], choice["token_ids"]) == (ids, ids)  # echo answers the prompt
    chunks = [c.model_dump() for c in echo_client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=len(ids), stream=True, extra_body=asked)]
    assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == ids
    assert [c["choices"][0].get("prompt_token_ids") for c in chunks if c["choices"][0].get(
        "prompt_token_ids")] == [ids]

    messages = [{"role": "user", "content": prompt}]
    rendered = httpx.post(f"{echo_system.gateway_url}/tokenize",
                          json={"model": DEFAULT_MODEL_NAME, "messages": messages},
                          headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"}).json()["tokens"]
    chat = echo_client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages,
                                               max_tokens=4, extra_body=asked).model_dump()
    assert chat["prompt_token_ids"] == rendered
    assert chat["choices"][0]["token_ids"] == rendered[:4]
    plain = echo_client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages,
                                                max_tokens=4).model_dump()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_return_tokens_as_token_ids_names_each_logprob_token_by_its_id(echo_system, echo_client):
    """vLLM's ``return_tokens_as_token_ids``: log-probabilities name tokens ``token_id:N``,
    the echoed prompt's too, in the order of the answer's ids; the text is unchanged."""
    prompt = "Fair queues for every tenant"
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    ids = tokenizer.encode(prompt)
    named = [f"token_id:{i}" for i in ids]
    asked = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    plain, whole = (echo_client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=len(ids), logprobs=1, echo=True,
        extra_body=extra) for extra in ({"ignore_eos": True}, asked))
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == named + named  # the echoed prompt, then the answer
    assert logprobs.top_logprobs[len(ids)] == {named[0]: 0.0}
    assert whole.choices[0].text == plain.choices[0].text
    assert logprobs.text_offset == plain.choices[0].logprobs.text_offset  # still of the text
    assert logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs
    chunks = list(echo_client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=4,
        logprobs=True, top_logprobs=1, stream=True, extra_body=asked))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.top_logprobs[0].token for e in entries]
    assert all(e.token.startswith("token_id:") and e.bytes == list(e.token.encode()) for e in entries)
    assert len(entries) == 4


def test_a_requests_markers_expire_after_the_configured_ttl(echo_system, echo_client):
    """A request leaves one key in Redis, the hash of its markers (done, the scorer's and
    the worker's claims...), which expires within ``FAIRWAY_MARKER_TTL_S``, so Redis holds
    about rate x TTL of them, not every request ever served."""
    response = echo_client.completions.with_raw_response.create(
        model=DEFAULT_MODEL_NAME, prompt="leave little behind", max_tokens=4)
    request_id = response.headers["x-request-id"]
    store = redis.Redis.from_url(echo_system.redis_url)
    try:
        deadline = time.monotonic() + 5  # the done marker is written as the worker finishes
        while not store.hexists(keys.request_markers(request_id), keys.MARKER_DONE):
            assert time.monotonic() < deadline, "no done marker"
            time.sleep(0.05)
        left = [k for k in store.scan_iter(match=f"*{request_id}*")]
        ttls = {k.decode(): store.ttl(k) for k in left}
        markers = store.hgetall(keys.request_markers(request_id))
    finally:
        store.close()
    assert list(ttls) == [keys.request_markers(request_id)], ttls
    assert {keys.MARKER_DONE, keys.MARKER_OWNER, keys.MARKER_CLAIM} <= {f.decode() for f in markers}
    assert 0 < ttls[keys.request_markers(request_id)] <= MARKER_TTL_S, ttls


def test_echo_honours_stop_strings(echo_system, echo_client):
    out = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt="one two three four",
                                         max_tokens=20, stop=[" three"])
    assert out.choices[0].text.endswith("two") and " three" not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    kept = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt="one two three four",
                                          max_tokens=20, stop=[" three"],
                                          extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == out.choices[0].text + " three"
    assert kept.choices[0].finish_reason == "stop"
    # What stopped it, as vLLM's stop_reason: the string, a named stop token, or nothing.
    assert out.choices[0].model_dump()["stop_reason"] == " three"
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    third = tokenizer.encode("one two three four")[3]
    by_token = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt="one two three four",
                                              max_tokens=20, extra_body={"stop_token_ids": [third]})
    assert (by_token.choices[0].finish_reason, by_token.choices[0].model_dump()["stop_reason"]) == (
        "stop", third)
    cut = echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt="one two three four",
                                         max_tokens=2)
    assert (cut.choices[0].finish_reason, cut.choices[0].model_dump()["stop_reason"]) == ("length", None)


def test_a_metered_tenant_is_told_its_limits_and_refused_past_them(echo_system, echo_client):
    """Rate limits per tenant (4 requests and 1000 tokens a minute): every answer says
    what is left; a request's unused tokens come back when it ends; a background response
    counts when it is queued; past the limit a 429 says when to come back, and other
    tenants are not held back."""
    metered = openai.OpenAI(base_url=f"{echo_system.gateway_url}/v1", api_key=METERED_KEY, max_retries=0)
    prompt = "one two three four"  # counted as 18 // 4 + 1 = 5 tokens, plus max_tokens
    first = metered.completions.with_raw_response.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=200, stop=[" three"])
    answer = first.parse()
    assert answer.choices[0].finish_reason == "stop"  # a few tokens of its 200
    used = answer.usage.prompt_tokens + answer.usage.completion_tokens
    h = first.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("4", "3")
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert 795 <= int(h["x-ratelimit-remaining-tokens"]) <= 800  # 1000 - 205, and what refilled
    assert h["x-ratelimit-reset-requests"].endswith("s")

    headers = {"Authorization": f"Bearer {METERED_KEY}"}
    body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{echo_system.gateway_url}/v1/completions", json=body,
                      headers=headers, timeout=60) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-ratelimit-remaining-requests"] == "2"
        # The first request's unused tokens came back as it ended: 1000 - 205 + (205 - used),
        # less this one's 205, and what refilled meanwhile; unsettled it would be 590 and that.
        assert int(streamed.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 205 - used
        assert used < 100
        assert any(line == "data: [DONE]" for line in streamed.iter_lines())

    queued = metered.responses.with_raw_response.create(
        model=DEFAULT_MODEL_NAME, input="Hi", max_output_tokens=8, background=True)
    assert queued.parse().status == "queued"
    assert queued.headers["x-ratelimit-remaining-requests"] == "1"

    too_big = httpx.post(f"{echo_system.gateway_url}/v1/completions", headers=headers, timeout=30,
                         json={"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 1000})
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "tokens_per_minute_exceeded"

    metered.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as refused:
        metered.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=2)
    error = refused.value.response
    assert error.json()["error"]["code"] == "rate_limit_exceeded"
    assert "4 requests per minute (RPM)" in error.json()["error"]["message"]
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(error.headers["Retry-After"]) <= 15  # one request every 15 s
    assert echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=2).choices
    unlimited = echo_client.completions.with_raw_response.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=2)
    assert not any(name.startswith("x-ratelimit") for name in unlimited.headers)
    metrics = scrape(echo_system, "echo-gateway")
    assert 'fairway:gateway_requests_rejected_total{reason="rate_limit_requests"} 1.0' in metrics
    assert 'fairway:tenant_rate_limited_requests_total{limit="requests",tenant="metered"} 1.0' in metrics


def test_usage_counts_what_each_tenant_was_served(echo_system):
    """The usage API: the tokens of each request a tenant sent (each choice a model
    request), as the answers told them, for the admin and for the tenant's own key."""
    billed = openai.OpenAI(base_url=f"{echo_system.gateway_url}/v1", api_key=BILLED_KEY, max_retries=0)
    started = int(time.time())
    answers = [billed.completions.create(model=DEFAULT_MODEL_NAME, prompt="usage one", max_tokens=3),
               billed.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=4, n=2,
                                              messages=[{"role": "user", "content": "usage two"}])]
    expected = {"input_tokens": answers[0].usage.prompt_tokens + 2 * answers[1].usage.prompt_tokens,
                "output_tokens": sum(a.usage.completion_tokens for a in answers),
                "num_model_requests": 3}
    url = f"{echo_system.gateway_url}/v1/organization/usage/completions"
    query = {"start_time": started - 60, "bucket_width": "1m", "group_by": "tenant", "tenants": "billed"}

    def totals(key: str) -> dict[str, int]:
        answer = httpx.get(url, params=query, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        results = [r for bucket in answer.json()["data"] for r in bucket["results"]]
        assert all(r["tenant"] == "billed" for r in results)
        return {k: sum(r[k] for r in results) for k in expected}

    deadline = time.monotonic() + 15  # the scheduler records a request as its worker reports it
    while totals(ADMIN_KEY) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert totals(ADMIN_KEY) == expected
    assert totals(BILLED_KEY) == expected
    asked_for_another = httpx.get(url, params={**query, "tenants": "acme"},
                                  headers={"Authorization": f"Bearer {BILLED_KEY}"}, timeout=10)
    assert asked_for_another.status_code == 403


def test_a_changed_keys_file_is_read_again_without_a_restart(echo_system):
    """A tenant added to the keys file can send at once, with its weight at the scheduler;
    a file that does not parse changes nothing (and is counted); the file put back is
    read again."""
    path = Path(echo_system.extra_env["FAIRWAY_API_KEYS_FILE"])
    original = path.read_text()
    url = f"{echo_system.gateway_url}/v1/completions"
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "newcomer", "max_tokens": 2}
    as_newcomer = {"Authorization": "Bearer sk-newcomer-test"}

    def replace(text: str) -> None:
        fresh = path.with_suffix(".new")
        fresh.write_text(text)
        os.replace(fresh, path)

    def until(check, what: str) -> None:
        deadline = time.monotonic() + 15
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    assert httpx.post(url, json=body, headers=as_newcomer, timeout=30).status_code == 401
    tenants = json.loads(original)["tenants"]
    try:
        replace(json.dumps({"tenants": {**tenants, "newcomer": {"key_sha256": hash_key("sk-newcomer-test"),
                                                                 "weight": 3.5}}}))
        until(lambda: httpx.post(url, json=body, headers=as_newcomer, timeout=30).status_code == 200,
              "the gateway never took the new key")
        until(lambda: '"newcomer": 3.5' in echo_system.log("echo-scheduler"), "the scheduler never read its weight")
        replace("{not json")
        until(lambda: 'fairway:tenants_file_reloads_total{outcome="failed"} 1.0' in scrape(
            echo_system, "echo-gateway"), "the broken file was not noticed")
        assert httpx.post(url, json=body, headers=as_newcomer, timeout=30).status_code == 200  # still in force
    finally:
        replace(original)
    until(lambda: httpx.post(url, json=body, headers=as_newcomer, timeout=30).status_code == 401,
          "the newcomer's key outlived the file that named it")


def stream_events(echo_system: System, body: dict) -> Iterator[tuple[str, dict]]:
    """POST a streaming completion as tenant acme; yield its request id with each event."""
    headers = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
    with httpx.stream("POST", f"{echo_system.gateway_url}/v1/completions", json=body,
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                yield request_id, json.loads(line[6:])


def test_a_cancel_marker_alone_stops_a_running_request(echo_system):
    """The cancel marker in Redis, with no broadcast on the control exchange (as when the
    broker restarted and the workers' control queues were not back yet, or the caller's
    gateway died): the worker reads it with its next heartbeat and stops the request."""
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "cancel me", "max_tokens": 1000,
            "stream": True, "ignore_eos": True}  # 2 s at the echo engine's 500 tokens/s
    store = redis.Redis.from_url(echo_system.redis_url)
    tokens, errors = 0, []
    try:
        for request_id, event in stream_events(echo_system, body):
            if "error" in event:
                errors.append(event["error"]["code"])
            elif event.get("choices"):
                assert event["choices"][0]["finish_reason"] is None, "ran to the end"
                tokens += 1
                if tokens == 10:
                    store.hset(keys.request_markers(request_id), keys.MARKER_CANCELLED, "1")
    finally:
        store.close()
    assert errors == ["cancelled"]
    assert 10 <= tokens < 1000
    seen = [json.loads(line) for line in echo_system.log("echo-cpu-worker").splitlines()
            if "cancel_marker_seen" in line]
    assert [e["request_id"] for e in seen] == [request_id]


async def test_a_producer_that_disconnects_mid_stream_stops_its_request(echo_system):
    """An AMQP producer that goes away mid-stream takes its exclusive reply queue with it:
    the worker's next token chunk comes back unroutable, and the worker stops the request
    instead of generating the rest for nobody."""
    async with AmqpClient(echo_system.amqp_url) as client:
        request = client.completion(DEFAULT_MODEL_NAME, "leave early", max_tokens=1000,
                                    ignore_eos=True)  # 2 s at the echo engine's 500 tokens/s
        request.tenant = "acme"  # guest is a trusted publisher, as the gateway is
        received = 0
        async for _ in client.replies(await client.publish(request)):
            received += 1
            if received == 10:
                break
    assert received == 10
    left_at = time.monotonic()
    store = redis.asyncio.Redis.from_url(echo_system.redis_url)
    try:
        while await store.hexists(keys.SCHED_INFLIGHT, request.request_id):
            assert time.monotonic() - left_at < 10, "the request still runs"
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    stopped_after = time.monotonic() - left_at
    gone = [json.loads(line) for line in echo_system.log("echo-cpu-worker").splitlines()
            if "caller_gone" in line]
    assert [e["request_id"] for e in gone] == [request.request_id]
    assert stopped_after < 1.5, f"ran {stopped_after:.2f} s more, as if to the end"


async def publish_to_scorer_feedback(amqp_url: str, *events: m.RequestFinished) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for event in events:
            await amqp.publish(channel.default_exchange, event, topology.SCORER_FEEDBACK_QUEUE)
    finally:
        await connection.close()


def test_a_redelivered_completion_is_learned_once(echo_system, echo_client):
    """The scorer learns each real output length once: the same completion event again
    (as when a scorer died after learning it and before acking it) changes nothing."""
    store = redis.Redis.from_url(echo_system.redis_url)
    state = keys.predictor_state(DEFAULT_MODEL_NAME)

    def learned() -> float:
        return float(store.hget(state, "n") or 0)

    def wait_for(request_id: str) -> None:
        deadline = time.monotonic() + 15
        while not store.hexists(keys.request_markers(request_id), keys.MARKER_LEARNED):
            assert time.monotonic() < deadline, f"{request_id} was never learned"
            time.sleep(0.05)

    try:
        response = httpx.post(f"{echo_system.gateway_url}/v1/completions", timeout=30,
                              headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"},
                              json={"model": DEFAULT_MODEL_NAME, "prompt": "learn me once",
                                    "max_tokens": 50, "stop": [" once"]})
        assert response.json()["choices"][0]["finish_reason"] == "stop"  # a real length
        request_id = response.headers["x-request-id"]
        wait_for(request_id)
        before = learned()

        def finished(rid: str) -> m.RequestFinished:
            return m.RequestFinished(
                request_id=rid, tenant="acme", worker_id="echo", model=DEFAULT_MODEL_NAME,
                pool="cpu", finish_reason="stop", prompt_tokens=4, output_tokens=2,
                score=m.LengthScore(uncertainty=0.5, p10=2, p50=7, p90=20), prompt="learn me once")

        probe = f"learn-probe-{time.time_ns()}"
        asyncio.run(publish_to_scorer_feedback(echo_system.amqp_url, finished(request_id),
                                               finished(probe)))
        wait_for(probe)
        deadline = time.monotonic() + 15
        while "predictor_duplicates_skipped" not in echo_system.log("echo-scorer"):
            assert time.monotonic() < deadline, "the duplicate was never seen"
            time.sleep(0.05)
        assert learned() == before + 1
    finally:
        store.close()


VLLM_NAMES = {
    "echo-gateway": ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                     "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                     "vllm:request_success_total", "vllm:request_time_per_output_token_seconds_bucket",
                     "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket"],
    "echo-cpu-worker": ["vllm:num_requests_running", "vllm:num_requests_waiting",
                        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                        "vllm:num_preemptions_total", "vllm:kv_cache_usage_perc",
                        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"],
    "echo-scheduler": ["vllm:num_requests_waiting"],
}
FAIRWAY_NAMES = {
    "echo-scheduler": ['fairway:tenant_served_tokens_total{tenant="acme"}',
                       'fairway:tenant_virtual_token_counter{tenant="acme"}',
                       'fairway:queue_depth{tenant="acme"}', 'fairway:pool_requests_inflight{pool="cpu"}',
                       'fairway:placements_total{pool="cpu"}',
                       'fairway:tenant_queue_time_seconds_count{tenant="acme"}'],
    "echo-scorer": ["fairway:predicted_output_tokens_bucket", "fairway:actual_output_tokens_bucket",
                    "fairway:output_length_actual_over_predicted_bucket",
                    'fairway:messages_dead_lettered_total{queue="fairway.scorer",reason="invalid_message"}'],
    "echo-gateway": ["fairway:gateway_requests_in_flight",
                     'fairway:tenant_time_to_first_token_seconds_count{model_name="fairway-tiny-llama",tenant="acme"}',
                     'fairway:tenant_e2e_request_latency_seconds_count{model_name="fairway-tiny-llama",tenant="acme"}'],
}


async def publish_garbage(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"not msgpack"), topology.SUBMIT_ROUTING_KEY)
    finally:
        await connection.close()


async def test_a_resume_point_that_cannot_be_used_falls_back_to_the_whole_answer(echo_system):
    """A resume point the worker cannot read, or one its engine cannot continue (here it
    says the whole answer was already sent), is no error for the client: the request is
    answered in full from the start, and the problem is logged."""
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    prompt = "start again from the top"
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode([ids[i % len(ids)] for i in range(12)], skip_special_tokens=True)
    store = redis.asyncio.Redis.from_url(echo_system.redis_url)
    try:
        async with AmqpClient(echo_system.amqp_url) as client:
            unreadable, complete = (client.completion(DEFAULT_MODEL_NAME, prompt, max_tokens=12,
                                                      ignore_eos=True) for _ in range(2))
            await store.set(keys.work_resume(unreadable.request_id), b"not msgpack")
            await store.set(keys.work_resume(complete.request_id), m.encode(m.ResumePoint(
                request_id=complete.request_id, worker_id="cpu-gone", output_token_ids=ids[:1] * 12,
                streamed_chars=5)))
            for request in (unreadable, complete):
                request.tenant = "acme"  # guest is a trusted publisher, as the gateway is
                replies = [reply async for reply in client.submit(request)]
                text = "".join(r.text for r in replies if isinstance(r, m.TokenChunk))
                final = replies[-1]
                assert (final.finish_reason, final.completion_tokens, text) == ("length", 12, expected)
    finally:
        await store.aclose()
    events = [json.loads(line) for line in echo_system.log("echo-cpu-worker").splitlines()
              if "resume_point_unreadable" in line or "resume_rejected" in line]
    assert [(e["event"], e["request_id"]) for e in events] == [
        ("resume_point_unreadable", unreadable.request_id), ("resume_rejected", complete.request_id)]


def scrape(echo_system: System, name: str) -> str:
    if name == "echo-gateway":
        url = f"{echo_system.gateway_url}/metrics"
    else:
        url = f"http://127.0.0.1:{echo_system.metrics_ports[name]}/metrics"
    return httpx.get(url, timeout=5).text


def test_metrics_names_after_traffic(echo_system, echo_client):
    for i in range(3):
        echo_client.completions.create(model=DEFAULT_MODEL_NAME, prompt=f"metrics {i}", max_tokens=2)
    asyncio.run(publish_garbage(echo_system.amqp_url))  # the scorer dead-letters it
    deadline = time.monotonic() + 15  # state gauges are refreshed every 0.5 s / heartbeat
    while True:
        texts = {name: scrape(echo_system, name) for name in
                 ("echo-gateway", "echo-scheduler", "echo-scorer", "echo-cpu-worker")}
        missing = [f"{name}: {metric}" for names in (VLLM_NAMES, FAIRWAY_NAMES)
                   for name, metrics in names.items() for metric in metrics
                   if metric not in texts[name]]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing
    assert f'model_name="{DEFAULT_MODEL_NAME}"' in texts["echo-cpu-worker"]
    served = [line for line in texts["echo-scheduler"].splitlines()
              if line.startswith('fairway:tenant_served_tokens_total{tenant="acme"}')]
    assert float(served[0].split()[-1]) > 0


@pytest.mark.parametrize("how", ["sigterm_twice", "sigkill"])
def test_a_request_whose_worker_stops_is_continued_not_regenerated(echo_system, how):
    """The worker streaming a long answer stops: with a SIGTERM and a second one that cuts
    its drain short, it leaves a resume point as it hands the request back; killed, it
    has left one (kept every 0.5 s) before. The other worker continues the answer from
    the point, without generating the first part again. After a drain the caller gets
    the exact echo, each token once (after a kill, the tokens between the point and the
    kill are generated again and the caller drops them by sequence number)."""
    tokenizer = load_tokenizer(resolve_model_path(None, echo_system.cache_dir))
    slow = {"FAIRWAY_ECHO_TOKENS_PER_S": "100", "FAIRWAY_WORKER_DRAIN_S": "30"}
    names = ["echo-cpu-worker", "echo-cpu-worker-b"]
    echo_system.signal("echo-cpu-worker")
    for name in names:
        echo_system.start("cpu-worker", name=name, **slow)
    store = redis.Redis.from_url(echo_system.redis_url)
    try:
        deadline = time.monotonic() + 60
        while {n.decode() for n in store.hkeys(keys.WORKERS)} != {f"cpu-{n}" for n in names}:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        prompt = "Carry on from where the last worker stopped"
        ids = tokenizer.encode(prompt)
        n = 300  # 3 s at 100 tokens/s
        body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": n, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        text, chunks, usage, exit_code = "", 0, None, None
        for request_id, event in stream_events(echo_system, body):
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices"):
                text += event["choices"][0]["text"]
                chunks += 1
                if chunks == (50 if how == "sigterm_twice" else 100):
                    victim = claimant_worker_id(store.hget(keys.request_markers(request_id),
                                                           keys.MARKER_CLAIM)).removeprefix("cpu-")
                    proc = echo_system.procs.pop(victim)
                    if how == "sigterm_twice":
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.5)  # draining: it would wait 30 s for the request
                        proc.send_signal(signal.SIGTERM)
                    else:
                        proc.kill()
                    exit_code = proc.wait(10)
                    signalled = time.monotonic()
        finished_after = time.monotonic() - signalled
        assert usage["completion_tokens"] == n
        if how == "sigterm_twice":
            assert exit_code == 0 and "shutdown_hurried" in echo_system.log(victim)
            assert text == tokenizer.decode([ids[i % len(ids)] for i in range(n)], skip_special_tokens=True)
        survivor = next(name for name in names if name != victim)
        resumed = [e for e in (json.loads(line) for line in echo_system.log(survivor).splitlines()
                               if '"resumed"' in line) if e["request_id"] == request_id]
        assert [e["handed_back_by"] for e in resumed] == [f"cpu-{victim}"]
        assert resumed[0]["output_tokens"] >= 40  # a point at most about 0.5 s older than the stop
        # The rest only: a regeneration would take the whole 3 s again.
        assert finished_after < (n - resumed[0]["output_tokens"]) / 100 + 1.5, finished_after
        deadline = time.monotonic() + 5  # deleted after the ack, which follows the answer
        while store.exists(keys.work_resume(request_id)):
            assert time.monotonic() < deadline, "an answered request's resume point stays"
            time.sleep(0.05)
    finally:
        store.close()
        for name in names:
            if name in echo_system.procs:
                echo_system.signal(name)
        echo_system.start("cpu-worker", name="echo-cpu-worker")
        echo_system.wait_ready()
