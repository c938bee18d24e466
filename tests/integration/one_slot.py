"""The real scheduler process beside a real worker with one slot (echo engine, in this
process), on their own RabbitMQ vhost and Redis database: tests publish scored requests
straight to the scheduler and watch the order their answers come in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import redis.asyncio as aioredis

from services import amqp, topology
from services import messages as m
from services.settings import Settings
from services.worker import WorkerService
from tests.integration.system import System, own_redis_db, own_vhost

PROMPT_TOKEN_IDS = [1, 215, 308, 47, 1022, 96, 513, 77]
TOKENS_PER_S = 40.0


def scored(rid: str, tenant: str, reply_to: str, max_tokens: int, background: bool = False,
           priority: int = 0) -> m.ScoredRequest:
    request = m.CompletionRequest(request_id=rid, tenant=tenant, model="fairway-tiny-llama",
                                  prompt="echo me", reply_to=reply_to, background=background,
                                  priority=priority, created=time.time(),
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


@dataclass
class OneSlot:
    system: System
    redis: aioredis.Redis
    channel: aio_pika.abc.AbstractChannel
    caller: Caller
    scored_exchange: aio_pika.abc.AbstractExchange

    async def submit(self, rid: str, tenant: str, max_tokens: int, **fields: object) -> None:
        """Publish a scored request for the scheduler, its answer to :attr:`caller`."""
        request = scored(rid, tenant, self.caller.queue.name, max_tokens, **fields)
        await amqp.publish(self.scored_exchange, request, topology.SUBMIT_ROUTING_KEY)


@asynccontextmanager
async def one_slot(rabbit_server, redis_server, model_cache, log_dir, *, vhost: str, db: int,
                   **scheduler_env: str) -> AsyncIterator[OneSlot]:
    amqp_url = own_vhost(rabbit_server, vhost)
    redis_url = own_redis_db(redis_server, db)
    redis = aioredis.from_url(redis_url)
    await redis.flushdb()
    system = System(amqp_url=amqp_url, redis_url=redis_url, cache_dir=model_cache, log_dir=log_dir,
                    extra_env=scheduler_env)
    settings = Settings(amqp_url=amqp_url, redis_url=redis_url, cache_dir=model_cache, engine="echo",
                        echo_tokens_per_s=TOKENS_PER_S, instance_id=f"{vhost}-test", metrics_port=0,
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
        exchange = await channel.get_exchange(topology.SCORED_EXCHANGE)
        yield OneSlot(system, redis, channel, caller, exchange)
    finally:
        await connection.close()
        system.stop_all()
        worker.hurry()
        await worker.stop()
        await redis.aclose()
