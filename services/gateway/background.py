"""OpenAI's background responses: ``POST /v1/responses`` with ``background: true``.

The request is checked as any response request is (a bad one is answered with its 400
at once), then queued in Redis and answered at once with the ``response`` object,
``status: "queued"``; the client polls ``GET /v1/responses/{id}`` (``in_progress``,
then ``completed``, ``incomplete``, ``failed`` or ``cancelled``) and may cancel it
with ``POST /v1/responses/{id}/cancel``. With ``stream: true`` too, its events are kept
as they are made (``keys.background_response_events``) and the request's answer is
their stream, from ``response.created`` and ``response.queued`` on; a client whose
connection dropped reads the rest with ``GET /v1/responses/{id}?stream=true&starting_after=N``
(the events after sequence number N), while the response runs on regardless.

The gateways run the queue (:class:`BackgroundRunner`): one gateway at a time runs a
response, under a lease it renews (:mod:`services.gateway.leases`), as the request its
tenant sent, through the same admission and pipeline (a ``service_tier: "flex"`` one
from spare capacity only). A request that finds its tenant at its admission limit,
no spare capacity or the system unavailable is tried again. When the gateway running a
response dies, another (or its restart) takes the lease once it lapses and runs the
response again from its start, so nothing is lost; the answer is stored once, by one
atomic write that also ends the response, and not at all once it was cancelled or
deleted. A streamed response run again after some of its output went out goes on with
its last event only (``response.completed`` with the whole new answer): the new run's
text deltas would not continue the ones already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from services import keys
from services.gateway.auth import authenticate
from services.gateway.errors import (
    RETRY_AFTER_S,
    ApiError,
    documented_errors,
    invalid,
    redis_or_503,
)
from services.gateway.leases import RETRIED_STATUSES, LeasedRunner, Leases
from services.gateway.responses import KEEPALIVE, sse
from services.gateway.responses_api import ResponseStore
from services.logs import get_logger

log = get_logger("gateway.background")

RUNNING = ("queued", "in_progress")
"""A background response's statuses before it ends."""
WINDOW_S = 24 * 3600
"""How long a background response that keeps being told "not now" (429, 503) is tried
again before it fails with that answer."""
REDIS_TIMEOUT_S = 10.0
QUEUED_EVENTS = 2
"""A streamed background response's first events, written when it is queued:
``response.created`` and ``response.queued``; its runs' events come after them."""
TERMINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")
CANDIDATES = 1024
"""How many of the oldest waiting responses a runner looks at to take the fairest:
enough while fewer than this many run at once across the gateways."""
TAIL_POLL_S = 0.1
"""How often a stream read from another gateway than the one running the response
looks for more events (the running gateway's own readers are woken at once)."""

_QUEUE = """
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[2], 'body', ARGV[3], 'record', ARGV[4], 'stream', #ARGV - 7)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[7])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[2])
for i = 8, #ARGV do redis.call('XADD', KEYS[5], '0-' .. (i - 7), 'e', ARGV[i]) end
if #ARGV > 7 then redis.call('EXPIRE', KEYS[5], ARGV[7]) end
return 1
"""
"""KEYS: job, active, tenant's active, stored response, events, tenants; ARGV: id,
tenant, body, record, created_at, per-tenant cap, TTL, then a streamed one's first
events."""

_START = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('GET', KEYS[3]) ~= ARGV[3] then return {0, ''} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
return {redis.call('HINCRBY', KEYS[1], 'runs', 1), last[1] and last[1][1] or ''}
"""
"""Start a run of a response not yet ended, under the owner's lease: store its record
(in progress) and count the run. KEYS: job, stored response, lease, events; ARGV:
record, TTL, owner. Returns the run's number (0 when it ended or the lease is
another's) and its last event's entry id ('' for none)."""

_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('XADD', KEYS[2], ARGV[i], 'e', ARGV[i + 1]) end
return 1
"""
"""Add events of a response not yet ended, under the owner's lease. KEYS: job, events,
lease; ARGV: owner, then entry id and SSE bytes of each event."""

