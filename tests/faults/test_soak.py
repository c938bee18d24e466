"""Faults one after another, at random, under steady load: the contract still holds.

Where each scenario of ``test_scenarios.py`` breaks one thing at a chosen moment, this
one keeps clients sending (HTTP streams of two tenants and an AMQP producer, a few at a
time, of random lengths, a batch now and then through the Batch API, and background
responses, streamed or polled) while it breaks something every few seconds, chosen by a
seeded random draw: kill -9 or SIGTERM a worker, the scheduler, the scorer or the
gateway (SIGTERM is a rolling deploy: its streams finish, then it comes back), pause
one of them or Redis for up to 8 s (SIGSTOP, then SIGCONT: it wakes after its peers may
have given it up), kill -9 Redis, fill Redis up, restart RabbitMQ, cut a worker's
broker link, or stall every link. One fault in four comes with a second at the same
time on another part (a worker dies while Redis is down, the scheduler while the broker
restarts): incidents rarely come alone.
After the last fault it stops sending, lets everything settle, and checks the ledger:
lost = duplicated = unexpected = 0, and the fairness counters equal the tokens served.
An HTTP stream in flight when its gateway is killed breaks at once and is owed no
answer; what is owed is that its work stops downstream and its admission slot comes
back, which the ledger checks too.

``FAIRWAY_SOAK_S`` (default 60) sets how long faults go on and ``FAIRWAY_SOAK_SEED``
(default 1) which faults come when; a long run (``FAIRWAY_SOAK_S=900``) is how to look
for the rare interleavings that a scenario written by hand does not think of.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter

import pytest
import redis.asyncio as aioredis

from tests.faults.clients import (
    DEFAULT_PROMPT,
    AmqpTenant,
    BackgroundResponses,
    BatchJobs,
    completion_body,
    http_stream,
    response_body,
    say,
)
from tests.faults.conftest import WORKERS

SOAK_S = float(os.environ.get("FAIRWAY_SOAK_S", "60"))
SOAK_SEED = int(os.environ.get("FAIRWAY_SOAK_SEED", "1"))
HTTP_CLIENTS = 4
AMQP_CLIENTS = 2
SETTLE_S = 120.0
STRUCTURED_REGEX = r"[a-z]+( [a-z]+)*\."


@pytest.mark.timeout(SOAK_S + SETTLE_S + 300)
async def test_random_faults_under_steady_load(fault_system, checker, http, keys_by_tenant):
    fs = fault_system
    rng = random.Random(SOAK_SEED)
    await checker.begin()
    stop = asyncio.Event()
    tenants = list(keys_by_tenant.items())

    async def http_client(i: int) -> None:
        client_rng = random.Random(SOAK_SEED * 100 + i)
        while not stop.is_set():
            max_tokens = client_rng.randint(4, 48)
            # Every other request asks for log-probabilities, which must come through the
            # faults exactly once per token too; every fourth holds its answer to a regex,
            # whose grammar a resumed request must take up where it was; every fifth goes
            # through the Responses API (a chat, streamed as its events).
            logprobs = client_rng.random() < 0.5
            extra: dict[str, object] = {}
            if client_rng.random() < 0.25:
                extra["guided_regex"] = STRUCTURED_REGEX
            body = (response_body(DEFAULT_PROMPT, max_tokens, logprobs=logprobs, **extra)
                    if client_rng.random() < 0.2 else
                    completion_body(DEFAULT_PROMPT, max_tokens, **extra, **({"logprobs": 2} if logprobs else {})))
            log = await http_stream(http, checker, fs.gateway_url, *tenants[i % len(tenants)], body=body)
            if not log.accepted:  # refused at the door (Redis or the broker away): back off
                await asyncio.sleep(0.5)

    batch_tenant, batch_key = tenants[0]
    batches = BatchJobs(http, checker, fs.gateway_url, batch_tenant, batch_key)

    async def batch_client() -> None:
        """A small batch every 20-40 s: its requests run in the background, between the others."""
        client_rng = random.Random(SOAK_SEED * 10_000)
        while not stop.is_set():
            await batches.submit(client_rng.randint(3, 8), client_rng.randint(4, 32), stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), client_rng.uniform(20.0, 40.0))

    background_tenant, background_key = tenants[1 % len(tenants)]
    backgrounds = BackgroundResponses(http, checker, fs.gateway_url, background_tenant, background_key)

    async def background_client() -> None:
        """A background response every 5-15 s, long enough that faults land while it runs,
        streamed or polled by turns: a stream a gateway kill cuts is read on from its last
        event."""
        client_rng = random.Random(SOAK_SEED * 20_000)
        stream = False
        while not stop.is_set():
            await backgrounds.submit(client_rng.randint(100, 300), stream)
            stream = not stream
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), client_rng.uniform(5.0, 15.0))

    async def amqp_client(producer: AmqpTenant, i: int) -> None:
        client_rng = random.Random(SOAK_SEED * 1000 + i)
        while not stop.is_set():
            log = await producer.run(max_tokens=client_rng.randint(4, 48))
            if not log.accepted:  # the broker did not confirm (restarting): back off
                await asyncio.sleep(0.5)

    faults: list[str] = []
    gateway_kills: list[tuple[float, float]] = []
    async with AmqpTenant(checker, fs.tenant_url("initech"), "initech") as producer:
        clients = [asyncio.create_task(http_client(i)) for i in range(HTTP_CLIENTS)]
        clients += [asyncio.create_task(amqp_client(producer, i)) for i in range(AMQP_CLIENTS)]
        clients.append(asyncio.create_task(batch_client()))
        clients.append(asyncio.create_task(background_client()))
        deadline = time.monotonic() + SOAK_S
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(2.0, 6.0))
            faults += await asyncio.gather(*(inject(fs, part, fault, rng, gateway_kills)
                                             for part, fault in draw(rng)))
        stop.set()
        async with asyncio.timeout(SETTLE_S):
            await asyncio.gather(*clients)
    batch_statuses = await batches.settle(SETTLE_S)
    background_statuses = await backgrounds.settle(SETTLE_S)
    cut = 0
    for log in checker.logs:
        if log.transport == "http" and log.accepted and not log.finals and any(
                log.started <= dead and killed <= log.ended for killed, dead in gateway_kills):
            log.gateway_killed = True
            cut += 1
    await fs.wait_workers()
    counts = {name: faults.count(name) for name in sorted(set(faults))}
    note = ", ".join(f"{k} x{v}" for k, v in counts.items())
    if cut:
        note += f"; {cut} streams cut by the gateway kills (owed no answer)"
    note += f"; batches: {dict(Counter(batch_statuses.values()))}"
    note += (f"; background responses: {dict(Counter(background_statuses.values()))}, runs each "
             f"{dict(sorted(Counter(backgrounds.runs.values()).items()))}, {backgrounds.resumed} streams read on "
             "after a cut")
    # Any terminal answer counts as answered; which errors the faults cost is worth seeing.
    errors = Counter(final.code or final.reason for log in checker.logs if log.accepted
                     for final in log.finals if final.reason not in ("stop", "length"))
    if errors:
        note += "; answered with errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))
    row = await checker.verify(f"soak: {len(faults)} random faults in {SOAK_S:.0f} s under load "
                               f"(seed {SOAK_SEED})", note=note)
    assert row.answered > len(faults), "too little got through to say anything"
    assert set(batch_statuses.values()) <= {"completed"}, batch_statuses
    assert set(background_statuses.values()) <= {"completed", "incomplete"}, background_statuses
    assert not backgrounds.problems, backgrounds.problems


WORKER_FAULTS = ("worker_kill", "worker_sigterm", "worker_link_cut", "worker_freeze")
FAULTS_BY_PART = {
    **{worker: WORKER_FAULTS for worker in WORKERS},
    "scheduler": ("scheduler_kill", "scheduler_sigterm", "scheduler_freeze"),
    "scorer": ("scorer_kill", "scorer_sigterm", "scorer_freeze"),
    "gateway": ("gateway_kill", "gateway_sigterm", "gateway_freeze"),
    "redis": ("redis_kill", "redis_full", "redis_freeze"),
    "rabbitmq": ("rabbitmq_restart", "rabbitmq_kill", "links_stalled"),
}
"""The faults each part can suffer. Two faults at once never hit one part: one repair
would undo the other's fault, or signal a process the other already stopped."""
TWO_AT_ONCE = 0.25


