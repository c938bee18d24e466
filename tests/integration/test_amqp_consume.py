"""The consume wrapper on a real broker: retries with backoff, then one error answer and
the dead-letter queue for a message whose handler fails on every delivery, and the
consumer keeps consuming; a handler that Redis cannot serve is run again in place, for
as long as that lasts, at no cost in deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import aio_pika
import pytest
from aiormq.exceptions import ChannelInvalidStateError
from redis import exceptions as redis_errors
from structlog.testing import capture_logs

from services import amqp, topology
from services import messages as m

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def consumed_queue(amqp_url: str):
    """A fresh quorum queue to consume (deleted after) and an exclusive reply queue."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        await topology.declare(channel)
        name = f"test.consume.{uuid.uuid4().hex[:8]}"
        queue = await channel.declare_queue(name, durable=True, arguments=topology.quorum_arguments())
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        yield channel, queue, replies
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


def request(rid: str, reply_to: str) -> m.CompletionRequest:
    return m.CompletionRequest(request_id=rid, model="tiny", prompt="x", reply_to=reply_to)


async def test_a_message_failing_every_delivery_gets_one_error_and_is_dead_lettered(amqp_url):
    async with consumed_queue(amqp_url) as (channel, queue, replies):
        name = queue.name
        calls: dict[str, list[float]] = {}
        handled = asyncio.Event()

        async def handler(msg: m.CompletionRequest, message) -> None:
            calls.setdefault(msg.request_id, []).append(time.monotonic())
            if msg.request_id.startswith("poison"):
                raise RuntimeError("this handler always fails on it")
            await message.ack()
            handled.set()

        await amqp.consume(channel, queue, m.CompletionRequest, handler, service="test",
                           delivery_limit=2)
        poison = f"poison-{uuid.uuid4().hex}"
        await amqp.publish(channel.default_exchange, request(poison, replies.name), name)

        answer = await _get(replies, timeout=20)
        final = m.decode(answer.body, m.FinalAnswer)
        assert (final.request_id, final.finish_reason) == (poison, "error")
        assert (final.error.status, final.error.code) == (500, "internal_error")
        times = calls[poison]
        assert len(times) == 3  # deliveries 0, 1 and 2 (the last one the limit allows)
        assert times[1] - times[0] >= amqp.retry_delay_s(0) * 0.9  # backed off, not hot-looped
        assert times[2] - times[1] >= amqp.retry_delay_s(1) * 0.9
        assert await _get(replies, timeout=1, fail=False) is None  # one answer only

        dead = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        assert await _find(dead, poison, timeout=10), "not dead-lettered"

        # The consumer is still there.
        await amqp.publish(channel.default_exchange, request("good", replies.name), name)
        await asyncio.wait_for(handled.wait(), 10)


async def test_a_handler_redis_cannot_serve_runs_again_in_place_without_spending_deliveries(
        amqp_url, monkeypatch):
    monkeypatch.setattr(amqp, "dependency_retry_delay_s", lambda attempt: 0.02)
    async with consumed_queue(amqp_url) as (channel, queue, replies):
        name = queue.name
        runs: list[tuple[int, int]] = []
        handled = asyncio.Event()
        outage = [redis_errors.ConnectionError("Connection refused"),
                  redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
                  redis_errors.ReadOnlyError("You can't write against a read only replica."),
                  redis_errors.TimeoutError("Timeout reading from socket"), TimeoutError()] * 2

        async def handler(msg: m.CompletionRequest, message) -> None:
            runs.append((message.delivery_tag, amqp.delivery_count(message)))
            if outage:
                raise outage.pop(0)
            await message.ack()
            handled.set()

        await amqp.consume(channel, queue, m.CompletionRequest, handler, service="test",
                           delivery_limit=2)
        rid = f"outage-{uuid.uuid4().hex}"
        await amqp.publish(channel.default_exchange, request(rid, replies.name), name)
        await asyncio.wait_for(handled.wait(), 20)
        # Eleven runs (more than the two deliveries the limit allows), all of one delivery.
        assert len(runs) == 11 and set(runs) == {runs[0]} and runs[0][1] == 0, runs
        assert await _get(replies, timeout=1, fail=False) is None  # no error answer
        dead = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        assert not await _find(dead, rid, timeout=1)


async def taken_elsewhere(amqp_url: str, first_handler, held_s: float) -> tuple[list[str], bool]:
    """One request to ``first_handler``, consuming on a channel of its own; after
    ``held_s`` another consumer starts and that channel closes (if it is still open), and
    the request must reach the other consumer. Returns the events logged meanwhile and
    whether an error answer came back."""
    async with consumed_queue(amqp_url) as (channel, queue, replies):
        connection = await aio_pika.connect(amqp_url)
        try:
            first = await connection.channel()
            taken = asyncio.Event()

            async def take(msg: m.CompletionRequest, message) -> None:
                await message.ack()
                taken.set()

            with capture_logs() as logs:
                await amqp.consume(first, await first.get_queue(queue.name), m.CompletionRequest,
                                   lambda msg, message: first_handler(first, msg, message),
                                   service="test")
                rid = f"elsewhere-{uuid.uuid4().hex}"
                await amqp.publish(channel.default_exchange, request(rid, replies.name), queue.name)
                await asyncio.sleep(held_s)
                await amqp.consume(channel, queue, m.CompletionRequest, take, service="test")
                if not first.is_closed:
                    await first.close()
                await asyncio.wait_for(taken.wait(), 10)
            return [e["event"] for e in logs], await _get(replies, 0.5, fail=False) is not None
        finally:
            await connection.close()


