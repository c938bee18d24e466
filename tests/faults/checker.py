"""The fault suite's ledger: what every client saw, checked against the contract.

Each scenario logs every request it sends (tenant, transport, whether it was accepted,
the sequence numbers of the token chunks its client received, every terminal answer)
and every reply a client received for a request it does not own. :meth:`Checker.verify`
then asserts the contract of ``DESIGN.md``:

- lost = 0: every accepted request has a terminal answer (a gateway timeout counts as
  lost: it means the system went silent);
- duplicated = 0: no request has two terminal answers, a repeated or missing token
  sequence number, more tokens than its answer reports, or (asked for) log-probabilities
  for other than exactly its tokens;
- unexpected = 0: no reply reached a client for a request it did not have accepted,
  nor one of another tenant;
- fairness: the scheduler's served-token counters grew, per tenant, by exactly the
  tokens the workers report having served (``w_in`` per input and ``w_out`` per output
  token), each request counted once; the VTC counters grew at least as much; and no
  tenant is left holding gateway admission slots.

"Tokens actually served" come from a tap on the workers' progress and completion
events (a quorum queue of the checker's own on the events exchange, as durable as the
scheduler's): per request, its prompt and the most output tokens any attempt generated;
they are cross-checked with the usage that clients received in their terminal answers.
Each verified scenario adds a row to the table that :meth:`Checker.write` saves as JSON
and markdown (``FAIRWAY_FAULTS_TABLE`` names the path stem; a temporary directory
otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis

from services import keys, topology
from services import messages as m
from services.scheduler.store import InflightRecord
from services.settings import DEFAULT_AMQP_RECONNECT_S

TAP_QUEUE = "fairway.test.finished-tap"


@dataclass
class Final:
    reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str | None = None
    status: int | None = None


@dataclass
class RequestLog:
    """One request as its client saw it."""

    local_id: str
    tenant: str
    transport: str
    request_id: str | None = None
    status: int | None = None
    """HTTP status of the response head (AMQP: 200 once the broker confirmed the publish)."""
    accepted: bool = False
    abandoned: bool = False
    """The client left on purpose before the answer: no terminal answer is owed."""
    gateway_killed: bool = False
    """The gateway serving it was killed mid-request: the client's connection broke at once
    (an error, not silence) and no answer can come over it; what is owed is that the work
    stops downstream and its admission slot comes back."""
    chunks: list[tuple[int, int]] = field(default_factory=list)
    """(position of its first token in the answer, tokens) of each chunk received."""
    tokens: int = 0
    logprob_tokens: int | None = None
    """Tokens the log-probabilities received covered, for an HTTP request that asked for
    them: exactly its completion tokens, each token's once."""
    output_ids: int | None = None
    """Output token ids received, for an HTTP completion that asked for them
    (``return_token_ids``): exactly its completion tokens, each token's once."""
    prompt_ids: int = 0
    """How many times the prompt's token ids came (asked for: once)."""
    text: str = ""
    """The answer's text as received (HTTP streams)."""
    finals: list[Final] = field(default_factory=list)
    refusal: str = ""
    """The error message of a request refused at admission (429/503)."""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    ended: float = 0.0

    def token(self, offset: int, n_tokens: int) -> None:
        if not self.chunks:
            self.first_token_at = time.monotonic()
        self.chunks.append((offset, n_tokens))
        self.tokens += n_tokens

    def final(self, reason: str, prompt_tokens: int = 0, completion_tokens: int = 0,
              code: str | None = None, status: int | None = None) -> None:
        self.finals.append(Final(reason, prompt_tokens, completion_tokens, code, status))

    @property
    def done(self) -> Final | None:
        return next((f for f in self.finals if f.reason in ("stop", "length")), None)

    def lost(self) -> bool:
        if not self.accepted or self.abandoned or self.gateway_killed:
            return False
        return not self.finals or all(f.code == "timeout" for f in self.finals)

    def duplicated(self) -> bool:
        if len(self.finals) > 1:
            return True
        expected = 0
        for offset, n_tokens in self.chunks:
            if offset != expected:
                return True  # a repeat, a gap or a chunk out of order
            expected += n_tokens
        done = self.done
        if done is not None and self.logprob_tokens not in (None, done.completion_tokens):
            return True  # a token's log-probability repeated or missing
        if done is not None and self.output_ids is not None and (
                self.output_ids != done.completion_tokens or self.prompt_ids != 1):
            return True  # a token id, or the prompt's ids, repeated or missing
        # HTTP events skip chunks with no text, so they can be fewer than the tokens.
        return done is not None and self.tokens > done.completion_tokens