_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[5] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
for i = 6, #ARGV, 2 do redis.call('XADD', KEYS[6], ARGV[i], 'e', ARGV[i + 1]) end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[4])
  redis.call('ZREM', KEYS[4], ARGV[4])
  redis.call('HDEL', KEYS[7], ARGV[4])
  if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('EXPIRE', KEYS[6], ARGV[2]) end
end
return 1
"""
"""Write a response not yet ended (``final``: and end it) with its last events, unless
it ended or (with an owner) its lease is another's. KEYS: job, stored response, active,
tenant's active, lease, events, tenants; ARGV: record, TTL, final (1/0), id, owner ('' for
any), then entry id and SSE bytes of each event."""


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def too_many_queued(limit: int) -> ApiError:
    return ApiError(429, f"Too many background responses queued or running for this API key "
                         f"(limit {limit}); wait for some to end, or cancel them.",
                    reason="background_limit", param="background", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


UNREACHABLE = "Background responses cannot be reached now (Redis is not reachable); retry later."


def entry_id(sequence: int) -> str:
    """The events stream's entry id of the event numbered ``sequence``."""
    return f"0-{sequence + 1}"


def split_events(piece: bytes) -> list[bytes]:
    """The SSE events of a piece of a stream (``event:``/``data:`` pairs, each ending in
    a blank line; the JSON of a ``data:`` line holds no line break)."""
    return [event + b"\n\n" for event in piece.split(b"\n\n") if event]


def event_kind(event: bytes) -> bytes:
    return event.split(b"\n", 1)[0].removeprefix(b"event: ")


def event_data(event: bytes) -> dict[str, Any]:
    return json.loads(event.split(b"\ndata: ", 1)[1])


@dataclass(frozen=True, slots=True)
class Job:
    """A background response to run: its id, tenant, request body, stored record
    (``tenant``, ``items``, ``inputs``, ``response``) as queued, and whether its events
    are kept (``stream``)."""

    response_id: str
    tenant: str
    body: bytes
    record: dict[str, Any]
    stream: bool = False

    @property
    def response(self) -> dict[str, Any]:
        return self.record["response"]

    def ended(self, status: str, **fields: Any) -> bytes:
        """The record of the response ended with ``status`` and no answer."""
        return encode({**self.record, "response": self.ended_response(status, **fields)})

    def ended_response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {**self.response, "status": status, **fields}


@dataclass(frozen=True, slots=True)
class BackgroundRun:
    """One run of a queued background response: the id and creation time its client was
    given, the id of this run's request, and (a streamed one) the sequence number its
    events go on from."""

    response_id: str
    request_id: str
    created_at: int
    first_sequence: int | None = None


