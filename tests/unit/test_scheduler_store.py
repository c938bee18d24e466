"""The scheduler's Redis store on a real Redis: lease, fencing, atomic batches, reload."""

from __future__ import annotations

import asyncio

import pytest

from services import amqp, keys
from services import messages as m
from services.latency_model import LatencyModel
from services.scheduler.service import backlog_seconds, expiry_answer, pool_views, queued_view
from services.scheduler.store import InflightRecord, NotLeader, Ops, SchedulerStore


def scored(rid: str, tenant: str = "acme") -> m.ScoredRequest:
    req = m.CompletionRequest(request_id=rid, tenant=tenant, model="tiny", prompt="hi",
                              sampling=m.SamplingParams(max_tokens=8))
    return m.ScoredRequest(request_id=rid, request=req, prompt_token_ids=[1, 2],
                           score=m.LengthScore(uncertainty=0.1, p10=1, p50=4, p90=8))


async def test_only_one_replica_holds_the_lease(redis_client):
    a = SchedulerStore(redis_client, "a", lease_ttl_s=0.5)
    b = SchedulerStore(redis_client, "b", lease_ttl_s=0.5)
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert await a.renew() and not await b.renew()
    await asyncio.sleep(0.7)  # a stops renewing: its lease expires
    assert await b.try_acquire()
    assert b.fence > a.fence


async def test_a_stale_leader_cannot_write(redis_client):
    a = SchedulerStore(redis_client, "a", lease_ttl_s=0.3)
    b = SchedulerStore(redis_client, "b", lease_ttl_s=5)
    assert await a.try_acquire()
    await asyncio.sleep(0.4)
    assert await b.try_acquire()
    ops = Ops()
    ops.enqueue(scored("r1"), 1.0)
    with pytest.raises(NotLeader):
        await a.apply(ops)
    assert await redis_client.hlen(keys.SCHED_QUEUED) == 0
    await b.apply(ops)
    assert await redis_client.hlen(keys.SCHED_QUEUED) == 1


async def test_state_round_trips_through_redis(redis_client):
    store = SchedulerStore(redis_client, "a", lease_ttl_s=5)
    assert await store.try_acquire()
    ops = Ops()
    ops.enqueue(scored("q1"), 10.5)
    record = InflightRecord(scored=scored("f1", "globex"), pool="cpu", dispatched_at=11.0,
                            charged_output=3, published=True)
    ops.put_inflight(record)
    ops.counters({"acme": 2.0, "globex": 7.5}, {"acme": 2.0, "globex": 8.0}, {"acme", "globex"})
    ops.mark_done("old")
    await store.apply(ops)
    state = await store.load()
    assert state.queued["q1"] == scored("q1") and state.arrival["q1"] == 10.5
    assert state.inflight["f1"] == record
    assert state.counters == {"acme": 2.0, "globex": 7.5}
    assert state.served == {"acme": 2.0, "globex": 8.0}
    assert await store.already_done(["old", "q1"]) == [True, False]


async def test_a_batch_is_all_or_nothing(redis_client):
    store = SchedulerStore(redis_client, "a", lease_ttl_s=5)
    assert await store.try_acquire()
    ops = Ops()
    ops.enqueue(scored("q1"), 1.0)
    ops.ops.append(["FLUSHALL"])  # not an allowed op: the script refuses before writing
    with pytest.raises(Exception, match="BADOP"):
        await store.apply(ops)
    assert await redis_client.hlen(keys.SCHED_QUEUED) == 0


