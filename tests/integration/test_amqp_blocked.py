"""A broker alarm as a publisher sees it, on a real broker: RabbitMQ blocks a connection
as it first publishes during a memory alarm, ``publishing_blocked`` reads that at once
(the gateway then refuses requests with a 503 instead of letting each wait out its
publish timeout), and reads it clear when the alarm ends."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from services import amqp
from services.localinfra import memory_alarm
from tests.waits import until

pytestmark = pytest.mark.integration


async def test_a_publisher_blocked_by_a_memory_alarm_is_seen_blocked_until_it_clears(
        rabbit_server, amqp_url):
    publisher = await aio_pika.connect_robust(amqp_url)
    quiet = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"test.blocked.{uuid.uuid4().hex[:8]}", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), queue.name, timeout=5)
        assert not amqp.publishing_blocked(publisher)
        assert not amqp.publishing_blocked(None)  # no connection yet: not blocked, not connected
        async with memory_alarm(rabbit_server):
            held = asyncio.ensure_future(
                channel.default_exchange.publish(aio_pika.Message(b"during"), queue.name, timeout=30))
            await until(lambda: amqp.publishing_blocked(publisher), timeout_s=10)
            assert not held.done()  # the broker holds the publish unconfirmed
            assert not amqp.publishing_blocked(quiet)  # only a connection that publishes
        await held  # confirmed once the alarm cleared: nothing was lost
        await until(lambda: not amqp.publishing_blocked(publisher), timeout_s=10)
        assert (await queue.declare()).message_count == 2
    finally:
        await quiet.close()
        await publisher.close()
