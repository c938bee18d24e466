"""The AMQP topology: every exchange, queue, binding and queue argument, in one place.

All queues that carry work are durable quorum queues with a dead-letter exchange and
an explicit ``x-delivery-limit`` (RabbitMQ 3.10 sets none by default), so a poison
message is dead-lettered after a bounded number of redeliveries instead of looping.

Where services run as least-privilege users (:mod:`services.provision`), an
administrator declares the topology once and the services declare it ``passive``:
they check that it exists, which needs no configure permission.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

DELIVERY_LIMIT = 5

# Exchanges
REQUESTS_EXCHANGE = "fairway.requests"
"""Direct exchange where the gateway and AMQP producers publish CompletionRequest."""
SUBMIT_ROUTING_KEY = "submit"
SCORED_EXCHANGE = "fairway.scored"
"""Direct exchange: scorer -> scheduler (ScoredRequest)."""
WORK_EXCHANGE = "fairway.work"
"""Direct exchange: scheduler -> worker pools (WorkItem), routing key = pool name."""
EVENTS_EXCHANGE = "fairway.events"
"""Topic exchange: worker events (progress, finished)."""
CONTROL_EXCHANGE = "fairway.control"
"""Fanout exchange: CancelRequest to every worker and scheduler."""
DEAD_LETTER_EXCHANGE = "fairway.dlx"

# Routing keys on EVENTS_EXCHANGE (worker heartbeats go to Redis, not AMQP)
PROGRESS_KEY = "request.progress"
FINISHED_KEY = "request.finished"

# Queues
SCORER_QUEUE = "fairway.scorer"
SCHEDULER_QUEUE = "fairway.scheduler"
SCHEDULER_EVENTS_QUEUE = "fairway.scheduler.events"
SCORER_FEEDBACK_QUEUE = "fairway.scorer.feedback"
DEAD_LETTER_QUEUE = "fairway.dead-letter"

POOLS = ("gpu", "cpu")
REPLY_QUEUE_PREFIX = "fairway.replies"
CONTROL_QUEUE_PREFIX = "fairway.control"


def work_queue(pool: str) -> str:
    """Shared queue of one worker pool; any live worker of the pool may take an item."""
    return f"fairway.work.{pool}"


def reply_queue(owner: str) -> str:
    """Name of a reply queue: a gateway instance's, or an AMQP producer's.

    Producers name theirs ``fairway.replies.<rabbitmq-user>.<anything>`` so that a
    least-privilege user may be granted exactly its own reply queues.
    """
    return f"{REPLY_QUEUE_PREFIX}.{owner}"


REPLY_QUEUE_EXPIRES_S = 60
"""How long a reply queue outlives its last consumer (twice the default
``broker_outage_grace_s``). A gateway or AMQP client whose link to the broker drops finds
its queue again when it is back, with the replies sent meanwhile; the queue of one gone
for longer is deleted, and replies to it come back unroutable, which stops their
requests. Until then the workers go on generating for a caller that is gone, unless a
peer gateway or a restart reaps its requests."""


async def declare_reply_queue(connection: AbstractConnection, name: str) -> AbstractQueue:
    """A reply queue that outlives its owner's connection, on a channel of its own.

    Durable, so that a broker restart keeps the queue and what it holds: replies are
    published persistent, and a publisher's confirm means that the broker wrote the reply
    to disk (or handed it to the consumer, which acked it), so even a broker killed with
    ``kill -9`` loses no reply its publisher saw confirmed. A worker that replies while its
    caller reconnects finds the queue, instead of having its reply returned unroutable and
    stopping the request as if the caller were gone. Not exclusive, so that a dropped link
    leaves it in place; its owner consumes it exclusively, which keeps two gateways of one
    instance id apart.

    A queue's arguments cannot change: one left by an earlier life of its owner with
    other arguments (another version) is deleted and declared anew. What it holds is of no
    use to this process, which reaps that life's requests."""
    arguments = {"x-expires": REPLY_QUEUE_EXPIRES_S * 1000}
    channel = await connection.channel()
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:
        with contextlib.suppress(Exception):
            await channel.close()
    channel = await connection.channel()
    await channel.queue_delete(name, if_unused=True)
    return await channel.declare_queue(name, durable=True, arguments=arguments)