class BackgroundStore:
    """Background responses in Redis: queued, taken, written and ended once; a streamed
    one's events kept and read."""

    def __init__(self, redis: Any, ttl_s: int, per_tenant: int, keepalive_s: float = 0.0) -> None:
        """``ttl_s``: how long a response is kept (the gateway's ``responses_ttl_s``);
        ``per_tenant``: the most a tenant may have queued or running; ``keepalive_s``: how
        long a reader of a response's events may go without bytes before an SSE comment
        (the gateway's ``stream_keepalive_s``; 0: never)."""
        self.redis = redis
        self.ttl_s = ttl_s
        self.per_tenant = per_tenant
        self.keepalive_s = keepalive_s
        self.leases = Leases(redis, keys.background_response_lease)
        self._queue = redis.register_script(_QUEUE)
        self._start = redis.register_script(_START)
        self._append = redis.register_script(_APPEND)
        self._write = redis.register_script(_WRITE)
        self._woken: dict[str, asyncio.Event] = {}
        """Per response: what this gateway's readers of its events wait on."""
        self.on_queued: Callable[[], None] = lambda: None
        """Called when this gateway queued a response (its runner looks at once)."""

    async def queue(self, tenant: str, response_id: str, body: bytes, record: bytes,
                    events: list[bytes] | None = None) -> None:
        """Queue a response (429 past the tenant's cap, 503 without Redis); its record
        is stored at once, for ``GET``; ``events``: a streamed one's first events
        (:data:`QUEUED_EVENTS` of them)."""
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            queued = await self._queue(
                keys=[keys.background_response(response_id), keys.BACKGROUND_RESPONSES_ACTIVE,
                      keys.tenant_background_responses(tenant), keys.stored_response(response_id),
                      keys.background_response_events(response_id), keys.BACKGROUND_RESPONSES_TENANT],
                args=[response_id, tenant, body, record, time.time(), self.per_tenant, self.ttl_s,
                      *(events or ())])
        if not queued:
            raise too_many_queued(self.per_tenant)
        self.on_queued()

    async def oldest(self, count: int) -> list[tuple[str, str]]:
        """The ``count`` oldest responses not yet ended, with their tenants."""
        ids = await self.redis.zrange(keys.BACKGROUND_RESPONSES_ACTIVE, 0, count - 1)
        if not ids:
            return []
        tenants = await self.redis.hmget(keys.BACKGROUND_RESPONSES_TENANT, ids)
        return [(i.decode(), t.decode() if t is not None else "") for i, t in zip(ids, tenants, strict=True)]

    async def job(self, response_id: str) -> Job | None:
        """The response's job, None once it ended (or is gone)."""
        tenant, body, record, stream = await self.redis.hmget(keys.background_response(response_id),
                                                              ["tenant", "body", "record", "stream"])
        if tenant is None or body is None or record is None:
            return None
        return Job(response_id, tenant.decode(), body, json.loads(record), stream not in (None, b"0"))

    async def running(self, response_id: str) -> bool:
        return bool(await self.redis.exists(keys.background_response(response_id)))

    async def has_events(self, response_id: str) -> bool:
        """Whether the response's events are kept (a streamed one's, while it is kept)."""
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            return bool(await self.redis.exists(keys.background_response_events(response_id)))

    async def forget(self, response_id: str) -> None:
        """No runner takes the response again (it is gone)."""
        await self.redis.zrem(keys.BACKGROUND_RESPONSES_ACTIVE, response_id)

    async def start(self, job: Job, owner: str) -> tuple[int, int]:
        """Mark the response in progress under ``owner``'s lease: the number of this run
        (1 for the first; 0 if it ended or the lease is another's) and the sequence
        number of its last event kept (-1 for none)."""
        run, last = await self._start(
            keys=[keys.background_response(job.response_id), keys.stored_response(job.response_id),
                  keys.background_response_lease(job.response_id),
                  keys.background_response_events(job.response_id)],
            args=[job.ended("in_progress"), self.ttl_s, owner])
        return int(run), int(last.rsplit(b"-", 1)[1]) - 1 if last else -1

    async def append(self, job: Job, owner: str, events: list[tuple[int, bytes]]) -> bool:
        """Keep events (sequence number, SSE bytes) of a response not yet ended, under
        ``owner``'s lease; False if it ended or the lease is another's."""
        added = await self._append(
            keys=[keys.background_response(job.response_id), keys.background_response_events(job.response_id),
                  keys.background_response_lease(job.response_id)],
            args=[owner, *(x for seq, event in events for x in (entry_id(seq), event))])
        self._wake(job.response_id)
        return bool(added)

    async def write(self, job: Job, record: bytes, *, final: bool, owner: str = "",
                    events: list[tuple[int, bytes]] = ()) -> bool:
        """Store ``record`` as the response's (``final``: and end it) with its last
        ``events``, unless it ended or (``owner`` given) its lease is not ``owner``'s;
        False then."""
        written = await self._write(
            keys=[keys.background_response(job.response_id), keys.stored_response(job.response_id),
                  keys.BACKGROUND_RESPONSES_ACTIVE, keys.tenant_background_responses(job.tenant),
                  keys.background_response_lease(job.response_id),
                  keys.background_response_events(job.response_id), keys.BACKGROUND_RESPONSES_TENANT],
            args=[record, self.ttl_s, "1" if final else "0", job.response_id, owner,
                  *(x for seq, event in events for x in (entry_id(seq), event))])
        self._wake(job.response_id)
        return bool(written)

    def _wake(self, response_id: str) -> None:
        woken = self._woken.pop(response_id, None)
        if woken is not None:
            woken.set()

    async def events(self, response_id: str, after: int) -> AsyncIterator[bytes]:
        """A streamed response's events after sequence number ``after`` as they come,
        until its last (or, cancelled or deleted, until it ended)."""
        key = keys.background_response_events(response_id)
        cursor = entry_id(after)
        loop = asyncio.get_running_loop()
        said_at = loop.time()
        try:
            while True:
                woken = self._woken.setdefault(response_id, asyncio.Event())
                entries = await self.redis.xrange(key, min=f"({cursor}", max="+", count=256)
                for entry, fields in entries:
                    cursor = entry.decode()
                    said_at = loop.time()
                    yield fields[b"e"]
                    if event_kind(fields[b"e"]) in TERMINAL_EVENTS:
                        return
                if entries:
                    continue
                if not await self.running(response_id):
                    if not await self.redis.xrange(key, min=f"({cursor}", max="+", count=1):
                        return  # cancelled or deleted: nothing more comes
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TAIL_POLL_S):
                        await woken.wait()
                if self.keepalive_s and loop.time() - said_at >= self.keepalive_s:
                    said_at = loop.time()
                    yield KEEPALIVE  # queued, or between events: not idle to a proxy
        finally:
            self._woken.pop(response_id, None)  # another reader of it sets its own again


