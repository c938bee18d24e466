"""OpenAI's Batch API: a file of requests run in the background, answered as a file.

A client uploads a JSONL file (``purpose: batch``; one ``{"custom_id", "method": "POST",
"url", "body"}`` per line) and creates a batch of it for one endpoint
(``/v1/chat/completions``, ``/v1/completions`` or ``/v1/responses``). The gateways run
it: each request goes through the same checks, admission and pipeline as one sent over
HTTP, as its tenant's request, but marked background: the scheduler starts it only when
no other request waits, so a batch fills spare capacity. When every request has answered, the batch's answers are an output file and its
failed requests an error file, each line naming its ``custom_id``.

Nothing is lost when a gateway dies. A batch lives in Redis (``keys.batch``): its
input, status and counts; each request's result is written once
(``keys.batch_results``, ``HSETNX`` by line). One gateway at a time runs a batch, under
a lease it renews; when it dies, another gateway (or its restart) takes the lease and
runs the lines with no result yet, so a request cut short runs again and its line is
answered exactly once. A request that finds its tenant at its admission limit (429), no
spare capacity that starts it within the request timeout (429) or the system unavailable
(503) waits and is tried again until the batch's window ends.

Status as OpenAI's: ``in_progress`` (the input is checked when the batch is created; a
bad file makes it ``failed`` with the line errors), ``finalizing``, ``completed``;
``cancelling`` then ``cancelled`` (answers so far kept); ``expired`` when its
``completion_window`` (24 h) ends first (the requests not run are in the error file as
``batch_expired``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import Field
from starlette.responses import JSONResponse, Response

from services import keys
from services.gateway.auth import authenticate
from services.gateway.bodies import read_body
from services.gateway.errors import ApiError, documented_errors, redis_or_503
from services.gateway.files import OUTPUT_PURPOSE, FileStore
from services.gateway.leases import RETRIED_STATUSES, LeasedRunner, Leases
from services.gateway.responses import cursor_page
from services.gateway.schemas import NonEmptyText, StrictBody, Text, parse_body
from services.logs import get_logger

log = get_logger("gateway.batches")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600
ENDED = ("completed", "failed", "expired", "cancelled")
MAX_LINE_ERRORS = 100
MAX_BODY_BYTES = 64 * 1024
"""A batch's creation body (ids, endpoint, window, a little metadata)."""
REDIS_TIMEOUT_S = 10.0


# --- the input file ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchLine:
    custom_id: str
    body: dict[str, Any]


@dataclass(slots=True)
class BatchInputError(Exception):
    """A batch input file that cannot run: OpenAI's ``errors.data`` entries."""

    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_batch_input(data: bytes, endpoint: str, max_requests: int) -> list[BatchLine]:
    """The requests of a batch input file for ``endpoint``, or BatchInputError naming
    every bad line (1-based, as OpenAI counts), up to ``MAX_LINE_ERRORS`` of them."""
    errors: list[dict[str, Any]] = []

    def bad(line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_LINE_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchInputError([{"code": "invalid_json_line", "message": "The file is not UTF-8 text.",
                                "param": None, "line": None}]) from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    rows = [(number, row) for number, row in enumerate(text.splitlines(), start=1) if row.strip()]
    if not rows:
        bad(None, "empty_file", "The batch input file holds no requests.")
    if len(rows) > max_requests:
        bad(None, "too_many_requests", f"A batch holds at most {max_requests} requests; "
                                       f"this file holds {len(rows)}.")
        raise BatchInputError(errors)
    for number, row in rows:
        try:
            item = json.loads(row)
        except (ValueError, RecursionError):
            bad(number, "invalid_json_line", "This line is not valid JSON.")
            continue
        if not isinstance(item, dict):
            bad(number, "invalid_json_line", "This line is not a JSON object.")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "custom_id must be a non-empty string.", "custom_id")
            continue
        if custom_id in seen:
            bad(number, "duplicate_custom_id", f"The custom_id {custom_id!r} is used by an earlier line.",
                "custom_id")
            continue
        seen.add(custom_id)
        if item.get("method") != "POST":
            bad(number, "invalid_method", "method must be POST.", "method")
        elif item.get("url") != endpoint:
            bad(number, "mismatched_url", f"url must be the batch's endpoint, {endpoint}.", "url")
        elif not isinstance(item.get("body"), dict):
            bad(number, "missing_required_parameter", "body must be a JSON object.", "body")
        elif not isinstance(item["body"].get("model"), str):
            bad(number, "missing_required_parameter", "body.model must be a string.", "body.model")
        elif item["body"].get("stream") not in (None, False):
            bad(number, "invalid_value", "A batch's requests are answered whole: stream must be false.",
                "body.stream")
        else:
            lines.append(BatchLine(custom_id, item["body"]))
    if errors:
        raise BatchInputError(errors)
    return lines