def quorum_arguments() -> dict[str, object]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-delivery-limit": DELIVERY_LIMIT,
    }


@dataclass
class Topology:
    """Declared exchanges and queues of one channel."""

    exchanges: dict[str, AbstractExchange] = field(default_factory=dict)
    queues: dict[str, AbstractQueue] = field(default_factory=dict)

    def exchange(self, name: str) -> AbstractExchange:
        return self.exchanges[name]


async def declare(channel: AbstractChannel, passive: bool = False) -> Topology:
    """Declare the whole shared topology (idempotent; every service calls it at start).

    ``passive``: only look the exchanges and queues up (they must exist), as a
    least-privilege user whose topology an administrator declared.
    """
    if passive:
        return await _look_up(channel)
    topo = Topology()
    ex = topo.exchanges
    ex[DEAD_LETTER_EXCHANGE] = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    ex[REQUESTS_EXCHANGE] = await channel.declare_exchange(
        REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    ex[SCORED_EXCHANGE] = await channel.declare_exchange(
        SCORED_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    ex[WORK_EXCHANGE] = await channel.declare_exchange(
        WORK_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    ex[EVENTS_EXCHANGE] = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    ex[CONTROL_EXCHANGE] = await channel.declare_exchange(
        CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )

    q = topo.queues
    q[DEAD_LETTER_QUEUE] = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await q[DEAD_LETTER_QUEUE].bind(ex[DEAD_LETTER_EXCHANGE])

    bindings: list[tuple[str, str, list[str]]] = [
        (SCORER_QUEUE, REQUESTS_EXCHANGE, [SUBMIT_ROUTING_KEY]),
        (SCHEDULER_QUEUE, SCORED_EXCHANGE, [SUBMIT_ROUTING_KEY]),
        (SCHEDULER_EVENTS_QUEUE, EVENTS_EXCHANGE, [PROGRESS_KEY, FINISHED_KEY]),
        (SCORER_FEEDBACK_QUEUE, EVENTS_EXCHANGE, [FINISHED_KEY]),
        *[(work_queue(pool), WORK_EXCHANGE, [pool]) for pool in POOLS],
    ]
    for queue_name, exchange_name, keys in bindings:
        queue = await channel.declare_queue(queue_name, durable=True, arguments=quorum_arguments())
        for key in keys:
            await queue.bind(ex[exchange_name], routing_key=key)
        q[queue_name] = queue
    return topo


# What :func:`declare` creates, shared by every service (reply and control queues are each
# user's own).
SHARED_EXCHANGES = (DEAD_LETTER_EXCHANGE, REQUESTS_EXCHANGE, SCORED_EXCHANGE, WORK_EXCHANGE,
              EVENTS_EXCHANGE, CONTROL_EXCHANGE)
SHARED_QUEUES = (DEAD_LETTER_QUEUE, SCORER_QUEUE, SCHEDULER_QUEUE, SCHEDULER_EVENTS_QUEUE,
           SCORER_FEEDBACK_QUEUE, *[work_queue(pool) for pool in POOLS])


async def _look_up(channel: AbstractChannel) -> Topology:
    topo = Topology()
    for name in SHARED_EXCHANGES:
        topo.exchanges[name] = await channel.get_exchange(name, ensure=True)
    for name in SHARED_QUEUES:
        topo.queues[name] = await channel.get_queue(name, ensure=True)
    return topo


async def declare_control_queue(channel: AbstractChannel, owner: str = "anonymous") -> AbstractQueue:
    """An exclusive, auto-deleted queue of this process that receives every CancelRequest.

    Named ``fairway.control.<owner>.<random>``, ``owner`` being the AMQP user, so a
    least-privilege user may be granted exactly its own control queues.
    """
    exchange = await channel.get_exchange(CONTROL_EXCHANGE)
    name = f"{CONTROL_QUEUE_PREFIX}.{owner}.{uuid.uuid4().hex[:12]}"
    queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
    await queue.bind(exchange)
    return queue
