"""Scheduler service: the I/O around :class:`SchedulerPolicy`.

Story: connect to Redis and RabbitMQ, wait for the leader lease, rebuild the policy
from Redis, then consume scored requests, worker events and cancels; each step asks
the policy for decisions, writes the resulting transition to Redis in one fenced
atomic step, and only then acks or publishes. On SIGTERM (or a lost lease) it stops
consuming, so unacked messages return to their queues for the next leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aio_pika.abc import AbstractIncomingMessage

from services import amqp, redis_client, topology
from services import messages as m
from services import metrics as prom
from services.latency_model import LatencyModel
from services.logs import get_logger
from services.runtime import BackgroundTasks, cancel_until_done, start_vital
from services.scheduler.policy import (
    PolicyConfig,
    PoolView,
    QueuedRequest,
    ScheduleResult,
    SchedulerPolicy,
    remaining_output,
)
from services.scheduler.store import InflightRecord, NotLeader, Ops, SchedulerStore
from services.settings import Settings
from services.tenants import read_tenants_file, watch_file
from services.usage import Usage

log = get_logger(__name__)

Step = Callable[[m.Message, Ops, dict[str, bool]], Awaitable[Callable[[], Awaitable[None]] | None]]
"""One input's state transition inside a batch: mutates memory, adds its Redis writes to
the batch's ops, and may return what to do once they are durable (a reply)."""

SCHEDULE_INTERVAL_S = 0.05
WORKERS_REFRESH_S = 0.1
"""How long a read of the live workers' heartbeats serves dispatch decisions (workers
heartbeat every second; what the scheduler itself dispatched is counted in memory)."""


def parse_weights(spec: str) -> dict[str, float]:
    """``"acme:2,globex:1"`` -> ``{"acme": 2.0, "globex": 1.0}``."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.rpartition(":")
        weights[name] = float(weight)
    return weights


def tenant_weights(settings: Settings) -> dict[str, float]:
    """VTC weights: the API keys file's (:mod:`services.tenants`), each overridden by
    ``FAIRWAY_TENANT_WEIGHTS``. ValueError or OSError when the file cannot be read."""
    weights = {} if settings.api_keys_file is None else {
        tenant: entry.weight for tenant, entry in read_tenants_file(settings.api_keys_file).items()}
    return weights | parse_weights(settings.tenant_weights)


def queued_view(scored: m.ScoredRequest, arrival: float, generated: int | None = None) -> QueuedRequest:
    """What the policy needs to know about a request.

    ``generated`` is set for a request a worker handed back: its input was charged at
    its first dispatch, and it had produced that many output tokens.
    """
    req = scored.request
    return QueuedRequest(
        request_id=scored.request_id,
        tenant=req.tenant,
        input_tokens=len(scored.prompt_token_ids),
        max_tokens=req.sampling.max_tokens,
        predicted_p50=scored.score.p50,
        predicted_p90=scored.score.p90,
        arrival=arrival,
        deadline=req.deadline,
        fail_if_late=req.fail_if_late,
        uncertainty=scored.score.uncertainty,
        generated=generated or 0,
        input_charged=generated is not None,
        adapter=scored.adapter,
        background=req.background,
        priority=req.priority,
    )


def cached_prompt_tokens(event: m.RequestFinished, scored: m.ScoredRequest) -> int:
    """Of the prompt's tokens (charged ``w_in`` at dispatch), those the completing run
    read from its worker's prefix cache."""
    return max(0, min(event.cached_tokens, len(scored.prompt_token_ids)))


def kv_reservation(scored: m.ScoredRequest) -> int:
    """KV tokens a dispatched request is expected to hold: prompt + predicted p90 output."""
    return len(scored.prompt_token_ids) + int(min(scored.score.p90, scored.request.sampling.max_tokens))


def expiry_answer(scored: m.ScoredRequest, reason: str) -> m.FinalAnswer:
    """The error for a request the policy gave up on: too big for any worker, or late."""
    if reason == "exceeds_kv_capacity":
        return amqp.error_answer(
            scored.request_id,
            f"the request needs {kv_reservation(scored)} KV-cache tokens (prompt plus output), "
            "more than any live worker holds; shorten the prompt or max_tokens",
            status=400, code="exceeds_kv_capacity")
    return amqp.error_answer(scored.request_id, f"deadline cannot be met: {reason}", status=504,
                             type_="timeout", code="deadline_exceeded")


