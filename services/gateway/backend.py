"""The gateway's I/O: AMQP publish/consume and the Redis admission counter.

Thin on purpose: routing and formatting live in ``replies`` and ``responses``. A request
goes through :meth:`Backend.submit` (admit in Redis, open a reply stream, publish with a
broker confirm) and ends with :meth:`Submission.close`, which runs exactly once and
cancels the request downstream when no final answer arrived (client gone, timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from redis.exceptions import RedisError

from services import amqp, keys, topology
from services.gateway.errors import ApiError, too_many_in_flight, unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.replies import TimedReplies
from services.logs import get_logger
from services.messages import CancelRequest, CompletionRequest, MessageError
from services.replies import ReplyRouter
from services.settings import Settings

log = get_logger(__name__)

PUBLISH_TIMEOUT_S = 10.0
REDIS_TIMEOUT_S = 5.0
CONNECT_RETRY_MAX_S = 10.0
SHUTDOWN_CLEANUP_S = 10.0

# INCR with the limit checked in the same atomic step. The TTL bounds a leak when a
# gateway dies with requests in flight: every request ends within request_timeout_s, so a
# key untouched for longer than that has no live request behind it.
_ADMIT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# DECR that never goes below zero (the key may have expired meanwhile).
_RELEASE_LUA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then
  return redis.call('DECR', KEYS[1])
end
return 0
"""


def amqp_login(url: str) -> str:
    """The user an AMQP URL logs in as (RabbitMQ checks ``user_id`` against it)."""
    return unquote(urlparse(url).username or "guest")


class Submission:
    """One accepted request; :meth:`close` releases its admission slot exactly once."""

    def __init__(self, backend: Backend, request: CompletionRequest, stream: TimedReplies) -> None:
        self.backend = backend
        self.request = request
        self.stream = stream
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Forget the request, free the tenant's slot, cancel it downstream if unfinished."""
        if self._closed:
            return
        self._closed = True
        await self.backend.finish(self)


