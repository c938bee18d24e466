"""Thin AMQP adapter shared by every service: connect, publish with confirms, consume strictly.

Consumers never crash on bad input: a payload that fails to decode is rejected
without requeue (so RabbitMQ dead-letters it through the queue's DLX) and, when the
message names a ``reply_to``, the producer gets an error :class:`FinalAnswer`.

A handler that fails because Redis cannot serve it (unreachable, timing out, loading,
read-only after a failover, out of memory, or refusing writes it cannot persist; see
:func:`services.redis_client.cannot_serve`) is run again in place, with backoff, until
Redis can: an outage of any length costs no delivery, so no request is dropped for it,
and the message stays with this consumer (the broker redelivers it if the process dies).
Handlers are idempotent under redelivery, so a second run is safe.

A handler that fails otherwise (a bug, a message it cannot serve) has its message
requeued after a backoff that grows with the delivery count. On the last delivery the
queue's limit allows, a failure is final: the request's caller gets one error answer,
the ``give_up`` hook runs, and the message is dead-lettered, so no accepted request ends
in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote, urlparse

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)
from aiormq.exceptions import AMQPConnectionError, ChannelAccessRefused

from services import messages as m
from services import metrics as prom
from services import redis_client, topology
from services.backoff import retry_until_up
from services.logs import get_logger
from services.runtime import STOP_SIGNALS, early_stops, freeze_heap
from services.settings import Settings

log = get_logger(__name__)

CONTENT_TYPE = "application/msgpack"
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
DEPENDENCY_RETRY_MAX_S = 5.0

M = TypeVar("M", bound=m.Message)
T = TypeVar("T")

NO_RETRY_FIXES = (ProbableAuthenticationError, ChannelAccessRefused, ChannelPreconditionFailed)
"""Broker errors that end a service's start at once: refused credentials or permissions,
a queue declared with other arguments."""

LINK_DOWN = (ChannelInvalidStateError, AMQPConnectionError, ConnectionError)


def link_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker link is down (a broker restart, a cut link): an
    outage to wait out, not a fault to report. The robust connection comes back by
    itself, and the broker delivers again whatever a closed channel held."""
    return isinstance(exc, LINK_DOWN)


def publishing_blocked(connection: AbstractRobustConnection | None) -> bool:
    """Whether the broker has blocked this connection's publishes (``connection.blocked``:
    a memory or disk alarm). A publish then waits, unconfirmed, until the alarm clears.
    The broker says so as the connection first publishes during the alarm. aiormq keeps
    that in a private event (its ``ready()`` waits on it) and offers no property to read;
    ``tests/integration/test_amqp_blocked.py`` pins this reading on a real broker."""
    transport = connection.transport if connection is not None else None
    unblocked = getattr(getattr(transport, "connection", None), "_Connection__connection_unblocked", None)
    return unblocked is not None and not unblocked.is_set()


