"""A worker that continues a handed-back request sends its caller again, from the start,
what the earlier workers sent (the tokens and text of the resume point), then goes on:
a caller that lost part of it (dropped from its reply queue in a broker restart) gets it
back. A real worker process's code (echo engine) on its own vhost and Redis database."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest
import redis.asyncio as aioredis

from services import amqp, keys, topology
from services import messages as m
from services.replies import ReplyStream
from services.settings import Settings
from services.worker import WorkerService
from tests.integration.system import own_redis_db, own_vhost

pytestmark = pytest.mark.integration

MAX_TOKENS = 12
PROMPT_TOKEN_IDS = [1, 215, 308, 47, 1022, 96, 513, 77]  # within the tiny model's vocabulary


def work_item(request_id: str, reply_to: str, echo_ids: bool = False, return_token_ids: bool = False,
              **sampling) -> m.WorkItem:
    """``echo_ids``: the prompt came as token ids and asked to be echoed (the scorer put
    their text in ``prompt``); ``return_token_ids``: the caller wants the prompt's ids."""
    request = m.CompletionRequest(request_id=request_id, tenant="acme", model="fairway-tiny-llama",
                                  prompt="echo me", reply_to=reply_to,
                                  prompt_token_ids=PROMPT_TOKEN_IDS if echo_ids else None, echo=echo_ids,
                                  return_token_ids=return_token_ids,
                                  sampling=m.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                            **sampling))
    scored = m.ScoredRequest(request_id=request_id, request=request, prompt_token_ids=PROMPT_TOKEN_IDS,
                             score=m.LengthScore(uncertainty=0.5, p10=4, p50=8, p90=12))
    return m.WorkItem(request_id=request_id, scored=scored, pool="cpu", dispatched_at=time.time())


async def answer(channel, queue, item: m.WorkItem) -> list[m.TokenChunk | m.FinalAnswer]:
    """Every reply a work item gets, up to its final answer."""
    replies: asyncio.Queue = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        replies.put_nowait(m.decode(message.body))

    tag = await queue.consume(on_message, no_ack=True)
    work = await channel.get_exchange(topology.WORK_EXCHANGE)
    await amqp.publish(work, item, "cpu")
    got = []
    async with asyncio.timeout(60):
        while not got or not isinstance(got[-1], m.FinalAnswer):
            got.append(await replies.get())
    await queue.cancel(tag)
    return got


def delivered(replies, logprobs: list | None = None, prompt: list | None = None) -> tuple[list[int], str]:
    """Tokens and text a caller gets (and, into the lists given, their log-probabilities
    and the prompt's)."""
    stream = ReplyStream("r")
    for reply in replies:
        stream.offer(reply)
    tokens, text = [], ""
    while stream.ready:
        item = stream._queue.get_nowait()
        if isinstance(item, m.TokenChunk):
            tokens += item.token_ids
            text += item.text
            if logprobs is not None:
                logprobs += item.logprobs
            if prompt is not None:
                prompt += item.prompt_logprobs
    return tokens, text


@pytest.mark.parametrize("with_logprobs", [False, True], ids=["tokens", "logprobs"])
async def test_a_resumed_request_sends_what_its_caller_was_sent_again_then_the_rest(
        rabbit_server, redis_server, model_cache, with_logprobs):
    """With log-probabilities asked for (and a token-id prompt's echo), they come along:
    each token's exactly once, and the prompt's (and its text) once, however the answer
    was cut between workers."""
    sampling = ({"logprobs": 1, "prompt_logprobs": 0, "echo_ids": True, "return_token_ids": True}
                if with_logprobs else {})
    echoed = "echo me" if with_logprobs else None
    prompt_ids = PROMPT_TOKEN_IDS if with_logprobs else None
    settings = Settings(amqp_url=own_vhost(rabbit_server, "worker-resume"),
                        redis_url=own_redis_db(redis_server, 6), cache_dir=model_cache,
                        engine="echo", echo_tokens_per_s=100.0, instance_id="resume-test",
                        metrics_port=0)
    worker = WorkerService(settings, "cpu", "cpu")
    await worker.start()
    redis = aioredis.from_url(settings.redis_url)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        whole = await answer(channel, queue,
                             work_item(f"whole-{uuid.uuid4().hex}", queue.name, **sampling))
        logprobs: list = []
        prompt: list = []
        tokens, text = delivered(whole, logprobs, prompt)
        assert len(tokens) == MAX_TOKENS and text
        assert len(logprobs) == (MAX_TOKENS if with_logprobs else 0)
        assert len(prompt) == (len(PROMPT_TOKEN_IDS) if with_logprobs else 0)
        assert [r.echoed_prompt for r in whole] == [echoed] + [None] * (len(whole) - 1)
        assert [r.prompt_token_ids for r in whole] == [prompt_ids] + [None] * (len(whole) - 1)

        # Another request like it was handed back once its caller had the first chunks
        # (about half the answer).
        sent_tokens, sent, sent_logprobs = [], "", []
        for chunk in (r for r in whole if isinstance(r, m.TokenChunk)):
            if len(sent_tokens) >= MAX_TOKENS // 2:
                break
            sent_tokens, sent = sent_tokens + chunk.token_ids, sent + chunk.text
            sent_logprobs += chunk.logprobs
        assert 0 < len(sent_tokens) < MAX_TOKENS
        rid = f"resumed-{uuid.uuid4().hex}"
        point = m.ResumePoint(request_id=rid, worker_id="cpu-gone", output_token_ids=sent_tokens,
                              streamed_chars=len(sent), streamed_text=sent,
                              output_logprobs=sent_logprobs, prompt_logprobs=prompt)
        await redis.set(keys.work_resume(rid), m.encode(point))
        resumed = await answer(channel, queue, work_item(rid, queue.name, **sampling))
        first = resumed[0]
        assert (first.token_offset, first.text_offset, first.token_ids, first.text) == (0, 0, sent_tokens, sent)
        assert (first.logprobs, first.prompt_logprobs, first.echoed_prompt, first.prompt_token_ids) == (
            sent_logprobs, prompt, echoed, prompt_ids)
        # The rest is generated after the point, not again (nor the prompt's logprobs).
        assert all(r.token_offset >= len(sent_tokens) and not r.prompt_logprobs
                   and r.echoed_prompt is None and r.prompt_token_ids is None for r in resumed[1:])
        again: list = []
        again_prompt: list = []
        assert delivered(resumed, again, again_prompt) == (tokens, text)
        assert (again, again_prompt) == (logprobs, prompt)
        assert resumed[-1].finish_reason == "length"
    finally:
        await connection.close()
        await redis.aclose()
        worker.hurry()
        await worker.stop()
