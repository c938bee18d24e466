"""Tenant isolation on the real broker, with the users ``services.provision`` creates.

A tenant's identity comes from authentication: RabbitMQ checks ``user_id`` against the
connection's user, the scorer takes the tenant from it, and a tenant's permissions let
it publish requests and use its own reply queues, nothing else. Every service of the
fault system runs as its own least-privilege user, so the other scenarios prove those
permissions suffice; this file proves what they refuse.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest
import redis.asyncio as aioredis

from services import amqp, keys, topology
from services import messages as m
from services.provision import SERVICE_USERS
from tests.faults.clients import MODEL, AmqpTenant
from tests.faults.conftest import password

pytestmark = pytest.mark.faults

REFUSED = (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
           aiormq.exceptions.ChannelNotFoundEntity, aio_pika.exceptions.ChannelClosed)


async def refused(url: str, action) -> str:
    """Run ``action(channel)`` on a fresh connection; the broker must refuse it."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        with pytest.raises(REFUSED) as info:
            await asyncio.wait_for(action(channel), 10)
        return str(info.value)
    finally:
        await connection.close()


def request(user_id_tenant: str = "", tenant: str = "") -> m.CompletionRequest:
    return m.CompletionRequest(request_id=f"iso-{user_id_tenant}-{id(object())}", tenant=tenant,
                               model=MODEL, prompt="who am I", sampling=m.SamplingParams(max_tokens=4))


async def publish_as(channel, claimed: str) -> None:
    exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
    await exchange.publish(amqp.to_amqp(request(claimed), user_id=claimed), topology.SUBMIT_ROUTING_KEY)


async def test_a_producer_cannot_claim_another_tenant(fault_system):
    url = fault_system.tenant_url("initech")
    for claimed in ("umbrella", SERVICE_USERS["gateway"]):
        message = await refused(url, lambda ch, c=claimed: publish_as(ch, c))
        assert "user_id" in message, message


async def test_the_tenant_field_is_ignored_and_the_authenticated_user_is_charged(fault_system, checker):
    served = aioredis.from_url(fault_system.system.redis_url)
    try:
        before = {k.decode(): float(v) for k, v in (await served.hgetall(keys.SCHED_SERVED)).items()}
        async with AmqpTenant(checker, fault_system.tenant_url("initech"), "initech") as producer:
            req = producer.client.completion(MODEL, "charge me", max_tokens=4, ignore_eos=True)
            req.tenant = "umbrella"  # a claim in the body: not trusted from a producer
            log = await producer.run(request=req)
        assert log.done
        await checker.quiesce()
        after = {k.decode(): float(v) for k, v in (await served.hgetall(keys.SCHED_SERVED)).items()}
    finally:
        await served.aclose()
    assert after.get("umbrella", 0.0) == before.get("umbrella", 0.0)
    charged = after["initech"] - before.get("initech", 0.0)
    assert charged == pytest.approx(log.done.prompt_tokens + 2 * log.done.completion_tokens)


async def test_a_publisher_without_user_id_gets_a_401(fault_system):
    connection = await aio_pika.connect(fault_system.tenant_url("initech"))
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(topology.reply_queue("initech.anon"), exclusive=True)
        exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
        await exchange.publish(amqp.to_amqp(request(), reply_to=replies.name), topology.SUBMIT_ROUTING_KEY)
        answer = None
        for _ in range(200):
            answer = await replies.get(no_ack=True, fail=False)
            if answer is not None:
                break
            await asyncio.sleep(0.1)
        assert answer is not None, "no answer"
        final = m.decode(answer.body, m.FinalAnswer)
        assert (final.finish_reason, final.error.status, final.error.code) == ("error", 401, "unauthenticated")
    finally:
        await connection.close()


async def test_a_tenant_can_touch_nothing_but_its_own_replies_and_the_requests_exchange(fault_system,
                                                                                       checker):
    url = fault_system.tenant_url("initech")

    async def consume(name):
        async def action(channel):
            queue = await channel.get_queue(name, ensure=False)
            await queue.consume(lambda message: None)
        return action

    async def declare(name):
        async def action(channel):
            await channel.declare_queue(name, exclusive=True)
        return action

    async def publish(exchange_name, key="x"):
        async def action(channel):
            exchange = (channel.default_exchange if exchange_name == "" else
                        await channel.get_exchange(exchange_name, ensure=False))
            await exchange.publish(amqp.to_amqp(m.CancelRequest(request_id="r", tenant="umbrella"),
                                                user_id="initech"), key)
        return action

    async with AmqpTenant(checker, fault_system.tenant_url("umbrella"), "umbrella") as other:
        other_queue = other.client.reply_queue.name
        attempts = {
            "read another tenant's replies": await consume(other_queue),
            "declare a queue in another tenant's name": await declare(topology.reply_queue("umbrella.mine")),
            "cancel (publish to the control exchange)": await publish(topology.CONTROL_EXCHANGE),
            "publish straight into a queue (default exchange)": await publish("", topology.work_queue("cpu")),
            "publish scored work": await publish(topology.SCORED_EXCHANGE, topology.SUBMIT_ROUTING_KEY),
            "read work items": await consume(topology.work_queue("cpu")),
            "read the dead letters": await consume(topology.DEAD_LETTER_QUEUE),
            "declare a shared queue": await declare(topology.SCORER_QUEUE),
        }
        for what, action in attempts.items():
            message = await refused(url, action)
            assert "ACCESS_REFUSED" in message or "RESOURCE_LOCKED" in message, (what, message)


async def test_service_users_are_confined_too(fault_system):
    port = fault_system.rabbit.port

    def url(service):
        user = SERVICE_USERS[service]
        return f"amqp://{user}:{password(user)}@127.0.0.1:{port}/fairway"

    async def consume_work(channel):
        queue = await channel.get_queue(topology.work_queue("cpu"), ensure=False)
        await queue.consume(lambda message: None)

    async def submit(channel):
        exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b"x"), topology.SUBMIT_ROUTING_KEY)

    async def delete_scorer_queue(channel):
        await channel.queue_delete(topology.SCORER_QUEUE)

    assert "ACCESS_REFUSED" in await refused(url("scorer"), consume_work)
    assert "ACCESS_REFUSED" in await refused(url("worker"), submit)
    assert "ACCESS_REFUSED" in await refused(url("gateway"), consume_work)
    assert "ACCESS_REFUSED" in await refused(url("scheduler"), delete_scorer_queue)