class Superseded(Exception):
    """A run's answer that was not stored: the response was cancelled or deleted, or
    another gateway runs it now."""


class RunStore(ResponseStore):
    """What a background run stores its answer with: the response's one final write,
    under the runner's lease, with the id, creation time and input ids it was queued
    with. A streamed run's answer is held (:attr:`held`) to be written with its last
    events. Reading (``previous_response_id``) is the stored responses' as ever."""

    def __init__(self, responses: ResponseStore, jobs: BackgroundStore, job: Job, owner: str) -> None:
        super().__init__(responses.redis, responses.ttl_s)
        self.jobs = jobs
        self.job = job
        self.owner = owner
        self.held: bytes | None = None

    async def keep(self, tenant: str, items: list[dict[str, Any]], response: dict[str, Any],
                   inputs: int = 0) -> None:
        queued = self.job.response
        response.update(id=queued["id"], created_at=queued["created_at"])
        own = self.job.record["items"][len(self.job.record["items"]) - self.job.record["inputs"]:]
        items = [*items[:len(items) - inputs], *own]  # the input as queued, with its ids
        data = self.record(tenant, items, response, inputs)
        if data is None:
            data = self.job.ended("failed", error={
                "code": "server_error", "message": "The answer is too large to store."})
        if self.job.stream:
            self.held = data
            return
        # A Redis error goes up: the lease is let go and the response runs again.
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            if not await self.jobs.write(self.job, data, final=True, owner=self.owner):
                raise Superseded()


class EventLog:
    """Where a streamed run's events go: kept as they come, numbered on from the
    response's last, but for the piece that ends the answer (held, to be written with
    it). ``quiet``: only the last event is kept (a run again after output went out)."""

    def __init__(self, jobs: BackgroundStore, store: RunStore, first_sequence: int, quiet: bool) -> None:
        self.jobs = jobs
        self.store = store
        self.next = first_sequence
        self.quiet = quiet
        self.held: list[tuple[int, bytes]] = []
        self.last: dict[str, Any] | None = None
        """The response of the event that ended the answer (completed, incomplete, failed)."""

    async def __call__(self, piece: bytes) -> None:
        events = []
        for event in split_events(piece):
            sequence, self.next = self.next, self.next + 1
            if event_kind(event) in TERMINAL_EVENTS:
                self.last = event_data(event)["response"]
            elif self.quiet:
                continue
            events.append((sequence, event))
        if self.store.held is not None:  # the answer is done: these go with it
            self.held += events
            return
        if events and not await self.jobs.append(self.store.job, self.store.owner, events):
            raise Superseded()


