"""The gateway's I/O: AMQP publish/consume and the Redis admission counter.

Thin on purpose: routing and formatting live in ``replies`` and ``responses``. A request
goes through :meth:`Backend.submit` (admit in Redis, open a reply stream, publish with a
broker confirm) and ends with :meth:`Submission.close`, which runs exactly once and
cancels the request downstream when no final answer arrived (client gone, timeout).

Admission (before any work is done): a tenant may hold at most ``max_queued_per_tenant``
unfinished requests and ``max_queued_tokens_per_tenant`` tokens of them (``max_tokens``
plus a prompt estimate), else 429 with ``Retry-After``; all tenants together at most
``max_queued_total``, else 503 (global back-pressure). Each admitted request is an entry
of a Redis sorted set scored by the time it stops counting (its timeout), so a slot whose
release was lost (gateway killed, Redis unreachable at that moment) frees itself then
instead of leaking; releases that fail are retried with the next Redis call. While the
broker blocks the gateway's publishes (a memory or disk alarm) a request is refused with
a 503 at once, rather than holding its slot for the publish timeout.

The reply queue outlives the gateway's connection (:func:`topology.declare_reply_queue`),
so a stream stays open when that connection drops (broker restart, network cut) and goes
on once the gateway has reconnected: the broker keeps the replies it confirmed, and
workers continue a request from a resume point and send again what came before it, which
the stream trims to what its caller lacks. Should the broker lose a final answer all the
same (a node that lost its disk), the request is done without an answer, which
:class:`~services.replies.LinkLossWatch` notices from its done marker, and its caller gets
one clear error (``broker_connection_lost``, 503). So does every stream still open when
the broker stays away for ``broker_outage_grace_s``; those requests are cancelled
downstream.

A cancel is a marker in Redis, which workers check as they start a request and with
every heartbeat while it runs, plus a broadcast on the control exchange that reaches
them at once when the broker can route it. Every gateway heartbeats into Redis and
records which admission slots it holds; when one dies (``kill -9``, host lost) the
others free its slots and cancel its requests once its heartbeat is
``gateway_dead_after_s`` old, and a restart under the same ``instance_id`` does so
before it takes a request, so neither its tenants' limits nor the workers stay taken
by clients that are gone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from aio_pika import Message
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from redis.exceptions import RedisError

from services import amqp, keys, redis_client, topology
from services.backoff import retry_until_up
from services.gateway.errors import (
    ApiError,
    overloaded,
    token_budget_exceeded,
    too_many_in_flight,
    unavailable,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.rate_limits import (
    BUCKET_LUA,
    NO_LIMITS,
    RateLimits,
    RateState,
    over_token_rate,
    rate_limited,
)
from services.gateway.replies import TimedReplies
from services.logs import get_logger
from services.messages import CancelRequest, CompletionRequest, MessageError
from services.replies import LinkLossWatch, OutageDeadline, ReplyRouter
from services.runtime import BackgroundTasks
from services.settings import Settings

log = get_logger(__name__)

PUBLISH_TIMEOUT_S = 10.0
BLOCKED_CHECK_S = 0.1
"""How often a publish not confirmed yet checks whether the broker blocked the connection."""
REDIS_TIMEOUT_S = 5.0
CONNECT_RETRY_MAX_S = 10.0
SHUTDOWN_CLEANUP_S = 10.0

# Admission in one atomic step, of one request or all of a request's choices (or none).
# KEYS: tenant set, tenant token hash, tenant token total, global set, this gateway's slot
# hash, tenant rate buckets. ARGV: now, expires at, max requests, max tokens, max total,
# key TTL, tenant, requests and tokens per minute (0: none), then each request's id and
# token cost. Entries past their expiry (a release that never came) are dropped first.
# Returns {verdict, requests left, tokens left}: 'ok' or the limit that refused.
_ADMIT_LUA = BUCKET_LUA + """
local now = ARGV[1]
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
for _, rid in ipairs(stale) do
  redis.call('ZREM', KEYS[1], rid)
  local cost = redis.call('HGET', KEYS[2], rid)
  if cost then
    redis.call('HDEL', KEYS[2], rid)
    redis.call('DECRBY', KEYS[3], cost)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local count = (#ARGV - 9) / 2
local total = 0
for i = 11, #ARGV, 2 do
  total = total + tonumber(ARGV[i])
end
if redis.call('ZCARD', KEYS[1]) + count > tonumber(ARGV[3]) then
  return {'requests'}
end
local used = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0'))
if used + total > tonumber(ARGV[4]) then
  return {'tokens'}
end
if redis.call('ZCARD', KEYS[4]) + count > tonumber(ARGV[5]) then
  return {'total'}
end
local rate = rate_take(KEYS[6], tonumber(ARGV[8]), tonumber(ARGV[9]), 1, total)
if rate[1] ~= 'ok' then
  return rate
end
for i = 10, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[i])
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[7])
end
redis.call('INCRBY', KEYS[3], total)
for i = 1, 5 do
  redis.call('EXPIRE', KEYS[i], ARGV[6])