async def test_a_handed_back_request_reloads_as_already_charged(redis_client):
    store = SchedulerStore(redis_client, "a", lease_ttl_s=5)
    assert await store.try_acquire()
    await redis_client.hset(keys.request_markers("back"), keys.MARKER_CLAIM, "cpu-w1")  # who handed it back
    ops = Ops()
    ops.enqueue(scored("fresh"), 1.0)
    ops.enqueue(scored("back"), 2.0, generated=3)
    ops.put_inflight(InflightRecord(scored=scored("run"), pool="cpu", dispatched_at=5.0,
                                    kv_tokens=42, arrival=4.0))
    await store.apply(ops)
    state = await store.load()
    assert state.requeued == {"back": 3}
    assert not await redis_client.hexists(keys.request_markers("back"), keys.MARKER_CLAIM), \
        "its next dispatch would be dropped"
    assert state.arrival == {"fresh": 1.0, "back": 2.0}
    assert (state.inflight["run"].kv_tokens, state.inflight["run"].arrival) == (42, 4.0)
    view = queued_view(state.queued["back"], state.arrival["back"], state.requeued.get("back"))
    assert view.input_charged and view.generated == 3
    assert not queued_view(state.queued["fresh"], 1.0).input_charged
    done = Ops()
    done.unqueue("back")
    await store.apply(done)
    assert (await store.load()).requeued == {}


def _beat(worker_id: str, kv: int) -> m.WorkerHeartbeat:
    return m.WorkerHeartbeat(worker_id=worker_id, pool="cpu", model="tiny", max_running=2,
                             running=0, waiting=0, total_kv_tokens=kv, free_kv_tokens=kv)


def test_pool_views_subtract_what_the_policy_reserved():
    inflight = {
        rid: InflightRecord(scored=scored(rid), pool="cpu", dispatched_at=0.0, kv_tokens=100)
        for rid in ("a", "b", "c")
    }
    (view,) = pool_views([_beat("w1", 500), _beat("w2", 300)], inflight)
    assert view.free_kv_tokens == 800 - 300
    assert view.free_slots == 1 and view.backlog_s > 0  # until a running request frees KV
    assert view.kv_capacity == 500
    inflight["d"] = InflightRecord(scored=scored("d"), pool="cpu", dispatched_at=0.0)
    (full,) = pool_views([_beat("w1", 500), _beat("w2", 300)], inflight)
    assert full.free_slots == 0 and full.backlog_s > 0
    assert pool_views([_beat("w1", 500)], {})[0].backlog_s == 0.0  # nothing running
    # A record without a reservation counts prompt + predicted p90 output.
    assert full.free_kv_tokens == 800 - 300 - (2 + 8)


def test_a_full_pool_expects_an_answer_past_its_prediction_to_double_not_to_end():
    """The wait for a slot counts what is left of the answer nearest its end by the
    policy's rule: one past its predicted 4 tokens (at 5 of its 40) has 5 more to go, not
    one, so a waiting request sees a wait worth handing background work back for."""
    latency = LatencyModel(decode_base_ms=100.0, decode_per_seq_ms=0.0, max_batch=1)
    long = scored("long")
    long.request.sampling.max_tokens = 40
    running = [InflightRecord(scored=long, pool="cpu", dispatched_at=0.0, charged_output=5)]
    assert backlog_seconds(running, latency) == pytest.approx(5 * 0.1)
    running[0].charged_output = 38  # near max_tokens: what is left of it
    assert backlog_seconds(running, latency) == pytest.approx(2 * 0.1)
    running.append(InflightRecord(scored=scored("fresh"), pool="cpu", dispatched_at=0.0))
    assert backlog_seconds(running, latency) == pytest.approx(2 * 0.1)  # the nearest end


def test_a_draining_worker_offers_no_free_capacity():
    """A worker stopping on SIGTERM advertises only what it still runs: the scheduler
    dispatches nothing more for it, while its running requests keep their reservations."""
    inflight = {"a": InflightRecord(scored=scored("a"), pool="cpu", dispatched_at=0.0, kv_tokens=100)}
    draining = m.WorkerHeartbeat(worker_id="w1", pool="cpu", model="tiny", max_running=2, running=1,
                                 waiting=0, total_kv_tokens=500, free_kv_tokens=400, draining=True)
    (view,) = pool_views([draining], inflight)
    assert view.free_slots == 0 and view.free_kv_tokens == 0
    (view,) = pool_views([draining, _beat("w2", 300)], inflight)
    assert view.free_slots == 2 and view.free_kv_tokens == 300