def fair_order(waiting: list[tuple[str, str]], running: Counter[str]) -> list[str]:
    """The order in which to take waiting responses ((id, tenant), oldest first) when
    ``running`` (per tenant) run here: a tenant's k-th oldest waiting one ranks as if it
    queued behind the ones of its running here (``running[tenant] + k``), so a tenant
    with many queued does not take every slot from one with a few; the older first on a
    tie. (The scheduler orders their requests fairly once they run; this keeps the
    runner's slots from being the unfair part.)"""
    seen: Counter[str] = Counter()
    ranked = []
    for position, (response_id, tenant) in enumerate(waiting):
        ranked.append((running[tenant] + seen[tenant], position, response_id))
        seen[tenant] += 1
    return [response_id for *_, response_id in sorted(ranked)]


Emit = Callable[[bytes], Awaitable[None]]
RunResponse = Callable[[str, bytes, BackgroundRun, RunStore, Emit | None], Awaitable[Any]]
"""(tenant, body, run, store, emit) -> run the response as if the tenant sent the body:
answered whole and stored by ``store.keep`` (``emit`` None), or streamed, each piece of
its events to ``emit``; an error before it began is raised as ApiError."""


class BackgroundRunner:
    """Runs the queued background responses, one gateway per response at a time (a lease
    each), at most ``concurrency`` at once in this gateway."""

    def __init__(self, store: BackgroundStore, responses: ResponseStore, run_response: RunResponse, *,
                 owner: str, concurrency: int, lease_s: float = 15.0, poll_s: float = 1.0,
                 retry_s: float = 1.0, on_outcome: Callable[[str], None] = lambda _: None) -> None:
        """``on_outcome`` counts each run's end: ``completed``, ``failed``, ``cancelled``,
        ``retried`` (a "not now" answer, tried again) or ``handed_over``."""
        self.store = store
        self.responses = responses
        self.run_response = run_response
        self.owner = owner
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.on_outcome = on_outcome
        self._tenants: dict[str, str] = {}
        """The tenant of each response this gateway runs."""
        self._leased = LeasedRunner("background_response", store.leases, self._waiting, self.run,
                                    owner=owner, lease_s=lease_s, poll_s=poll_s, max_jobs=concurrency)
        store.on_queued = self._leased.wake

    async def _waiting(self) -> list[str]:
        """The responses to take, fairest first (see :func:`fair_order`)."""
        running = self._leased.running
        waiting = [(r, t) for r, t in await self.store.oldest(CANDIDATES) if r not in running]
        return fair_order(waiting, Counter(t for r, t in self._tenants.items() if r in running))

    def start(self) -> None:
        self._leased.start()

    async def close(self) -> None:
        """Stop: the responses under way are given up and their leases let go, so another
        gateway runs them again at once."""
        await self._leased.close()

    async def run(self, response_id: str, lost: asyncio.Event | None = None) -> None:
        """Run one response to its end, unless it is cancelled or deleted meanwhile, or
        ``lost`` is set (its lease went to another gateway)."""
        lost = lost or asyncio.Event()
        job = await self.store.job(response_id)
        if job is None:
            await self.store.forget(response_id)
            return
        run, last = await self.store.start(job, self.owner)
        if not run:
            return
        self._tenants[response_id] = job.tenant
        try:
            await self._run(job, run, last, lost)
        finally:
            self._tenants.pop(response_id, None)

    async def _run(self, job: Job, run: int, last: int, lost: asyncio.Event) -> None:
        response_id = job.response_id
        log.info("background_response_running", response_id=response_id, tenant=job.tenant, run=run)
        # A request id is used once: a run after a dead gateway's, or a try after "not now",
        # gets one of its own (the first may still be running, or cancelled, downstream).
        request_id = response_id if run == 1 else f"{response_id}-{uuid.uuid4().hex[:12]}"
        created_at = job.response["created_at"]
        first = last + 1 if job.stream else None
        while True:
            store = RunStore(self.responses, self.store, job, self.owner)
            emit = None if first is None else EventLog(self.store, store, first, quiet=last > QUEUED_EVENTS)
            work = asyncio.ensure_future(self.run_response(
                job.tenant, job.body, BackgroundRun(response_id, request_id, created_at, first), store, emit))
            try:
                await self._watch(work, job, lost)
                outcome = await self._end_stream(job, store, emit) if emit is not None else "completed"
            except ApiError as err:
                if err.status in RETRIED_STATUSES and time.time() < created_at + WINDOW_S:
                    self.on_outcome("retried")
                    await asyncio.sleep(self.retry_s * random.uniform(0.5, 1.5))
                    request_id = f"{response_id}-{uuid.uuid4().hex[:12]}"
                    continue
                outcome = await self._fail(job, emit, {"code": err.code or err.type, "message": err.message})
            except Superseded:
                outcome = "handed_over" if lost.is_set() else "cancelled"
            except (RedisError, OSError):
                raise  # the lease is let go: this gateway or another runs it again
            except Exception as exc:  # a bug: the response fails, the runner goes on
                log.exception("background_response_crashed", response_id=response_id)
                outcome = await self._fail(job, emit, {"code": "server_error",
                                                       "message": f"The response failed: {exc!r}"})
            self.on_outcome(outcome)
            log.info("background_response_ended", response_id=response_id, tenant=job.tenant,
                     outcome=outcome)
            return

    async def _watch(self, work: asyncio.Future[Any], job: Job, lost: asyncio.Event) -> None:
        """Await the run; cancel it (its requests are cancelled downstream) once the
        response is cancelled or deleted, or the lease lost."""
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=self.poll_s)
                if done:
                    work.result()
                    return
                if lost.is_set():
                    raise Superseded()
                with contextlib.suppress(RedisError, OSError):
                    if not await self.store.running(job.response_id):
                        raise Superseded()
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    async def _end_stream(self, job: Job, store: RunStore, events: EventLog) -> str:
        """Write a streamed run's answer with its last events, ending the response."""
        if store.held is None:  # it ended without an answer (response.failed went out)
            error = (events.last or {}).get("error") or {"code": "server_error", "message": "No answer."}
            return await self._fail(job, None, error)
        if not await self.store.write(job, store.held, final=True, owner=self.owner, events=events.held):
            raise Superseded()
        return "completed"

    async def _fail(self, job: Job, events: EventLog | None, error: dict[str, Any]) -> str:
        """End the response as failed with ``error`` (a streamed one with its
        ``response.failed`` event)."""
        last = []
        if events is not None:
            last = [(events.next, sse({"type": "response.failed", "sequence_number": events.next,
                                       "response": job.ended_response("failed", error=error)},
                                      event="response.failed"))]
        if not await self.store.write(job, job.ended("failed", error=error), final=True, owner=self.owner,
                                      events=last):
            return "cancelled"
        return "failed"


