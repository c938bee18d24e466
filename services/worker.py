"""Worker runtime shared by ``cpu_worker`` and ``gpu_worker``: AMQP around the engine.

Story: load the engine, connect, take work items from the pool's queue (prefetch =
engine slots, so the broker only hands over what the engine can run), feed them to
the engine's step loop on its own thread, stream every token to the caller's
``reply_to`` in order, report progress and completion, heartbeat capacity and speed
into Redis, and on SIGTERM stop taking work, finish what runs within a grace period
and hand the rest back to the queue, each with a resume point for the next worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from services import amqp, keys, redis_client, topology
from services import messages as m
from services import metrics as prom
from services.adapters import AdapterCatalog
from services.engine import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStats,
    LLMEngine,
    RequestOutput,
    ResumedOutput,
)
from services.engine.echo import EchoEngine
from services.engine.interface import LoraRequest
from services.engine.sampling import with_seed
from services.logs import get_logger
from services.runtime import BackgroundTasks, start_vital
from services.settings import Settings

log = get_logger(__name__)

ENGINE_STOP_TIMEOUT_S = 30.0
"""How long a stopping worker waits for the engine's step in progress to end."""

PROGRESS_INTERVAL_S = 0.5
RESUME_POINT_INTERVAL_S = 0.5
RESUME_POINT_GROWTH = 0.1
"""A request's resume point is rewritten (whole) once its output grew by this fraction
since the last one, at most every interval: a worker that dies loses at most about the
interval or this fraction of each answer, whichever is more, and an answer of n tokens
costs O(n) bytes of writes, not O(n^2)."""
FEEDBACK_PROMPT_CHARS = 4000
BACKGROUND_PRIORITY = 1.0
"""Engine priority of background requests (0 for the others): when KV memory runs short,
the engine preempts them first."""


@dataclass(frozen=True, slots=True)
class WorkClaim:
    """What Redis says about a work item as a worker takes it."""

    cancelled: bool
    done: bool
    claimed: bool
    """This delivery holds the request's claim: no other delivery has started it."""
    resume: m.ResumePoint | None = None
    """What the caller already has, left by a worker that handed the request back."""

    def is_duplicate(self, redelivered: bool) -> bool:
        """A copy that must not run: the request was answered, or another delivery holds
        its claim. A scheduler that dies between publishing a work item and recording the
        broker's confirm makes its successor publish the item again, so a second copy is
        expected after a failover. A broker redelivery (the first worker died holding the
        message) is the one case that must run again despite the claim."""
        return self.done or (not self.claimed and not redelivered)


def emit_failed(request_id: str, exc: BaseException) -> None:
    """A reply or event the broker did not take (the request is handed back): a warning
    when the link is down (a broker restart or a cut link, which the worker rides out),
    an error with its trace otherwise."""
    if amqp.link_down(exc):
        log.warning("emit_failed", request_id=request_id, error=repr(exc))
    else:
        log.error("emit_failed", request_id=request_id, exc_info=exc)


def claimant(worker_id: str, life: str, delivery_tag: int) -> str:
    """Who takes a request's claim: one delivery of its work item to one worker process.
    A handler run again in place (Redis failed it) is the same delivery and still holds
    the claim it may have taken; a second copy, even to the same worker, is not."""
    return f"{worker_id}/{life}.{delivery_tag}"


def claimant_worker_id(claim: str | bytes) -> str:
    """The worker whose delivery holds a claim."""
    text = claim.decode() if isinstance(claim, bytes) else claim
    return text.split("/", 1)[0]


async def claim_work(redis: aioredis.Redis, request_id: str, claimed_by: str,
                     marker_ttl_s: int = keys.DEFAULT_MARKER_TTL_S) -> WorkClaim:
    """Take the claim for ``claimed_by`` (see :func:`claimant`) unless someone holds it,
    and read it back with the done and cancelled markers and any resume point, in one
    round trip. The claim is taken even when the request turns out done, cancelled or
    unservable, which is harmless: nobody else may run it then either."""
    pipe = redis.pipeline(transaction=False)
    redis_client.set_marker(pipe, request_id, keys.MARKER_CLAIM, claimed_by, marker_ttl_s, nx=True)
    pipe.hmget(keys.request_markers(request_id), keys.MARKER_CANCELLED, keys.MARKER_DONE,
               keys.MARKER_CLAIM)
    pipe.get(keys.work_resume(request_id))
    _, _, (cancelled, done, holder), resume = await pipe.execute()
    claimed = holder is not None and holder.decode() == claimed_by
    point = None
    if resume is not None:
        try:
            point = m.decode(resume, m.ResumePoint)
        except m.MessageError as exc:  # then the request is generated again from the start
            log.warning("resume_point_unreadable", request_id=request_id, error=str(exc))
    return WorkClaim(cancelled=bool(cancelled), done=bool(done), claimed=bool(claimed), resume=point)


async def ack_answered(message: AbstractIncomingMessage, redis: aioredis.Redis, request_id: str,
                       marker_ttl_s: int = keys.DEFAULT_MARKER_TTL_S) -> None:
    """Ack a work item whose answer the broker has confirmed. If the ack cannot go (the link
    dropped after the confirm), the broker redelivers the item, and the worker that takes
    it must drop it: the scheduler marks the request done on its completion event, but
    maybe only after the redelivery (the event waits out the same outage), so the done
    marker is set here as well."""
    try:
        await message.ack()
    except Exception as exc:  # noqa: BLE001 - the answer is out; what is left is cleanup
        log.warning("ack_failed", request_id=request_id, error=repr(exc))
        try:
            pipe = redis.pipeline(transaction=False)
            redis_client.set_marker(pipe, request_id, keys.MARKER_DONE, "1", marker_ttl_s)
            await pipe.execute()
        except Exception as mark_exc:  # noqa: BLE001 - the copy then runs again, for nothing
            log.warning("answered_mark_failed", request_id=request_id, error=repr(mark_exc))