end
return rate
"""
# Idempotent: releasing twice, or after the entry expired, changes nothing (its tokens
# are settled only by the release that ends its entry). KEYS as admission's; ARGV:
# request id, tokens per minute, tokens to give back to the rate bucket (< 0: to take).
_RELEASE_LUA = BUCKET_LUA + """
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  rate_settle(KEYS[6], 0, tonumber(ARGV[2]), 0, tonumber(ARGV[3]))
end
local cost = redis.call('HGET', KEYS[2], ARGV[1])
if cost then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[3], cost)
end
return redis.call('ZREM', KEYS[4], ARGV[1])
"""
# KEYS: tenant rate buckets. ARGV: requests and tokens per minute, tokens to take.
_TAKE_RATE_LUA = BUCKET_LUA + """
return rate_take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1, tonumber(ARGV[3]))
"""
# KEYS: tenant rate buckets. ARGV: requests and tokens per minute, tokens to give back.
_GIVE_BACK_RATE_LUA = BUCKET_LUA + """
rate_settle(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1, tonumber(ARGV[3]))
"""
MAX_PENDING_RELEASES = 100_000
MAX_ORPHANED = 100_000
CONNECTION_LOST = "broker_connection_lost"
ANSWER_LOST_GRACE_S = 5.0
"""How long a request that lived through a broker outage may be done without its final
answer arriving before its answer counts as lost (the answer is published before the
completion event that makes it done, so it is normally already here)."""
BROKER_BLOCKED = (
    "The message broker is refusing new messages (a memory or disk alarm); retry later."
)


class BrokerBlocked(Exception):
    """The broker blocks this connection's publishes (a memory or disk alarm)."""


def redis_refusal(exc: BaseException) -> str:
    """The 503 message of a request Redis failed to admit."""
    if redis_client.refuses_writes(exc):
        return f"{redis_client.why_unavailable(exc)}, so no request can be queued; retry later."
    return f"{redis_client.why_unavailable(exc)}; retry later."


def _slot_keys(tenant: str, incarnation: str) -> list[str]:
    return [keys.tenant_inflight(tenant), keys.tenant_tokens(tenant), keys.tenant_tokens_total(tenant),
            keys.GATEWAY_INFLIGHT, keys.gateway_slots(incarnation), keys.tenant_rate(tenant)]


def dead_gateways(seen: dict[str, float], now: float, dead_after_s: float, own: str,
                  owns_instance: bool, beating_s: float) -> list[str]:
    """Gateway incarnations (``instance_id:boot_id``) whose slots to free and requests to
    cancel: those whose heartbeat is older than ``dead_after_s``, judged only once this
    gateway has itself been beating (reaching Redis) for that long, so that after a Redis
    outage the first gateway back does not take the others for dead; and, once this
    gateway ``owns_instance`` (consumes, exclusively, the reply queue its instance id
    names, which no live gateway of that id could let it do), every earlier life of its
    instance id."""
    instance = keys.gateway_instance(own)
    judge_silence = beating_s >= dead_after_s
    return [
        other for other, at in seen.items()
        if other != own
        and ((judge_silence and at < now - dead_after_s)
             or (owns_instance and keys.gateway_instance(other) == instance))
    ]


