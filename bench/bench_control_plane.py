"""What the pipeline itself costs: requests/s and added latency over the echo engine.

    python bench/bench_control_plane.py                      # starts its own echo system
    python bench/bench_control_plane.py --url http://127.0.0.1:8000 --api-key sk-fairway-dev \
        --echo-tokens-per-s 1000                             # a running `fairway up --engine echo`

Short requests (``max_tokens`` cycling over ``--max-tokens``, EOS ignored, streamed with
``include_usage``) go through gateway -> scorer -> scheduler -> worker with the echo
engine, whose own time for a request is known exactly: it emits output token ``k`` at
``k / tokens_per_s`` seconds after the worker admits the request, so a request with ``n``
output tokens spends ``n / tokens_per_s`` in the engine. The added latency of a request is
its end-to-end time at the client (request sent -> last byte of the stream) minus that;
added TTFT is TTFT minus ``1 / tokens_per_s``.

Two phases after a warm-up:

- ``latency``: open loop, Poisson arrivals at ``--rate`` req/s for ``--latency-requests``
  requests; added latency p50/p90/p99 (the goal: p50 <= 3 ms, p99 <= 15 ms).
- ``throughput``: closed loop, ``--concurrency`` requests always in flight for
  ``--duration`` s; completed requests per second (the goal: >= 1000 req/s).

The load generator is a small HTTP/1.1 client on asyncio streams with keep-alive
connections (httpx costs more CPU than a service here, and it runs on the same cores).
When it starts the system itself, the JSON also reports each process's CPU seconds per
phase (from ``/proc``), which is where to look first for hot spots, and ``redis_growth``:
Redis' memory and keys per completed request. What a request leaves (its markers, kept
``FAIRWAY_MARKER_TTL_S``) is in ``dataset_bytes_per_request`` (data, with a few capped
lists filling up) and ``request_key_bytes_per_request`` (``MEMORY USAGE`` of its keys);
``bytes_per_request`` also counts client buffers grown under load, which do not pile up
with time. ``--plot DIR`` writes the CDF of added latency per phase.

Also on a started system: ``amqp_messages_per_request`` per phase, as RabbitMQ's global
counters count them (published, delivered, acknowledged), and last a
``messaging_floor`` phase: what durable messaging alone costs here, with nothing else
running (CPU per message of the broker and an aio-pika client to publish with a confirm
into a quorum queue, and to deliver and ack; one hop's latency). Its ``bound`` applies
that cost to the messages each request took: the most requests/s the cores could carry
if messaging were all the pipeline did, and the least added latency of the
``CRITICAL_PATH_HOPS`` hops before the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from services import keys, topology
from services.localinfra import RabbitServer, RedisServer, free_port, rabbitmqctl
from services.settings import DEFAULT_MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]

SERVICES = ("scheduler", "scorer", "cpu-worker", "gateway")
API_KEY = "sk-bench-control-plane"


# --- a lean HTTP/1.1 client ---------------------------------------------------------


@dataclass(slots=True)
class Result:
    sent: float
    first: float | None = None
    end: float | None = None
    output_tokens: int = 0
    status: int = 0
    error: str | None = None


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def post(self, head: bytes, body: bytes, result: Result) -> None:
        if self.writer is None:
            await self.open()
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        result.sent = time.perf_counter()
        writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status_line = await reader.readuntil(b"\r\n")
        result.status = int(status_line.split(b" ", 2)[1])
        headers = (await reader.readuntil(b"\r\n\r\n")).lower()
        chunked = b"transfer-encoding: chunked" in headers
        data = b""
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                piece = (await reader.readexactly(size + 2))[:-2]
                if result.first is None and b'"text":"' in piece and b'"text":""' not in piece:
                    result.first = time.perf_counter()
                data += piece
        else:
            start = headers.find(b"content-length:")
            length = int(headers[start + 15 : headers.find(b"\r\n", start)])
            data = await reader.readexactly(length)
        result.end = time.perf_counter()
        if b"connection: close" in headers:
            self.close()
        if result.status != 200:
            result.error = data[:300].decode(errors="replace")
            return
        usage = data.rfind(b'"completion_tokens":')
        if usage < 0:
            result.error = "no usage in the answer"
            return
        tail = data[usage + 20 :]
        result.output_tokens = int(tail[: min(i for i in (tail.find(b","), tail.find(b"}")) if i >= 0)])
        if result.first is None:
            result.first = result.end


class Client:
    def __init__(self, url: str, api_key: str, model: str, stream: bool, max_tokens: list[int]) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.model = model
        self.stream = stream
        self.max_tokens = max_tokens
        self.head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self.idle: list[Connection] = []
        self.counter = 0

    def body(self) -> bytes:
        i = self.counter
        self.counter += 1
        body = {"model": self.model, "prompt": f"request {i}: say something short",
                "max_tokens": self.max_tokens[i % len(self.max_tokens)], "ignore_eos": True,
                "temperature": 0.0}
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return json.dumps(body, separators=(",", ":")).encode()

    async def one(self) -> Result:
        reused = bool(self.idle)
        conn = self.idle.pop() if reused else Connection(self.host, self.port)
        body = self.body()
        result = Result(sent=time.perf_counter())
        try:
            try:
                await conn.post(self.head, body, result)
            except (asyncio.IncompleteReadError, ConnectionError):
                if not reused or result.status:
                    raise
                # The server closed an idle keep-alive connection: once more on a new one.
                conn.close()
                result = Result(sent=time.perf_counter())
                await conn.post(self.head, body, result)
        except Exception as exc:  # noqa: BLE001 - connection reset, parse error: count it
            conn.close()
            result.error = repr(exc)
            result.end = time.perf_counter()
        if conn.writer is not None:
            self.idle.append(conn)
        return result

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


# --- phases -------------------------------------------------------------------------


async def closed_loop(client: Client, concurrency: int, duration: float) -> tuple[list[Result], float]:
    results: list[Result] = []
    stop_at = time.perf_counter() + duration

    async def runner() -> None:
        while time.perf_counter() < stop_at:
            results.append(await client.one())

    start = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def open_loop(client: Client, rate: float, n: int, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    next_at = start
    for _ in range(n):
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.one()))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summarize(results: list[Result], duration: float, tokens_per_s: float) -> dict:
    ok = [r for r in results if r.error is None and r.end is not None]
    engine_s = (lambda n: n / tokens_per_s) if tokens_per_s > 0 else (lambda n: 0.0)
    e2e = [(r.end - r.sent) * 1000 for r in ok]
    added = [(r.end - r.sent - engine_s(r.output_tokens)) * 1000 for r in ok]
    ttft = [(r.first - r.sent) * 1000 for r in ok if r.first is not None]
    added_ttft = [(r.first - r.sent - engine_s(1)) * 1000 for r in ok if r.first is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            key = f"{r.status}: {r.error[:120]}"
            errors[key] = errors.get(key, 0) + 1
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(duration, 3),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / duration if duration else 0.0,
        "mean_output_tokens": float(np.mean([r.output_tokens for r in ok])) if ok else 0.0,
    }
    for name, values in (("e2el", e2e), ("added", added), ("ttft", ttft), ("added_ttft", added_ttft)):
        out[f"mean_{name}_ms"] = float(np.mean(values)) if values else 0.0
        for q in (50, 90, 99):
            out[f"{'median' if q == 50 else f'p{q}'}_{name}_ms"] = pct(values, q)
    if errors:
        out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    return out


# --- the system under test ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (RabbitMQ's beam runs under a shell)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass
class EchoSystem:
    workdir: Path
    tokens_per_s: float
    max_running: int
    cpu_workers: int
    log_level: str
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        self.redis = RedisServer(workdir=self.workdir / "redis")
        self.rabbit = RabbitServer(workdir=self.workdir / "rabbitmq")
        self.redis.start()
        self.rabbit.start()
        cache = Path(os.environ.get("FAIRWAY_CACHE_DIR") or Path.home() / ".cache" / "fairway")
        from services.models import ensure_default_model

        ensure_default_model(cache)
        env = dict(os.environ)
        env.update(
            FAIRWAY_AMQP_URL=self.rabbit.url, FAIRWAY_REDIS_URL=self.redis.url,
            FAIRWAY_CACHE_DIR=str(cache), FAIRWAY_PORT=str(self.port),
            FAIRWAY_API_KEYS=f"bench:{API_KEY}", FAIRWAY_ENGINE="echo",
            FAIRWAY_ECHO_TOKENS_PER_S=str(self.tokens_per_s),
            FAIRWAY_MAX_RUNNING=str(self.max_running), FAIRWAY_LOG_FORMAT="json",
            FAIRWAY_LOG_LEVEL=self.log_level, FAIRWAY_MAX_QUEUED_PER_TENANT="100000",
        )
        env.update(self.extra_env)
        plan = ["scheduler", "scorer"] + ["cpu-worker"] * self.cpu_workers + ["gateway"]
        for i, service in enumerate(plan):
            name = service if plan.count(service) == 1 else f"{service}-{i}"
            with open(self.workdir / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "services.cli", service], cwd=ROOT,
                    env={**env, "FAIRWAY_INSTANCE_ID": f"bench-{name}"},
                    stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early; see {self.workdir / name}.log")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the echo system did not become ready")

    def pids(self) -> dict[str, list[int]]:
        out = {name: [proc.pid] for name, proc in self.procs.items()}
        out["redis"] = [self.redis.proc.pid]
        out["rabbitmq"] = descendants(self.rabbit.proc.pid)
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.rabbit.stop()
        self.redis.stop()


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has used (``/proc/stat``, not idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by each process of the system under test, and by everything else on the
    machine (other work competing for the same cores makes every hop slower)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.pids["bench-client"] = [os.getpid()]

    def sample(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        out["machine"] = machine_busy_seconds()
        return out

    @staticmethod
    def diff(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
        """CPU cores used on average by each process over ``seconds``."""
        out = {name: round((after[name] - before[name]) / seconds, 3) for name in before}
        out["other_processes"] = round(out.pop("machine") - sum(out.values()), 3)
        return out


# --- what messaging alone costs -----------------------------------------------------

CRITICAL_PATH_HOPS = 4
"""AMQP hops between a request's arrival and its first token back at the gateway:
gateway -> scorer -> scheduler -> worker -> gateway."""

FLOOR_QUEUE = "fairway.bench.messaging-floor"


def parse_global_counters(text: str) -> dict[str, int]:
    """Message totals from ``rabbit_global_counters:overview()`` as ``rabbitmqctl eval``
    prints it (an Erlang map of label lists to counter maps)."""
    out = {"published": 0, "confirmed": 0, "delivered_quorum": 0, "delivered_classic": 0,
           "acknowledged": 0}
    for labels, body in re.findall(r"\[([^\]]*)\]\s*=>\s*#\{([^}]*)\}", text):
        values = {k: int(v) for k, v in re.findall(r"(\w+) => (\d+)", body)}
        if labels == "{protocol,amqp091}":
            out["published"] = values.get("messages_received_total", 0)
            out["confirmed"] = values.get("messages_confirmed_total", 0)
        elif labels.startswith("{protocol,amqp091},{queue_type,"):
            kind = "quorum" if "quorum" in labels else "classic" if "classic" in labels else None
            if kind is not None:
                out[f"delivered_{kind}"] = values.get("messages_delivered_total", 0)
                out["acknowledged"] += values.get("messages_acknowledged_total", 0)
    return out


class BrokerCounters:
    """RabbitMQ's own count of the messages a phase published and delivered, so messages
    per request are measured, not assumed."""

    def __init__(self, rabbit: RabbitServer) -> None:
        self.rabbit = rabbit

    def sample(self) -> dict[str, int]:
        return parse_global_counters(rabbitmqctl(self.rabbit, "eval", "rabbit_global_counters:overview()."))

    @staticmethod
    def per_request(before: dict[str, int], after: dict[str, int], requests: int) -> dict[str, float]:
        out = {k: round((after[k] - before[k]) / max(requests, 1), 2) for k in before}
        out["delivered"] = round(out["delivered_quorum"] + out["delivered_classic"], 2)
        return out


async def messaging_floor(amqp_url: str, broker_pids: list[int], messages: int,
                          body_bytes: int = 400, latency_samples: int = 200) -> dict:
    """The cost of durable messaging alone, with nothing else running: CPU per message
    (broker and an aio-pika client) to publish with a confirm into a quorum queue like the
    pipeline's, then to deliver and ack it; and one hop's latency (publish -> delivery)."""
    import aio_pika

    def cpu() -> tuple[float, float]:
        return sum(cpu_seconds(p) for p in broker_pids), cpu_seconds(os.getpid())

    def per_message(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
        broker, client = ((a - b) * 1000 / messages for a, b in zip(after, before, strict=True))
        return {"broker_cpu_ms": round(broker, 4), "client_cpu_ms": round(client, 4),
                "cpu_ms": round(broker + client, 4)}

    body = b"x" * body_bytes
    conn = await aio_pika.connect(amqp_url)
    try:
        publisher = await conn.channel(publisher_confirms=True)
        consumer = await conn.channel()
        await consumer.set_qos(prefetch_count=256)
        queue = await consumer.declare_queue(FLOOR_QUEUE, durable=True,
                                             arguments=topology.quorum_arguments())
        await queue.purge()

        window = asyncio.Semaphore(256)

        async def publish_one() -> None:
            try:
                await publisher.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=FLOOR_QUEUE)
            finally:
                window.release()

        before = cpu()
        started = time.perf_counter()
        pending = []
        for _ in range(messages):
            await window.acquire()
            pending.append(asyncio.ensure_future(publish_one()))
        await asyncio.gather(*pending)
        publish_s = time.perf_counter() - started
        publish = per_message(before, cpu())

        drained = asyncio.Event()
        received = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received == messages:
                drained.set()

        before = cpu()
        started = time.perf_counter()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(drained.wait(), 120)
        deliver_s = time.perf_counter() - started
        deliver = per_message(before, cpu())
        await queue.cancel(tag)

        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_probe(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.put_nowait(time.perf_counter())
            await message.ack()

        tag = await queue.consume(on_probe)
        hops = []
        for _ in range(latency_samples):
            sent = time.perf_counter()
            await publisher.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=FLOOR_QUEUE)
            hops.append((await asyncio.wait_for(arrived.get(), 10) - sent) * 1000)
            await asyncio.sleep(0.002)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await conn.close()
    return {
        "messages": messages,
        "body_bytes": body_bytes,
        "queue_type": topology.quorum_arguments()["x-queue-type"],
        "publish": {**publish, "messages_per_s": round(messages / publish_s)},
        "deliver": {**deliver, "messages_per_s": round(messages / deliver_s)},
        "hop_latency_ms": {"median": pct(hops, 50), "p90": pct(hops, 90), "p99": pct(hops, 99)},
    }


def messaging_bound(floor: dict, per_request: dict[str, float], cores: int) -> dict:
    """What the pipeline could reach if messaging were all it did: each request's measured
    messages at the floor's cost per message, on ``cores`` cores, and its hops' latency.
    A lower bound on cost (a message routed to two queues is charged one enqueue)."""
    cpu_ms = (per_request["published"] * floor["publish"]["cpu_ms"]
              + per_request["delivered"] * floor["deliver"]["cpu_ms"])
    return {
        "published_per_request": per_request["published"],
        "delivered_per_request": per_request["delivered"],
        "messaging_cpu_ms_per_request": round(cpu_ms, 3),
        "max_request_throughput": round(cores * 1000 / cpu_ms, 1) if cpu_ms else None,
        "critical_path_hops": CRITICAL_PATH_HOPS,
        "min_added_latency_ms": round(CRITICAL_PATH_HOPS * floor["hop_latency_ms"]["median"], 2),
    }



# --- main ---------------------------------------------------------------------------


def parse_range(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


class QueueProbe:
    """Samples where requests wait during a phase: AMQP queue depths and the scheduler's
    Redis queues (queued, in flight), every ``interval`` seconds."""

    QUEUES = ("fairway.scorer", "fairway.scheduler", "fairway.work.cpu",
              "fairway.scheduler.events", "fairway.scorer.feedback")

    def __init__(self, amqp_url: str, redis_url: str, interval: float = 0.25) -> None:
        self.amqp_url, self.redis_url, self.interval = amqp_url, redis_url, interval
        self.samples: list[dict[str, int]] = []

    async def run(self, stop: asyncio.Event) -> None:
        import aio_pika
        import redis.asyncio as aioredis

        from services import keys

        conn = await aio_pika.connect(self.amqp_url)
        redis = aioredis.from_url(self.redis_url)
        try:
            channel = await conn.channel()
            while not stop.is_set():
                sample = {}
                for name in self.QUEUES:
                    queue = await channel.declare_queue(name, passive=True)
                    sample[name] = queue.declaration_result.message_count
                sample["redis.queued"] = await redis.hlen(keys.SCHED_QUEUED)
                sample["redis.inflight"] = await redis.hlen(keys.SCHED_INFLIGHT)
                self.samples.append(sample)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await conn.close()
            await redis.aclose()

    async def redis_footprint(self) -> dict[str, int]:
        """Redis' memory and key count now, and the memory of the per-request keys (the
        markers each request leaves, kept ``FAIRWAY_MARKER_TTL_S``): that part grows
        with rate x TTL; the rest of the growth (client buffers, capped lists, the main
        dictionary's tables) does not."""
        import redis.asyncio as aioredis

        redis = aioredis.from_url(self.redis_url)
        try:
            memory = await redis.info("memory")
            request_keys = request_bytes = 0
            async for key in redis.scan_iter(match=f"{keys.PREFIX}:req:*", count=1000):
                request_keys += 1
                request_bytes += await redis.memory_usage(key, samples=0) or 0
            return {"used_memory_bytes": int(memory["used_memory"]),
                    "dataset_bytes": int(memory["used_memory_dataset"]), "keys": int(await redis.dbsize()),
                    "request_keys": request_keys, "request_key_bytes": request_bytes}
        finally:
            await redis.aclose()

    def summary(self) -> dict[str, dict[str, float]]:
        names = self.samples[0].keys() if self.samples else []
        return {n: {"mean": round(float(np.mean([s[n] for s in self.samples])), 1),
                    "max": max(s[n] for s in self.samples)} for n in names}


async def measure(args, url: str, tokens_per_s: float, meter: CpuMeter | None,
                  probe: QueueProbe | None = None, counters: BrokerCounters | None = None) -> dict:
    client = Client(url, args.api_key, args.model, not args.no_stream, parse_range(args.max_tokens))
    report: dict = {}
    try:
        # /ready covers the gateway and a worker; the scorer may still be loading.
        deadline = time.monotonic() + 180
        while (first := await client.one()).error is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no request succeeded: {first.error}")
            await asyncio.sleep(0.5)
        if meter and args.idle_s:
            before = meter.sample()
            await asyncio.sleep(args.idle_s)
            report["idle_cpu_cores"] = CpuMeter.diff(before, meter.sample(), args.idle_s)
        footprint = await probe.redis_footprint() if probe else None
        warm, _ = await closed_loop(client, min(args.concurrency, 16), args.warmup_s)
        report["warmup_completed"] = sum(r.error is None for r in warm)
        completed = report["warmup_completed"]
        phases = []
        if args.latency_requests:
            phases.append(("latency", lambda: open_loop(client, args.rate, args.latency_requests, args.seed)))
        if args.duration:
            phases.append(("throughput", lambda: closed_loop(client, args.concurrency, args.duration)))
        for name, run in phases:
            before = meter.sample() if meter else None
            messages_before = counters.sample() if counters else None
            stop = asyncio.Event()
            probing = asyncio.ensure_future(probe.run(stop)) if probe else None
            results, duration = await run()
            stop.set()
            if probing is not None:
                await probing
                report.setdefault(name, {})
            report[name] = summarize(results, duration, tokens_per_s)
            completed += report[name]["completed"]
            if probe is not None:
                report[name]["queue_depths"] = probe.summary()
                probe.samples.clear()
            if meter:
                report[name]["cpu_cores"] = CpuMeter.diff(before, meter.sample(), duration)
            if counters:
                report[name]["amqp_messages_per_request"] = BrokerCounters.per_request(
                    messages_before, counters.sample(), len(results))
            report[name]["_results"] = results
        if footprint is not None and completed:
            after = await probe.redis_footprint()
            report["redis_growth"] = {
                "requests": completed, "before": footprint, "after": after,
                "bytes_per_request": round((after["used_memory_bytes"] - footprint["used_memory_bytes"]) / completed),
                "dataset_bytes_per_request": round(
                    (after["dataset_bytes"] - footprint["dataset_bytes"]) / completed),
                "keys_per_request": round((after["keys"] - footprint["keys"]) / completed, 2),
                "request_key_bytes_per_request": round(
                    (after["request_key_bytes"] - footprint["request_key_bytes"]) / completed),
            }
    finally:
        client.close()
    return report


def write_plot(report: dict, tokens_per_s: float, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in ("latency", "throughput"):
        if phase not in report:
            continue
        ok = [r for r in report[phase]["_results"] if r.error is None]
        per_token = 1 / tokens_per_s if tokens_per_s > 0 else 0.0
        data = np.sort([(r.end - r.sent - r.output_tokens * per_token) * 1000 for r in ok])
        ax.step(data, np.arange(1, data.size + 1) / max(data.size, 1), where="post",
                label=f"{phase} ({report[phase]['request_throughput']:.0f} req/s)")
    ax.axvline(3, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(15, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("added latency over the echo engine (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "control_plane_added_latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running echo system's gateway (default: start one)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--echo-tokens-per-s", type=float, default=1000.0,
                        help="the echo engine's pace (set on the system this starts; "
                             "with --url, say what the running one uses)")
    parser.add_argument("--max-tokens", default="1-4", help="max_tokens, cycling over a range")
    parser.add_argument("--no-stream", action="store_true", help="non-streamed requests")
    parser.add_argument("--rate", type=float, default=200.0, help="latency phase arrival rate")
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64, help="throughput phase")
    parser.add_argument("--duration", type=float, default=10.0, help="throughput phase seconds")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--idle-s", type=float, default=3.0,
                        help="first measure the started system's CPU use without traffic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-running", type=int, default=256,
                        help="echo worker slots (FAIRWAY_MAX_RUNNING) of a started system")
    parser.add_argument("--cpu-workers", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="FAIRWAY_LOG_LEVEL of a started system")
    parser.add_argument("--floor-messages", type=int, default=4000,
                        help="messages for the messaging-floor phase on a started system (0: skip)")
    parser.add_argument("--keep-logs", metavar="DIR", help="workdir of a started system")
    parser.add_argument("--plot", metavar="DIR")
    parser.add_argument("--json", metavar="OUT", help="also write the JSON here")
    args = parser.parse_args()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    system = None
    meter = None
    try:
        if args.url:
            url = args.url
            args.api_key = args.api_key or "sk-fairway-dev"
        else:
            workdir = Path(args.keep_logs or tempfile.mkdtemp(prefix="fairway-cp-"))
            workdir.mkdir(parents=True, exist_ok=True)
            system = EchoSystem(workdir, args.echo_tokens_per_s, args.max_running,
                                args.cpu_workers, args.log_level)
            system.start()
            url = system.url
            args.api_key = API_KEY
            meter = CpuMeter(system.pids())
        probe = QueueProbe(system.rabbit.url, system.redis.url) if system else None
        counters = BrokerCounters(system.rabbit) if system else None
        report = asyncio.run(measure(args, url, args.echo_tokens_per_s, meter, probe, counters))
        if system is not None and args.floor_messages:
            floor = asyncio.run(messaging_floor(
                system.rabbit.url, system.pids()["rabbitmq"], args.floor_messages))
            phase = report.get("throughput") or report.get("latency")
            if phase:
                floor["bound"] = messaging_bound(
                    floor, phase["amqp_messages_per_request"], os.cpu_count() or 1)
            report["messaging_floor"] = floor
    finally:
        if system is not None:
            system.stop()
    config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    config["url"] = url
    config["cpu_count"] = os.cpu_count()
    config["started_system"] = system is not None
    config["nice"] = os.nice(0)
    config["loadavg_1m_at_end"] = os.getloadavg()[0]
    if args.plot:
        report["plot"] = write_plot(report, args.echo_tokens_per_s, args.plot)
    for phase in ("latency", "throughput"):
        report.get(phase, {}).pop("_results", None)
    out = {"config": config, **report}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