@dataclass
class Row:
    scenario: str
    sent: int
    accepted: int
    answered: int
    lost: int
    duplicated: int
    unexpected: int
    note: str = ""


EXTERNAL_ROWS: list[Row] = []
"""Rows proven by tests outside this suite (the two-replica failover), for the table."""


def record_external(row: Row) -> None:
    EXTERNAL_ROWS.append(row)


class Checker:
    """Ledger of one test session; scenarios share it and each adds a row."""

    def __init__(self, redis_url: str, w_in: float = 1.0, w_out: float = 2.0) -> None:
        self.redis_url = redis_url
        self.w_in = w_in
        self.w_out = w_out
        self.rows: list[Row] = []
        self.logs: list[RequestLog] = []
        self.strays: list[tuple[str, str]] = []
        self.finished: dict[str, m.RequestFinished] = {}
        """Completion events seen by the tap, the first per request (requeues excluded)."""
        self.completions: Counter[str] = Counter()
        """Completion events per request: more than one means a request ran twice."""
        self.generated: dict[str, int] = {}
        """Most output tokens any progress event reported per request: an attempt that a
        fault cut short still generated (and was charged for) that many."""
        self._seq = 0
        self._tap_connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._tap_queue: aio_pika.abc.AbstractQueue | None = None
        self._served_before: dict[str, float] = {}
        self._usage_before: Counter[str] = Counter()
        self._vtc_before: dict[str, float] = {}

    # --- recording -------------------------------------------------------------------

    def new(self, tenant: str, transport: str) -> RequestLog:
        self._seq += 1
        log = RequestLog(local_id=f"{transport}-{self._seq}", tenant=tenant, transport=transport)
        self.logs.append(log)
        return log

    def stray(self, receiver: str, request_id: str) -> None:
        """A client of ``receiver`` got a reply for a request it never had accepted."""
        self.strays.append((receiver, request_id))

    async def start_tap(self, amqp_url: str) -> None:
        """Count the workers' completion events on a queue of our own (survives restarts)."""
        # Back as soon as the services are after a broker restart (they try every second).
        self._tap_connection = await aio_pika.connect_robust(
            amqp_url, reconnect_interval=DEFAULT_AMQP_RECONNECT_S)
        channel = await self._tap_connection.channel()
        exchange = await channel.declare_exchange(topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        # Quorum, as the scheduler's events queue: a worker's event that a broker restart
        # cut off before its confirm may still have reached the scheduler's queue, and a
        # classic queue would lose it where the scheduler's kept and charged it.
        queue = self._tap_queue = await channel.declare_queue(TAP_QUEUE, durable=True,
                                                              arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key=topology.FINISHED_KEY)
        await queue.bind(exchange, routing_key=topology.PROGRESS_KEY)

        # As the scheduler counts: a request's first completion ends its charge; what a
        # second run of it reports (a redelivered copy that ran before the request was
        # marked done) is neither charged nor what its caller was answered with.
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event = m.decode(message.body)
            done = event.request_id in self.finished
            if isinstance(event, m.RequestProgress) and not done:
                self.generated[event.request_id] = max(self.generated.get(event.request_id, 0),
                                                       event.total_tokens)
            elif isinstance(event, m.RequestFinished) and not event.requeue:
                if not done:
                    self.finished[event.request_id] = event
                self.completions[event.request_id] += 1
            await message.ack()

        await queue.consume(on_message)

    async def stop_tap(self) -> None:
        if self._tap_connection is not None:
            channel = await self._tap_connection.channel()
            await channel.queue_delete(TAP_QUEUE)
            await self._tap_connection.close()

    async def begin(self) -> None:
        """Start a scenario: let the last one's work end (a failed scenario can leave streams
        whose late charges would count here), forget its requests, snapshot the counters."""
        await self.quiesce()
        self.logs = []
        self.strays = []
        self.finished = {}
        self.completions = Counter()
        self.generated = {}
        self._served_before, self._vtc_before = await self._counters()
        self._usage_before = await self._usage_requests()

    # --- checking --------------------------------------------------------------------

    async def _counters(self) -> tuple[dict[str, float], dict[str, float]]:
        redis = aioredis.from_url(self.redis_url)
        try:
            served = await redis.hgetall(keys.SCHED_SERVED)
            vtc = await redis.hgetall(keys.SCHED_COUNTERS)
        finally:
            await redis.aclose()
        decode = lambda h: {k.decode(): float(v) for k, v in h.items()}
        return decode(served), decode(vtc)

    async def _usage_requests(self) -> Counter[str]:
        """Each tenant's model requests in the usage records (every day bucket)."""
        redis = aioredis.from_url(self.redis_url)
        counts: Counter[str] = Counter()
        try:
            pattern = keys.usage_bucket("1d", 0).removesuffix("0") + "*"
            async for key in redis.scan_iter(match=pattern):
                for name, value in (await redis.hgetall(key)).items():
                    tenant, _model, measure = name.decode().split("\t")
                    if measure == "num_model_requests":
                        counts[tenant] += int(value)
        finally:
            await redis.aclose()
        return counts

    async def quiesce(self, timeout: float = 30.0) -> None:
        """Wait until the scheduler holds no queued or in-flight work and events are in."""
        redis = aioredis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    busy = await redis.hlen(keys.SCHED_QUEUED) + await redis.hlen(keys.SCHED_INFLIGHT)
                except (OSError, aioredis.RedisError):
                    busy = 1
                if not busy:
                    break
                await asyncio.sleep(0.2)
            else:
                inflight = [InflightRecord.from_bytes(blob) for blob in
                            (await redis.hgetall(keys.SCHED_INFLIGHT)).values()]
                held = [(r.scored.request_id, r.scored.request.tenant, r.pool, r.published,
                         r.charged_output) for r in inflight]
                queued = [k.decode() for k in await redis.hkeys(keys.SCHED_QUEUED)]
                raise AssertionError(f"the scheduler still holds work after {timeout}s: "
                                     f"in flight {held}, queued {queued}")
        finally:
            await redis.aclose()
        await self._tap_drained(deadline)
        await asyncio.sleep(0.5)  # the last completion events delivered are counted

    async def _tap_drained(self, deadline: float) -> None:
        """Wait until the tap is connected (after a broker restart it may still be
        reconnecting) and has taken every completion event the workers published."""
        if self._tap_queue is None:
            return
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the tap's link is not back yet
                if (await self._tap_queue.declare(timeout=2)).message_count == 0:
                    return
            await asyncio.sleep(0.2)
        raise AssertionError("the completion-event tap did not drain")

    async def admission_slots(self, tenants: set[str]) -> dict[str, int]:
        redis = aioredis.from_url(self.redis_url)
        try:
            return {t: int(await redis.zcard(keys.tenant_inflight(t))) for t in sorted(tenants)}
        finally:
            await redis.aclose()

    def expected_served(self) -> dict[str, float]:
        expected: dict[str, float] = {}
        for event in self.finished.values():
            output = max(event.output_tokens, self.generated.get(event.request_id, 0))
            charge = self.w_in * event.prompt_tokens + self.w_out * output
            expected[event.tenant] = expected.get(event.tenant, 0.0) + charge
        return expected

    async def verify(self, scenario: str, *, note: str = "", fairness: bool = True,
                     quiesce_s: float = 30.0) -> Row:
        """Assert the contract for the scenario's requests and record its row."""
        await self.quiesce(quiesce_s)
        accepted = [r for r in self.logs if r.accepted]
        answered = [r for r in accepted if r.finals]
        lost = [r for r in accepted if r.lost()]
        duplicated = [r for r in self.logs if r.duplicated()]
        own_ids = {(r.tenant, r.request_id) for r in accepted}
        unexpected = [s for s in self.strays if s not in own_ids]
        unexpected += [r for r in self.logs if not r.accepted and (r.finals or r.chunks)]
        row = Row(scenario, len(self.logs), len(accepted), len(answered), len(lost), len(duplicated),
                  len(unexpected), note)
        self.rows.append(row)
        problems = []
        if lost:
            problems.append(f"lost: {[(r.request_id, r.tenant, r.finals) for r in lost][:5]}")
        if duplicated:
            problems.append(f"duplicated: {[(r.request_id, r.chunks[:50], r.finals) for r in duplicated][:3]}")
        if unexpected:
            problems.append(f"unexpected: {unexpected[:5]}")
        # What clients were told they used is what the workers report having served.
        for r in accepted:
            done = r.done
            event = self.finished.get(r.request_id or "")
            if done is not None and event is not None and (
                    (event.prompt_tokens, event.output_tokens) != (done.prompt_tokens, done.completion_tokens)):
                problems.append(f"usage mismatch {r.request_id}: client {done}, worker {event}")
            if done is not None and event is None:
                problems.append(f"no completion event for answered request {r.request_id}")
        tenants = {r.tenant for r in self.logs}
        if fairness:
            served, vtc = await self._counters()
            expected = self.expected_served()
            for tenant in tenants | set(expected):
                grew = served.get(tenant, 0.0) - self._served_before.get(tenant, 0.0)
                want = expected.get(tenant, 0.0)
                if abs(grew - want) > 1e-6:
                    problems.append(f"served counter of {tenant} grew by {grew}, served {want} "
                                    f"(the tap's events per request: {self.write_ledger()})")
                vtc_grew = vtc.get(tenant, 0.0) - self._vtc_before.get(tenant, 0.0)
                if vtc_grew + 1e-6 < min(want, grew) / 8:  # tenant weights are at most 8
                    problems.append(f"VTC counter of {tenant} grew by {vtc_grew} for {want} served")
            # The usage records count each finished request once, as the counters charge it.
            usage = await self._usage_requests()
            finished = Counter(event.tenant for event in self.finished.values())
            for tenant in set(usage) | set(finished):
                recorded = usage[tenant] - self._usage_before.get(tenant, 0)
                if recorded != finished[tenant]:
                    problems.append(f"usage of {tenant} recorded {recorded} requests, {finished[tenant]} finished")
        leaked = {t: n for t, n in (await self.admission_slots(tenants)).items() if n}
        if leaked:
            problems.append(f"admission slots still held: {leaked}")
        assert not problems, f"{scenario}: " + "; ".join(problems)
        return row

    def write_ledger(self) -> Path:
        """The tap's view per request (its completion event and the most output any
        progress event reported), as JSON lines beside the table: with Redis' append-only
        file (the scheduler's charges) it says which request a counter mismatch is in."""
        path = self.write().with_suffix(".ledger.jsonl")
        with path.open("w") as out:
            for rid in sorted(set(self.finished) | set(self.generated)):
                event = self.finished.get(rid)
                out.write(json.dumps({
                    "request_id": rid, "tenant": event.tenant if event else None,
                    "finish_reason": event.finish_reason if event else None,
                    "prompt_tokens": event.prompt_tokens if event else None,
                    "output_tokens": event.output_tokens if event else None,
                    "progress_tokens": self.generated.get(rid),
                    "completions": self.completions.get(rid, 0)}) + "\n")
        return path

    # --- the table -------------------------------------------------------------------

    def all_rows(self) -> list[Row]:
        return self.rows + EXTERNAL_ROWS

    def markdown(self) -> str:
        head = "| scenario | sent | accepted | answered | lost | duplicated | unexpected | note |"
        lines = [head, "|" + "---|" * 8]
        for r in self.all_rows():
            lines.append(f"| {r.scenario} | {r.sent} | {r.accepted} | {r.answered} | {r.lost} | "
                         f"{r.duplicated} | {r.unexpected} | {r.note} |")
        return "\n".join(lines) + "\n"

    def write(self, stem: str | os.PathLike | None = None) -> Path:
        stem = Path(stem or os.environ.get("FAIRWAY_FAULTS_TABLE") or Path(
            os.environ.get("TMPDIR", "/tmp")) / "fairway-faults")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps([asdict(r) for r in self.all_rows()], indent=2))
        stem.with_suffix(".md").write_text(self.markdown())
        return stem