def merge_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Consecutive steps' outputs as one per request, in order of first appearance: its
    tokens and text joined, its state (ended, counts) the latest."""
    merged: dict[str, RequestOutput] = {}
    for out in outputs:
        first = merged.get(out.request_id)
        if first is None:
            merged[out.request_id] = out
        else:
            merged[out.request_id] = replace(
                out, new_token_ids=first.new_token_ids + out.new_token_ids,
                new_text=first.new_text + out.new_text, logprobs=first.logprobs + out.logprobs,
                prompt_logprobs=first.prompt_logprobs or out.prompt_logprobs)
    return list(merged.values())


class EngineThread(threading.Thread):
    """Runs the engine's step loop; the engine is only ever touched from this thread."""

    def __init__(self, engine: LLMEngine | EchoEngine, on_outputs,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.on_death = on_death
        """Called (on this thread) if the step loop itself fails: nothing runs any more."""
        # A paced engine (echo) says how long until its next token: sleep on the command
        # queue meanwhile, so a new request is taken at once and nothing busy-waits.
        self._wait_s = getattr(engine, "wait_s", None)
        self.on_outputs = on_outputs
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.stats: EngineStats = engine.stats()
        self.live: set[str] = set()
        self._stopping = threading.Event()

    def add(self, request: EngineRequest) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("add", request, done))
        return done

    def prepare(self, request: EngineRequest) -> None:
        """The engine's slow set-up of a request (compiling its language), on the calling
        thread, so the step loop does not stall on it; raises EngineError."""
        self.engine.prepare(request)

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id, None))

    def stop(self) -> None:
        self._stopping.set()
        self.commands.put(("wake", None, None))

    def _handle(self, command: tuple) -> None:
        kind, arg, done = command
        if kind == "add":
            # A caller that stopped waiting (its delivery's handler was cancelled: the broker
            # link went, and the item is redelivered) cancelled the future: do not start it.
            if not done.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(arg)
                self.live.add(arg.request_id)
            except Exception as exc:  # noqa: BLE001 - any error goes back to the caller
                done.set_exception(exc)
            else:
                done.set_result(None)
        elif kind == "abort":
            self.engine.abort_request(arg)

    def run(self) -> None:
        try:
            self._step_loop()
        except BaseException as exc:
            log.exception("engine_thread_died")
            if self.on_death is not None:
                self.on_death(exc)

    def _step_loop(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_unfinished_requests():
                self._handle(self.commands.get())  # idle: sleep until a command arrives
            while not self.commands.empty():
                self._handle(self.commands.get_nowait())
            if self.engine.has_unfinished_requests():
                wait = self._wait_s() if self._wait_s is not None else 0.0
                if wait > 0:
                    with contextlib.suppress(queue.Empty):
                        self._handle(self.commands.get(timeout=wait))
                    self.stats = self.engine.stats()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception:
                    log.exception("engine_step_failed")
                    outputs = self._fail_all()
                self.live.difference_update(o.request_id for o in outputs if o.finished)
                if outputs:
                    self.on_outputs(outputs)
            self.stats = self.engine.stats()

    def _fail_all(self) -> list[RequestOutput]:
        """A broken step must not hang callers: end every live request with an error."""
        outputs = []
        for rid in self.live:
            with contextlib.suppress(Exception):
                self.engine.abort_request(rid)
            outputs.append(RequestOutput(request_id=rid, new_token_ids=[], new_text="", finished=True,
                                         finish_reason="error", num_prompt_tokens=0,
                                         num_output_tokens=0, error="engine step failed"))
        with contextlib.suppress(Exception):
            self.engine.step()  # collect the aborts so the engine frees their blocks
        return outputs


@dataclass
class Active:
    """A request this worker is running."""

    item: m.WorkItem
    message: AbstractIncomingMessage
    output_tokens: int = 0
    reported_tokens: int = 0
    engine_id: str = ""
    """The engine's id for this attempt (request id + attempt number): outputs of an
    aborted earlier attempt of the same request can never be taken for this one's."""
    unconfirmed: deque[tuple[asyncio.Future, int, int]] = field(default_factory=deque)
    """Chunk publishes not known confirmed, in order, each with (output tokens, characters)
    the caller has once it is in. The final answer waits for them; a refused one stays here."""
    confirmed: tuple[int, int] = (0, 0)
    """(output tokens, characters) of the chunks the broker confirmed, in order."""
    stopping: bool = False
    """Being aborted for a cancel marker or a caller that is gone: abort (and log) once."""
    finishing: bool = False
    """Its last output came: the final answer is on its way."""
    output_token_ids: list[int] = field(default_factory=list)
    """Every output token sent to the caller (a hand-back leaves them as a resume point)."""
    output_logprobs: list[m.TokenLogprob] = field(default_factory=list)
    """Their log-probabilities, when the request asked for them."""
    prompt_logprobs: list[m.TokenLogprob] = field(default_factory=list)
    """The prompt's, sent with the first chunk, when the request asked for them."""
    streamed_chars: int = 0
    """Characters of text sent to the caller."""
    streamed_text: list[str] = field(default_factory=list)
    """That text, in the pieces it was sent in."""
    checkpointed: int = 0
    """Output tokens in its resume point in Redis (0: none), the one it was resumed from
    or the last this worker wrote; deleted once the request is answered."""

    def sent(self, publish: asyncio.Future, token_ids: list[int], text: str,
             logprobs: list[m.TokenLogprob] | None = None,
             prompt_logprobs: list[m.TokenLogprob] | None = None) -> None:
        """A chunk went out (``publish`` completes with the broker's confirm)."""
        self.output_token_ids.extend(token_ids)
        self.output_logprobs.extend(logprobs or [])
        self.prompt_logprobs = self.prompt_logprobs or prompt_logprobs or []
        self.streamed_chars += len(text)
        self.streamed_text.append(text)
        self.unconfirmed.append((publish, len(self.output_token_ids), self.streamed_chars))

    @property
    def publishes(self) -> list[asyncio.Future]:
        """Chunk publishes not known confirmed (a refused one among them)."""
        return [publish for publish, *_ in self.unconfirmed]

    def confirmed_prefix(self) -> tuple[int, int] | None:
        """(tokens, characters) the caller surely has: the chunks up to the first
        one not confirmed yet (those drop out of ``unconfirmed``). None once a publish
        failed: the caller misses that chunk."""
        while self.unconfirmed and self.unconfirmed[0][0].done():
            publish = self.unconfirmed[0][0]
            if publish.cancelled() or publish.exception() is not None:
                return None
            self.confirmed = self.unconfirmed.popleft()[1:]
        return self.confirmed

    def resume_point_due(self) -> bool:
        """What its caller surely has grew by ``RESUME_POINT_GROWTH`` since its last point."""
        prefix = self.confirmed_prefix()
        n = prefix[0] if prefix else 0
        return n - self.checkpointed >= max(1.0, RESUME_POINT_GROWTH * n)

    def resume_point(self, worker_id: str) -> m.ResumePoint | None:
        """What its caller surely has (the chunks the broker confirmed, in order), so the
        next worker continues from there; None before any, or once a publish failed."""
        prefix = self.confirmed_prefix()
        if not prefix or not prefix[0]:
            return None
        tokens, chars = prefix
        return m.ResumePoint(request_id=self.item.request_id, worker_id=worker_id,
                             output_token_ids=self.output_token_ids[:tokens], streamed_chars=chars,
                             streamed_text="".join(self.streamed_text)[:chars],
                             output_logprobs=self.output_logprobs[:tokens],
                             prompt_logprobs=self.prompt_logprobs)

    @property
    def request(self) -> m.CompletionRequest:
        return self.item.scored.request

    def prompt_extras(self, first: bool) -> dict[str, Any]:
        """What a reply carrying the answer's ``first`` tokens brings back about the prompt,
        when the caller asked: a token-id prompt's text, the prompt's ids. Later ones: nothing."""
        if not first:
            return {}
        return {"echoed_prompt": self.request.prompt_to_echo(),
                "prompt_token_ids": self.item.scored.prompt_ids_to_return()}


class WorkerService:
    def __init__(self, settings: Settings, pool: str, device: str) -> None:
        self.settings = settings
        self.pool = pool
        self.device = device
        self.worker_id = f"{pool}-{settings.instance_id}"
        self.life = uuid.uuid4().hex[:12]
        self.active: dict[str, Active] = {}
        self.draining = False
        self.cut_off = False
        """Redis has not taken a heartbeat for ``worker_timeout_s``: the scheduler takes this
        worker for dead, so it takes no work (what it runs goes on streaming) until Redis
        answers again."""
        self.by_engine: dict[str, Active] = {}
        self._attempts = itertools.count(1)
        self.outputs: asyncio.Queue[list[RequestOutput]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._background = BackgroundTasks()
        """Final answers and hand-backs, run outside the output loop."""
        self._consumer_tag: str | None = None
        self._hurry = asyncio.Event()
        self.failed = asyncio.Event()
        """The engine thread or one of its loops died: what this worker holds cannot progress."""
        # One resume-point write at a time, so an older point never lands after a newer one.
        self._saving_points = asyncio.Lock()

    async def start(self) -> None:
        s = self.settings
        from services.models import resolve_model_path

        path = resolve_model_path(s.model_path, s.cache_dir)
        if s.threads and self.device == "cpu":
            import torch

            torch.set_num_threads(s.threads)
        config = EngineConfig(max_num_seqs=s.max_running, kv_cache_tokens=s.kv_tokens,
                              max_model_len=s.max_model_len, max_loras=s.max_loras,
                              max_lora_rank=s.max_lora_rank, max_cpu_loras=s.max_cpu_loras,
                              enable_prefix_caching=s.enable_prefix_caching)
        if s.engine == "echo":  # no model: the tokenizer and config only
            engine = await asyncio.to_thread(EchoEngine.from_pretrained, path, config,
                                             s.echo_tokens_per_s)
        else:
            engine = await asyncio.to_thread(LLMEngine.from_pretrained, path, self.device,
                                             s.dtype, config)
        loop = asyncio.get_running_loop()
        self.engine = EngineThread(engine, lambda outs: loop.call_soon_threadsafe(self.outputs.put_nowait, outs),
                                   on_death=lambda _exc: loop.call_soon_threadsafe(self.failed.set))
        self.engine.start()

        self.redis = redis_client.connect(s.redis_url)
        self.adapters = AdapterCatalog.from_settings(s, self.redis)
        await redis_client.wait_until_up(self.redis)  # claims and heartbeats need it
        await redis_client.when_up(self._heartbeat)
        self.connection, _ = await amqp.open_until_up(s, self.worker_id, self._consume)
        self._tasks = [start_vital(coro, self.failed) for coro in (
            self._output_loop(), self._heartbeat_loop(), self._progress_loop(),
            self._resume_point_loop())]
        log.info("worker_started", worker_id=self.worker_id, pool=self.pool, device=self.device,
                 model=s.model_name, model_path=path, engine=s.engine)

    async def _consume(self, connection: AbstractRobustConnection) -> None:
        """Open the channel, declare (or check) the topology, take work and cancels."""
        connection.close_callbacks.add(self._on_link_lost)
        self.channel = await connection.channel()
        self.channel.close_callbacks.add(self._on_link_lost)
        self.channel.return_callbacks.add(self._on_reply_returned)
        await self.channel.set_qos(prefetch_count=self.settings.max_running)
        topo = await topology.declare(self.channel, passive=not self.settings.declare_topology)
        self.events = topo.exchange(topology.EVENTS_EXCHANGE)
        self.work_queue = topo.queues[topology.work_queue(self.pool)]
        await self._take_work()
        control = await topology.declare_control_queue(self.channel, amqp.login_user(self.settings.amqp_url))
        await amqp.consume(self.channel, control, m.Message, self.on_control, service=self.worker_id)

    # --- inputs ----------------------------------------------------------------

    def taking_work(self) -> bool:
        return not self.draining and not self.cut_off

    async def _take_work(self) -> None:
        """Consume the pool's work queue: at start, and again when Redis answers after the
        worker was cut off from it."""
        self._consumer_tag = await amqp.consume(self.channel, self.work_queue, m.WorkItem,
                                                self.on_work, service=self.worker_id,
                                                give_up=self._give_up, keep=self.taking_work)

    async def _stop_taking_work(self) -> None:
        """Cancel the work consumer. What the broker already sent is handed back as it
        comes (see :meth:`on_work`), and so are items waiting for Redis (``keep``)."""
        tag, self._consumer_tag = self._consumer_tag, None
        if tag:
            with contextlib.suppress(Exception):
                await self.work_queue.cancel(tag)

    async def on_work(self, item: m.WorkItem, message: AbstractIncomingMessage) -> None:
        rid = item.request_id
        req = item.scored.request
        if rid in self.active:  # a duplicate delivery while the first one runs
            await message.ack()
            return
        claim = await claim_work(self.redis, rid, claimant(self.worker_id, self.life, message.delivery_tag),
                                 self.settings.marker_ttl_s)
        if claim.done:  # already answered; a late copy must not produce a second answer
            await message.ack()
            return
        if claim.cancelled:
            await self._finish_early(item, message, "cancelled")
            return
        lora, problem = await self._lora(item)
        if problem is not None:
            await self._finish_early(item, message, "error", problem)
            return
        if claim.is_duplicate(message.redelivered):
            log.info("duplicate_work_dropped", request_id=rid)
            await message.ack()
            return
        if not self.taking_work():  # sent before the consumer was cancelled: another worker's
            await message.nack(requeue=True)
            return
        point = claim.resume
        active = self._activate(item, message, point)
        engine_req = EngineRequest(request_id=active.engine_id,
                                   prompt_token_ids=item.scored.prompt_token_ids,
                                   sampling=with_seed(req.sampling, rid),
                                   priority=BACKGROUND_PRIORITY if req.background else 0.0,
                                   lora=lora, cache_salt=self._cache_salt(req))
        if point is not None:
            engine_req.resume = ResumedOutput(point.output_token_ids, point.streamed_chars)
        try:
            await self._start_in_engine(active, engine_req)
        except EngineError as exc:
            if point is None:
                await self._finish_early(item, message, "error", str(exc))
                return
            # A resume point this engine cannot continue (another max_model_len): answer
            # from the start instead; the caller drops the chunks it already has.
            log.warning("resume_rejected", request_id=rid, error=str(exc))
            active = self._activate(item, message, None)
            engine_req.request_id, engine_req.resume = active.engine_id, None
            try:
                await self._start_in_engine(active, engine_req)
            except EngineError as exc:
                await self._finish_early(item, message, "error", str(exc))
            return
        if point is not None:
            self._send_again(active, point)
            prom.worker_resumed.labels(self.settings.model_name).inc()
            log.info("resumed", request_id=rid, output_tokens=len(point.output_token_ids),
                     handed_back_by=point.worker_id)

    def _send_again(self, active: Active, point: m.ResumePoint) -> None:
        """Send the caller what the resumed request's earlier workers sent it, from the
        start: it drops what it has and gets what a broker restart took from its reply
        queue (else that gap would never fill). The final answer waits for its confirm."""
        if len(point.streamed_text) != point.streamed_chars:  # a point without its text
            return
        send = asyncio.ensure_future(amqp.reply(self.channel, active.request.reply_to, m.TokenChunk(
            request_id=active.item.request_id, token_offset=0, text_offset=0,
            text=point.streamed_text, token_ids=list(point.output_token_ids),
            logprobs=list(point.output_logprobs), prompt_logprobs=list(point.prompt_logprobs),
            prompt_tokens=len(active.item.scored.prompt_token_ids), **active.prompt_extras(first=True)),
            mandatory=True))
        send.add_done_callback(lambda f: self._on_sent(active, f))
        active.unconfirmed.appendleft((send, len(point.output_token_ids), point.streamed_chars))

    async def _start_in_engine(self, active: Active, engine_req: EngineRequest) -> None:
        """Hand a request to the engine thread. If that fails, or the wait is cancelled
        (the delivery then goes back to the queue), nothing of it stays tracked or running."""
        try:
            if engine_req.sampling.structured is not None:
                await asyncio.to_thread(self.engine.prepare, engine_req)
            await asyncio.wrap_future(self.engine.add(engine_req))
        except BaseException as exc:
            self._forget(active)
            if isinstance(exc, asyncio.CancelledError):
                self.engine.abort(active.engine_id)  # in case the engine took it meanwhile
            raise

    def _activate(self, item: m.WorkItem, message: AbstractIncomingMessage,
                  point: m.ResumePoint | None) -> Active:
        """Track a request this worker starts (continuing after ``point``, when given)."""
        active = Active(item=item, message=message, engine_id=f"{item.request_id}#{next(self._attempts)}")
        if point is not None:
            active.output_token_ids = list(point.output_token_ids)
            active.output_logprobs = list(point.output_logprobs)
            active.prompt_logprobs = list(point.prompt_logprobs)
            active.streamed_chars = point.streamed_chars
            active.streamed_text = [point.streamed_text]
            active.confirmed = (len(point.output_token_ids), point.streamed_chars)
            active.checkpointed = len(point.output_token_ids)  # that point is in Redis
        self.active[item.request_id] = active
        self.by_engine[active.engine_id] = active
        return active

    async def _lora(self, item: m.WorkItem) -> tuple[LoraRequest | None, str | None]:
        """The adapter a work item runs with (looked up by name in this worker's registry,
        whose paths are this machine's), or the error if it was revoked meanwhile."""
        name = item.scored.adapter
        if name is None:
            return None, None
        spec = await self.adapters.get(name)
        if spec is None or not spec.may_use(item.scored.request.tenant):
            return None, f"The model `{item.scored.request.model}` does not exist."
        return LoraRequest(spec.name, spec.path), None

    async def _finish_early(self, item: m.WorkItem, message: AbstractIncomingMessage,
                            reason: m.FinishReason, error: str | None = None) -> None:
        active = Active(item=item, message=message)
        output = RequestOutput(request_id=item.request_id, new_token_ids=[], new_text="", finished=True,
                               finish_reason=reason, num_prompt_tokens=len(item.scored.prompt_token_ids),
                               num_output_tokens=0, error=error)
        await self._finish(active, output)

    async def on_control(self, msg: m.Message, message: AbstractIncomingMessage) -> None:
        """The control fanout: a caller's cancel, or the scheduler's hand-back of a
        background request (acted on by the worker that runs it)."""
        active = self.active.get(msg.request_id)
        if active is not None and isinstance(msg, m.CancelRequest) and active.request.tenant == msg.tenant:
            self._stop(active)
        elif active is not None and isinstance(msg, m.PreemptRequest):
            self._preempt(active)
        await message.ack()

    def _preempt(self, active: Active) -> None:
        """Start handing a background request back to the scheduler, unless it is ending
        anyway (answered, cancelled) or the worker drains (which hands it back itself)."""
        if (not active.request.background or active.stopping or active.finishing or self.draining
                or active.engine_id not in self.by_engine):
            return
        log.info("preempted_by_scheduler", request_id=active.item.request_id,
                 output_tokens=len(active.output_token_ids))
        self._background.spawn(self._hand_back_to_scheduler(active))

    async def _hand_back_to_scheduler(self, active: Active) -> None:
        """Stop the request and give it to the scheduler's queue rather than the pool's: the
        scheduler starts it again once no foreground request waits for its room.

        As a drain does, the resume point (what the caller has) is written once the broker
        answered for every chunk sent; the claim is released with it, so the scheduler's
        next dispatch may run it; then the requeue event, and only then the ack. If the
        worker dies before the event, the broker redelivers the item, which continues from
        the point; if it cannot write the point or send the event, it gives the item back
        to the broker the same way."""
        rid = active.item.request_id
        self._forget(active)
        self.engine.abort(active.engine_id)
        await asyncio.gather(*active.publishes, return_exceptions=True)
        try:
            async with self._saving_points:  # not beside a periodic write of an older point
                point = active.resume_point(self.worker_id)
                pipe = self.redis.pipeline(transaction=True)
                if point is not None:
                    pipe.set(keys.work_resume(rid), m.encode(point), ex=self.settings.marker_ttl_s)
                pipe.hdel(keys.request_markers(rid), keys.MARKER_CLAIM)
                await pipe.execute()
            # All this run generated is charged, once: the next run charges past it only.
            generated = max(len(point.output_token_ids) if point else 0, active.output_tokens)
            await self._finished_event(active.item, "cancelled", len(active.item.scored.prompt_token_ids),
                                       generated, requeue=True)
        except Exception as exc:  # noqa: BLE001 - the broker's redelivery continues it instead
            log.warning("hand_back_to_scheduler_failed", request_id=rid, error=repr(exc))
            prom.worker_handed_back.labels(self.settings.model_name).inc()
            with contextlib.suppress(Exception):
                await active.message.nack(requeue=True)
            return
        prom.worker_handed_back.labels(self.settings.model_name).inc()
        with contextlib.suppress(Exception):
            await active.message.ack()

    def _stop(self, active: Active, event: str | None = None) -> None:
        """Abort a running request (once, however many cancels arrive); it finishes as
        cancelled with what it generated."""
        if active.stopping or active.engine_id not in self.by_engine:
            return
        active.stopping = True
        if event is not None:
            log.info(event, request_id=active.item.request_id)
        self.engine.abort(active.engine_id)

    def _on_reply_returned(self, _channel: object, message: AbstractIncomingMessage) -> None:
        """A token chunk came back unroutable: its caller's reply queue is gone (an AMQP
        producer that disconnected), so nobody can read the rest; stop the request, which
        finishes as cancelled. (A dead gateway's requests are cancelled by the gateways.)"""
        if message.exchange:  # replies are the only publishes to the default exchange
            return
        rid = m.peek_request_id(message.body)
        active = self.active.get(rid) if rid else None
        # Chunks of the steps before the abort come back too: _stop acts on the first.
        if active is not None and active.request.reply_to == message.routing_key:
            self._stop(active, "caller_gone")

    def _forget(self, active: Active) -> None:
        if self.active.get(active.item.request_id) is active:
            del self.active[active.item.request_id]
        self.by_engine.pop(active.engine_id, None)

    def _on_link_lost(self, *_: object) -> None:
        """The broker connection (or channel) closed: the broker has put every unacked work
        item back in its queue, and their acks can no longer be sent. Stop running them;
        the redelivered copies go on from their resume points (or the start) here or on
        another worker, and the caller keeps one copy of each token by its position."""
        if self.active:
            log.warning("link_lost_requests_handed_back", n=len(self.active))
            prom.worker_handed_back.labels(self.settings.model_name).inc(len(self.active))
        for active in list(self.active.values()):
            self.engine.abort(active.engine_id)
            self._forget(active)

    async def _hand_back(self, active: Active) -> None:
        """A reply or event could not be published: give the request back to the queue."""
        self.engine.abort(active.engine_id)
        self._forget(active)
        prom.worker_handed_back.labels(self.settings.model_name).inc()
        with contextlib.suppress(Exception):
            await active.message.nack(requeue=True)

    async def _give_up(self, item: m.WorkItem) -> None:
        """A work item that failed on every delivery: its caller got an error answer;
        tell the scheduler it ended so its slot and charge are settled."""
        await self._finished_event(item, "error", len(item.scored.prompt_token_ids), 0)

    def _finished_event(self, item: m.WorkItem, reason: m.FinishReason, prompt_tokens: int,
                        output_tokens: int, **extra: Any) -> Awaitable[None]:
        """Publish a request's completion event: its charge settles, the scorer learns."""
        req = item.scored.request
        return amqp.publish(self.events, m.RequestFinished(
            request_id=item.request_id, tenant=req.tenant, worker_id=self.worker_id, model=req.model,
            pool=self.pool, finish_reason=reason, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
            score=item.scored.score, **extra), topology.FINISHED_KEY)

    # --- outputs ---------------------------------------------------------------

    async def _output_loop(self) -> None:
        """Start every publish at once, in step order, without waiting for confirms: the
        channel keeps them in order on the wire, and requests never wait for each other.
        Steps that piled up meanwhile (the engine ran ahead of this loop) go out as one
        chunk per request: a busy worker sends fewer, larger messages, an idle one each
        step's tokens at once."""
        while True:
            outputs = await self.outputs.get()
            while not self.outputs.empty():
                outputs = outputs + self.outputs.get_nowait()
            for out in merge_outputs(outputs):
                active = self.by_engine.get(out.request_id)
                if active is not None:
                    self._emit(active, out)

    def _emit(self, active: Active, out: RequestOutput) -> None:
        active.output_tokens = out.num_output_tokens
        if out.finished:  # its last tokens travel in the final answer
            active.finishing = True
            self._background.spawn(self._finish(active, out))
            return
        if out.new_token_ids or out.new_text:
            send = asyncio.ensure_future(amqp.reply(self.channel, active.request.reply_to, m.TokenChunk(
                request_id=active.item.request_id, token_offset=len(active.output_token_ids),
                text_offset=active.streamed_chars, text=out.new_text,
                token_ids=list(out.new_token_ids), logprobs=out.logprobs,
                prompt_logprobs=out.prompt_logprobs,
                prompt_tokens=0 if active.output_token_ids else out.num_prompt_tokens,
                **active.prompt_extras(first=not active.output_token_ids)),
                mandatory=True))
            send.add_done_callback(lambda f: self._on_sent(active, f))
            active.sent(send, out.new_token_ids, out.new_text, out.logprobs, out.prompt_logprobs)
        if len(active.unconfirmed) > 64:
            active.confirmed_prefix()  # let go of the confirmed ones

    def _on_sent(self, active: Active, send: asyncio.Future) -> None:
        """A chunk the broker did not take: hand the request back (once)."""
        if send.cancelled() or send.exception() is None or active.engine_id not in self.by_engine:
            return
        emit_failed(active.item.request_id, send.exception())
        self._background.spawn(self._hand_back(active))

    async def _finish(self, active: Active, out: RequestOutput) -> None:
        """Terminal answer (with the last step's tokens: one message fewer per request)
        and completion event published together; the ack only once the broker confirmed
        them and every chunk before them, so nothing is lost."""
        rid = active.item.request_id
        req = active.request
        reason: m.FinishReason = out.finish_reason or "stop"  # type: ignore[assignment]
        error = None
        if reason == "error":
            error = m.ErrorInfo(message=out.error or "generation failed", type="invalid_request_error",
                                code="engine_error", status=400)
        done = reason in ("stop", "length")
        final = amqp.reply(self.channel, req.reply_to, m.FinalAnswer(
            request_id=rid, token_offset=len(active.output_token_ids), text_offset=active.streamed_chars,
            text=out.new_text if done else "", token_ids=list(out.new_token_ids) if done else [],
            logprobs=out.logprobs if done else [],
            prompt_logprobs=out.prompt_logprobs if done else [],
            **active.prompt_extras(first=done and not active.output_token_ids),
            finish_reason=reason, stop_reason=out.stop_reason if done else None,
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens, cached_tokens=out.num_cached_tokens,
            error=error))
        event = self._finished_event(active.item, reason, out.num_prompt_tokens, out.num_output_tokens,
                                     prompt=req.prompt_text()[:FEEDBACK_PROMPT_CHARS],
                                     cached_tokens=out.num_cached_tokens)
        try:
            await asyncio.gather(final, event, *active.publishes)
        except Exception as exc:  # noqa: BLE001 - logged by emit_failed, then handed back
            emit_failed(rid, exc)
            await self._hand_back(active)
            return
        await ack_answered(active.message, self.redis, rid, self.settings.marker_ttl_s)
        self._forget(active)
        if active.checkpointed:  # answered: its resume point is of no more use
            with contextlib.suppress(Exception):
                await self.redis.delete(keys.work_resume(rid))
        prom.observe_worker_finish(self.settings.model_name, reason, out.num_prompt_tokens,
                                   out.num_output_tokens)

    async def _resume_point_loop(self) -> None:
        """Keep a resume point of each request that runs past an interval, so a worker that
        dies loses little of its work: the next worker continues from the point. (Its own
        loop: a slow Redis delays no progress report.)"""
        while True:
            await asyncio.sleep(RESUME_POINT_INTERVAL_S)
            running = [a for a in self.active.values() if a.resume_point_due()]
            try:
                if await self._save_resume_points(running) and not self.draining:
                    # One that was answered while its point was being written keeps none.
                    answered = [a for a in running
                                if a.checkpointed and self.active.get(a.item.request_id) is not a]
                    if answered:
                        await self.redis.delete(*(keys.work_resume(a.item.request_id) for a in answered))
            except Exception as exc:  # noqa: BLE001 - without points a dead worker's requests regenerate
                log.warning("resume_points_not_saved", error=str(exc))

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            for active in list(self.active.values()):
                if active.output_tokens > active.reported_tokens:
                    new = active.output_tokens - active.reported_tokens
                    active.reported_tokens = active.output_tokens
                    with contextlib.suppress(Exception):
                        await amqp.publish(self.events, m.RequestProgress(
                            request_id=active.item.request_id, tenant=active.request.tenant,
                            worker_id=self.worker_id, new_tokens=new,
                            total_tokens=active.output_tokens), topology.PROGRESS_KEY)

    # --- capacity --------------------------------------------------------------

    def _cache_salt(self, request: m.CompletionRequest) -> str:
        """Whose cached prefixes the request may share (``prefix_cache_scope``)."""
        return request.tenant if self.settings.prefix_cache_scope == "tenant" else ""

    def heartbeat(self) -> m.WorkerHeartbeat:
        st = self.engine.stats
        prom.worker_state.publish({
            "model": self.settings.model_name, "running": st.num_running, "waiting": st.num_waiting,
            "kv_usage": 1.0 - st.num_free_kv_tokens / max(st.num_total_kv_tokens, 1),
            "preemptions": st.num_preemptions, "prefix_cache_queries": st.prefix_cache_queries,
            "prefix_cache_hits": st.prefix_cache_hits,
        })
        decode_tps = 1000.0 * max(st.num_running, 1) / st.decode_step_ms if st.decode_step_ms else 0.0
        return m.WorkerHeartbeat(
            worker_id=self.worker_id, pool=self.pool, model=self.settings.model_name,
            max_running=st.max_num_seqs, running=st.num_running, waiting=st.num_waiting,
            free_kv_tokens=st.num_free_kv_tokens, total_kv_tokens=st.num_total_kv_tokens,
            speed=m.SpeedReport(prefill_tokens_per_s=st.prefill_tokens_per_s,
                                decode_tokens_per_s=decode_tps, decode_step_ms=st.decode_step_ms),
            sent_at=time.time(), running_ids=sorted(self.active), adapters=list(st.adapters),
            draining=self.draining, prefix_cache_queries=st.prefix_cache_queries,
            prefix_cache_hits=st.prefix_cache_hits,
        )

    async def _heartbeat(self) -> None:
        """Advertise capacity and speed; in the same round trip read the cancel markers of
        the running requests, so a cancel whose broadcast never came (broker restarting,
        the caller's gateway died) stops the work within a heartbeat."""
        beat = self.heartbeat()
        running = list(self.active.values())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.WORKERS, self.worker_id, m.encode(beat))
        pipe.zadd(keys.WORKERS_SEEN, {self.worker_id: beat.sent_at})
        for active in running:
            pipe.hget(keys.request_markers(active.item.request_id), keys.MARKER_CANCELLED)
        results = await pipe.execute()
        if running:
            for active, cancelled in zip(running, results[-len(running):], strict=True):
                if cancelled:
                    self._stop(active, "cancel_marker_seen")

    async def _heartbeat_loop(self) -> None:
        """Heartbeat; a worker whose heartbeats fail for ``worker_timeout_s`` (the scheduler
        no longer sees it) stops taking work and hands back what waits for Redis, so that
        workers that reach Redis serve it; it takes work again once a heartbeat goes through."""
        failing_since: float | None = None
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self._heartbeat()
            except Exception as exc:  # noqa: BLE001 - the heartbeat loop must survive any error
                log.warning("heartbeat_failed", error=str(exc))
                now = time.monotonic()
                failing_since = failing_since or now
                if not self.cut_off and now - failing_since >= self.settings.worker_timeout_s:
                    self.cut_off = True
                    log.warning("cut_off_from_redis_taking_no_work", running=len(self.active))
                    await self._stop_taking_work()
                continue
            failing_since = None
            if self.cut_off and not self.draining:
                self.cut_off = False  # before consuming: the first items may come at once
                try:
                    await self._take_work()
                except Exception as exc:  # noqa: BLE001 - tried again with the next heartbeat
                    self.cut_off = True
                    log.warning("take_work_failed", error=repr(exc))
                    continue
                log.info("redis_back_taking_work")

    async def _save_resume_points(self, running: list[Active]) -> int:
        """Write the resume point of each request whose chunks all reached the broker, in
        one round trip; returns how many were written."""
        async with self._saving_points:
            points = [(a, p) for a in running if (p := a.resume_point(self.worker_id)) is not None]
            if not points:
                return 0
            pipe = self.redis.pipeline(transaction=False)
            for _, point in points:
                pipe.set(keys.work_resume(point.request_id), m.encode(point), ex=self.settings.marker_ttl_s)
            await pipe.execute()
            for active, point in points:
                active.checkpointed = len(point.output_token_ids)
            return len(points)

    # --- shutdown --------------------------------------------------------------

    async def _hand_back_resumable(self, running: list[Active]) -> None:
        """Hand requests back to the queue, each with a resume point in Redis saying what
        its caller has, so the worker that takes it next continues the same answer.
        Forgotten first, so the abort's "cancelled" answer never reaches the caller; the
        points are written once the broker answered for every chunk sent, and before the
        items go back. A request with a chunk the broker refused gets no new point: the
        next worker continues from its last one, or from the start, and its caller keeps
        one copy of what it already has."""
        for active in running:
            self._forget(active)
            self.engine.abort(active.engine_id)
        await asyncio.gather(*(p for active in running for p in active.publishes), return_exceptions=True)
        try:
            saved = await self._save_resume_points(running)
        except Exception as exc:  # noqa: BLE001 - without them the next worker regenerates
            log.warning("resume_points_not_saved", error=str(exc))
            saved = 0
        log.info("handing_back", requests=len(running), resumable=saved)
        for active in running:
            prom.worker_handed_back.labels(self.settings.model_name).inc()
            with contextlib.suppress(Exception):
                await active.message.nack(requeue=True)

    def hurry(self) -> None:
        """End a drain now (a second SIGTERM): hand back what still runs."""
        self._hurry.set()

    async def stop(self) -> None:
        """Drain: take no new work, tell the scheduler at once (a draining heartbeat
        offers no free capacity), let the running requests finish for ``worker_drain_s``
        (or until :meth:`hurry`), hand the rest back to the queue."""
        self.draining = True
        await self._stop_taking_work()
        if getattr(self, "redis", None) and getattr(self, "engine", None):
            with contextlib.suppress(Exception):
                await self._heartbeat()
        if self.active:
            log.info("draining", requests=len(self.active), drain_s=self.settings.worker_drain_s)
        deadline = time.monotonic() + self.settings.worker_drain_s
        while self.active and time.monotonic() < deadline and not self._hurry.is_set():
            await asyncio.sleep(0.05)
        if self.active:
            await self._hand_back_resumable(list(self.active.values()))
        # Hand-backs to the scheduler under way end first: their acks need the connection.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENGINE_STOP_TIMEOUT_S):
                await self._background.wait()
        self.active.clear()
        self.by_engine.clear()
        for task in self._tasks:
            task.cancel()
        # A stop during start (broker or Redis not up yet, model loading) finds less to close.
        if getattr(self, "redis", None):
            with contextlib.suppress(Exception):
                await self.redis.zrem(keys.WORKERS_SEEN, self.worker_id)
                await self.redis.hdel(keys.WORKERS, self.worker_id)
        if getattr(self, "engine", None):
            # Wait for the step in progress: a thread still inside torch when the process
            # exits aborts it ("terminate called without an active exception", exit -6).
            self.engine.stop()
            await asyncio.to_thread(self.engine.join, ENGINE_STOP_TIMEOUT_S)
            if self.engine.is_alive():
                log.warning("engine_still_stepping", timeout_s=ENGINE_STOP_TIMEOUT_S)
        if getattr(self, "connection", None):
            await self.connection.close()
        if getattr(self, "redis", None):
            await self.redis.aclose()


async def main(settings: Settings, pool: str, device: str) -> None:
    service = WorkerService(settings, pool, device)
    await amqp.run_until_signalled(service.start, service.stop, service.hurry, failed=service.failed)