# --- state in Redis --------------------------------------------------------------------------

# Set fields only if the status is one of the given ones (comma-separated): the status
# moves forward under any number of gateways, and never back.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == current then
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    return 1
  end
end
return 0
"""

# A line's result, kept once (a second run of the line, by a gateway that lost the lease,
# changes nothing), and counted; none after the batch ended or is being finalized.
_RECORD = """
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'in_progress' and status ~= 'cancelling' then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""

_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")
_FIELDS = ("tenant", "static", "status", "total", "completed", "failed", "errors", "output_file_id",
           "error_file_id", "ending", "usage", *_TIMES)
"""Every field of a batch's hash but its input (which may be large)."""


def _batch_record(batch_id: str, values: list[bytes | None]) -> BatchRecord | None:
    fields = {name: value for name, value in zip(_FIELDS, values) if value is not None}
    return BatchRecord.from_fields(batch_id, fields) if "status" in fields else None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class BatchRecord:
    """A batch as Redis holds it."""

    batch_id: str
    tenant: str
    static: dict[str, Any]
    """What never changes: endpoint, input file, window, creation and expiry, metadata."""
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    times: dict[str, int] = field(default_factory=dict)
    errors: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    ending: str | None = None
    """While finalizing: the status it ends with (``completed`` or ``expired``)."""
    usage: dict[str, Any] | None = None
    """Tokens its answered requests used, once it ended."""

    @classmethod
    def from_fields(cls, batch_id: str, h: dict[str, bytes]) -> BatchRecord:
        return cls(
            batch_id=batch_id, tenant=h["tenant"].decode(), static=json.loads(h["static"]),
            status=h["status"].decode(), total=int(h.get("total", 0)), completed=int(h.get("completed", 0)),
            failed=int(h.get("failed", 0)),
            times={name: int(h[name]) for name in _TIMES if name in h},
            errors=json.loads(h["errors"]) if "errors" in h else None,
            output_file_id=_text(h.get("output_file_id")), error_file_id=_text(h.get("error_file_id")),
            ending=_text(h.get("ending")), usage=json.loads(h["usage"]) if "usage" in h else None)

    @property
    def expires_at(self) -> int:
        return int(self.static["expires_at"])

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI batch object."""
        s = self.static
        return {
            "id": self.batch_id, "object": "batch", "endpoint": s["endpoint"], "model": s.get("model"),
            "errors": self.errors, "input_file_id": s["input_file_id"],
            "completion_window": s["completion_window"], "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": s["created_at"], "expires_at": s["expires_at"],
            **{name: self.times.get(name) for name in _TIMES},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": self.usage, "metadata": s.get("metadata"),
        }


def batch_not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", reason="not_found", param="batch_id",
                    code="batch_not_found")


UNREACHABLE = "Batches cannot be reached now (Redis is not reachable); retry later."


class BatchStore:
    """Batches in Redis: made, read, moved on, their results written once."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._transition = redis.register_script(_TRANSITION)
        self._record = redis.register_script(_RECORD)
        self.leases = Leases(redis, keys.batch_lease)
        self.on_created: Callable[[], None] = lambda: None
        """Called when this gateway made a batch to run (its runner looks at once)."""

    async def create(self, tenant: str, static: dict[str, Any], data: bytes,
                     lines: list[BatchLine] | None, errors: list[dict[str, Any]] | None) -> BatchRecord:
        """A batch of ``lines`` of ``data`` (in progress), or one that failed with ``errors``."""
        batch_id = f"batch_{uuid.uuid4().hex}"
        now = int(time.time())
        fields: dict[str, Any] = {"tenant": tenant, "static": json.dumps(static)}
        if errors is None:
            fields |= {"status": "in_progress", "in_progress_at": now, "input": data,
                       "total": len(lines or ()), "completed": 0, "failed": 0}
        else:
            fields |= {"status": "failed", "failed_at": now,
                       "errors": json.dumps({"object": "list", "data": errors})}
        record = keys.batch(batch_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping=fields)
            if errors is None:
                pipe.sadd(keys.BATCHES_ACTIVE, batch_id)
            else:
                pipe.expire(record, self.ttl_s)
            pipe.zadd(keys.tenant_batches(tenant), {batch_id: now})
            pipe.expire(keys.tenant_batches(tenant), max(self.ttl_s, WINDOW_S * 2))
            await pipe.execute()
        if errors is None:
            self.on_created()
        return await self.load(batch_id)

    async def load(self, batch_id: str) -> BatchRecord | None:
        return _batch_record(batch_id, await self.redis.hmget(keys.batch(batch_id), _FIELDS))

    async def load_many(self, batch_ids: list[str]) -> list[BatchRecord | None]:
        """Each batch's record (None for one that is gone), in one round trip."""
        if not batch_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(keys.batch(batch_id), _FIELDS)
            rows = await pipe.execute()
        return [_batch_record(batch_id, values) for batch_id, values in zip(batch_ids, rows, strict=True)]

    async def status(self, batch_id: str) -> str | None:
        return _text(await self.redis.hget(keys.batch(batch_id), "status"))

    async def input(self, batch_id: str) -> bytes:
        return await self.redis.hget(keys.batch(batch_id), "input") or b""

    async def move(self, batch_id: str, allowed: tuple[str, ...], status: str, **fields: Any) -> bool:
        """Set ``status`` (and its ``<status>_at`` time) and ``fields`` if the status is
        one of ``allowed``."""
        args: list[Any] = [",".join(allowed), "status", status, f"{status}_at", int(time.time())]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._transition(keys=[keys.batch(batch_id)], args=args))

    async def results(self, batch_id: str) -> dict[int, dict[str, Any]]:
        raw = await self.redis.hgetall(keys.batch_results(batch_id))
        # A big batch's results take a while to decode: not on the event loop.
        return await asyncio.to_thread(lambda: {int(i): json.loads(value) for i, value in raw.items()})

    async def answered(self, batch_id: str) -> set[int]:
        return {int(index) for index in await self.redis.hkeys(keys.batch_results(batch_id))}

    async def record(self, batch_id: str, index: int, result: dict[str, Any], ok: bool) -> bool:
        """Keep a line's result unless it has one; False if it had (or the batch ended)."""
        return bool(await self._record(
            keys=[keys.batch_results(batch_id), keys.batch(batch_id)],
            args=[index, json.dumps(result, ensure_ascii=False), "completed" if ok else "failed"]))

    async def ended(self, batch_id: str, tenant: str) -> None:
        """A batch that ended: no runner takes it again; it expires with its files."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.BATCHES_ACTIVE, batch_id)
            pipe.hdel(keys.batch(batch_id), "input")
            pipe.delete(keys.batch_results(batch_id))
            pipe.expire(keys.batch(batch_id), self.ttl_s)
            await pipe.execute()

    async def forget(self, batch_id: str) -> None:
        """No runner takes the batch again (it ended, or is gone)."""
        await self.redis.srem(keys.BATCHES_ACTIVE, batch_id)

    async def active(self) -> list[str]:
        return sorted(i.decode() for i in await self.redis.smembers(keys.BATCHES_ACTIVE))

    async def listed(self, tenant: str) -> list[BatchRecord]:
        """The tenant's batches, newest first."""
        index = keys.tenant_batches(tenant)
        ids = [i.decode() for i in await self.redis.zrevrange(index, 0, -1)]
        records = await self.load_many(ids)
        gone = [i for i, r in zip(ids, records) if r is None]
        if gone:
            await self.redis.zrem(index, *gone)
        return [r for r in records if r is not None]