class HandBack(Exception):
    """A handler's consumer is going away for a reason that is not the message's (the
    scheduler replica lost its term, and closes its channel): the message is left
    unsettled, as everything else the consumer holds, and the broker delivers it again
    once the channel closes. Not a failed delivery: no error is logged, and no nack now,
    which would have the broker hand it straight back to this consumer."""


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A robust connection (reconnects and re-declares by itself) with AMQP heartbeats.

    The first connection is retried with backoff while the broker is unreachable, so a
    service may start before RabbitMQ; refused credentials fail at once (:data:`NO_RETRY_FIXES`).
    What counts as "not up yet" is what aio-pika's own reconnect loop retries: a broker
    that is booting or shutting down accepts the socket and drops it mid-handshake, which
    aiormq (under uvloop) can report as ``StopAsyncIteration``, not ``AMQPConnectionError``.
    """
    return await retry_until_up(
        lambda: aio_pika.connect_robust(
            settings.amqp_url,
            heartbeat=settings.amqp_heartbeat_s,
            reconnect_interval=settings.amqp_reconnect_s,
            client_properties={"connection_name": f"{name}:{settings.instance_id}"},
        ),
        CONNECTION_EXCEPTIONS,
        "waiting_for_broker",
        fatal=NO_RETRY_FIXES,
    )


async def open_until_up(
    settings: Settings, name: str, set_up: Callable[[AbstractRobustConnection], Awaitable[T]]
) -> tuple[AbstractRobustConnection, T]:
    """:func:`connect`, then ``set_up`` on the new connection (channels, topology,
    consumers), retried together until both succeed. A broker that goes away between the
    two (a restart during a rollout) is waited for like one not up yet, instead of the
    service exiting half set up; each failed try's connection is closed before the next.
    (:func:`connect` inside waits for the handshake; this loop for the set-up after it.)
    Once set up, the robust connection restores its channels and consumers by itself."""

    async def attempt() -> tuple[AbstractRobustConnection, T]:
        connection = await connect(settings, name)
        try:
            return connection, await set_up(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise

    return await retry_until_up(attempt, CONNECTION_EXCEPTIONS, "waiting_for_broker", fatal=NO_RETRY_FIXES)


def login_user(url: str) -> str:
    """The user an AMQP URL logs in as (RabbitMQ checks ``user_id`` against it)."""
    return unquote(urlparse(url).username or "guest")


def to_amqp(msg: m.Message, *, reply_to: str | None = None, user_id: str | None = None) -> aio_pika.Message:
    """The AMQP message for ``msg``. Its request id is the ``correlation_id``, AMQP's
    property for what a message is about; the ``message_id`` is this publish's own:
    aiormq finds the publish a returned message belongs to by its ``message_id``, so
    publishes sharing one (a stream's chunks) would have a return matched to the wrong
    publish, and the returns after the first logged as unhandled, never reaching the
    channel's return callbacks (how a worker learns that a caller is gone)."""
    return aio_pika.Message(
        body=m.encode(msg),
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        correlation_id=msg.request_id or None,
        type=msg.TYPE,
        reply_to=reply_to,
        user_id=user_id,
    )


async def publish(
    exchange: AbstractExchange,
    msg: m.Message,
    routing_key: str,
    *,
    reply_to: str | None = None,
    mandatory: bool = False,
) -> None:
    """Publish and wait for the broker's confirm (channels are opened with confirms on)."""
    await exchange.publish(
        to_amqp(msg, reply_to=reply_to), routing_key=routing_key, mandatory=mandatory
    )


async def reply(channel: AbstractChannel, reply_to: str, msg: m.Message, *,
                mandatory: bool = False) -> None:
    """Send a token or terminal message to a caller's own reply queue (default exchange).

    A caller whose reply queue is gone has left, and its answer is dropped; ``mandatory``
    has the broker return it instead (to the channel's return callbacks), which is how a
    worker learns that nobody reads the rest of a stream.
    """
    if reply_to:
        await channel.default_exchange.publish(to_amqp(msg), routing_key=reply_to,
                                               mandatory=mandatory)


class BatchedAcks:
    """Acks a consumer's messages in batches: the last message handled within
    ``interval_s`` is acked, with ``multiple``, for every one before it, so the consumer
    sends at most one ack per interval however busy it is. For messages worth acking only
    so that the broker requeues those a dropped link took in transit (written to the dead
    socket, or handled but not acked yet), at close to ``no_ack``'s cost; a consumer that
    takes them again must bear repeats. The handler must be done with a message when it
    calls :meth:`handled`."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._last: AbstractIncomingMessage | None = None
        self._flush: asyncio.Task[None] | None = None

    def handled(self, message: AbstractIncomingMessage) -> None:
        self._last = message
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._ack())

    async def _ack(self) -> None:
        await asyncio.sleep(self.interval_s)
        self._flush = None
        await self.flush()

    async def flush(self) -> None:
        """Ack what was handled now (a consumer about to close its channel)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        message, self._last = self._last, None
        if message is not None:
            # A channel that closed meanwhile: the broker requeued them, nothing to ack.
            with contextlib.suppress(Exception):
                await message.ack(multiple=True)


def error_answer(request_id: str, message: str, *, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None) -> m.FinalAnswer:
    """An error ends a stream at once, wherever it is, so it needs no position."""
    return m.FinalAnswer(
        request_id=request_id,
        token_offset=0,
        text_offset=0,
        finish_reason="error",
        error=m.ErrorInfo(message=message, type=type_, code=code, status=status),
    )


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message (quorum queues' ``x-delivery-count``)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def retry_delay_s(deliveries: int) -> float:
    return min(RETRY_BASE_S * 2**deliveries, RETRY_MAX_S)


def dependency_retry_delay_s(attempt: int) -> float:
    return min(retry_delay_s(attempt - 1), DEPENDENCY_RETRY_MAX_S)


def still_held(message: AbstractIncomingMessage) -> bool:
    """Whether this consumer can still settle ``message``: not settled yet, and its channel
    open (after a channel closes, the broker redelivers what it held)."""
    if message.processed:
        return False
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False


def reply_target(msg: m.Message, message: AbstractIncomingMessage) -> str:
    """Where the caller of the request that ``msg`` carries waits for its answer."""
    if isinstance(msg, m.CompletionRequest):
        return message.reply_to or msg.reply_to
    if isinstance(msg, m.ScoredRequest):
        return msg.request.reply_to
    if isinstance(msg, m.WorkItem):
        return msg.scored.request.reply_to
    return message.reply_to or ""


async def consume(
    channel: AbstractChannel,
    queue: AbstractQueue,
    expected: type[M],
    handler: Callable[[M, AbstractIncomingMessage], Awaitable[None]],
    *,
    service: str,
    on_invalid: Callable[[], None] | None = None,
    give_up: Callable[[M], Awaitable[None]] | None = None,
    delivery_limit: int = topology.DELIVERY_LIMIT,
    keep: Callable[[], bool] | None = None,
) -> str:
    """Consume ``queue`` with decoding and failure handling around ``handler``.

    The handler acks (or rejects) the message itself once its work is durable. A
    :class:`MessageError` dead-letters the message; any other exception requeues it
    after a backoff, and on the last delivery the queue's limit allows, answers the
    caller with an error, calls ``give_up`` and dead-letters it. A message that Redis
    cannot serve is run again in place while ``keep()`` holds (always, without it), and
    handed back to the queue once it does not: a consumer that stopped taking work lets
    others have what it holds.
    """

    async def fail(msg: M, message: AbstractIncomingMessage) -> None:
        deliveries = delivery_count(message)
        if deliveries < delivery_limit:
            await asyncio.sleep(retry_delay_s(deliveries))
            if not message.processed:
                await message.nack(requeue=True)
            return
        log.error("message_given_up", service=service, queue=queue.name,
                  request_id=msg.request_id, deliveries=deliveries + 1)
        try:
            await reply(channel, reply_target(msg, message), error_answer(
                msg.request_id, "the request failed repeatedly inside the server and was dropped",
                status=500, type_="server_error", code="internal_error"))
            if give_up is not None:
                await give_up(msg)
        except Exception as exc:  # noqa: BLE001 - the reject below must still happen
            log.warning("give_up_failed", error=repr(exc))
        if not message.processed:
            await message.reject(requeue=False)
            prom.dead_lettered.labels(queue.name, "gave_up").inc()

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            msg = m.decode(message.body, expected)
        except m.MessageError as exc:
            log.warning("message_rejected", service=service, queue=queue.name, error=str(exc))
            if on_invalid is not None:
                on_invalid()
            request_id = (m.peek_request_id(message.body) or message.correlation_id
                          or message.message_id or "")
            reply_to = message.reply_to or m.peek_reply_to(message.body)
            if reply_to:
                try:
                    await reply(channel, reply_to,
                                error_answer(request_id, f"invalid message: {exc}", code="invalid_message"))
                except Exception as send_exc:  # noqa: BLE001 - the reject below must still happen
                    log.warning("error_reply_failed", error=str(send_exc))
            await message.reject(requeue=False)
            prom.dead_lettered.labels(queue.name, "invalid_message").inc()
            return
        attempt = 0
        while True:
            try:
                await handler(msg, message)
                return
            except asyncio.CancelledError:
                if still_held(message):
                    await message.nack(requeue=True)
                raise
            except HandBack as exc:
                log.info("message_left_to_broker", service=service, queue=queue.name,
                         request_id=msg.request_id, reason=str(exc))
                return
            except Exception as exc:
                if link_down(exc) and not still_held(message):
                    # Its channel closed with the link: the broker delivers it again.
                    log.warning("handler_link_down", service=service, queue=queue.name,
                                request_id=msg.request_id, error=repr(exc))
                    return
                if not redis_client.cannot_serve(exc):
                    log.exception("handler_failed", service=service, queue=queue.name,
                                  request_id=msg.request_id, deliveries=delivery_count(message) + 1)
                    if not message.processed:
                        await fail(msg, message)
                    return
                if not still_held(message):
                    return
                if keep is not None and not keep():
                    await message.nack(requeue=True)
                    return
                attempt += 1
                if attempt & (attempt - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... attempt
                    log.warning("redis_cannot_serve", service=service, queue=queue.name,
                                request_id=msg.request_id, attempt=attempt, error=repr(exc))
                prom.handler_retries.labels(queue.name).inc()
                await asyncio.sleep(dependency_retry_delay_s(attempt))

    return await queue.consume(on_message)


class ServiceFailed(RuntimeError):
    """A part the service cannot work without died; it stopped and exits non-zero, so its
    supervisor starts it again."""


async def run_until_signalled(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    hurry: Callable[[], None] | None = None,
    failed: asyncio.Event | None = None,
) -> None:
    """Run a service: ``start`` it, wait for SIGTERM/SIGINT, then ``stop`` it gracefully.
    A second signal while it stops calls ``hurry`` (cut a drain short, as a second
    Ctrl-C does for uvicorn). ``failed`` set once it runs means it cannot go on: it stops
    at once (``hurry``, then ``stop``) and :class:`ServiceFailed` is raised."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set() and hurry is not None:
            log.info("shutdown_hurried")
            hurry()
        stopping.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    for sig in early_stops():
        log.info("stop_requested_while_starting", signal=signal.Signals(sig).name)
        stopping.set()
    try:
        # A signal while starting (waiting for the broker or Redis, loading the model)
        # cancels the start instead of waiting for it.
        starting = asyncio.ensure_future(start())
        signalled = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            try:
                starting.result()  # a failed start raises here
            except BaseException:
                signalled.cancel()
                raise
            freeze_heap()
            broken = asyncio.ensure_future((failed or asyncio.Event()).wait())
            await asyncio.wait({signalled, broken}, return_when=asyncio.FIRST_COMPLETED)
            if not signalled.done():
                signalled.cancel()
                log.error("service_failed_stopping")
                if hurry is not None:
                    hurry()
                raise ServiceFailed("a part the service cannot work without died; see the log")
            broken.cancel()
        log.info("shutdown_requested")
    finally:
        await stop()