class Backend:
    """AMQP connection, reply consumer, Redis client; created without I/O, started later."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.router = ReplyRouter()
        self.reply_queue_name = topology.reply_queue(settings.instance_id)
        self.amqp_user = amqp_login(settings.amqp_url)
        self.redis: aioredis.Redis = aioredis.from_url(
            settings.redis_url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
        )
        self._admit = self.redis.register_script(_ADMIT_LUA)
        self._release = self.redis.register_script(_RELEASE_LUA)
        self._connection: AbstractRobustConnection | None = None
        self._requests_exchange: AbstractExchange | None = None
        self._control_exchange: AbstractExchange | None = None
        self._ready = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._submissions: dict[str, Submission] = {}

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, retrying until the broker answers."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(
                self._connect_forever(), name="gateway-amqp-connect"
            )

    @property
    def amqp_connected(self) -> bool:
        conn = self._connection
        return (
            self._ready.is_set()
            and conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
        )

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._connect()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to reach or set up the broker: retry
                log.warning("amqp_connect_failed", error=repr(exc), retry_in_s=delay)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_RETRY_MAX_S)

    async def _connect(self) -> None:
        conn = await amqp.connect(self.settings, "gateway")
        self._connection = conn
        publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
        topo = await topology.declare(publish)
        consume = await conn.channel()
        queue = await consume.declare_queue(self.reply_queue_name, exclusive=True, auto_delete=True)
        # Replies are only worth something to this process: no redelivery, so no acks.
        await queue.consume(self.router.on_message, no_ack=True)
        self._requests_exchange = topo.exchange(topology.REQUESTS_EXCHANGE)
        self._control_exchange = topo.exchange(topology.CONTROL_EXCHANGE)
        self._ready.set()
        log.info("amqp_connected", reply_queue=self.reply_queue_name)

    async def _drop_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # closing a half-open connection may fail in many ways
                log.debug("amqp_close_failed", error=repr(exc))

    async def close(self) -> None:
        """Cancel what is still in flight downstream, then close the connections."""
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        try:
            async with asyncio.timeout(SHUTDOWN_CLEANUP_S):
                for submission in list(self._submissions.values()):
                    await submission.close()
                if self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
        except TimeoutError:
            # Slots left behind expire with their Redis key's TTL.
            log.warning("shutdown_cleanup_timeout", left=len(self._submissions))
        self._ready.clear()
        await self._drop_connection()
        await self.redis.aclose()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run cleanup outside the caller's task (which may be cancelled), keeping a reference."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- requests --------------------------------------------------------------------

    async def submit(self, request: CompletionRequest, arrived_at: float) -> Submission:
        """Admit, open the reply stream, publish with a confirm. Raises ApiError 429/503."""
        exchange = self._requests_exchange
        if not self.amqp_connected or exchange is None:
            raise unavailable("The message broker is not reachable; retry later.")
        # user_id is checked by the broker and tells the scorer to trust request.tenant.
        try:
            message = amqp.to_amqp(request, reply_to=self.reply_queue_name, user_id=self.amqp_user)
        except MessageError as exc:  # over the wire-size cap
            raise ApiError(413, str(exc), reason="too_large", code="request_too_large") from None
        tenant = request.tenant
        if not await self._try_admit(tenant):
            raise too_many_in_flight(self.settings.max_queued_per_tenant)
        stream = TimedReplies(self.router.open(request.request_id), opened_at=arrived_at)
        submission = Submission(self, request, stream)
        self._submissions[request.request_id] = submission
        self.metrics.in_flight.inc()
        try:
            await exchange.publish(message, topology.SUBMIT_ROUTING_KEY, timeout=PUBLISH_TIMEOUT_S)
        except asyncio.CancelledError:
            self.spawn(submission.close())
            raise
        except Exception as exc:  # nack, unroutable, timeout or connection loss: not accepted
            log.warning("publish_failed", request_id=request.request_id, error=repr(exc))
            await submission.close()
            raise unavailable(
                "The request could not be queued (broker did not confirm); retry later."
            ) from None
        log.info(
            "request_accepted",
            request_id=request.request_id,
            tenant=tenant,
            kind=request.kind,
            max_tokens=request.sampling.max_tokens,
        )
        return submission

    async def finish(self, submission: Submission) -> None:
        request = submission.request
        stream = submission.stream
        self.router.close(request.request_id)
        if self._submissions.pop(request.request_id, None) is not None:
            self.metrics.in_flight.dec()
        if stream.final is not None:
            self.metrics.observe_finished(stream)
        elif not stream.arrived:
            self.metrics.cancelled.inc()
            await self.publish_cancel(request.request_id, request.tenant)
        await self._release_slot(request.tenant)

    async def publish_cancel(self, request_id: str, tenant: str) -> None:
        """Tell every worker and scheduler to drop the request; best effort."""
        exchange = self._control_exchange
        if exchange is None or not self.amqp_connected:
            log.warning("cancel_not_sent", request_id=request_id, reason="broker not connected")
            return
        message = amqp.to_amqp(
            CancelRequest(request_id=request_id, tenant=tenant), user_id=self.amqp_user
        )
        try:
            await exchange.publish(message, "", timeout=PUBLISH_TIMEOUT_S)
            log.info("request_cancelled", request_id=request_id, tenant=tenant)
        except Exception as exc:  # the scheduler's own timeouts are the fallback
            log.warning("cancel_publish_failed", request_id=request_id, error=repr(exc))

    async def _try_admit(self, tenant: str) -> bool:
        ttl = int(self.settings.request_timeout_s) + 60
        try:
            admitted = await self._admit(
                keys=[keys.tenant_inflight(tenant)], args=[self.settings.max_queued_per_tenant, ttl]
            )
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", op="admit", error=repr(exc))
            raise unavailable("Redis is not reachable; retry later.") from None
        return bool(admitted)

    async def _release_slot(self, tenant: str) -> None:
        try:
            await self._release(keys=[keys.tenant_inflight(tenant)])
        except (RedisError, OSError) as exc:
            # The key's TTL frees the slot later.
            log.warning("redis_unavailable", op="release", tenant=tenant, error=repr(exc))

    # --- readiness -------------------------------------------------------------------

    async def readiness(self, now: float) -> dict[str, bool]:
        """Broker connected, Redis answering, and a worker heartbeat within worker_alive_s."""
        checks = {"amqp": self.amqp_connected, "redis": False, "worker": False}
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                checks["redis"] = bool(await self.redis.ping())
                alive = await self.redis.zrangebyscore(
                    keys.WORKERS_SEEN, now - self.settings.worker_alive_s, "+inf", start=0, num=1
                )
                checks["worker"] = bool(alive)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("readiness_redis_failed", error=repr(exc))
        return checks
