"""A small AMQP client for programs that submit requests without the gateway.

The tenant is the RabbitMQ user the client connects as: every request carries that
user in the ``user_id`` property, which RabbitMQ verifies against the connection.

Replies arrive on an exclusive queue of this connection. When the connection drops
(broker restart, network cut), the broker deletes that queue and replies sent
meanwhile are gone, so every request still open gets one clear error answer
(``broker_connection_lost``, status 503) instead of waiting forever; the connection
then reconnects by itself for new requests.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Self
from urllib.parse import unquote, urlparse

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from services import amqp, topology
from services import messages as m
from services.replies import Reply, ReplyRouter, ReplyStream
from services.settings import DEFAULT_AMQP_RECONNECT_S

CONNECTION_LOST = "broker_connection_lost"


class AmqpClient:
    def __init__(self, url: str, reconnect_s: float = DEFAULT_AMQP_RECONNECT_S) -> None:
        """``reconnect_s``: seconds between reconnect attempts while the broker is away
        (as the services' ``FAIRWAY_AMQP_RECONNECT_S``)."""
        self.url = url
        self.reconnect_s = reconnect_s
        self.user = unquote(urlparse(url).username or "guest")
        self.router = ReplyRouter()

    async def __aenter__(self) -> Self:
        self.connection: AbstractRobustConnection = await aio_pika.connect_robust(
            self.url, reconnect_interval=self.reconnect_s)
        self.channel: AbstractChannel = await self.connection.channel()
        self.exchange = await self.channel.get_exchange(topology.REQUESTS_EXCHANGE)
        self.reply_queue: AbstractQueue = await self.channel.declare_queue(
            topology.reply_queue(f"{self.user}.{uuid.uuid4().hex[:12]}"), exclusive=True, auto_delete=True
        )
        await self.reply_queue.consume(self.router.on_message, no_ack=True)
        self.connection.close_callbacks.add(self._on_connection_lost)
        return self

    def _on_connection_lost(self, *_: object) -> None:
        self.router.fail_all(CONNECTION_LOST,
                             "the connection to the message broker was lost; the request's "
                             "replies may be lost with it, retry it")

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    def completion(self, model: str, prompt: str, **sampling: object) -> m.CompletionRequest:
        params = m.SamplingParams(**sampling)  # type: ignore[arg-type]
        if params.seed is None:
            params.seed = random.getrandbits(31)
        return m.CompletionRequest(request_id=f"amqp-{uuid.uuid4().hex}", model=model,
                                   prompt=prompt, sampling=params, created=time.time())

    async def publish(self, request: m.CompletionRequest) -> ReplyStream:
        """Publish and wait for the broker's confirm; the request is accepted once this returns."""
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
