"""Fault scenarios on real servers: each breaks something mid-run and checks the contract.

Every scenario sends a bounded number of requests, waits a bounded time, and ends
with ``checker.verify`` (lost = 0, duplicated = 0, unexpected = 0, fairness counters
equal the tokens served, no admission slot left behind), which adds its row to the
suite's table. Scheduler failover with a second replica is proven in
``tests/integration/test_scheduler_replicas.py``, which adds its own row.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter

import aio_pika
import msgpack
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from services import amqp, keys, metrics, topology
from services import messages as m
from services.engine import EngineConfig, EngineRequest, LLMEngine
from services.engine.sampling import with_seed
from services.localinfra import memory_alarm
from services.messages import SamplingParams
from services.models import DEFAULT_MODEL_NAME
from services.scheduler.store import InflightRecord
from services.worker import claimant_worker_id
from tests.faults.checker import RequestLog
from tests.faults.clients import DEFAULT_PROMPT, MODEL, AmqpTenant, completion_body, http_stream
from tests.faults.conftest import WORKERS
from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.faults

TOKEN_TIMEOUT_S = 60.0


async def running_on(redis_url: str, worker: str) -> list[str]:
    client = aioredis.from_url(redis_url)
    try:
        blob = await client.hget(keys.WORKERS, f"cpu-{worker}")
    finally:
        await client.aclose()
    return m.decode(blob, m.WorkerHeartbeat).running_ids if blob else []


async def until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False


async def claimed_by(fs, request_ids: list[str]) -> dict[str, str]:
    """The worker (its name in WORKERS) that started each request, from the claim it takes
    in Redis as it starts one. Heartbeats lag by up to a second, and a short request can
    start and finish between two of them."""
    if not request_ids:
        return {}
    client = aioredis.from_url(fs.system.redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for rid in request_ids:
                pipe.hget(keys.request_markers(rid), keys.MARKER_CLAIM)
            claims = await pipe.execute()
    finally:
        await client.aclose()
    names = {f"cpu-{w}": w for w in WORKERS}
    return {rid: names[claimant_worker_id(c)] for rid, c in zip(request_ids, claims)
            if c and claimant_worker_id(c) in names}


async def streaming_worker(fs, checker, since: int = 0) -> str | None:
    """A worker that streams a request (a few tokens in, not finished), if any does yet:
    placement decides which worker gets the work, so a scenario cannot assume one."""
    streaming = [log.request_id for log in checker.logs[since:]
                 if log.request_id and log.tokens >= 3 and not log.finals]
    busy = set((await claimed_by(fs, streaming)).values())
    return next((worker for worker in WORKERS if worker in busy), None)


def streams(http, checker, fs, keys_by_tenant, n: int, **kw) -> list[asyncio.Task]:
    """``n`` streamed completions, alternating between the HTTP tenants."""
    tenants = list(keys_by_tenant.items())
    return [asyncio.create_task(http_stream(http, checker, fs.gateway_url, *tenants[i % len(tenants)],
                                            **kw)) for i in range(n)]


async def some_tokens(checker, n: int = 1, at_least: int = 2, since: int = 0) -> None:
    """Until ``n`` streams (of those logged after the ``since``-th) got ``at_least`` tokens."""
    async def seen() -> bool:
        return sum(log.tokens >= at_least for log in checker.logs[since:]) >= n
    assert await until(seen, TOKEN_TIMEOUT_S), "no tokens arrived: " + repr(
        [(log.status, log.refusal, log.tokens, log.finals) for log in checker.logs[since:]])


def uninterrupted_answers(cache_dir, request_ids, max_tokens: int) -> dict[str, str]:
    """The text of each request (``http_stream``'s default prompt, sampled as the gateway
    maps a body without sampling fields) when one engine runs it from start to end."""
    engine = LLMEngine.from_pretrained(str(cache_dir / DEFAULT_MODEL_NAME), "cpu", "auto",
                                       EngineConfig(kv_cache_tokens=8192))
    prompt = engine.tokenizer.encode(DEFAULT_PROMPT, add_special_tokens=True)
    for rid in request_ids:
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
        engine.add_request(EngineRequest(rid, prompt, with_seed(params, rid)))
    text = dict.fromkeys(request_ids, "")
    while engine.has_unfinished_requests():
        for out in engine.step():
            text[out.request_id] += out.new_text
    return text


def details(logs) -> list:
    return [(log.transport, log.request_id, log.status, log.tokens, log.finals) for log in logs
            if not log.done]


def outcomes(logs) -> dict[str, int]:
    out: dict[str, int] = {}
    for log in logs:
        key = "done" if log.done else (log.finals[0].code if log.finals else f"http {log.status}")
        out[key] = out.get(key, 0) + 1
    return out


async def test_worker_killed_mid_stream(fault_system, checker, http, keys_by_tenant):
    """kill -9 a worker while it streams: the other worker finishes its requests."""
    MAX_TOKENS = 140  # within the tenants' token budgets, still mid-stream at the kill
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 8, max_tokens=MAX_TOKENS)
    assert await until(lambda: streaming_worker(fs, checker), TOKEN_TIMEOUT_S), "nothing streamed"
    victim = await streaming_worker(fs, checker)
    survivor = next(w for w in WORKERS if w != victim)
    # Leave out requests that could finish on the victim before the kill lands (an answer,
    # or all but the last 80 tokens, already there).
    far_from_done = [log.request_id for log in checker.logs
                     if log.request_id and not log.finals and log.tokens <= MAX_TOKENS - 80]
    killed = {rid for rid, worker in (await claimed_by(fs, far_from_done)).items() if worker == victim}
    fs.system.signal(victim, signal.SIGKILL)
    logs = await asyncio.gather(*tasks)
    fs.start(victim)
    row = await checker.verify("worker kill -9 mid-stream",
                               note=f"{len(killed)} streams finished by the other worker")
    finished_by = {rid: e.worker_id for rid, e in checker.finished.items()}
    assert killed and all(finished_by.get(rid) == f"cpu-{survivor}" for rid in killed), (killed, finished_by)
    assert all(log.done for log in logs), outcomes(logs)
    assert row.answered == 8
    # Partly generated twice (after the last resume point), sampled: still word for word.
    got = {log.request_id: log.text for log in logs if log.request_id in killed}
    assert got == await asyncio.to_thread(uninterrupted_answers, fs.system.cache_dir, got, MAX_TOKENS)
    await fs.wait_workers()


async def test_worker_drained_on_sigterm(fault_system, checker, http, keys_by_tenant):
    """SIGTERM a worker mid-stream, as a rolling deploy does: it takes no new work at once,
    lets what it runs finish for ``FAIRWAY_WORKER_DRAIN_S``, hands back what outlasts that
    (with a resume point: the other worker continues each answer where its client is)
    and exits 0."""
    DRAIN_S, LONG, SHORT = 1.0, 900, 16  # the fault suite's model holds 1024 tokens
    await checker.begin()
    fs = fault_system
    fs.system.signal("gateway")  # long requests need more than the suite's token budget
    fs.start("gateway", FAIRWAY_MAX_QUEUED_TOKENS_PER_TENANT="20000")
    for worker in WORKERS:  # placement picks the victim, so both get the short drain
        fs.system.signal(worker)
        fs.start(worker, FAIRWAY_WORKER_DRAIN_S=str(DRAIN_S))
    await fs.wait_workers()
    long_tasks = streams(http, checker, fs, keys_by_tenant, 4, max_tokens=LONG)
    await some_tokens(checker, n=4)
    since = len(checker.logs)
    short_tasks = streams(http, checker, fs, keys_by_tenant, 4, max_tokens=SHORT)
    await some_tokens(checker, n=4, since=since)
    long_on = await claimed_by(fs, [log.request_id for log in checker.logs[:since]])
    short_on = await claimed_by(fs, [log.request_id for log in checker.logs[since:]])
    # Which requests the drain must let finish and which it must hand back depends on how
    # fast this machine generates: judge each by the pace it has kept since its first token,
    # with a margin of two either way, and leave those in between unjudged.
    now = time.monotonic()

    def seconds_left(log: RequestLog, max_tokens: int) -> float:
        return (max_tokens - log.tokens) * (now - log.first_token_at) / (log.tokens - 1)

    far_from_done = {log.request_id for log in checker.logs[:since]
                     if not log.finals and seconds_left(log, LONG) > 2 * DRAIN_S}
    near_done = {log.request_id for log in checker.logs[since:]
                 if log.finals or seconds_left(log, SHORT) < DRAIN_S / 2}
    victim = max(WORKERS, key=lambda w: sum(long_on.get(rid) == w for rid in far_from_done))
    survivor = next(w for w in WORKERS if w != victim)
    handed_back = {rid for rid in far_from_done if long_on.get(rid) == victim}
    assert handed_back, f"no long request far from its end: {checker.logs[:since]}"
    drained = {rid for rid in near_done if short_on.get(rid) == victim}

    signalled = time.monotonic()
    exit_code = asyncio.create_task(asyncio.to_thread(fs.system.signal, victim, signal.SIGTERM, 60))
    await asyncio.sleep(0.3)
    since = len(checker.logs)
    after = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 2, max_tokens=SHORT))
    assert await exit_code == 0
    stopped_after = time.monotonic() - signalled
    logs = await asyncio.gather(*long_tasks, *short_tasks)
    fs.start(victim)
    row = await checker.verify(
        "worker SIGTERM mid-stream (drain)",
        note=f"exited 0 after {stopped_after:.1f} s; {len(drained)} finished in its drain, "
             f"{len(handed_back)} handed back and finished by the other worker")
    finished_by = {rid: e.worker_id for rid, e in checker.finished.items()}  # all in: verified
    assert all(log.done for log in [*logs, *after]), outcomes([*logs, *after])
    assert all(finished_by[rid] == f"cpu-{victim}" for rid in drained), (drained, finished_by)
    assert all(finished_by[rid] == f"cpu-{survivor}" for rid in handed_back), \
        {rid: finished_by[rid] for rid in handed_back}
    resumed = {json.loads(line)["request_id"] for line in fs.system.log(survivor).splitlines()
               if '"resumed"' in line}
    assert handed_back <= resumed, "handed-back requests were regenerated, not continued"
    # Sampled without a seed (so with one of their ids), continued on another worker in
    # another batch: word for word what an uninterrupted run answers.
    got = {log.request_id: log.text for log in logs if log.request_id in handed_back}
    assert got == await asyncio.to_thread(uninterrupted_answers, fs.system.cache_dir, got, LONG)
    assert all(finished_by[log.request_id] == f"cpu-{survivor}" for log in after), "work went to the draining worker"
    assert stopped_after < DRAIN_S + 10, f"took {stopped_after:.1f} s to stop"
    assert row.answered == 10
    fs.system.signal("gateway")
    fs.start("gateway")
    await fs.wait_workers()


async def test_scheduler_killed_without_a_replica(fault_system, checker, http, keys_by_tenant):
    """kill -9 the only scheduler with requests queued and running, then start a new one."""
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 16, max_tokens=24)  # 8 slots: some wait
    await some_tokens(checker)
    queued = await _hlen(fs, keys.SCHED_QUEUED)
    fs.system.signal("scheduler", signal.SIGKILL)
    await asyncio.sleep(1.5)  # its lease (1 s) runs out
    fs.start("scheduler")
    logs = await asyncio.gather(*tasks)
    await checker.verify("scheduler kill -9, restarted (no replica)",
                         note=f"{queued} requests were queued in Redis at the kill")
    assert all(log.done for log in logs), outcomes(logs)


async def test_scorer_killed_and_restarted(fault_system, checker, http, keys_by_tenant):
    """kill -9 the scorer during a burst: anything it held unacknowledged is redelivered,
    requests sent while it is down wait in its durable queue, and the restarted scorer
    scores them all; each request is answered once."""
    await checker.begin()
    fs = fault_system
    async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as producer:
        tasks = streams(http, checker, fs, keys_by_tenant, 6, max_tokens=24)
        tasks += [asyncio.create_task(producer.run(max_tokens=24)) for _ in range(2)]
        await asyncio.sleep(0.2)  # the burst is in the scorer's hands
        fs.system.signal("scorer", signal.SIGKILL)
        tasks += streams(http, checker, fs, keys_by_tenant, 6, max_tokens=24)
        tasks += [asyncio.create_task(producer.run(max_tokens=24)) for _ in range(2)]
        waiting = 0

        async def all_waiting() -> bool:
            nonlocal waiting
            waiting = await _ready_messages(fs, topology.SCORER_QUEUE)
            return waiting >= 8

        assert await until(all_waiting, 20), f"only {waiting} requests wait in the scorer's queue"
        fs.start("scorer")
        logs = await asyncio.gather(*tasks)
    await checker.verify("scorer kill -9, restarted",
                         note=f"{waiting} requests waited in the scorer's queue while it was down")
    assert all(log.done for log in logs), outcomes(logs)


async def _ready_messages(fs, queue: str) -> int:
    connection = await aio_pika.connect(fs.amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count
    finally:
        await connection.close()


async def test_redis_killed_and_restarted(fault_system, checker, http, keys_by_tenant):
    """kill -9 Redis mid-run; it restarts 20 s later (longer than a failing message's
    retries would last, and than the scheduler's lease) from its append-only file
    (appendfsync everysec: a killed process loses nothing it acknowledged, the kernel has
    the writes)."""
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 16, max_tokens=24)
    await some_tokens(checker, n=2)
    fs.redis.kill()
    await asyncio.sleep(20.0)
    await asyncio.to_thread(fs.redis.start)
    logs = await asyncio.gather(*tasks)
    await checker.verify("Redis kill -9, restarted from AOF 20 s later", note="appendfsync everysec")
    assert all(log.done for log in logs), outcomes(logs)


async def test_redis_out_of_memory(fault_system, checker, http, keys_by_tenant):
    """Redis reaches its maxmemory (noeviction: it refuses every write) mid-run, for longer
    than a failing message's retries could last (about 15 s of backoff): a request sent
    to the gateway meanwhile is refused with a 503 that says why, one sent on AMQP waits,
    and once Redis has room again every accepted request is answered."""
    await checker.begin()
    fs = fault_system
    admin = aioredis.from_url(fs.system.redis_url)
    try:
        async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as producer:
            tasks = streams(http, checker, fs, keys_by_tenant, 12, max_tokens=24)
            await some_tokens(checker, n=2)
            await admin.config_set("maxmemory", 1)
            try:
                await asyncio.sleep(1.5)  # the gateways' next heartbeat meets the full Redis
                refused = await http_stream(http, checker, fs.gateway_url,
                                            *next(iter(keys_by_tenant.items())), max_tokens=8)
                tasks.append(asyncio.create_task(producer.run(max_tokens=12)))
                await asyncio.sleep(20.0)
            finally:
                await admin.config_set("maxmemory", 0)
            logs = await asyncio.gather(*tasks)
    finally:
        await admin.aclose()
    assert refused.status == 503 and "out of memory" in refused.refusal, \
        (refused.status, refused.refusal, refused.finals)
    await checker.verify("Redis out of memory for 20 s", note=f"outcomes: {outcomes(logs)}")
    assert all(log.done for log in logs), outcomes(logs)


async def test_worker_cut_off_from_redis(fault_system, checker, http, keys_by_tenant):
    """One worker loses Redis (its link cut, new connections refused for 20 s) while the
    broker still reaches it: once its heartbeats have failed for the scheduler's worker
    timeout it stops taking work and hands back what waits for Redis, so every request
    sent meanwhile is answered by the other worker before the link comes back; then it
    takes work again."""
    CUT_S = 20.0
    await checker.begin()
    fs = fault_system
    victim, survivor = WORKERS
    proxy = TcpProxy(fs.redis.port).start()
    fs.proxies[f"redis-{victim}"] = proxy  # closed with the others
    fs.system.signal(victim, signal.SIGTERM)
    fs.start(victim, FAIRWAY_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
    await fs.wait_workers()
    cut_at = time.monotonic()
    proxy.cut(refuse_s=CUT_S)
    logs = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 8, max_tokens=24))
    answered_in_s = max(log.ended for log in logs) - cut_at
    await fs.wait_workers()  # the victim beats again once the link is back
    row = await checker.verify("worker cut off from Redis for 20 s",
                               note=f"all answered within {answered_in_s:.1f} s of the cut")
    assert all(log.done for log in logs), outcomes(logs)
    assert row.answered == 8
    finished_by = {checker.finished[log.request_id].worker_id for log in logs}
    assert finished_by == {f"cpu-{survivor}"}, finished_by
    assert answered_in_s < CUT_S
    assert "redis_back_taking_work" in fs.system.log(victim)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_rabbitmq_restarted(fault_system, checker, http, keys_by_tenant, how):
    """Restart RabbitMQ mid-run, gracefully or after ``kill -9``. Every stream, the
    gateway's and an AMQP producer's, goes on once everything has reconnected: their reply
    queues and the replies in them outlive the restart (a confirmed persistent message is
    on disk), and the workers continue their requests from resume points and send again
    what came before, which fills what never reached a queue, so a stream far from its end
    gets its whole answer, word for word. The system serves new requests once it has
    reconnected."""
    MAX_TOKENS = 140  # within the tenants' token budgets, still mid-stream at the restart
    await checker.begin()
    fs = fault_system
    async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as producer:
        tasks = streams(http, checker, fs, keys_by_tenant, 8, max_tokens=MAX_TOKENS)
        tasks += [asyncio.create_task(producer.run(max_tokens=60)) for _ in range(4)]
        await some_tokens(checker, n=6)
        far_from_done = {log.request_id for log in checker.logs if log.transport == "http"
                         and log.request_id and not log.finals and log.tokens <= MAX_TOKENS - 80}
        await asyncio.to_thread(fs.rabbit.stop if how == "stop" else fs.rabbit.kill)
        await asyncio.to_thread(fs.rabbit.start)
        during = await asyncio.gather(*tasks)
        # A request sent while the broker was down was refused (503, nothing queued).
        assert all(log.done for log in during if log.accepted), details(during)
        await fs.wait_workers()
        await producer.ready()
        after = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 4, max_tokens=12),
                                     *[producer.run(max_tokens=12) for _ in range(2)])
    http_during = [log for log in during if log.transport == "http"]
    await checker.verify("RabbitMQ restarted" if how == "stop" else "RabbitMQ kill -9, restarted",
                         note=f"HTTP streams in flight: {outcomes(http_during)} ({len(far_from_done)} "
                              f"far from their end); AMQP producer's: "
                              f"{outcomes([log for log in during if log.transport != 'http'])}; "
                              f"after: {outcomes(after)}")
    assert all(log.done for log in after), outcomes(after)
    kept = [log for log in http_during if log.request_id in far_from_done]
    assert far_from_done and all(log.done for log in kept), details(kept)
    got = {log.request_id: log.text for log in kept}
    assert got == await asyncio.to_thread(uninterrupted_answers, fs.system.cache_dir, got, MAX_TOKENS)


async def test_rabbitmq_memory_alarm(fault_system, checker, http, keys_by_tenant):
    """RabbitMQ raises its memory alarm mid-run, as it does when it runs short of memory or
    disk: it blocks every connection that publishes, so streams stall. The first request
    sent meanwhile is refused with a 503 as soon as the broker tells the gateway it blocks
    its publishes, which it does as that request's publish reaches it (the request is
    cancelled, should the broker take it once the alarm clears); the next is refused
    without a publish, and ``/ready`` says why. When the alarm clears every stream goes on
    to its end."""
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 12, max_tokens=40)
    await some_tokens(checker, n=2)
    tenant, key = next(iter(keys_by_tenant.items()))
    async with memory_alarm(fs.rabbit):
        await asyncio.sleep(1.0)
        first = await http_stream(http, checker, fs.gateway_url, tenant, key, max_tokens=8)
        second = await http_stream(http, checker, fs.gateway_url, tenant, key, max_tokens=8)
        ready = await http.get(f"{fs.gateway_url}/ready", timeout=5)
    logs = await asyncio.gather(*tasks)
    during = (first, second)
    assert all(log.status == 503 and not log.accepted for log in during), \
        [(log.status, log.refusal, log.finals) for log in during]
    # Neither waits out the 10 s publish timeout.
    assert all(log.ended - log.started < 2.0 for log in during), [log.ended - log.started for log in during]
    assert ready.status_code == 503 and ready.json()["checks"]["amqp_publishing"] is False, ready.text
    exposition = (await http.get(f"{fs.gateway_url}/metrics", timeout=5)).text
    assert 'gateway_requests_rejected_total{reason="broker_blocked"}' in exposition
    await checker.verify("RabbitMQ memory alarm (publishers blocked)",
                         note=f"sent during it: {first.status} in {first.ended - first.started:.2f} s, "
                              f"then {second.status} in {second.ended - second.started:.2f} s; "
                              f"in flight: {outcomes(logs)}")
    assert all(log.done for log in logs), outcomes(logs)


async def test_broker_link_stalled_and_cut(fault_system, checker, http, keys_by_tenant):
    """Through the TCP proxies: (1) every service's link stalls 1.5 s, under the heartbeat
    timeout: nothing is lost or failed; (2) a worker's link is cut mid-stream: its work is
    redone elsewhere; (3) the gateway's link stalls past its heartbeat timeout: its
    streams pause and go on once it has reconnected (its reply queue outlives the link,
    and the broker requeues the replies the dead link had taken unacked), and it serves
    new requests again."""
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 8, max_tokens=40)
    await some_tokens(checker, n=2)
    for proxy in fs.proxies.values():
        proxy.stall()
    await asyncio.sleep(1.5)
    for proxy in fs.proxies.values():
        proxy.resume()
    stalled = await asyncio.gather(*tasks)
    assert all(log.done for log in stalled), outcomes(stalled)

    mark = len(checker.logs)
    tasks = streams(http, checker, fs, keys_by_tenant, 8, max_tokens=140)  # mid-stream at the cut
    assert await until(lambda: streaming_worker(fs, checker, since=mark), TOKEN_TIMEOUT_S), "nothing streamed"
    worker = await streaming_worker(fs, checker, since=mark)
    cut = fs.proxies[worker].cut(refuse_s=2.0)
    cut_logs = await asyncio.gather(*tasks)
    assert cut and all(log.done for log in cut_logs), outcomes(cut_logs)

    mark = len(checker.logs)
    tasks = streams(http, checker, fs, keys_by_tenant, 6, max_tokens=150)
    await some_tokens(checker, n=2, since=mark)
    links_lost = await broker_outage_streams(http, fs, "open")
    fs.proxies["gateway"].stall()
    await asyncio.sleep(10)  # heartbeat 2 s: both ends give the link up within a few seconds
    fs.proxies["gateway"].resume()
    gateway_logs = await asyncio.gather(*tasks)
    assert all(log.done for log in gateway_logs), details(gateway_logs)
    open_at_loss = await broker_outage_streams(http, fs, "open") - links_lost
    assert open_at_loss > 0, "the stall did not break the gateway's link"
    await fs.wait_workers()
    after = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 4, max_tokens=12))
    assert all(log.done for log in after), outcomes(after)
    await checker.verify("broker link: all stalled 1.5 s; worker cut; gateway stalled 10 s",
                         note=f"gateway in flight: {outcomes(gateway_logs)}, {open_at_loss:.0f} open "
                              f"as its link dropped")


async def broker_outage_streams(http, fs, outcome: str) -> float:
    """The gateway's count of streams open at a broker link loss (``open``), or of those
    that then ended with an error (``failed``, ``answer_lost``)."""
    text = (await http.get(f"{fs.gateway_url}/metrics", timeout=5)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == f"{metrics.GATEWAY_BROKER_OUTAGE}_total"
                    and sample.labels.get("outcome") == outcome):
                return sample.value
    return 0.0


async def test_slow_and_disconnecting_clients(fault_system, checker, http, keys_by_tenant):
    """A client reading slowly neither slows others nor makes the gateway buffer without
    bound; clients that leave mid-stream free their worker slots and admission slots,
    and are charged for what was generated, once."""
    await checker.begin()
    fs = fault_system
    (acme, acme_key), (globex, globex_key) = keys_by_tenant.items()
    rss_before = vmrss_kb(fs.pid("gateway"))
    slow = asyncio.create_task(http_stream(http, checker, fs.gateway_url, acme, acme_key,
                                           max_tokens=150, read_delay_s=0.04))
    await some_tokens(checker, n=1)
    leavers = [asyncio.create_task(http_stream(http, checker, fs.gateway_url, globex, globex_key,
                                               max_tokens=120, leave_after=5)) for _ in range(3)]
    others = [asyncio.create_task(http_stream(http, checker, fs.gateway_url, globex, globex_key,
                                              max_tokens=16)) for _ in range(4)]
    others_logs = await asyncio.gather(*others)
    left = await asyncio.gather(*leavers)
    slow_log = await slow
    rss_after = vmrss_kb(fs.pid("gateway"))
    assert slow_log.done and all(log.done for log in others_logs)
    assert max(log.ended for log in others_logs) < slow_log.ended, "a slow reader held others back"
    assert all(log.abandoned for log in left)

    async def idle() -> bool:
        return not any([await running_on(fs.system.redis_url, w) for w in ("cpu-worker-a", "cpu-worker-b")])

    assert await until(idle, 20), "workers still run the requests of clients that left"
    growth_mib = (rss_after - rss_before) / 1024
    await checker.verify("slow reader + 3 clients leaving mid-stream",
                         note=f"3 left on purpose (owed no answer); gateway RSS "
                              f"{rss_before // 1024} -> {rss_after // 1024} MiB")
    assert growth_mib < 32, f"gateway RSS grew {growth_mib:.1f} MiB"


async def test_gateway_drained_on_sigterm(fault_system, checker, http, keys_by_tenant):
    """SIGTERM the gateway mid-stream, as a rolling deploy does: it stops accepting
    connections at once, finishes the streams it serves, frees their slots and exits 0."""
    await checker.begin()
    fs = fault_system
    tasks = streams(http, checker, fs, keys_by_tenant, 8, max_tokens=120)
    await some_tokens(checker, n=4)
    mid_stream = sum(not log.finals for log in checker.logs)
    signalled = time.monotonic()
    exit_code = asyncio.create_task(asyncio.to_thread(fs.system.signal, "gateway", signal.SIGTERM, 60))
    await asyncio.sleep(0.5)
    since = len(checker.logs)
    late = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 1, max_tokens=4))
    logs = await asyncio.gather(*tasks)
    assert await exit_code == 0
    stopped_after = time.monotonic() - signalled
    fs.start("gateway")
    await fs.wait_workers()
    row = await checker.verify("gateway SIGTERM mid-stream (drain)",
                               note=f"{mid_stream} streams mid-way at the signal, all finished; "
                                    f"exited 0 after {stopped_after:.1f} s")
    assert mid_stream >= 4 and all(log.done for log in logs), outcomes(logs)
    assert not late[0].accepted and checker.logs[since] is late[0], "a draining gateway took a new request"
    assert row.answered == 8


async def test_gateway_killed_mid_stream(fault_system, checker, http, keys_by_tenant):
    """kill -9 the gateway while it streams 8 requests and has 8 more queued, then restart
    it: its clients' connections broke at once, as nothing is left to answer them. Its
    requests are cancelled downstream (running ones stop, queued ones never run), and its
    tenants' admission slots come back once it is back, not a request timeout later."""
    MAX_TOKENS = 900
    await checker.begin()
    fs = fault_system
    # Long requests need a larger token budget than the suite's (600 per tenant).
    fs.system.signal("gateway")
    fs.start("gateway", FAIRWAY_MAX_QUEUED_TOKENS_PER_TENANT="20000", FAIRWAY_MAX_QUEUED_TOTAL="32")
    await fs.wait_workers()
    tasks = streams(http, checker, fs, keys_by_tenant, 16, max_tokens=MAX_TOKENS)
    await some_tokens(checker, n=4)
    fs.system.signal("gateway", signal.SIGKILL)
    killed_at = time.monotonic()
    fs.start("gateway")
    killed = await asyncio.gather(*tasks)
    for log in killed:
        log.gateway_killed = True
    assert all(not log.finals for log in killed), outcomes(killed)
    await checker.quiesce()
    stopped_after = time.monotonic() - killed_at
    await fs.wait_workers()
    # 8 per tenant were held; the suite's limit is 8, so these need the slots back.
    after = await asyncio.gather(*streams(http, checker, fs, keys_by_tenant, 4, max_tokens=12))
    reasons = Counter(e.finish_reason for rid, e in checker.finished.items()
                      if rid not in {log.request_id for log in after})
    generated = sum(e.output_tokens for e in checker.finished.values())
    await checker.verify("gateway kill -9 mid-stream, restarted",
                         note=f"its requests ended {dict(reasons)} within {stopped_after:.1f} s; "
                              f"{generated} of {16 * MAX_TOKENS} tokens generated")
    assert set(reasons) == {"cancelled"}, reasons
    assert all(log.done for log in after), outcomes(after)