def draw(rng: random.Random) -> list[tuple[str, str]]:
    """One (part, fault), or with probability :data:`TWO_AT_ONCE` two on different parts."""
    parts = rng.sample(sorted(FAULTS_BY_PART), 2 if rng.random() < TWO_AT_ONCE else 1)
    return [(part, rng.choice(FAULTS_BY_PART[part])) for part in parts]


async def inject(fs, part: str, fault: str, rng: random.Random,
                 gateway_kills: list[tuple[float, float]]) -> str:
    """Break ``part`` by ``fault``, then repair it; returns the fault's name. Each gateway
    kill goes to ``gateway_kills`` as (signal sent, process gone): a stream that overlaps
    it is cut, also one sent in between to the dying process's listen backlog."""
    say(f"fault {fault} on {part}")
    try:
        return await _inject(fs, part, fault, rng, gateway_kills)
    finally:
        say(f"fault {fault} on {part} repaired")


async def _inject(fs, part: str, fault: str, rng: random.Random,
                  gateway_kills: list[tuple[float, float]]) -> str:
    if fault == "worker_kill":
        fs.system.signal(part, signal.SIGKILL)
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        fs.start(part)
    elif fault == "worker_sigterm":
        await asyncio.to_thread(fs.system.signal, part, signal.SIGTERM, 60)
        fs.start(part)
    elif fault in ("scheduler_kill", "scorer_kill", "gateway_kill"):
        name = fault.removesuffix("_kill")
        killed = time.monotonic()
        fs.system.signal(name, signal.SIGKILL)  # returns once the process is gone
        if name == "gateway":
            gateway_kills.append((killed, time.monotonic()))
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        fs.start(name)
    elif fault in ("scheduler_sigterm", "scorer_sigterm", "gateway_sigterm"):
        name = fault.removesuffix("_sigterm")
        exit_code = await asyncio.to_thread(fs.system.signal, name, signal.SIGTERM, 60)
        fs.start(name)
        assert exit_code == 0, f"{name} exited {exit_code} on SIGTERM"
    elif fault.endswith("_freeze"):
        # Paused with its sockets open (a long GC pause, a VM migration), then resumed:
        # meanwhile its peers may have given it up (AMQP heartbeat 2 s, scheduler lease
        # 1 s, worker timeout 3 s), so it wakes holding deliveries, a term or claims that
        # are no longer its own, and must let them go without a second answer.
        proc = fs.redis.proc if part == "redis" else fs.system.procs[part]
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(rng.uniform(0.5, 5.0 if part == "redis" else 8.0))
        finally:
            proc.send_signal(signal.SIGCONT)
    elif fault == "redis_kill":
        fs.redis.kill()
        await asyncio.sleep(rng.uniform(0.5, 5.0))
        await asyncio.to_thread(fs.redis.start)
    elif fault == "redis_full":
        admin = aioredis.from_url(fs.system.redis_url)
        try:
            await admin.config_set("maxmemory", 1)
            await asyncio.sleep(rng.uniform(1.0, 6.0))
            await admin.config_set("maxmemory", 0)
        finally:
            await admin.aclose()
    elif fault == "worker_link_cut":
        fs.proxies[part].cut(refuse_s=rng.uniform(0.0, 3.0))
    elif fault in ("rabbitmq_restart", "rabbitmq_kill"):
        # Streams go on across it; nothing may be lost or doubled.
        await asyncio.to_thread(fs.rabbit.stop if fault == "rabbitmq_restart" else fs.rabbit.kill)
        await asyncio.to_thread(fs.rabbit.start)
    elif fault == "links_stalled":
        for proxy in fs.proxies.values():
            proxy.stall()
        await asyncio.sleep(1.5)  # under the 2 s AMQP heartbeat: nothing may fail for it
        for proxy in fs.proxies.values():
            proxy.resume()
    return fault
