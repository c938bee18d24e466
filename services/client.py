"""A small AMQP client for programs that submit requests without the gateway.

The tenant is the RabbitMQ user the client connects as: every request carries that
user in the ``user_id`` property, which RabbitMQ verifies against the connection.

Replies arrive on a reply queue of this client's own that outlives its connection
(:func:`topology.declare_reply_queue`), so a stream stays open when the connection drops
(broker restart or crash, network cut) and goes on once the client has reconnected: the
broker keeps every reply it confirmed, and a worker that lost its link continues the
request from its resume point, sending again what came before it, which the stream trims
to what it lacks. A stream still open when the broker has been away for
``outage_grace_s`` gets one clear error answer (``broker_connection_lost``, 503) instead
of waiting forever. The queue is deleted when the client closes; one left by a client
that died expires ``topology.REPLY_QUEUE_EXPIRES_S`` after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Self
from urllib.parse import unquote, urlparse

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustConnection,
)

from services import amqp, topology
from services import messages as m
from services.replies import OutageDeadline, Reply, ReplyRouter, ReplyStream
from services.settings import (
    DEFAULT_AMQP_HEARTBEAT_S,
    DEFAULT_AMQP_RECONNECT_S,
    DEFAULT_BROKER_OUTAGE_GRACE_S,
)

CONNECTION_LOST = "broker_connection_lost"
CHANNEL_RESTORE_WAIT_S = 5.0


class AmqpClient:
    def __init__(self, url: str, reconnect_s: float = DEFAULT_AMQP_RECONNECT_S,
                 outage_grace_s: float = DEFAULT_BROKER_OUTAGE_GRACE_S,
                 heartbeat_s: int = DEFAULT_AMQP_HEARTBEAT_S) -> None:
        """``reconnect_s``: seconds between reconnect attempts while the broker is away
        (as the services' ``FAIRWAY_AMQP_RECONNECT_S``); ``outage_grace_s``: how long open
        streams wait for it (as the gateway's ``FAIRWAY_BROKER_OUTAGE_GRACE_S``);
        ``heartbeat_s``: the AMQP heartbeat, which bounds how long a silently cut link
        goes unnoticed (as ``FAIRWAY_AMQP_HEARTBEAT_S``; the broker's default is 60 s)."""
        self.url = url
        self.reconnect_s = reconnect_s
        self.heartbeat_s = heartbeat_s
        self.user = unquote(urlparse(url).username or "guest")
        self.router = ReplyRouter()
        self.outage = OutageDeadline(outage_grace_s, self._fail_open_streams)
        self._acks = amqp.BatchedAcks()

    async def __aenter__(self) -> Self:
        self.connection: AbstractRobustConnection = await aio_pika.connect_robust(
            self.url, heartbeat=self.heartbeat_s, reconnect_interval=self.reconnect_s)
        try:
            self.channel: AbstractChannel = await self.connection.channel()
            # Passive: the system declares its topology; this fails clearly if it is not up.
            self.exchange = await self.channel.get_exchange(topology.REQUESTS_EXCHANGE)
            self.reply_queue: AbstractQueue = await topology.declare_reply_queue(
                self.connection, topology.reply_queue(f"{self.user}.{uuid.uuid4().hex[:12]}"))
            self._consumer_tag = await self.router.consume(self.reply_queue, self._acks)
        except BaseException:
            await self.connection.close()
            raise
        self.connection.close_callbacks.add(self._on_connection_lost)
        self.connection.reconnect_callbacks.add(self._on_reconnected)
        return self

    @property
    def connected(self) -> bool:
        """The link is up and the channel restored on it: a publish can go out now."""
        return (not self.connection.is_closed and self.connection.connected.is_set()
                and not self.channel.is_closed)

    def _on_connection_lost(self, *_: object) -> None:
        if self.router.streams:
            self.outage.link_lost()

    def _on_reconnected(self, *_: object) -> None:
        self.outage.link_back()

    def _fail_open_streams(self) -> None:
        if not self.connected:
            self.router.fail_all(
                CONNECTION_LOST,
                "the connection to the message broker was lost and did not come back in "
                f"{self.outage.grace_s:g} s; the request's replies may be lost with it, retry it")

    async def __aexit__(self, *exc: object) -> None:
        self.outage.link_back()
        self.connection.close_callbacks.discard(self._on_connection_lost)
        if self.connected:
            await self._acks.flush()
            with contextlib.suppress(Exception):  # a queue not deleted expires by itself
                # Cancelled first: the broker would cancel it itself, which aio-pika warns of.
                await self.reply_queue.cancel(self._consumer_tag)
                await self.reply_queue.delete(if_unused=False, if_empty=False)
        await self.connection.close()

    def completion(self, model: str, prompt: str, **sampling: object) -> m.CompletionRequest:
        """A completion request; the sampling fields not given are left to the server, as
        over HTTP (the model's own temperature, top_p and top_k, say)."""
        params = m.SamplingParams(**sampling)  # type: ignore[arg-type]
        if "max_tokens" not in sampling:  # the default, raised to min_tokens as over HTTP
            params.max_tokens = max(params.max_tokens, params.min_tokens)
        if params.seed is None:
            params.seed = random.getrandbits(31)
        return m.CompletionRequest(request_id=f"amqp-{uuid.uuid4().hex}", model=model,
                                   prompt=prompt, sampling=params, created=time.time(),
                                   defaulted=[name for name in m.DEFAULTABLE if name not in sampling])

    async def publish(self, request: m.CompletionRequest) -> ReplyStream:
        """Publish and wait for the broker's confirm; the request is accepted once this returns.
        Right after a reconnect the channel may still be being restored: wait for it (a
        few seconds at most) instead of failing on a closed channel."""
        deadline = time.monotonic() + CHANNEL_RESTORE_WAIT_S
        while (self.connection.connected.is_set() and self.channel.is_closed
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        stream = self.router.open(request.request_id)
        try:
            await self.exchange.publish(
                amqp.to_amqp(request, reply_to=self.reply_queue.name, user_id=self.user),
                routing_key=topology.SUBMIT_ROUTING_KEY,
            )
        except BaseException:
            self.router.close(request.request_id)
            raise
        return stream

    async def replies(self, stream: ReplyStream) -> AsyncIterator[Reply]:
        """Token chunks in order, then the one final answer, of a published request."""
        try:
            async for reply in stream:
                yield reply
        finally:
            self.router.close(stream.request_id)

    async def submit(self, request: m.CompletionRequest) -> AsyncIterator[Reply]:
        """Publish (with a broker confirm) and yield token chunks, then the final answer."""
        stream = await self.publish(request)
        async for reply in self.replies(stream):
            yield reply