async def test_gateway_killed_mid_batch(fault_system, checker, http, keys_by_tenant):
    """kill -9 the gateway that runs a batch while some of its requests are answered and
    two are under way, then restart it: the restarted gateway takes the batch over once
    the dead one's lease lapses and runs the lines without a result. The batch completes
    with every request answered exactly once; the two under way ran again (the killed
    gateway's runs of them were cancelled downstream or, if short enough, finished with
    no one to answer; what they generated is charged all the same)."""
    LINES, MAX_TOKENS = 10, 60
    await checker.begin()
    fs = fault_system
    tenant, key = next(iter(keys_by_tenant.items()))
    auth = {"Authorization": f"Bearer {key}"}
    fs.system.signal("gateway")
    fs.start("gateway", FAIRWAY_BATCH_CONCURRENCY="2")
    await fs.wait_workers()
    rows = [{"custom_id": f"job-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": MODEL, "prompt": DEFAULT_PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}}
            for i in range(LINES)]
    data = "\n".join(json.dumps(row) for row in rows).encode()
    uploaded = await http.post(f"{fs.gateway_url}/v1/files", headers=auth, data={"purpose": "batch"},
                               files={"file": ("jobs.jsonl", data)}, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    created = await http.post(f"{fs.gateway_url}/v1/batches", headers=auth, timeout=10, json={
        "input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    batch_id = created.json()["id"]

    async def batch() -> dict:
        return (await http.get(f"{fs.gateway_url}/v1/batches/{batch_id}", headers=auth, timeout=5)).json()

    async def some_answered() -> bool:
        return (await batch())["request_counts"]["completed"] >= 3
    assert await until(some_answered, 120), await batch()
    fs.system.signal("gateway", signal.SIGKILL)
    killed_at = time.monotonic()
    fs.start("gateway", FAIRWAY_BATCH_CONCURRENCY="2")
    await fs.wait_workers()

    async def ended() -> bool:
        return (await batch())["status"] not in ("in_progress", "finalizing")
    assert await until(ended, 240, interval=0.5), await batch()
    took = time.monotonic() - killed_at
    done = await batch()
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": LINES, "completed": LINES, "failed": 0}, done
    content = await http.get(f"{fs.gateway_url}/v1/files/{done['output_file_id']}/content", headers=auth,
                             timeout=10)
    output = [json.loads(x) for x in content.text.splitlines()]
    assert [o["custom_id"] for o in output] == [row["custom_id"] for row in rows]
    for o in output:  # the client's view of each request, for the ledger
        log = checker.new(tenant, "batch")
        log.request_id, log.status, log.accepted = o["response"]["request_id"], 200, True
        usage = o["response"]["body"]["usage"]
        log.final(o["response"]["body"]["choices"][0]["finish_reason"], usage["prompt_tokens"],
                  usage["completion_tokens"])
    cut = Counter(e.finish_reason for rid, e in checker.finished.items()
                  if rid not in {o["response"]["request_id"] for o in output})
    await checker.verify("gateway kill -9 mid-batch, restarted",
                         note=f"batch completed {took:.1f} s after the kill, each of {LINES} lines "
                              f"answered once; runs cut short: {dict(cut)}")
    assert all(u["response"]["body"]["usage"]["completion_tokens"] == MAX_TOKENS for u in output)
    assert sum(cut.values()) <= 2 and set(cut) <= {"cancelled", "length"}, cut
    assert await checker.admission_slots({tenant}) == {tenant: 0}
    fs.system.signal("gateway")
    fs.start("gateway")
    await fs.wait_workers()


async def test_gateway_killed_mid_background_responses(fault_system, checker, http, keys_by_tenant):
    """kill -9 the gateway while it runs background responses (Responses API, background
    true), then restart it: once the dead gateway's leases lapse, the restarted one runs
    each again from its start, under a request id of its own. Every response completes
    with its whole answer, stored once under the id its client was given; the killed
    runs were cancelled downstream (or finished with no one to store them)."""
    RESPONSES, MAX_TOKENS = 4, 60
    await checker.begin()
    fs = fault_system
    tenant, key = next(iter(keys_by_tenant.items()))
    auth = {"Authorization": f"Bearer {key}"}
    await fs.wait_workers()
    ids = []
    for i in range(RESPONSES):
        created = await http.post(f"{fs.gateway_url}/v1/responses", headers=auth, timeout=10, json={
            "model": MODEL, "input": f"{DEFAULT_PROMPT} {i}", "max_output_tokens": MAX_TOKENS,
            "ignore_eos": True, "background": True})
        assert created.status_code == 200 and created.json()["status"] == "queued", created.text
        ids.append(created.json()["id"])

    async def statuses() -> list[str]:
        return [(await http.get(f"{fs.gateway_url}/v1/responses/{i}", headers=auth, timeout=5)).json()["status"]
                for i in ids]

    async def running() -> bool:
        return "queued" not in await statuses() and any(p.startswith(ids[0]) for p in checker.generated)
    assert await until(running, 120), await statuses()
    fs.system.signal("gateway", signal.SIGKILL)
    killed_at = time.monotonic()
    fs.start("gateway")
    await fs.wait_workers()

    async def ended() -> bool:
        return all(s not in ("queued", "in_progress") for s in await statuses())
    assert await until(ended, 240, interval=0.5), await statuses()
    took = time.monotonic() - killed_at
    answers = [(await http.get(f"{fs.gateway_url}/v1/responses/{i}", headers=auth, timeout=5)).json() for i in ids]
    await checker.quiesce(30.0)
    runs = Counter()
    for response in answers:
        assert response["status"] == "incomplete" and response["usage"]["output_tokens"] == MAX_TOKENS, response
        own = [rid for rid in checker.finished if rid == response["id"] or rid.startswith(f"{response['id']}-")]
        runs[len(own)] += 1
        reruns = [rid for rid in own if rid != response["id"]]
        assert len(reruns) <= 1, own
        answered = reruns[0] if reruns else response["id"]
        assert checker.finished[answered].finish_reason == "length", own
        log = checker.new(tenant, "background")  # the client's view, for the ledger
        log.request_id, log.status, log.accepted = answered, 200, True
        log.final("length", response["usage"]["input_tokens"], response["usage"]["output_tokens"])
    await checker.verify("gateway kill -9 mid-background-responses, restarted",
                         note=f"all {RESPONSES} completed {took:.1f} s after the kill, each stored once; "
                              f"runs per response: {dict(runs)}")
    assert await checker.admission_slots({tenant}) == {tenant: 0}


async def test_background_streams_handed_back_for_interactive_ones(fault_system, checker, http,
                                                                   keys_by_tenant):
    """Flex (background) streams fill the workers; interactive streams then arrive. The
    scheduler has running flex requests handed back (the suite sets no minimum wait), the
    interactive ones take their slots, and each handed-back stream goes on where its
    client is once nothing else waits: word for word what one uninterrupted run answers,
    every token once, charged once."""
    FLEX_TOKENS, SHORT_TOKENS = 60, 12
    await checker.begin()
    fs = fault_system
    logs_before = {w: len(fs.system.log(w)) for w in WORKERS}
    flex_body = completion_body(DEFAULT_PROMPT, FLEX_TOKENS, service_tier="flex")
    flex = streams(http, checker, fs, keys_by_tenant, 8, body=flex_body)
    await some_tokens(checker, n=7, at_least=3)  # a slot of the eight is kept for live tenants
    short = streams(http, checker, fs, keys_by_tenant, 4, max_tokens=SHORT_TOKENS)
    short_logs = await asyncio.gather(*short)
    flex_logs = await asyncio.gather(*flex)
    preempted = set()
    for worker in WORKERS:
        for line in fs.system.log(worker)[logs_before[worker]:].splitlines():
            if '"preempted_by_scheduler"' in line:
                preempted.add(json.loads(line)["request_id"])
    row = await checker.verify("background streams handed back for interactive ones",
                               note=f"{len(preempted)} flex streams handed back and resumed")
    assert row.answered == 12 and all(log.done for log in short_logs + flex_logs), outcomes(checker.logs)
    flex_ids = {log.request_id for log in flex_logs}
    assert preempted and preempted <= flex_ids, (preempted, flex_ids)
    got = {log.request_id: log.text for log in flex_logs if log.request_id in preempted}
    assert got == await asyncio.to_thread(uninterrupted_answers, fs.system.cache_dir, got, FLEX_TOKENS)


async def test_same_request_id_published_twice(fault_system, checker):
    """A producer publishes one request twice (a retry after a lost confirm); another
    tenant then reuses its id. The first gets one answer; the other one clear error."""
    await checker.begin()
    fs = fault_system
    async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as owner, \
            AmqpTenant(checker, fs.tenant_url("umbrella"), "umbrella") as other:
        request = owner.client.completion(MODEL, "say it once", max_tokens=40, ignore_eos=True)
        first = asyncio.create_task(owner.run(request=request))
        await asyncio.sleep(0.2)
        await owner.client.exchange.publish(
            amqp.to_amqp(request, reply_to=owner.client.reply_queue.name, user_id="initech"),
            routing_key=topology.SUBMIT_ROUTING_KEY)
        await some_tokens(checker)
        thief = m.CompletionRequest(request_id=request.request_id, model=MODEL, prompt="mine now",
                                    sampling=m.SamplingParams(max_tokens=8))
        stolen = await other.run(request=thief)
        answered = await first
        await asyncio.sleep(2)  # a second answer would have arrived by now
    await checker.verify("same request id published twice (+ reused by another tenant)",
                         note="3 publishes of one id")
    assert answered.done and answered.done.completion_tokens == 40
    assert [f.code for f in stolen.finals] == ["duplicate_request_id"] and not stolen.chunks
    assert len(checker.finished) == 1


async def test_work_item_republished_after_a_scheduler_failover(fault_system, checker):
    """A scheduler killed between publishing a work item and recording the broker's
    confirm leaves its successor to publish the item again. Copies published while the
    request runs, and one after it finished, are dropped by the workers: one answer."""
    await checker.begin()
    fs = fault_system
    redis = aioredis.from_url(fs.system.redis_url)
    connection = await aio_pika.connect_robust(fs.amqp_url)
    try:
        work = await (await connection.channel()).get_exchange(topology.WORK_EXCHANGE)
        async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as owner:
            request = owner.client.completion(MODEL, "run me once", max_tokens=40, ignore_eos=True)
            first = asyncio.create_task(owner.run(request=request))
            await some_tokens(checker)
            blob = await redis.hget(keys.SCHED_INFLIGHT, request.request_id)
            assert blob, "the request is not in flight"
            record = InflightRecord.from_bytes(blob)
            item = m.WorkItem(request_id=request.request_id, scored=record.scored, pool=record.pool,
                              dispatched_at=record.dispatched_at)
            for _ in range(len(WORKERS)):  # while it runs: each worker may take a copy
                await amqp.publish(work, item, record.pool)
            answered = await first
            await amqp.publish(work, item, record.pool)  # after it finished
            await asyncio.sleep(2)  # a second run would have streamed by now
    finally:
        await connection.close()
        await redis.aclose()
    await checker.verify("work item republished after a scheduler failover",
                         note="3 extra copies of one work item, 2 while it ran")
    assert answered.done and answered.done.completion_tokens == 40
    assert checker.completions == {request.request_id: 1}, "the request ran more than once"


POISON = {
    "not msgpack": (topology.REQUESTS_EXCHANGE, topology.SUBMIT_ROUTING_KEY, b"\xc1 not msgpack"),
    "wrong type": (topology.REQUESTS_EXCHANGE, topology.SUBMIT_ROUTING_KEY,
                   msgpack.packb({"v": 1, "t": "cancel_request", "request_id": "x", "tenant": "t"})),
    "oversized": (topology.REQUESTS_EXCHANGE, topology.SUBMIT_ROUTING_KEY,
                  b"\x00" * (m.MAX_MESSAGE_BYTES + 1)),
    "bad scored request": (topology.SCORED_EXCHANGE, topology.SUBMIT_ROUTING_KEY, None),
    "bad work item": (topology.WORK_EXCHANGE, "cpu", msgpack.packb({"v": 1, "t": "work_item"})),
    "bad event": (topology.EVENTS_EXCHANGE, topology.FINISHED_KEY, b"\x92\x01"),
}


async def test_poison_messages_and_bad_parameters(fault_system, checker, http, keys_by_tenant):
    """Malformed or oversized messages on every consumer's queue are dead-lettered, whoever
    can be answered gets one error, and every consumer keeps consuming; a producer's bad
    sampling parameters get a 400 before any work is done."""
    await checker.begin()
    fs = fault_system
    connection = await aio_pika.connect_robust(fs.amqp_url)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        ids = {}
        for name, (exchange_name, key, body) in POISON.items():
            if body is None:  # decodes as msgpack, not as a ScoredRequest; says where to answer
                body = msgpack.packb({"v": 1, "t": "scored_request", "request_id": "p",
                                      "request": {"reply_to": replies.name}})
            ids[name] = f"poison-{uuid.uuid4().hex}"
            exchange = await channel.get_exchange(exchange_name)
            await exchange.publish(aio_pika.Message(body, message_id=ids[name], reply_to=(
                replies.name if exchange_name == topology.REQUESTS_EXCHANGE else None)), key)
        async with AmqpTenant(checker, fs.tenant_url("umbrella"), "umbrella") as producer:
            bad = [{"temperature": -1.0}, {"top_p": 5.0}, {"max_tokens": 0}, {"top_k": -2},
                   {"stop": ["a", "b", "c", "d", "e"]}, {"temperature": float("inf")}]
            rejected = await asyncio.gather(*[producer.run(request=producer.client.completion(
                MODEL, "bad parameters", **params)) for params in bad])
            chat = m.CompletionRequest(request_id=f"amqp-{uuid.uuid4().hex}", model=MODEL, kind="chat",
                                       messages=[m.ChatMessage(role="robot", content="hi")])
            rejected.append(await producer.run(request=chat))
            good = await asyncio.gather(producer.run(max_tokens=8),
                                        *streams(http, checker, fs, keys_by_tenant, 2, max_tokens=8))
        answers = await _drain(replies, expect=4, timeout=15)
        dead = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        lettered = await _find_all(dead, set(ids.values()), timeout=20)
    finally:
        await connection.close()
    await checker.verify("poison messages + bad sampling parameters",
                         note=f"{len(POISON)} poison messages dead-lettered, {len(bad) + 1} rejected")
    assert all(log.finals and log.finals[0].status == 400 and not log.chunks for log in rejected), \
        [(log.finals) for log in rejected]
    assert all(log.done for log in good)
    assert lettered == set(ids.values()), f"not dead-lettered: {set(POISON) - set(lettered)}"
    # Error answers: the three on the requests exchange (reply_to property) and the scored
    # request (reply_to inside its body); nothing for the rest, and one each.
    assert sorted(a.finish_reason for a in answers) == ["error"] * 4
    assert all(a.error.code == "invalid_message" for a in answers)


async def test_overload_burst_at_three_times_capacity(fault_system, checker, http, keys_by_tenant):
    """Bursts of 3x what admission lets in: the excess gets 429/503 with Retry-After at once,
    before any work, what is admitted is served, and the services' memory stays flat."""
    await checker.begin()
    fs = fault_system
    capacity = ADMITTED_PER_TENANT * len(keys_by_tenant)
    names = ["gateway", "scorer", "scheduler", "cpu-worker-a", "cpu-worker-b"]

    async def burst() -> list:
        # Long ones first (4 per tenant: their token budget holds 3), so it refuses some too.
        long = streams(http, checker, fs, keys_by_tenant, 4 * len(keys_by_tenant), max_tokens=150)
        await asyncio.sleep(1.0)
        short = streams(http, checker, fs, keys_by_tenant, 3 * capacity - len(long), max_tokens=12)
        return await asyncio.gather(*long, *short)

    await burst()  # warm-up: steady-state allocations
    await checker.quiesce()
    before = {name: vmrss_kb(fs.pid(name)) for name in names} | {"redis": vmrss_kb(fs.redis.proc.pid)}
    logs = []
    for _ in range(3):
        logs += await burst()
        await checker.quiesce()
    after = {name: vmrss_kb(fs.pid(name)) for name in names} | {"redis": vmrss_kb(fs.redis.proc.pid)}
    refused = [log for log in logs if not log.accepted]
    reasons = {log.refusal for log in refused}
    rss = ", ".join(f"{n} {before[n] // 1024}->{after[n] // 1024}" for n in before)
    await checker.verify("overload: 3 bursts at 3x admission capacity", note=f"RSS MiB {rss}")
    print(f"\noverload RSS (MiB, before -> after 3 bursts): {rss}")
    assert len(refused) >= 3 * capacity, "admission let more than its capacity in"
    assert {log.status for log in refused} <= {429, 503}
    assert any("requests in flight" in r for r in reasons) and any("tokens" in r for r in reasons), reasons
    assert max(log.ended - log.started for log in refused) < 5.0, "a refusal waited for work"
    accepted = [log for log in checker.logs if log.accepted]
    assert len(checker.finished) == len(accepted), "work was done for refused requests"
    for name in before:
        growth = (after[name] - before[name]) / 1024
        assert growth < max(24.0, before[name] / 1024 * 0.1), f"{name} RSS grew {growth:.1f} MiB"


ADMITTED_PER_TENANT = 8


def vmrss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def _hlen(fs, key: str) -> int:
    client = aioredis.from_url(fs.system.redis_url)
    try:
        return await client.hlen(key)
    finally:
        await client.aclose()


async def _drain(queue, expect: int, timeout: float) -> list[m.FinalAnswer]:
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            if len(out) >= expect:
                await asyncio.sleep(1.0)  # and nothing more comes
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    break
            else:
                await asyncio.sleep(0.1)
                continue
        out.append(m.decode(message.body, m.FinalAnswer))
    return out


async def _find_all(queue, message_ids: set[str], timeout: float) -> set[str]:
    found: set[str] = set()
    deadline = time.monotonic() + timeout
    while found != message_ids and time.monotonic() < deadline:
        letter = await queue.get(no_ack=True, fail=False)
        if letter is None:
            await asyncio.sleep(0.1)
        elif letter.message_id in message_ids:
            found.add(letter.message_id)
    return found