def token_cost(request: CompletionRequest) -> int:
    """What a request counts against its tenant's token budget: ``max_tokens`` plus the
    prompt at one token per 4 UTF-8 bytes (no tokenizer here; real BPE counts are lower
    for English, so this errs on the side of the budget)."""
    if request.prompt_token_ids is not None:
        return request.sampling.max_tokens + len(request.prompt_token_ids)
    text = request.prompt_text() if request.kind == "completion" else "".join(
        msg.content for msg in request.messages)
    return request.sampling.max_tokens + len(text.encode("utf-8", "replace")) // 4 + 1


def log_finished(request: CompletionRequest, stream: TimedReplies) -> None:
    """One line per answered request, as TGI logs one: how it ended, its tokens and its
    times from acceptance (ms), for an operator who follows a request or a tenant."""
    final = stream.final
    if final is None:
        return
    def since_accepted(at: float | None) -> float | None:
        return None if at is None else round((at - stream.opened_at) * 1000, 1)
    error = {} if final.error is None else {"error_code": final.error.code, "status": final.error.status}
    log.info("request_finished", request_id=request.request_id, tenant=request.tenant,
             finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
             completion_tokens=final.completion_tokens, ttft_ms=since_accepted(stream.first_token_at),
             e2e_ms=since_accepted(stream.final_at), **error)