def test_a_request_too_big_for_any_worker_is_a_client_error():
    answer = expiry_answer(scored("big"), "exceeds_kv_capacity")
    assert answer.error.status == 400 and answer.error.code == "exceeds_kv_capacity"
    late = expiry_answer(scored("late"), "deadline")
    assert late.error.status == 504 and late.error.code == "deadline_exceeded"


async def test_progress_charges_survive_a_reload_and_a_lost_lease_exactly_once(redis_client, redis_url):
    """Output charged from progress events is recorded per request with the counters, so
    a reload (failover, Redis restart) does not charge it again when the request ends.
    Also when a batch was refused because the lease lapsed (Redis away longer than its
    TTL): its charges were made in memory, its events are redelivered once the replica
    leads again, and a batch of other events in between must not carry the refused
    charges into Redis (counters are written whole) before they are charged again."""
    from services.scheduler.service import SchedulerService
    from services.settings import Settings

    service = SchedulerService(Settings(redis_url=redis_url, instance_id="s1"))
    service.redis = redis_client
    service.store = SchedulerStore(redis_client, "s1", lease_ttl_s=30)
    assert await service.store.try_acquire()
    seed = Ops()
    for rid in ("r1", "r2"):
        seed.put_inflight(InflightRecord(scored=scored(rid), pool="cpu", dispatched_at=0.0, kv_tokens=10))
    await service.store.apply(seed)
    service._restore(await service.store.load())

    def progress(rid: str, total: int) -> m.RequestProgress:
        return m.RequestProgress(request_id=rid, tenant="acme", worker_id="w", new_tokens=total,
                                 total_tokens=total)

    await redis_client.delete(keys.SCHED_LEASE)  # the lease lapsed
    with pytest.raises(amqp.HandBack) as lost:  # left to the broker for the next leader
        await service._batched(service._take_event, progress("r1", 5))
    assert isinstance(lost.value.__cause__, NotLeader)
    assert await service.store.try_acquire()  # leads again
    await service._batched(service._take_event, progress("r2", 3))
    await service._batched(service._take_event, progress("r1", 5))  # the redelivery
    # A later reload (failover, Redis restart) must find what was charged per request.
    service._restore(await service.store.load())
    for rid, total in (("r1", 5), ("r2", 3)):
        await service._batched(service._take_event, m.RequestFinished(
            request_id=rid, tenant="acme", worker_id="w", model="tiny", pool="cpu",
            finish_reason="length", prompt_tokens=2, output_tokens=total, score=scored(rid).score))
    served = float(await redis_client.hget(keys.SCHED_SERVED, "acme"))
    assert served == service.config.w_out * (5 + 3)
    assert not await redis_client.hlen(keys.SCHED_INFLIGHT)


async def test_a_requeued_request_is_charged_only_past_what_it_had_produced(redis_client, redis_url):
    """A worker that hands a request back with a ``requeue`` completion event had
    produced some output, already charged; its next run regenerates that output, and
    only tokens past it are charged, also after a reload between the two runs."""
    import time

    from services.scheduler.service import SchedulerService
    from services.settings import Settings

    service = SchedulerService(Settings(redis_url=redis_url, instance_id="s1"))
    service.redis = redis_client
    service.store = SchedulerStore(redis_client, "s1", lease_ttl_s=30)
    assert await service.store.try_acquire()
    seed = Ops()
    seed.put_inflight(InflightRecord(scored=scored("r1"), pool="cpu", dispatched_at=0.0, kv_tokens=10))
    await service.store.apply(seed)
    service._restore(await service.store.load())

    async def no_publish(records):
        return None

    service._publish = no_publish
    service._workers, service._workers_at = [_beat("w1", 500)], time.time() + 60

    def progress(total: int) -> m.RequestProgress:
        return m.RequestProgress(request_id="r1", tenant="acme", worker_id="w1", new_tokens=1,
                                 total_tokens=total)

    def finished(total: int, requeue: bool) -> m.RequestFinished:
        return m.RequestFinished(request_id="r1", tenant="acme", worker_id="w1", model="tiny", pool="cpu",
                                 finish_reason="length", prompt_tokens=2, output_tokens=total,
                                 score=scored("r1").score, requeue=requeue)

    await service._batched(service._take_event, progress(3))
    await service._batched(service._take_event, finished(5, requeue=True))
    assert "r1" in service.queued
    service._restore(await service.store.load())  # a failover while it waits
    assert await service.schedule_once() == 1
    assert service.inflight["r1"].charged_output == 5
    for total in (2, 5, 6):  # the new run regenerates the first 5 tokens
        await service._batched(service._take_event, progress(total))
    await service._batched(service._take_event, finished(7, requeue=False))
    served = float(await redis_client.hget(keys.SCHED_SERVED, "acme"))
    assert served == service.config.w_out * 7