def backlog_seconds(running: list[InflightRecord], latency: LatencyModel) -> float:
    """Predicted seconds until the first of ``running`` finishes and frees its slot (by the
    policy's rule for what is left of an answer, as the simulator predicts it)."""
    if not running:
        return 0.0
    step_s = latency.decode_step_s(len(running))
    return min(remaining_output(r.scored.score.p50, r.charged_output, r.scored.request.sampling.max_tokens)
               for r in running) * step_s


def pool_views(workers: list[m.WorkerHeartbeat], inflight: dict[str, InflightRecord]) -> list[PoolView]:
    """Free capacity per pool: what live workers advertise minus what is dispatched to it.
    A draining worker (stopping) advertises only what it still runs."""
    views = []
    for pool in topology.POOLS:
        members = [w for w in workers if w.pool == pool]
        if not members:
            continue
        used = [r for r in inflight.values() if r.pool == pool]
        reserved = sum(r.kv_tokens or kv_reservation(r.scored) for r in used)
        slots = sum(w.offered_slots for w in members)
        kv_total = sum(w.offered_kv_tokens for w in members)
        speeds = [w.speed for w in members if w.speed.decode_step_ms > 0]
        latency = LatencyModel(max_batch=slots, kv_tokens=kv_total, name=pool)
        if speeds:
            step_ms = sum(s.decode_step_ms for s in speeds) / len(speeds)
            prefill = [s.prefill_tokens_per_s for s in speeds if s.prefill_tokens_per_s > 0]
            latency = LatencyModel(
                prefill_ms_per_token=1000.0 / (sum(prefill) / len(prefill)) if prefill else 0.05,
                decode_base_ms=step_ms / len(members),
                decode_per_seq_ms=0.0,
                max_batch=slots,
                kv_tokens=kv_total,
                name=pool,
            )
        free_slots = max(slots - len(used), 0)
        views.append(PoolView(
            name=pool,
            free_slots=free_slots,
            free_kv_tokens=max(kv_total - reserved, 0),
            running=len(used),
            latency=latency,
            backlog_s=backlog_seconds(used, latency),
            kv_capacity=max(w.total_kv_tokens for w in members),
            adapters=adapter_shares(members),
        ))
    return views


def adapter_shares(members: list[m.WorkerHeartbeat]) -> dict[str, float]:
    """LoRA adapter -> share of ``members`` holding it in their device pool."""
    counts: dict[str, int] = {}
    for worker in members:
        for name in set(worker.adapters):
            counts[name] = counts.get(name, 0) + 1
    return {name: n / len(members) for name, n in counts.items()}


class SchedulerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = PolicyConfig(
            name=settings.policy,
            w_in=settings.vtc_w_in,
            w_out=settings.vtc_w_out,
            w_cached=settings.vtc_w_cached,
            tenant_weights=parse_weights(settings.tenant_weights),
            idle_tenant_slots=settings.idle_tenant_slots,
            preempt_background=settings.preempt_background,
            preempt_after_s=settings.preempt_background_after_s,
        )
        self.stopping = asyncio.Event()
        self.lost = asyncio.Event()
        self.wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._dirty = False
        self._inbox: list[tuple[Step, m.Message, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        self._runner: asyncio.Task | None = None
        self._workers: list[m.WorkerHeartbeat] = []
        self._workers_at = 0.0
        self._metrics_at = 0.0
        self._background = BackgroundTasks()
        self._watch: asyncio.Task | None = None
        try:
            self.reload_weights()
        except (ValueError, OSError) as exc:
            # The file is the gateway's first; the scheduler goes on with the env's weights.
            log.error("tenant_weights_unreadable", path=str(settings.api_keys_file), error=str(exc))

    def reload_weights(self) -> None:
        """Take the tenants' weights from the keys file again (in place: the policy reads
        this dict); ValueError or OSError, nothing changed, when it cannot be read."""
        weights = tenant_weights(self.settings)
        self.config.tenant_weights.clear()
        self.config.tenant_weights.update(weights)
        log.info("tenant_weights", weights=weights)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.redis = redis_client.connect(self.settings.redis_url)
        self.store = SchedulerStore(self.redis, self.settings.instance_id, self.settings.lease_ttl_s)
        self.connection = await amqp.connect(self.settings, "scheduler")
        if self.settings.api_keys_file is not None and self.settings.tenants_reload_s > 0:
            self._watch = self._background.spawn(watch_file(
                self.settings.api_keys_file, self.settings.tenants_reload_s, self.reload_weights,
                lambda outcome: prom.tenants_file_reloads.labels(outcome).inc()))
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.stopping.set()
        self.lost.set()
        if self._watch is not None:
            self._watch.cancel()
        if self._runner:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._runner, 10)
        if getattr(self, "store", None):
            with contextlib.suppress(Exception):
                await self.store.release()
        if getattr(self, "connection", None):
            await self.connection.close()
        if getattr(self, "redis", None):
            await self.redis.aclose()

    async def _run(self) -> None:
        """Stand by until this replica holds the lease, lead until it is lost, repeat."""
        while not self.stopping.is_set():
            try:
                if await self.store.try_acquire():
                    await self._lead()
            except Exception as exc:
                if redis_client.cannot_serve(exc) or amqp.link_down(exc):
                    log.warning("scheduler_cycle_waiting", error=repr(exc))
                else:
                    log.exception("scheduler_cycle_failed")
            if not self.stopping.is_set():
                await asyncio.sleep(self.settings.lease_ttl_s / 3)

    async def _lead(self) -> None:
        log.info("leader_acquired", replica=self.settings.instance_id, fence=self.store.fence)
        await redis_client.check_durability(self.redis)
        self.lost.clear()
        async with self._lock:  # not in the middle of a batch left from the last term
            self._restore(await self.store.load())
        self.channel = await self.connection.channel()
        await self.channel.set_qos(prefetch_count=256)
        topo = await topology.declare(self.channel, passive=not self.settings.declare_topology)
        self.work_exchange = topo.exchange(topology.WORK_EXCHANGE)
        self.control_exchange = topo.exchange(topology.CONTROL_EXCHANGE)
        # Dispatches whose publish may not have happened before the last leader died.
        await self._publish_unconfirmed()
        tags = [
            (topo.queues[topology.SCHEDULER_QUEUE], await amqp.consume(
                self.channel, topo.queues[topology.SCHEDULER_QUEUE], m.ScoredRequest,
                self.on_scored, service="scheduler")),
            (topo.queues[topology.SCHEDULER_EVENTS_QUEUE], await amqp.consume(
                self.channel, topo.queues[topology.SCHEDULER_EVENTS_QUEUE], m.Message,
                self.on_event, service="scheduler")),
        ]
        control = await topology.declare_control_queue(self.channel,
                                                        amqp.login_user(self.settings.amqp_url))
        tags.append((control, await amqp.consume(
            self.channel, control, m.Message, self.on_control, service="scheduler")))
        tasks = [start_vital(self._renew_loop(), self.lost), start_vital(self._schedule_loop(), self.lost)]
        try:
            await self.lost.wait()
        finally:
            # Ended, not only cancelled: a loop left running would schedule into the next term.
            await cancel_until_done(lambda: tasks)
            for queue, tag in tags:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            with contextlib.suppress(Exception):
                await self.channel.close()
            log.info("leader_released", replica=self.settings.instance_id)

    def _restore(self, state) -> None:
        """Rebuild the in-memory policy and maps from what Redis holds."""
        self.policy = SchedulerPolicy(self.config)
        self.queued = state.queued
        self.arrival = state.arrival
        self.inflight = state.inflight
        self.policy.restore(
            state.counters,
            state.served,
            [queued_view(s, state.arrival[rid], state.requeued.get(rid))
             for rid, s in state.queued.items()],
            [replace(queued_view(r.scored, r.arrival or r.dispatched_at), pool=r.pool)
             for r in state.inflight.values()],
        )
        self._dirty = False

    async def _sync(self) -> None:
        """Under the lock: after a write Redis did not confirm, reload before going on."""
        if self._dirty:
            log.info("state_resync")
            self._restore(await self.store.load())

    async def _renew_loop(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            try:
                if not await self.store.renew():
                    log.warning("lease_lost", replica=self.settings.instance_id)
                    self.lost.set()
            except Exception as exc:  # noqa: BLE001 - the renew loop must survive any error
                log.warning("lease_renew_failed", error=str(exc))

    async def _apply(self, ops: Ops) -> None:
        try:
            await self.store.apply(ops)
        except Exception as exc:
            # Redis did not take the write (not leader), or did not confirm it (it may or
            # may not have applied it): memory may now differ from Redis, the source of
            # truth, so reload before the next step. Without the reload, a later batch's
            # counters (written whole) would carry this batch's charges into Redis while
            # its events are redelivered and charged again.
            self._dirty = True
            if isinstance(exc, NotLeader):
                self.lost.set()
            raise

    # --- inputs ----------------------------------------------------------------

    async def _batched(self, step: Step, msg: m.Message) -> None:
        """Run ``step`` in the next batch: every message that arrived meanwhile is taken
        under one lock, with one Redis read of done markers and one fenced write, so the
        cost per message is not a serial round trip. Returns once the write is durable
        (the caller acks then); a failed write fails every message of the batch."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox.append((step, msg, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        try:
            after = await future
        except NotLeader as exc:  # the next leader takes it, maybe this replica again
            raise amqp.HandBack("not the leader") from exc
        if after is not None:
            await after()

    async def _drain(self) -> None:
        while self._inbox:
            batch, self._inbox = self._inbox, []
            try:
                async with self._lock:
                    await self._sync()
                    fresh = [msg.request_id for step, msg, _ in batch
                             if isinstance(msg, m.ScoredRequest)
                             and msg.request_id not in self.queued and msg.request_id not in self.inflight]
                    done = dict(zip(fresh, await self.store.already_done(fresh))) if fresh else {}
                    ops = Ops(self.settings.marker_ttl_s)
                    results = []
                    try:
                        for step, msg, _ in batch:
                            results.append(await step(msg, ops, done))
                    except Exception:
                        self._dirty = True  # memory moved ahead of Redis: reload next time
                        raise
                    await self._apply(ops)
            except Exception as exc:  # noqa: BLE001 - every handler of the batch gets it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
            self.wake.set()

    async def on_scored(self, scored: m.ScoredRequest, message: AbstractIncomingMessage) -> None:
        await self._batched(self._take_scored, scored)
        await message.ack()

    async def _take_scored(self, scored: m.ScoredRequest, ops: Ops, done: dict[str, bool]) -> None:
        rid = scored.request_id
        if rid in self.queued or rid in self.inflight or done.get(rid, True):
            return
        arrival = time.time()
        tenant = scored.request.tenant
        self.policy.add(queued_view(scored, arrival), arrival)
        self.queued[rid] = scored
        self.arrival[rid] = arrival
        ops.enqueue(scored, arrival)
        ops.counters(self.policy.counters, self.policy.served, {tenant})

    async def on_event(self, event: m.Message, message: AbstractIncomingMessage) -> None:
        await self._batched(self._take_event, event)
        await message.ack()

    async def _take_event(self, event: m.Message, ops: Ops, done: dict[str, bool]) -> None:
        if isinstance(event, m.RequestProgress):
            await self._progress(event.request_id, event.tenant, event.total_tokens, ops)
        elif isinstance(event, m.RequestFinished):
            await self._finished(event, ops)

    async def _progress(self, rid: str, tenant: str, total_tokens: int, ops: Ops | None = None) -> None:
        """Charge output tokens not charged yet: idempotent under redelivery."""
        record = self.inflight.get(rid)
        if record is None or total_tokens <= record.charged_output:
            return
        self.policy.on_progress(tenant, total_tokens - record.charged_output, time.time(), request_id=rid)
        record.charged_output = total_tokens
        own = ops is None
        # An empty Ops is falsy: "ops or Ops()" would drop these writes.
        ops = Ops(self.settings.marker_ttl_s) if own else ops
        ops.put_inflight(record)
        ops.counters(self.policy.counters, self.policy.served, {tenant})
        if own:
            await self._apply(ops)

    async def _finished(self, event: m.RequestFinished, ops: Ops) -> None:
        rid = event.request_id
        record = self.inflight.get(rid)
        if record is None:
            return
        now = time.time()
        await self._progress(rid, event.tenant, event.output_tokens, ops)
        self.inflight.pop(rid)
        ops.drop_inflight(rid)
        if event.requeue:
            prom.preemptions.labels(record.pool).inc()
            arrival = record.arrival or record.dispatched_at
            self.policy.requeue(queued_view(record.scored, arrival, event.output_tokens), now)
            self.queued[rid] = record.scored
            self.arrival[rid] = arrival
            ops.enqueue(record.scored, arrival, generated=event.output_tokens)
        else:
            self.policy.on_finished(rid, event.tenant, event.output_tokens, now)
            # The completing run's cache hits, once (the record is gone for a redelivery);
            # a resumed run's prompt holds output, charged w_out: only the prompt counts.
            cached = cached_prompt_tokens(event, record.scored)
            self.policy.on_cached_input(event.tenant, cached)
            ops.mark_done(rid)
            used = Usage(len(record.scored.prompt_token_ids), cached, event.output_tokens)
            ops.usage(event.tenant, record.scored.request.model, used, now, self.settings.usage_retention_days)
        ops.counters(self.policy.counters, self.policy.served, {event.tenant})

    async def on_control(self, msg: m.Message, message: AbstractIncomingMessage) -> None:
        """The control fanout: cancels; the hand-backs this scheduler asked for are the workers'."""
        if isinstance(msg, m.CancelRequest):
            await self._batched(self._take_cancel, msg)
        await message.ack()

    async def _take_cancel(self, cancel: m.CancelRequest, ops: Ops, done: dict[str, bool]):
        """Drop a queued request (its answer goes out once the write is durable) or mark
        a running one cancelled for its worker."""
        rid = cancel.request_id
        scored = self.queued.get(rid)
        if scored is not None and scored.request.tenant == cancel.tenant:
            self.policy.cancel(rid)
            self.queued.pop(rid)
            self.arrival.pop(rid, None)
            ops.unqueue(rid)
            ops.mark_done(rid)
            return lambda: amqp.reply(self.channel, scored.request.reply_to, m.FinalAnswer(
                request_id=rid, token_offset=0, text_offset=0, finish_reason="cancelled",
                prompt_tokens=len(scored.prompt_token_ids)))
        if rid in self.inflight and self.inflight[rid].scored.request.tenant == cancel.tenant:
            ops.mark_cancelled(rid)
        return None

    # --- dispatch --------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while not self.lost.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), SCHEDULE_INTERVAL_S)
            self.wake.clear()
            self._publish_metrics()
            try:
                if any(not r.published for r in self.inflight.values()):
                    # Dispatched, but the broker did not confirm the work item (it was
                    # down): publish again; a worker drops a copy that did arrive.
                    async with self._lock:
                        await self._sync()
                    await self._publish_unconfirmed()
                await self.schedule_once()
            except NotLeader:
                return
            except Exception as exc:
                if redis_client.cannot_serve(exc):
                    log.warning("schedule_waiting_for_redis", error=repr(exc))
                elif amqp.link_down(exc):
                    log.warning("schedule_waiting_for_broker", error=repr(exc))
                else:
                    log.exception("schedule_failed")
                await asyncio.sleep(0.5)

    def _publish_metrics(self, every_s: float = 0.5) -> None:
        """Hand the metrics endpoint a copy of the state (at most every ``every_s``)."""
        now = time.monotonic()
        if now - self._metrics_at < every_s:
            return
        self._metrics_at = now
        inflight: dict[str, int] = dict.fromkeys(topology.POOLS, 0)
        for record in self.inflight.values():
            inflight[record.pool] = inflight.get(record.pool, 0) + 1
        tenants = set(self.policy.counters) | set(self.policy.backlogged())
        prom.scheduler_state.publish({
            "model": self.settings.model_name,
            "served": dict(self.policy.served),
            "counters": dict(self.policy.counters),
            "queued": {t: self.policy.num_queued(t) for t in tenants},
            "inflight": inflight,
        })

    async def schedule_once(self) -> int:
        if not self.queued:
            return 0
        now = time.time()
        if now - self._workers_at > WORKERS_REFRESH_S:
            self._workers = await self.store.live_workers(now, self.settings.worker_timeout_s)
            self._workers_at = now
        workers = self._workers
        async with self._lock:
            await self._sync()
            result = self.policy.schedule(now, pool_views(workers, self.inflight))
            records, expired = await self._record(result, now)
        # The dispatches are durable: publish without the lock, so inputs keep flowing
        # while the broker confirms.
        if records:
            await self._publish(records)
            log.debug("dispatched", n=len(records), pools=[r.pool for r in records])
        for scored, reason in expired:
            await amqp.reply(self.channel, scored.request.reply_to, expiry_answer(scored, reason))
        await self._ask_hand_backs(result.preempt)
        return len(records)

    async def _record(self, result: ScheduleResult, now: float
                      ) -> tuple[list[InflightRecord], list[tuple[m.ScoredRequest, str]]]:
        """Under the lock: make the policy's dispatches and expiries durable."""
        if not result.dispatches and not result.expired:
            return [], []
        ops = Ops(self.settings.marker_ttl_s)
        records = []
        tenants = set()
        for d in result.dispatches:
            scored = self.queued.pop(d.request_id)
            # A handed-back request's output so far was charged on its last run; its
            # new run regenerates it, and only tokens past it are charged again.
            record = InflightRecord(scored=scored, pool=d.pool, dispatched_at=now,
                                    kv_tokens=d.kv_tokens,
                                    arrival=self.arrival.pop(d.request_id, now),
                                    charged_output=d.request.generated if d.request else 0)
            self.inflight[d.request_id] = record
            records.append(record)
            tenants.add(scored.request.tenant)
            ops.unqueue(d.request_id)
            ops.put_inflight(record)
        expired = []
        for e in result.expired:
            scored = self.queued.pop(e.request_id)
            self.arrival.pop(e.request_id, None)
            expired.append((scored, e.reason))
            tenants.add(scored.request.tenant)
            ops.unqueue(e.request_id)
            ops.mark_done(e.request_id)
        ops.counters(self.policy.counters, self.policy.served, tenants)
        await self._apply(ops)
        for record in records:
            prom.placements.labels(record.pool).inc()
            if not record.charged_output:
                prom.tenant_queue_time.labels(record.scored.request.tenant).observe(
                    max(now - (record.arrival or now), 0.0))
        for _, reason in expired:
            prom.requests_expired.labels(reason).inc()
        return records, expired

    async def _ask_hand_backs(self, request_ids: list[str]) -> None:
        """Ask the workers to hand these background requests back (see PreemptRequest). Not
        durable: one that does not happen is asked again (``preempt_retry_s``)."""
        if not request_ids:
            return
        log.info("preempting_background", request_ids=request_ids)
        await asyncio.gather(*(amqp.publish(self.control_exchange, m.PreemptRequest(request_id=rid), "")
                               for rid in request_ids))

    async def _publish(self, records: list[InflightRecord]) -> None:
        """Publish work items (all at once, confirms awaited together), then record which
        ones the broker confirmed."""

        async def publish(record: InflightRecord) -> None:
            item = m.WorkItem(request_id=record.scored.request_id, scored=record.scored,
                              pool=record.pool, dispatched_at=record.dispatched_at)
            await amqp.publish(self.work_exchange, item, record.pool)
            record.published = True

        results = await asyncio.gather(*(publish(r) for r in records), return_exceptions=True)
        async with self._lock:
            ops = Ops(self.settings.marker_ttl_s)
            for record in records:
                # Not one that finished (or was reloaded) meanwhile: that would revive it.
                if record.published and self.inflight.get(record.scored.request_id) is record:
                    ops.put_inflight(record)
            await self._apply(ops)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _publish_unconfirmed(self) -> None:
        pending = [r for r in self.inflight.values() if not r.published]
        if pending:
            log.info("republishing_unconfirmed", n=len(pending))
            await self._publish(pending)


async def main(settings: Settings) -> None:
    service = SchedulerService(settings)
    await amqp.run_until_signalled(service.start, service.stop)