async def test_a_handed_back_message_waits_for_its_channel_to_close_then_goes_elsewhere(amqp_url):
    """HandBack (a scheduler replica that lost its term): no error, and no nack that would
    bounce the message straight back to the same consumer; once that consumer's channel
    closes, the broker delivers it to another."""
    seen: list[int] = []

    async def hand_back(_channel, msg: m.CompletionRequest, message) -> None:
        seen.append(amqp.delivery_count(message))
        raise amqp.HandBack("not the leader")

    events, error_answer = await taken_elsewhere(amqp_url, hand_back, held_s=1.0)
    assert seen == [0]  # held for the whole second, not bounced back and forth
    assert "message_left_to_broker" in events and "handler_failed" not in events, events
    assert not error_answer


async def test_a_handler_whose_channel_closed_with_the_link_is_left_to_the_broker(amqp_url):
    """The broker link dropped under a handler (its channel is closed): an outage, not a
    fault of the message. No traceback, no error answer; the broker delivers it again."""

    async def link_drops(channel, msg: m.CompletionRequest, message) -> None:
        await channel.close()
        raise ChannelInvalidStateError("closed")

    events, error_answer = await taken_elsewhere(amqp_url, link_drops, held_s=0.5)
    assert "handler_link_down" in events and "handler_failed" not in events, events
    assert not error_answer


def test_link_down_is_the_broker_link_only():
    from aiormq.exceptions import AMQPConnectionError, ConnectionClosed

    assert amqp.link_down(ChannelInvalidStateError("closed"))
    assert amqp.link_down(ConnectionClosed(320, "CONNECTION_FORCED"))
    assert amqp.link_down(AMQPConnectionError("Server connection unexpectedly closed"))
    assert amqp.link_down(ConnectionResetError())
    assert not amqp.link_down(RuntimeError("a bug"))
    assert not amqp.link_down(redis_errors.ConnectionError("Connection refused"))
    assert not amqp.link_down(m.MessageError("bad"))


def test_dependency_retry_backs_off_to_a_cap():
    delays = [amqp.dependency_retry_delay_s(a) for a in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == amqp.RETRY_BASE_S
    assert delays[-1] == amqp.DEPENDENCY_RETRY_MAX_S


def test_delivery_count_and_reply_target():
    class Incoming:
        def __init__(self, headers, reply_to=None):
            self.headers, self.reply_to = headers, reply_to

    assert amqp.delivery_count(Incoming({"x-delivery-count": 3})) == 3
    assert amqp.delivery_count(Incoming(None)) == 0
    assert amqp.delivery_count(Incoming({"x-delivery-count": "3"})) == 0
    assert amqp.retry_delay_s(0) < amqp.retry_delay_s(2) <= amqp.RETRY_MAX_S
    assert amqp.retry_delay_s(50) == amqp.RETRY_MAX_S
    req = request("r", "from-body")
    scored = m.ScoredRequest(request_id="r", request=req, prompt_token_ids=[1],
                             score=m.LengthScore(uncertainty=0, p10=1, p50=1, p90=1))
    item = m.WorkItem(request_id="r", scored=scored, pool="cpu", dispatched_at=0)
    assert amqp.reply_target(req, Incoming({}, "from-property")) == "from-property"
    assert amqp.reply_target(req, Incoming({})) == "from-body"
    assert amqp.reply_target(scored, Incoming({})) == "from-body"
    assert amqp.reply_target(item, Incoming({})) == "from-body"


async def _get(queue, timeout: float, fail: bool = True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    if fail:
        raise TimeoutError("nothing arrived")
    return None


async def _find(queue, ident: str, timeout: float) -> bool:
    """Whether a dead letter with ``ident`` as its message id (set by the test's own
    publish) or its correlation id (our services' publishes: the request id) arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        letter = await queue.get(no_ack=True, fail=False)
        if letter is None:
            await asyncio.sleep(0.1)
        elif ident in (letter.message_id, letter.correlation_id):
            return True
    return False


async def test_every_chunk_returned_unroutable_reaches_the_return_callbacks(amqp_url):
    """A worker learns that a caller is gone from its token chunks coming back unroutable;
    with a stream's chunks published together, each return must reach the callbacks (and
    none be logged as an unhandled message), which needs a message id per publish."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        returned: list[tuple[str | None, int]] = []
        channel.return_callbacks.add(lambda _channel, message: returned.append(
            (m.peek_request_id(message.body), m.decode(message.body, m.TokenChunk).token_offset)))
        gone = f"fairway.replies.nobody.{uuid.uuid4().hex[:8]}"  # no such queue
        await asyncio.gather(*(
            amqp.reply(channel, gone, m.TokenChunk(request_id="r1", token_offset=i, text_offset=i,
                                                   text="x", token_ids=[7]), mandatory=True)
            for i in range(5)))
        async with asyncio.timeout(5):
            while len(returned) < 5:
                await asyncio.sleep(0.02)
        assert sorted(returned) == [("r1", i) for i in range(5)]
    finally:
        await connection.close()