# --- running batches ---------------------------------------------------------------------------

Execute = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any], str]]]
"""(tenant, endpoint, body) -> (HTTP status, answer body, request id): one request run
as if sent to the endpoint, answered whole."""


def result_line(line: BatchLine, status: int, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """A line of the output (status 200) or error file, as OpenAI writes them."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def unrun_line(line: BatchLine, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def batch_usage(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The tokens of a batch's answers (chat and completion usage, or the Responses API's),
    in the Batch API's shape."""
    inputs = outputs = cached = 0
    for answer in answers:
        usage = answer["response"]["body"].get("usage") or {}
        inputs += usage.get("prompt_tokens", usage.get("input_tokens", 0))
        outputs += usage.get("completion_tokens", usage.get("output_tokens", 0))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached += details.get("cached_tokens", 0)
    return {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": outputs, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inputs + outputs}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


class BatchRunner:
    """Runs the batches in Redis, one gateway per batch at a time (a lease each), at most
    ``concurrency`` requests at once in this gateway."""

    def __init__(self, store: BatchStore, files: FileStore, execute: Execute, *, owner: str,
                 concurrency: int, max_requests: int, lease_s: float = 15.0, poll_s: float = 1.0,
                 retry_s: float = 1.0, on_outcome: Callable[[str], None] = lambda _: None) -> None:
        """``on_outcome`` counts each request's run: ``completed``, ``failed``, ``retried``."""
        self.store = store
        self.files = files
        self.execute = execute
        self.max_requests = max_requests
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.on_outcome = on_outcome
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._leased = LeasedRunner("batch", store.leases, store.active, self.run, owner=owner,
                                    lease_s=lease_s, poll_s=poll_s)
        store.on_created = self._leased.wake

    def start(self) -> None:
        self._leased.start()

    async def close(self) -> None:
        """Stop: requests under way are given up (their lines run again wherever the batch
        goes on), and the leases let go so another gateway goes on at once."""
        await self._leased.close()

    async def run(self, batch_id: str, lost: asyncio.Event | None = None) -> None:
        """Run the batch's lines that have no result, then finalize it (unless the lease
        was lost: then whoever holds it goes on)."""
        lost = lost or asyncio.Event()
        record = await self.store.load(batch_id)
        if record is None or record.status in ENDED:
            await self.store.forget(batch_id)
            return
        data = await self.store.input(batch_id)
        lines = await asyncio.to_thread(parse_batch_input, data, record.static["endpoint"],
                                        self.max_requests)
        if record.status == "in_progress":
            await self._run_lines(record, lines, lost)
        if not lost.is_set():
            await self._finalize(batch_id, lines)

    async def _run_lines(self, record: BatchRecord, lines: list[BatchLine], lost: asyncio.Event) -> None:
        pending = [i for i in range(len(lines)) if i not in await self.store.answered(record.batch_id)]
        pending.reverse()
        tasks: set[asyncio.Task[None]] = set()
        log.info("batch_running", batch_id=record.batch_id, tenant=record.tenant, left=len(pending))
        try:
            while pending or tasks:
                if (lost.is_set() or await self.store.status(record.batch_id) != "in_progress"
                        or time.time() >= record.expires_at):
                    return
                while pending and len(tasks) < self._concurrency:
                    index = pending.pop()
                    tasks.add(asyncio.create_task(self._run_line(record, index, lines[index])))
                done, tasks = await asyncio.wait(tasks, timeout=self.poll_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a Redis error ends this run; the lease lapses
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_line(self, record: BatchRecord, index: int, line: BatchLine) -> None:
        endpoint = record.static["endpoint"]
        while True:
            async with self._slots:
                try:
                    status, body, request_id = await self.execute(record.tenant, endpoint, line.body)
                except Exception as exc:
                    log.exception("batch_request_failed", batch_id=record.batch_id, line=index)
                    status, request_id = 500, ""
                    body = {"error": {"message": f"The request failed: {exc!r}", "type": "server_error",
                                      "param": None, "code": None}}
            if status not in RETRIED_STATUSES or time.time() >= record.expires_at:
                break
            self.on_outcome("retried")
            await asyncio.sleep(self.retry_s * random.uniform(0.5, 1.5))
        if await self.store.record(record.batch_id, index, result_line(line, status, body, request_id),
                                   ok=status == 200):
            self.on_outcome("completed" if status == 200 else "failed")

    async def _finalize(self, batch_id: str, lines: list[BatchLine]) -> None:
        """Write the output and error files and end the batch; safe to repeat (the files'
        ids come from the batch's), so a gateway that dies while at it loses nothing."""
        record = await self.store.load(batch_id)
        if record is None or record.status in ENDED:
            return
        if record.status == "in_progress":
            expired = time.time() >= record.expires_at
            if not expired and len(await self.store.answered(batch_id)) < len(lines):
                return  # the lease was lost mid-way: its new holder goes on
            ending = "expired" if expired else "completed"
            if not await self.store.move(batch_id, ("in_progress",), "finalizing", ending=ending):
                return
            record.status, record.ending = "finalizing", ending
        ended = (record.ending or "completed") if record.status == "finalizing" else "cancelled"
        results = await self.store.results(batch_id)
        output = [results[i] for i in sorted(results) if results[i]["response"]["status_code"] == 200]
        errors = [results[i] for i in sorted(results) if results[i]["response"]["status_code"] != 200]
        if ended == "expired":
            errors += [unrun_line(line, "batch_expired", "This request could not be executed before "
                                                         "the completion window expired.")
                       for i, line in enumerate(lines) if i not in results]
        hexid = batch_id.removeprefix("batch_")
        fields: dict[str, Any] = {"failed": len(errors), "usage": json.dumps(batch_usage(output))}
        for rows, kind, name in ((output, "output", "output_file_id"), (errors, "error", "error_file_id")):
            if rows:
                fields[name] = (await self.files.create(
                    record.tenant, f"{batch_id}_{kind}.jsonl", OUTPUT_PURPOSE,
                    await asyncio.to_thread(_jsonl, rows),
                    file_id=f"file-{hexid}-{kind}"))["id"]
        await self.store.move(batch_id, ("finalizing", "cancelling"), ended, **fields)
        await self.store.ended(batch_id, record.tenant)
        log.info("batch_ended", batch_id=batch_id, tenant=record.tenant, status=ended,
                 completed=len(output), failed=len(errors))


# --- routes --------------------------------------------------------------------------------------


class BatchBody(StrictBody):
    """POST /v1/batches."""

    input_file_id: NonEmptyText
    endpoint: Text
    completion_window: Text
    metadata: dict[str, Text] | None = Field(default=None, max_length=16)


def _batches(request: Request) -> tuple[BatchStore, str]:
    state = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    request.state.tenant = tenant  # for the recent-errors log
    return state.batches, tenant


async def _owned(store: BatchStore, batch_id: str, tenant: str) -> BatchRecord:
    async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
        record = await store.load(batch_id)
    if record is None or record.tenant != tenant:
        raise batch_not_found(batch_id)
    return record


async def create_batch(request: Request) -> Response:
    store, tenant = _batches(request)
    state = request.app.state.gateway
    body = parse_body(await read_body(request, MAX_BODY_BYTES), BatchBody)
    if body.endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}.", reason="invalid_request",
                       param="endpoint", code="invalid_value")
    if body.completion_window != COMPLETION_WINDOW:
        raise ApiError(400, f"completion_window must be {COMPLETION_WINDOW!r}.", reason="invalid_request",
                       param="completion_window", code="invalid_value")
    files: FileStore = state.files
    try:
        info = await files.get(body.input_file_id, tenant)
    except ApiError as err:
        err.param = "input_file_id" if err.status == 404 else err.param
        raise
    if info["purpose"] != "batch":
        raise ApiError(400, "The input file was not uploaded with purpose 'batch'.", reason="invalid_request",
                       param="input_file_id", code="invalid_file_purpose")
    data = await files.content(body.input_file_id, tenant)
    lines, errors = None, None
    try:
        # Up to 50,000 lines: parsed off the event loop, which streams other answers.
        lines = await asyncio.to_thread(parse_batch_input, data, body.endpoint,
                                        state.settings.batch_max_requests)
    except BatchInputError as exc:
        errors = exc.errors
    now = int(time.time())
    models = sorted({line.body["model"] for line in lines or ()})
    static = {"endpoint": body.endpoint, "input_file_id": body.input_file_id,
              "completion_window": COMPLETION_WINDOW, "created_at": now, "expires_at": now + WINDOW_S,
              "metadata": body.metadata, "model": models[0] if len(models) == 1 else None}
    async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
        record = await store.create(tenant, static, data, lines, errors)
    log.info("batch_created", batch_id=record.batch_id, tenant=tenant, status=record.status,
             requests=record.total)
    return JSONResponse(record.to_openai())


async def retrieve_batch(request: Request, batch_id: str) -> Response:
    store, tenant = _batches(request)
    return JSONResponse((await _owned(store, batch_id, tenant)).to_openai())


async def cancel_batch(request: Request, batch_id: str) -> Response:
    store, tenant = _batches(request)
    record = await _owned(store, batch_id, tenant)
    async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
        moved = await store.move(batch_id, ("validating", "in_progress"), "cancelling")
        record = await store.load(batch_id) or record
    if not moved and record.status not in ("cancelling", "cancelled"):
        raise ApiError(409, f"Cannot cancel a batch with status '{record.status}'.", reason="conflict",
                       code="batch_not_cancellable")
    return JSONResponse(record.to_openai())


async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                       after: str | None = None) -> Response:
    store, tenant = _batches(request)
    async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
        records = await store.listed(tenant)
    return JSONResponse(cursor_page([r.to_openai() for r in records], limit, after))


def install(app: FastAPI) -> None:
    """Add the batch routes (``app.state.gateway.batches`` holds the store)."""
    security = {"security": [{"bearerAuth": []}]}
    errors = {401: "Missing or invalid API key", 503: "Redis is not reachable"}
    found = {**errors, 404: "No such batch (of this API key's tenant)"}
    body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/BatchBody"}}}}}
    app.add_api_route("/v1/batches", create_batch, methods=["POST"], summary="Create a batch",
                      openapi_extra={**security, **body},
                      responses=documented_errors({**errors, 400: "Invalid body",
                                                   404: "No such input file", 413: "Body too large"}))
    app.add_api_route("/v1/batches", list_batches, methods=["GET"], summary="List batches",
                      openapi_extra=security,
                      responses=documented_errors({**errors, 400: "Invalid query parameters"}))
    app.add_api_route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"], summary="A batch",
                      openapi_extra=security, responses=documented_errors(found))
    app.add_api_route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"],
                      summary="Cancel a batch", openapi_extra=security,
                      responses=documented_errors({**found, 409: "The batch has ended"}))