async def test_a_completed_requests_cached_prompt_tokens_are_repriced_once(redis_client, redis_url):
    """A completion event's cached prompt tokens are re-priced (w_in -> w_cached), once: a
    hand-back's event and a redelivered completion are not. A resumed run's cached
    tokens count only up to the prompt, as only the prompt was charged w_in."""
    import time

    from services.scheduler.service import SchedulerService
    from services.settings import Settings

    service = SchedulerService(Settings(redis_url=redis_url, instance_id="s1"))
    service.redis = redis_client
    service.store = SchedulerStore(redis_client, "s1", lease_ttl_s=30)
    assert await service.store.try_acquire()

    async def no_publish(records):
        return None

    service._publish = no_publish
    service._workers, service._workers_at = [_beat("w1", 500)], time.time() + 60
    service._restore(await service.store.load())
    w_in, w_out, w_cached = service.config.w_in, service.config.w_out, service.config.w_cached

    def long(rid: str) -> m.ScoredRequest:
        return m.ScoredRequest(request_id=rid, request=scored(rid).request,
                               prompt_token_ids=list(range(40)), score=scored(rid).score)

    def finished(rid: str, output: int, cached: int, requeue: bool = False) -> m.RequestFinished:
        return m.RequestFinished(request_id=rid, tenant="acme", worker_id="w1", model="tiny", pool="cpu",
                                 finish_reason="length", prompt_tokens=40, output_tokens=output,
                                 score=scored(rid).score, requeue=requeue, cached_tokens=cached)

    async def served() -> float:
        """The tenant's VTC counter (weight 1); the served-tokens counter is not re-priced."""
        return float(await redis_client.hget(keys.SCHED_COUNTERS, "acme"))

    await service._batched(service._take_scored, long("r1"))
    assert await service.schedule_once() == 1
    await service._batched(service._take_event, finished("r1", 3, 32, requeue=True))
    assert await served() == pytest.approx(w_in * 40 + w_out * 3)  # handed back: not yet
    service._restore(await service.store.load())  # a failover while it waits
    assert await service.schedule_once() == 1
    await service._batched(service._take_event, finished("r1", 5, 16))
    await service._batched(service._take_event, finished("r1", 5, 16))  # the redelivery
    assert await served() == pytest.approx(w_in * 40 + w_out * 5 - (w_in - w_cached) * 16)

    before = await served()
    await service._batched(service._take_scored, long("r2"))
    assert await service.schedule_once() == 1
    await service._batched(service._take_event, finished("r2", 4, 48))  # resumed: 8 were output
    assert await served() - before == pytest.approx(w_in * 40 + w_out * 4 - (w_in - w_cached) * 40)
    assert float(await redis_client.hget(keys.SCHED_SERVED, "acme")) == w_in * 80 + w_out * 9
    # The usage record counts each completed request once, with all of its runs' output:
    # neither the hand-back's event nor the redelivery adds to it.
    days = [key async for key in redis_client.scan_iter(match=keys.usage_bucket("1d", 0)[:-1] + "*")]
    totals: dict[str, int] = {}
    for day in days:
        for name, value in (await redis_client.hgetall(day)).items():
            totals[name.decode()] = totals.get(name.decode(), 0) + int(value)
    model = scored("r1").request.model
    assert totals == {f"acme\t{model}\tinput_tokens": 80, f"acme\t{model}\tinput_cached_tokens": 56,
                      f"acme\t{model}\toutput_tokens": 9, f"acme\t{model}\tnum_model_requests": 2}
