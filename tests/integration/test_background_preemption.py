"""A foreground request that finds the only slot held by a background (batch) request
has it handed back: the real scheduler process asks, a real worker (echo engine, one
slot) hands it back to the scheduler's queue with a resume point, the foreground
request runs, and the background one continues where it was, its caller getting every
token once. Real RabbitMQ and Redis, on their own vhost and database."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services import amqp, keys, topology
from services import messages as m
from tests.integration.one_slot import PROMPT_TOKEN_IDS, one_slot
from tests.integration.test_worker_resume import delivered

pytestmark = pytest.mark.integration


async def test_a_foreground_request_takes_the_slot_of_a_background_one_which_then_continues(
        rabbit_server, redis_server, model_cache, tmp_path):
    async with one_slot(rabbit_server, redis_server, model_cache, tmp_path, vhost="preempt", db=7,
                        FAIRWAY_PREEMPT_BACKGROUND_AFTER_S="0") as slot:
        caller, system, redis = slot.caller, slot.system, slot.redis
        batch, chat = f"batch-{uuid.uuid4().hex}", f"chat-{uuid.uuid4().hex}"
        await slot.submit(batch, "acme", 120, background=True)
        await caller.wait(lambda: len(delivered(caller.replies.get(batch, []))[0]) >= 10)
        await slot.submit(chat, "globex", 8)
        await caller.wait(lambda: chat in caller.replies)
        # A foreground request is never handed back, whoever asks.
        control = await slot.channel.get_exchange(topology.CONTROL_EXCHANGE)
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