class Submission:
    """One accepted request; :meth:`close` releases its admission slot exactly once."""

    def __init__(self, backend: Backend, request: CompletionRequest, stream: TimedReplies,
                 rate: RateState | None = None) -> None:
        self.backend = backend
        self.request = request
        self.stream = stream
        self.rate = rate
        """Its tenant's rate limits it was charged under and what was left of them (None:
        it was not rate limited)."""
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
        self.amqp_user = amqp.login_user(settings.amqp_url)
        # Named after the AMQP user, like a producer's, so a least-privilege user may be
        # granted exactly its own reply queues.
        self.reply_queue_name = topology.reply_queue(f"{self.amqp_user}.{settings.instance_id}")
        self.incarnation = keys.gateway_life(settings.instance_id, uuid.uuid4().hex[:12])
        """This process's life of the gateway ``instance_id``: owner of its admission slots."""
        self.redis: aioredis.Redis = redis_client.connect(settings.redis_url, socket_timeout_s=REDIS_TIMEOUT_S)
        self._admit = self.redis.register_script(_ADMIT_LUA)
        self._release = self.redis.register_script(_RELEASE_LUA)
        self._take_rate = self.redis.register_script(_TAKE_RATE_LUA)
        self._give_back_rate = self.redis.register_script(_GIVE_BACK_RATE_LUA)
        self._connection: AbstractRobustConnection | None = None
        self._requests_exchange: AbstractExchange | None = None
        self._control_exchange: AbstractExchange | None = None
        self._ready = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._background = BackgroundTasks()
        self._submissions: dict[str, Submission] = {}
        self._pending_releases: dict[str, tuple[str, int, int]] = {}
        """Request id -> tenant, tokens per minute and tokens to settle of admission slots
        whose release failed; retried later."""
        self._orphaned: dict[str, str] = {}
        """Request id -> tenant of requests to cancel downstream whose cancel marker is not
        written yet (failed by a connection loss, or Redis was unreachable)."""
        self._owns_instance = False
        """We consume our reply queue exclusively: no other live gateway has this instance id."""
        self._beating_since: float | None = None
        """Start of this gateway's unbroken run of heartbeats into Redis."""
        self._refusing_writes: BaseException | None = None
        """What Redis said when it refused this gateway's last write (full, read-only,
        cannot persist): new requests are refused until a write goes through again."""
        self.link_loss = LinkLossWatch(ANSWER_LOST_GRACE_S)
        self._reply_acks = amqp.BatchedAcks()
        self._outage = OutageDeadline(settings.broker_outage_grace_s, self._fail_open_streams)
        """Fails every open stream once the broker has been away ``broker_outage_grace_s``."""

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, retrying until the broker answers."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(
                self._connect_forever(), name="gateway-amqp-connect"
            )
            self._housekeeping_task = asyncio.create_task(self._housekeeping_loop())

    async def _housekeeping_loop(self) -> None:
        """Every heartbeat interval: say this gateway is alive, retry what failed while
        Redis was unreachable (slot releases, cancel markers), free dead gateways' slots."""
        while True:
            try:
                # Redis's clock, not this host's: gateways on hosts whose clocks disagree
                # must not take each other for dead.
                seconds, micros = await self.redis.time()
                await self._housekeeping(seconds + micros / 1e6)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                self._beating_since = None
                refuses = redis_client.refuses_writes(exc)
                if refuses and self._refusing_writes is None:
                    log.error("redis_refuses_writes", error=str(exc))
                self._refusing_writes = exc if refuses else None
                log.warning("housekeeping_failed", error=repr(exc))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _housekeeping(self, now: float) -> None:
        """One round at ``now`` (Redis server time, the one clock all gateways share)."""
        await self.redis.zadd(keys.GATEWAYS_SEEN, {self.incarnation: now})
        self._refusing_writes = None
        if self._beating_since is None:
            self._beating_since = now
        await self._retry_releases()
        for request_id, tenant in list(self._orphaned.items()):
            await self.cancel_downstream(request_id, tenant)
        await self._fail_lost_answers(time.monotonic())
        for incarnation in dead_gateways(await self._seen(), now, self.settings.gateway_dead_after_s,
                                         self.incarnation, self._owns_instance,
                                         now - self._beating_since):
            await self._reap(incarnation)

    async def _seen(self) -> dict[str, float]:
        """Every gateway incarnation with the time of its last heartbeat."""
        return {k.decode(): at for k, at in
                await self.redis.zrange(keys.GATEWAYS_SEEN, 0, -1, withscores=True)}

    async def _reap_earlier_lives(self) -> None:
        """Free what earlier lives of this instance id held (a restart after ``kill -9``),
        before this one takes a request, so that their tenants are not refused for slots
        held by clients that are gone. Redis down: the housekeeping loop does it later."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                # Not beating yet, so no silence is judged: only this instance's lives.
                for incarnation in dead_gateways(await self._seen(), 0.0, self.settings.gateway_dead_after_s,
                                                 self.incarnation, True, 0.0):
                    await self._reap(incarnation)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("reap_failed", error=repr(exc))

    async def _reap(self, incarnation: str) -> None:
        """Cancel a dead gateway's requests and free its slots. Idempotent, so gateways
        racing to reap the same one do no harm; its heartbeat entry goes last, so a reaper
        that dies halfway leaves the rest to the next."""
        raw = await self.redis.hgetall(keys.gateway_slots(incarnation))
        slots = {rid.decode(): tenant.decode() for rid, tenant in raw.items()}
        if slots:
            # Every marker and release in one round trip: a dead gateway may hold thousands,
            # and this loop also carries this gateway's own heartbeat.
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid, tenant in slots.items():
                    redis_client.set_marker(pipe, rid, keys.MARKER_CANCELLED, "1", self.settings.marker_ttl_s)
                    await self._release(keys=_slot_keys(tenant, incarnation), args=[rid, 0, 0], client=pipe)
                await pipe.execute()
            await asyncio.gather(*(self._broadcast_cancel(rid, tenant) for rid, tenant in slots.items()))
        await self.redis.zrem(keys.GATEWAYS_SEEN, incarnation)
        self.metrics.reaped.inc(len(slots))
        log.warning("dead_gateway_reaped", gateway=incarnation, requests=len(slots))

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
        # Any failure to set up the broker is retried (the gateway answers /health meanwhile).
        await retry_until_up(
            self._connect_or_clean_up,
            (Exception,),
            "amqp_connect_failed",
            max_delay_s=CONNECT_RETRY_MAX_S,
        )

    async def _connect_or_clean_up(self) -> None:
        try:
            await self._connect()
        except Exception:
            await self._drop_connection()
            raise

    async def _connect(self) -> None:
        conn = await amqp.connect(self.settings, "gateway")
        self._connection = conn
        publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
        topo = await topology.declare(publish, passive=not self.settings.declare_topology)
        queue = await topology.declare_reply_queue(conn, self.reply_queue_name)
        await self.router.consume(queue, self._reply_acks)
        self._requests_exchange = topo.exchange(topology.REQUESTS_EXCHANGE)
        self._control_exchange = topo.exchange(topology.CONTROL_EXCHANGE)
        conn.close_callbacks.add(self._on_connection_lost)
        conn.reconnect_callbacks.add(self._on_reconnected)
        self._owns_instance = True
        await redis_client.check_durability(self.redis)
        await self._reap_earlier_lives()
        self._ready.set()
        log.info("amqp_connected", reply_queue=self.reply_queue_name)

    def _on_connection_lost(self, *_: object) -> None:
        """The link dropped: streams stay open for the broker to come back (the reply queue
        outlives the link), up to ``broker_outage_grace_s``. A stream already ended (its
        answer read, or failed by an earlier outage while a reconnect attempt was failing)
        has nothing to wait for."""
        open_ids = [rid for rid, s in self._submissions.items() if not s.stream.stream.finished]
        if not open_ids:
            return
        self.link_loss.link_lost(open_ids)
        if self._outage.link_lost():
            log.warning("amqp_connection_lost", in_flight=len(open_ids))
            self.metrics.broker_outage.labels("open").inc(len(open_ids))

    def _on_reconnected(self, *_: object) -> None:
        # Orphans' cancel markers are written by the housekeeping loop, broker or not.
        self._outage.link_back()
        log.info("amqp_reconnected", orphaned=len(self._orphaned),
                 open_streams=len(self.link_loss.watched))

    def _fail_open_streams(self) -> None:
        """The broker stayed away too long: fail every stream still open with one clear
        error, and cancel its request downstream."""
        if self.amqp_connected:
            return
        log.warning("broker_outage_streams_failed", n=len(self._submissions),
                    after_s=self.settings.broker_outage_grace_s)
        self.metrics.broker_outage.labels("failed").inc(len(self._submissions))
        for request_id, submission in self._submissions.items():
            if not submission.stream.arrived:
                self._orphan(request_id, submission.request.tenant)
            self.link_loss.forget(request_id)
        self.router.fail_all(
            CONNECTION_LOST,
            "The gateway lost its connection to the message broker, which did not come back "
            "in time; retry the request.",
        )

    async def _fail_lost_answers(self, now: float) -> None:
        """End the streams that lived through a broker outage whose requests are done
        without their final answer having arrived (the broker lost it)."""
        watched = self.link_loss.watched
        if not watched or not self.amqp_connected:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in watched:
                pipe.hexists(keys.request_markers(rid), keys.MARKER_DONE)
            done = dict(zip(watched, map(bool, await pipe.execute())))
        for rid in self.link_loss.lost(done, now):
            log.warning("answer_lost_in_broker_outage", request_id=rid)
            self.metrics.broker_outage.labels("answer_lost").inc()
            self.link_loss.forget(rid)
            self.router.fail(
                rid, CONNECTION_LOST,
                "The broker lost this request's answer while the gateway was reconnecting "
                "to it; retry the request.")

    def _orphan(self, request_id: str, tenant: str) -> None:
        if len(self._orphaned) < MAX_ORPHANED:
            self._orphaned[request_id] = tenant

    async def _drop_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # noqa: BLE001 - closing a half-open connection may fail
                log.debug("amqp_close_failed", error=repr(exc))

    async def close(self) -> None:
        """Cancel what is still in flight downstream, then close the connections."""
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
        self._outage.link_back()
        try:
            async with asyncio.timeout(SHUTDOWN_CLEANUP_S):
                for submission in list(self._submissions.values()):
                    await submission.close()
                await self._background.wait()
        except TimeoutError:
            log.warning("shutdown_cleanup_timeout", left=len(self._submissions))
        self._ready.clear()
        await self._reply_acks.flush()
        await self._drop_connection()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                held = await self.redis.hlen(keys.gateway_slots(self.incarnation))
                if held or self._orphaned:
                    # Stay registered: the other gateways (or this one's restart) free
                    # the slots and cancel the requests that this shutdown could not.
                    log.warning("gateway_left_work_to_reap", slots=held, cancels=len(self._orphaned))
                else:
                    await self.redis.zrem(keys.GATEWAYS_SEEN, self.incarnation)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("gateway_unregister_failed", error=repr(exc))
        await self.redis.aclose()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run cleanup outside the caller's task (which may be cancelled)."""
        return self._background.spawn(coro)

    # --- requests --------------------------------------------------------------------

    async def submit(self, request: CompletionRequest, arrived_at: float) -> Submission:
        """Admit, open the reply stream, publish with a confirm. Raises ApiError 429/503."""
        return (await self.submit_all([request], arrived_at))[0]

    async def submit_all(
        self, requests: list[CompletionRequest], arrived_at: float, limits: RateLimits = NO_LIMITS
    ) -> list[Submission]:
        """Submit requests of one tenant together (the n choices of one request): all are
        admitted in one step or none is, so a tenant near its limit gets a 429 before any
        work starts; then each is published with a confirm. If one cannot be published,
        all are closed (cancelled downstream, their slots freed) and the error raised.
        ``limits``: the tenant's rate limits, which they count against as one request."""
        exchange = self._requests_exchange
        if not self.amqp_connected or exchange is None:
            raise unavailable("The message broker is not reachable; retry later.")
        if amqp.publishing_blocked(self._connection):
            # Its publish would wait out PUBLISH_TIMEOUT_S holding an admission slot.
            raise unavailable(BROKER_BLOCKED, reason="broker_blocked")
        # user_id is checked by the broker and tells the scorer to trust request.tenant.
        try:
            messages = [amqp.to_amqp(r, reply_to=self.reply_queue_name, user_id=self.amqp_user)
                        for r in requests]
        except MessageError as exc:  # over the wire-size cap
            raise ApiError(413, str(exc), reason="too_large", code="request_too_large") from None
        rate = await self._try_admit(
            requests[0].tenant, {r.request_id: token_cost(r) for r in requests}, limits)
        submissions = [self._open(r, arrived_at, rate) for r in requests]
        try:
            for submission, message in zip(submissions, messages, strict=True):
                await self._publish_request(exchange, submission.request, message)
        except asyncio.CancelledError:
            for submission in submissions:
                self.spawn(submission.close())
            raise
        except Exception:
            # Closing cancels downstream those already published and frees every slot.
            await asyncio.gather(*(submission.close() for submission in submissions))
            raise
        return submissions

    def _open(self, request: CompletionRequest, arrived_at: float, rate: RateState | None) -> Submission:
        """An admitted request's reply stream and its :class:`Submission`."""
        stream = TimedReplies(self.router.open(request.request_id), opened_at=arrived_at)
        submission = Submission(self, request, stream, rate)
        self._submissions[request.request_id] = submission
        self.metrics.in_flight.inc()
        return submission

    async def _publish_request(
        self, exchange: AbstractExchange, request: CompletionRequest, message: Message
    ) -> None:
        """Publish an admitted request with a confirm; 503 when the broker does not take it."""
        try:
            await self._publish_unless_blocked(exchange, message)
        except BrokerBlocked:
            log.warning("publish_blocked", request_id=request.request_id)
            raise unavailable(BROKER_BLOCKED, reason="broker_blocked") from None
        except Exception as exc:  # noqa: BLE001 - nack, unroutable, timeout, lost connection: 503
            log.warning("publish_failed", request_id=request.request_id, error=repr(exc))
            raise unavailable(
                "The request could not be queued (broker did not confirm); retry later."
            ) from None
        log.info(
            "request_accepted",
            request_id=request.request_id,
            tenant=request.tenant,
            kind=request.kind,
            max_tokens=request.sampling.max_tokens,
        )

    async def _publish_unless_blocked(self, exchange: AbstractExchange, message: Message) -> None:
        """Publish a request and wait for the broker's confirm. Raises :class:`BrokerBlocked`
        once the broker says it blocks this connection (a memory or disk alarm), which it
        does as the publish reaches it: else the first request of an alarm would wait out
        ``PUBLISH_TIMEOUT_S``."""
        publish = asyncio.ensure_future(
            exchange.publish(message, topology.SUBMIT_ROUTING_KEY, timeout=PUBLISH_TIMEOUT_S))
        try:
            while not publish.done():
                await asyncio.wait((publish,), timeout=BLOCKED_CHECK_S)
                if not publish.done() and amqp.publishing_blocked(self._connection):
                    raise BrokerBlocked
            publish.result()
        finally:
            if not publish.done():
                publish.cancel()

    async def finish(self, submission: Submission) -> None:
        request = submission.request
        stream = submission.stream
        self.router.close(request.request_id)
        self.link_loss.forget(request.request_id)
        if self._submissions.pop(request.request_id, None) is not None:
            self.metrics.in_flight.dec()
        if request.request_id in self._orphaned:
            await self.cancel_downstream(request.request_id, request.tenant)
        elif stream.final is not None:
            if not request.tokenize_only:  # no generation to count
                self.metrics.observe_finished(stream, request.tenant, request.background)
            log_finished(request, stream)
        elif not stream.arrived:
            self.metrics.cancelled.inc()
            await self.cancel_downstream(request.request_id, request.tenant)
        tokens_per_minute = submission.rate.limits.tokens_per_minute if submission.rate else 0
        settle = 0
        if tokens_per_minute and stream.final is not None:
            # What its estimate charged over what it used: given back (or, short, taken).
            settle = token_cost(request) - stream.final.prompt_tokens - stream.final.completion_tokens
        await self._release_slot(request.tenant, request.request_id, tokens_per_minute, settle)

    async def cancel_downstream(self, request_id: str, tenant: str) -> None:
        """Stop the request wherever it is: its cancel marker in Redis (which workers check
        as they start a request and while it runs; retried until written) and a broadcast
        to every worker and scheduler (at once, when the broker can route it)."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S), self.redis.pipeline(transaction=False) as pipe:
                redis_client.set_marker(pipe, request_id, keys.MARKER_CANCELLED, "1", self.settings.marker_ttl_s)
                await pipe.execute()
            self._orphaned.pop(request_id, None)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis_unavailable", op="cancel", request_id=request_id, error=repr(exc))
            self._orphan(request_id, tenant)
        await self._broadcast_cancel(request_id, tenant)

    async def _broadcast_cancel(self, request_id: str, tenant: str) -> None:
        """The fast path of a cancel (best effort): every worker and scheduler hears it."""
        exchange = self._control_exchange
        if exchange is None or not self.amqp_connected:
            log.info("cancel_broadcast_skipped", request_id=request_id, reason="broker not connected")
            return
        if amqp.publishing_blocked(self._connection):  # it would wait out the alarm
            log.info("cancel_broadcast_skipped", request_id=request_id, reason="broker blocks publishes")
            return
        message = amqp.to_amqp(
            CancelRequest(request_id=request_id, tenant=tenant), user_id=self.amqp_user
        )
        try:
            await exchange.publish(message, "", timeout=PUBLISH_TIMEOUT_S)
            log.info("request_cancelled", request_id=request_id, tenant=tenant)
        except Exception as exc:  # noqa: BLE001 - unroutable, timeout, link lost: the marker stays
            log.info("cancel_broadcast_failed", request_id=request_id, error=repr(exc))

    async def _try_admit(self, tenant: str, costs: dict[str, int],
                         limits: RateLimits = NO_LIMITS) -> RateState | None:
        """Take an admission slot for each request (id -> token cost), all or none, and
        (``limits``) one request and their tokens from the tenant's rate limits, or raise
        429 (tenant limits) / 503 (global, Redis down). Returns what is left of the rate
        limits (None: the tenant has none)."""
        s = self.settings
        total = sum(costs.values())
        if 0 < limits.tokens_per_minute < total:
            raise over_token_rate(limits, total, len(costs))
        now = time.time()
        # A request ends within request_timeout_s (504 otherwise); its slot counts until then.
        expires = now + s.request_timeout_s + 5
        # Checked first: a full Redis still runs the admission script (it deletes before
        # it adds, and Redis lets a script that has written go on), then the request
        # would wait in the scorer until Redis has room; a read-only one fails it anyway.
        if self._refusing_writes is not None:
            raise unavailable(redis_refusal(self._refusing_writes))
        try:
            await self._retry_releases()
            reply = await self._admit(
                keys=_slot_keys(tenant, self.incarnation),
                args=[repr(now), repr(expires), s.max_queued_per_tenant,
                      s.max_queued_tokens_per_tenant, s.max_queued_total,
                      int(s.request_timeout_s) + 60, tenant,
                      limits.requests_per_minute, limits.tokens_per_minute,
                      *itertools.chain.from_iterable(costs.items())],
            )
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", op="admit", error=repr(exc))
            if redis_client.refuses_writes(exc):
                self._refusing_writes = exc
            raise unavailable(redis_refusal(exc)) from None
        verdict, *levels = (v.decode() if isinstance(v, bytes) else v for v in reply)
        if verdict in ("ok", "rpm", "tpm"):
            return self._rate_state(tenant, limits, verdict, levels, total)
        if verdict == "requests":
            raise too_many_in_flight(s.max_queued_per_tenant)
        if verdict == "tokens":
            if total > s.max_queued_tokens_per_tenant:
                what = (f"The request's max_tokens plus prompt ({total} tokens)" if len(costs) == 1
                        else f"The max_tokens plus prompt of its {len(costs)} choices ({total} tokens)")
                raise ApiError(400, f"{what} exceeds this API key's budget of "
                                    f"{s.max_queued_tokens_per_tenant}.",
                               reason="too_large", param="max_tokens", code="token_budget_exceeded")
            raise token_budget_exceeded(s.max_queued_tokens_per_tenant)
        raise overloaded()

    async def take_rate(self, tenant: str, requests: list[CompletionRequest],
                        limits: RateLimits) -> RateState | None:
        """Charge requests that run later (a background response's choices) to their
        tenant's rate limits now, as one request, at their estimate (never settled); 429
        when they do not fit. Returns what is left (None: the tenant has no limits)."""
        if not limits.active:
            return None
        total = sum(token_cost(r) for r in requests)
        if 0 < limits.tokens_per_minute < total:
            raise over_token_rate(limits, total, len(requests))
        try:
            reply = await self._take_rate(keys=[keys.tenant_rate(tenant)],
                                          args=[limits.requests_per_minute, limits.tokens_per_minute, total])
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", op="take_rate", error=repr(exc))
            raise unavailable(redis_refusal(exc)) from None
        verdict, *levels = (v.decode() if isinstance(v, bytes) else v for v in reply)
        return self._rate_state(tenant, limits, verdict, levels, total)

    def _rate_state(self, tenant: str, limits: RateLimits, verdict: str, levels: list[str],
                    tokens: int) -> RateState | None:
        """What is left of a tenant's rate limits after a take that ``verdict`` answered
        (``ok``; else the 429 of the limit that refused, counted), or None when it has none."""
        rate = RateState(limits, float(levels[0]), float(levels[1]))
        if verdict != "ok":
            self.metrics.rate_limited.labels(tenant, "requests" if verdict == "rpm" else "tokens").inc()
            raise rate_limited(rate, verdict, tokens)
        return rate if limits.active else None

    async def give_back_rate(self, tenant: str, rate: RateState, tokens: int) -> None:
        """Undo a :meth:`take_rate` of one request and ``tokens`` whose request was then
        refused after all (best effort: a Redis error leaves the charge)."""
        limits = rate.limits
        try:
            await self._give_back_rate(keys=[keys.tenant_rate(tenant)],
                                       args=[limits.requests_per_minute, limits.tokens_per_minute, tokens])
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", op="give_back_rate", tenant=tenant, error=repr(exc))

    async def _release_slot(self, tenant: str, request_id: str, tokens_per_minute: int = 0,
                            settle: int = 0) -> None:
        """Free a request's admission slot, and give its tenant's token rate limit (of
        ``tokens_per_minute``) back ``settle`` tokens (< 0: take them)."""
        try:
            await self._release(keys=_slot_keys(tenant, self.incarnation),
                                args=[request_id, tokens_per_minute, settle])
        except (RedisError, OSError) as exc:
            # Retried with the next admission; the entry's expiry frees it in any case.
            log.warning("redis_unavailable", op="release", tenant=tenant, error=repr(exc))
            if len(self._pending_releases) < MAX_PENDING_RELEASES:
                self._pending_releases[request_id] = (tenant, tokens_per_minute, settle)

    async def _retry_releases(self) -> None:
        for request_id, (tenant, tokens_per_minute, settle) in list(self._pending_releases.items()):
            await self._release(keys=_slot_keys(tenant, self.incarnation),
                                args=[request_id, tokens_per_minute, settle])
            self._pending_releases.pop(request_id, None)

    # --- readiness -------------------------------------------------------------------

    async def readiness(self, now: float) -> dict[str, bool]:
        """Broker connected and taking messages, Redis answering, and a worker heartbeat
        within worker_alive_s."""
        checks = {"amqp": self.amqp_connected,
                  "amqp_publishing": not amqp.publishing_blocked(self._connection),
                  "redis": False, "worker": False}
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
