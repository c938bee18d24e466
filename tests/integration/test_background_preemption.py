"""A foreground request that finds the only slot held by a background (batch) request
has it handed back: the real scheduler process asks, a real worker (echo engine, one
slot) hands it back to the scheduler's queue with a resume point, the foreground
request runs, and the background one continues where it was, its caller getting every
token once. Real RabbitMQ and Redis, on their own vhost and database."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest
import redis.asyncio as aioredis

from services import amqp, keys, topology
from services import messages as m
from services.settings import Settings
from services.worker import WorkerService
from tests.integration.system import System, own_redis_db, own_vhost
from tests.integration.test_worker_resume import delivered

pytestmark = pytest.mark.integration

PROMPT_TOKEN_IDS = [1, 215, 308, 47, 1022, 96, 513, 77]
TOKENS_PER_S = 40.0


def scored(rid: str, tenant: str, reply_to: str, max_tokens: int, background: bool) -> m.ScoredRequest:
    request = m.CompletionRequest(request_id=rid, tenant=tenant, model="fairway-tiny-llama",
                                  prompt="echo me", reply_to=reply_to, background=background,
                                  created=time.time(),
                                  sampling=m.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return m.ScoredRequest(request_id=rid, request=request, prompt_token_ids=PROMPT_TOKEN_IDS,
                           score=m.LengthScore(uncertainty=0.1, p10=max_tokens, p50=max_tokens,
                                               p90=max_tokens))


class Caller:
    """One reply queue; every reply, by request, with when it came."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.replies: dict[str, list[m.TokenChunk | m.FinalAnswer]] = {}
        self.finished_at: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        reply = m.decode(message.body)
        self.replies.setdefault(reply.request_id, []).append(reply)
        if isinstance(reply, m.FinalAnswer):
            self.finished_at.setdefault(reply.request_id, time.monotonic())
        self.changed.set()

    async def wait(self, done, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


async def test_a_foreground_request_takes_the_slot_of_a_background_one_which_then_continues(
        rabbit_server, redis_server, model_cache, tmp_path):
    amqp_url = own_vhost(rabbit_server, "preempt")
    redis_url = own_redis_db(redis_server, 7)
    redis = aioredis.from_url(redis_url)
    await redis.flushdb()
    system = System(amqp_url=amqp_url, redis_url=redis_url, cache_dir=model_cache, log_dir=tmp_path,
                    extra_env={"FAIRWAY_PREEMPT_BACKGROUND_AFTER_S": "0"})
    settings = Settings(amqp_url=amqp_url, redis_url=redis_url, cache_dir=model_cache, engine="echo",
                        echo_tokens_per_s=TOKENS_PER_S, instance_id="preempt-test", metrics_port=0,
                        max_running=1, heartbeat_interval_s=0.2)
    worker = WorkerService(settings, "cpu", "cpu")
    connection = await aio_pika.connect(amqp_url)
    try:
        await worker.start()
        system.start("scheduler")
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        caller = Caller(queue)
        await queue.consume(caller.on_message, no_ack=True)
        scored_exchange = await channel.get_exchange(topology.SCORED_EXCHANGE)

        batch, chat = f"batch-{uuid.uuid4().hex}", f"chat-{uuid.uuid4().hex}"
        await amqp.publish(scored_exchange, scored(batch, "acme", queue.name, 120, background=True),
                           topology.SUBMIT_ROUTING_KEY)
        await caller.wait(lambda: len(delivered(caller.replies.get(batch, []))[0]) >= 10)
        await amqp.publish(scored_exchange, scored(chat, "globex", queue.name, 8, background=False),
                           topology.SUBMIT_ROUTING_KEY)
        await caller.wait(lambda: chat in caller.replies)
        # A foreground request is never handed back, whoever asks.
        control = await channel.get_exchange(topology.CONTROL_EXCHANGE)
        await amqp.publish(control, m.PreemptRequest(request_id=chat), "")
        await caller.wait(lambda: {batch, chat} <= set(caller.finished_at))
        assert [r.token_offset for r in caller.replies[chat]].count(0) == 1

        # Without the hand-back the chat request would have waited for the batch's 120
        # tokens at 40 per second; it ran while the batch request waited.
        assert caller.finished_at[chat] < caller.finished_at[batch]
        chat_final = caller.replies[chat][-1]
        assert (chat_final.finish_reason, chat_final.completion_tokens) == ("length", 8)
        batch_final = caller.replies[batch][-1]
        assert (batch_final.finish_reason, batch_final.completion_tokens) == ("length", 120)
        tokens, text = delivered(caller.replies[batch])
        assert len(tokens) == 120 and text
        # The second run started from the resume point: it sent the caller what it had
        # from the start once, then the rest (a restart from scratch sends no such chunk).
        restarts = [r for r in caller.replies[batch][1:]
                    if isinstance(r, m.TokenChunk) and r.token_offset == 0]
        assert len(restarts) == 1 and len(restarts[0].token_ids) >= 10
        assert "preempting_background" in system.log("scheduler")
        # Settled: nothing queued or in flight, the batch charged its input once.
        await asyncio.sleep(0.5)
        assert await redis.hlen(keys.SCHED_INFLIGHT) == 0
        assert await redis.hlen(keys.SCHED_QUEUED) == 0
        served = {k.decode(): float(v) for k, v in (await redis.hgetall(keys.SCHED_SERVED)).items()}
        assert served == {"acme": len(PROMPT_TOKEN_IDS) + 2.0 * 120, "globex": len(PROMPT_TOKEN_IDS) + 2.0 * 8}
    finally:
        await connection.close()
        system.stop_all()
        worker.hurry()
        await worker.stop()
        await redis.aclose()