# --- routes --------------------------------------------------------------------------------------


def not_cancellable(response_id: str) -> ApiError:
    return invalid(f"Response {response_id!r} was not created with background true: only a "
                   "background response can be cancelled.", param="response_id")


async def cancel(store: BackgroundStore, responses: ResponseStore, response_id: str, tenant: str) -> dict[str, Any]:
    """Cancel a background response of ``tenant``'s: it is ``cancelled`` unless it had
    ended, and then it is answered as it ended (cancelling is idempotent)."""
    record = await responses.stored(response_id, tenant)
    response = record["response"]
    if not response.get("background"):
        raise not_cancellable(response_id)
    if response["status"] not in RUNNING:
        return response
    job = Job(response_id, tenant, b"", record)
    async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
        if await store.write(job, job.ended("cancelled"), final=True):
            log.info("background_response_cancelled", response_id=response_id, tenant=tenant)
            return {**response, "status": "cancelled"}
    return await responses.get(response_id, tenant)  # it ended meanwhile


async def cancel_response(request: Request, response_id: str) -> Response:
    """POST /v1/responses/{id}/cancel."""
    state = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    return JSONResponse(await cancel(state.background, state.responses, response_id, tenant))


def install(app: FastAPI) -> None:
    app.add_api_route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"],
                      openapi_extra={"security": [{"bearerAuth": []}]},
                      responses=documented_errors({
                          400: "Not a background response", 401: "Missing or invalid API key",
                          404: "No such response (of this API key's tenant)",
                          503: "Redis is not reachable"}),
                      summary="Cancel a background response")
