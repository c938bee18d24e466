"""The live dashboard: a static page at ``/dashboard`` and its JSON at ``/dashboard/data``.

The page (HTML, JS, CSS next to this module) holds no data and needs no key; it asks
for the admin key (``FAIRWAY_ADMIN_KEY``) once, keeps it in ``sessionStorage`` and sends
it as ``Authorization: Bearer`` when it polls ``/dashboard/data`` every second. Without
a configured admin key the data endpoint answers 403; a missing or wrong key is 401 and
a tenant's key is 403. No cookies, so no CSRF; a strict CSP keeps scripts to our own.

Data path: :func:`read_snapshot` reads Redis (scheduler state, worker and gateway
heartbeats, the capped lists of recent length samples, latencies and errors) into a
:class:`RawSnapshot`, and
:func:`build_dashboard`, plain code, turns it into the JSON the page draws.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgpack
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from services import keys, topology
from services import messages as m
from services.gateway.auth import (  # AdminAuth: shared with /admin/adapters
    ADMIN_ERRORS,
    AdminAuth,
    KeyStore,
)
from services.gateway.batches import BatchRecord, BatchStore
from services.gateway.errors import ApiError, documented_errors, unavailable
from services.gateway.rate_limits import NO_LIMITS, RateLimits, bucket_level
from services.logs import get_logger
from services.recent import RecentLog, decode_entries
from services.settings import Settings
from services.usage import bucket_start

log = get_logger(__name__)

QUEUE_SCAN_LIMIT = 5000
"""Queued or in-flight requests read per poll; beyond it per-tenant counts are partial."""
WORKER_FORGET_S = 300.0
"""Workers silent for longer are left off (a crashed worker's heartbeat stays in Redis)."""
SNAPSHOT_TTL_S = 0.5
"""Polls within this window share one Redis read (several open dashboards)."""
ERRORS_SHOWN = 50
BATCHES_SHOWN = 50
"""Batches in progress the page lists (the oldest first)."""
MESSAGE_CHARS = 300
REDIS_TIMEOUT_S = 5.0
LATENCY_WINDOW_S = 60.0
"""Each tenant's latency percentiles are over the requests answered in this window."""

ASSETS = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/app.js": ("dashboard.js", "text/javascript"),
    "/dashboard/style.css": ("dashboard.css", "text/css"),
}
"""URL -> (file next to this module, media type)."""
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --- the data: raw Redis state -> JSON -------------------------------------------------


@dataclass
class RawSnapshot:
    """What one poll reads from Redis, undecoded."""

    now: float
    counters: dict[bytes, bytes] = field(default_factory=dict)
    served: dict[bytes, bytes] = field(default_factory=dict)
    queued: list[bytes] = field(default_factory=list)
    """msgpack ScoredRequest blobs (all, or the first QUEUE_SCAN_LIMIT)."""
    queued_total: int = 0
    inflight: list[bytes] = field(default_factory=list)
    """msgpack InflightRecord blobs."""
    inflight_total: int = 0
    heartbeats: dict[bytes, bytes] = field(default_factory=dict)
    seen: dict[bytes, float] = field(default_factory=dict)
    length_samples: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)
    latencies: list[bytes] = field(default_factory=list)
    leader: bytes | None = None
    fence: bytes | None = None
    gateways: dict[bytes, float] = field(default_factory=dict)
    """Gateway life -> last heartbeat, in Redis server time."""
    gateway_slots: dict[bytes, int] = field(default_factory=dict)
    """Gateway life -> admission slots it holds (its requests in flight)."""
    redis_now: float | None = None
    """Redis server time of the read, the clock of the gateways' heartbeats."""
    batches: list[BatchRecord] = field(default_factory=list)
    """The batches not yet ended (the first ``BATCHES_SHOWN``), read."""
    background_tenants: list[bytes] = field(default_factory=list)
    """The tenant of each background response not yet ended (queued or running)."""
    usage_today: dict[bytes, bytes] = field(default_factory=dict)
    """Today's usage bucket (:mod:`services.usage`): tenant, model, measure -> count."""
    rate_buckets: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    """Each rate-limited tenant's buckets (:func:`keys.tenant_rate`), as stored."""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _number(value: Any) -> float | None:
    """A finite float from Redis bytes or JSON, else None."""
    try:
        number = float(_text(value) if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _floats(raw: dict[bytes, bytes]) -> dict[str, float]:
    out = {}
    for name, value in raw.items():
        number = _number(value)
        if number is not None:
            out[_text(name)] = number
    return out


def _unpack(blob: bytes) -> Any:
    try:
        return msgpack.unpackb(blob, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def _scored_tenant(scored: Any) -> str | None:
    """Tenant of a msgpack ScoredRequest (bytes or already unpacked), without full decoding."""
    body = _unpack(scored) if isinstance(scored, bytes) else scored
    request = body.get("request") if isinstance(body, dict) else None
    tenant = request.get("tenant") if isinstance(request, dict) else None
    return tenant if isinstance(tenant, str) else None


def _inflight_place(blob: bytes) -> tuple[str | None, str | None]:
    """(tenant, pool) of a msgpack InflightRecord."""
    body = _unpack(blob)
    if not isinstance(body, dict):
        return None, None
    pool = body.get("pool")
    return _scored_tenant(body.get("scored")), pool if isinstance(pool, str) else None


def _count(names: Iterable[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _workers(raw: RawSnapshot, alive_s: float) -> list[dict[str, Any]]:
    seen = {_text(k): v for k, v in raw.seen.items()}
    out = []
    for worker_id, blob in raw.heartbeats.items():
        try:
            beat = m.decode(blob, m.WorkerHeartbeat)
        except m.MessageError:
            continue
        last = seen.get(_text(worker_id), beat.sent_at)
        age = max(raw.now - last, 0.0)
        if age > WORKER_FORGET_S:
            continue
        total_kv = beat.total_kv_tokens
        out.append({
            "id": beat.worker_id,
            "pool": beat.pool,
            "model": beat.model,
            "alive": age <= alive_s,
            "draining": beat.draining,
            "age_s": round(age, 3),
            "running": beat.running,
            "waiting": beat.waiting,
            "max_running": beat.max_running,
            "offered_slots": beat.offered_slots,
            "load": beat.running / beat.max_running if beat.max_running > 0 else 0.0,
            "kv_used": 1.0 - beat.free_kv_tokens / total_kv if total_kv > 0 else 0.0,
            "free_kv_tokens": beat.free_kv_tokens,
            "total_kv_tokens": total_kv,
            "decode_tokens_per_s": beat.speed.decode_tokens_per_s,
            "prefill_tokens_per_s": beat.speed.prefill_tokens_per_s,
            "decode_step_ms": beat.speed.decode_step_ms,
            "prefix_cache_hit_rate": (beat.prefix_cache_hits / beat.prefix_cache_queries
                                      if beat.prefix_cache_queries else None),
        })  # fmt: skip
    out.sort(key=lambda w: (w["pool"], w["id"]))
    return out


def _gateways(raw: RawSnapshot, dead_after_s: float) -> list[dict[str, Any]]:
    """Each gateway life: alive while its beat is younger than ``dead_after_s`` (then the
    other gateways reap it), and the requests it holds."""
    now = raw.redis_now if raw.redis_now is not None else raw.now
    out = []
    for life, last in raw.gateways.items():
        name = _text(life)
        age = max(now - last, 0.0)
        out.append({
            "id": name,
            "instance": keys.gateway_instance(name),
            "alive": age <= dead_after_s,
            "age_s": round(age, 3),
            "in_flight": raw.gateway_slots.get(life, 0),
        })  # fmt: skip
    out.sort(key=lambda g: g["id"])
    return out


def _pools(workers: list[dict[str, Any]], dispatched: dict[str, int]) -> list[dict[str, Any]]:
    names = list(topology.POOLS)
    names += sorted(({w["pool"] for w in workers} | set(dispatched)) - set(names))
    out = []
    for name in names:
        live = [w for w in workers if w["pool"] == name and w["alive"]]
        if not live and not dispatched.get(name):
            continue
        out.append({
            "name": name,
            "workers": len(live),
            "dispatched": dispatched.get(name, 0),
            "running": sum(w["running"] for w in live),
            "waiting": sum(w["waiting"] for w in live),
            "slots": sum(w["offered_slots"] for w in live),
            "free_kv_tokens": sum(w["free_kv_tokens"] for w in live),
            "total_kv_tokens": sum(w["total_kv_tokens"] for w in live),
            "decode_tokens_per_s": sum(w["decode_tokens_per_s"] for w in live),
        })  # fmt: skip
    return out


def _length_points(raw: list[bytes]) -> list[dict[str, Any]]:
    points = []
    for entry in decode_entries(raw):
        predicted, actual = _number(entry.get("predicted")), _number(entry.get("actual"))
        t = _number(entry.get("t"))
        if predicted is None or actual is None or t is None:
            continue
        points.append({
            "t": t,
            "tenant": str(entry.get("tenant", "")),
            "pool": str(entry.get("pool", "")),
            "predicted": predicted,
            "p10": _number(entry.get("p10")),
            "p90": _number(entry.get("p90")),
            "actual": actual,
            "finish_reason": str(entry.get("finish_reason", "")),
        })  # fmt: skip
    return points


def length_summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean absolute error of p50, and how often the actual length fell in [p10, p90]."""
    if not points:
        return {"n": 0, "mean_abs_error": None, "within_p10_p90": None}
    errors = [abs(p["actual"] - p["predicted"]) for p in points]
    banded = [p for p in points if p["p10"] is not None and p["p90"] is not None]
    within = [p for p in banded if p["p10"] <= p["actual"] <= p["p90"]]
    return {
        "n": len(points),
        "mean_abs_error": sum(errors) / len(errors),
        "within_p10_p90": len(within) / len(banded) if banded else None,
    }


def _percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def tenant_latencies(raw: list[bytes], now: float, window_s: float = LATENCY_WINDOW_S) -> dict[str, dict[str, Any]]:
    """Per tenant, over the requests answered in the last ``window_s``: how many, and the
    p50 and p90 of their time to first token and end to end (ms): whether each tenant is
    answered as fast as the others."""
    ttft: dict[str, list[float]] = {}
    e2e: dict[str, list[float]] = {}
    for entry in decode_entries(raw):
        tenant, at, total = entry.get("tenant"), _number(entry.get("t")), _number(entry.get("e2e"))
        if not isinstance(tenant, str) or at is None or total is None or now - at > window_s:
            continue
        e2e.setdefault(tenant, []).append(total * 1000)
        first = _number(entry.get("ttft"))
        if first is not None:
            ttft.setdefault(tenant, []).append(first * 1000)
    return {tenant: {"answered": len(totals),
                     "ttft_p50_ms": _percentile(ttft.get(tenant, []), 0.5),
                     "ttft_p90_ms": _percentile(ttft.get(tenant, []), 0.9),
                     "e2e_p50_ms": _percentile(totals, 0.5), "e2e_p90_ms": _percentile(totals, 0.9)}
            for tenant, totals in e2e.items()}


def _errors(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for entry in decode_entries(raw)[:ERRORS_SHOWN]:
        status = entry.get("status")
        out.append({
            "t": _number(entry.get("t")),
            "status": status if isinstance(status, int) else None,
            "code": entry.get("code") if isinstance(entry.get("code"), str) else None,
            "message": str(entry.get("message", ""))[:MESSAGE_CHARS],
            "tenant": entry.get("tenant") if isinstance(entry.get("tenant"), str) else None,
            "path": str(entry.get("path", "")),
            "request_id": entry.get("request_id") if isinstance(entry.get("request_id"), str) else None,
        })  # fmt: skip
    return out


def _usage_today(fields: dict[bytes, bytes]) -> dict[str, dict[str, int]]:
    """Tenant -> today's tokens (input and output) and model requests, over its models."""
    today: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        tenant, _model, measure = _text(name).split("\t")
        row = today.setdefault(tenant, {"tokens_today": 0, "requests_today": 0})
        if measure in ("input_tokens", "output_tokens"):
            row["tokens_today"] += int(value)
        elif measure == "num_model_requests":
            row["requests_today"] += int(value)
    return today


def _rate_left(limits: RateLimits, bucket: dict[bytes, bytes], now: float | None) -> dict[str, Any] | None:
    """A tenant's rate limits and what is left of each at ``now`` (Redis time)."""
    if not limits.active:
        return None
    fields = {_text(k): float(v) for k, v in bucket.items()}
    out: dict[str, Any] = {}
    for name, field_, limit in (("requests", "r", limits.requests_per_minute),
                                ("tokens", "t", limits.tokens_per_minute)):
        out[f"{name}_per_minute"] = limit or None
        out[f"{name}_left"] = None if not limit else max(0, math.floor(bucket_level(
            limit, fields.get(f"{field_}l"), fields.get(f"{field_}t"), now)))
    return out


def build_dashboard(
    raw: RawSnapshot, *, tenants: Iterable[str] = (), worker_alive_s: float, model: str,
    gateway_dead_after_s: float = 15.0, limits: Callable[[str], RateLimits] = lambda _: NO_LIMITS,
) -> dict[str, Any]:
    """The page's JSON from one Redis snapshot; ``tenants`` are listed even without traffic,
    each with its rate ``limits``."""
    counters, served = _floats(raw.counters), _floats(raw.served)
    queued = _count(_scored_tenant(blob) for blob in raw.queued)
    places = [_inflight_place(blob) for blob in raw.inflight]
    dispatched_by_tenant = _count(tenant for tenant, _ in places)
    dispatched_by_pool = _count(pool for _, pool in places)
    background = _count(_text(t) for t in raw.background_tenants)
    latency = tenant_latencies(raw.latencies, raw.now)
    today = _usage_today(raw.usage_today)
    unanswered = {"answered": 0, "ttft_p50_ms": None, "ttft_p90_ms": None, "e2e_p50_ms": None, "e2e_p90_ms": None}
    names = sorted(set(tenants) | set(counters) | set(served) | set(queued) | set(dispatched_by_tenant)
                   | set(background) | set(latency))
    workers = _workers(raw, worker_alive_s)
    points = _length_points(raw.length_samples)
    fence = _number(raw.fence) if raw.fence is not None else None
    return {
        "now": raw.now,
        "model": model,
        "scheduler": {
            "leader": _text(raw.leader) if raw.leader is not None else None,
            "fence": int(fence) if fence is not None else None,
        },
        "tenants": [
            {
                "name": name,
                "served_tokens": served.get(name, 0.0),
                "vtc": counters.get(name, 0.0),
                "queued": queued.get(name, 0),
                "dispatched": dispatched_by_tenant.get(name, 0),
                "background_responses": background.get(name, 0),
                **latency.get(name, unanswered),
                **today.get(name, {"tokens_today": 0, "requests_today": 0}),
                "rate_limits": _rate_left(limits(name), raw.rate_buckets.get(name, {}), raw.redis_now),
            }
            for name in names
        ],
        "queue": {
            "queued": raw.queued_total,
            "dispatched": raw.inflight_total,
            "complete": len(raw.queued) >= raw.queued_total
            and len(raw.inflight) >= raw.inflight_total,
        },
        "pools": _pools(workers, dispatched_by_pool),
        "workers": workers,
        "gateways": _gateways(raw, gateway_dead_after_s),
        "lengths": points,
        "length_summary": length_summary(points),
        "errors": _errors(raw.errors),
        "batches": [
            {"id": b.batch_id, "tenant": b.tenant, "status": b.status, "total": b.total,
             "completed": b.completed, "failed": b.failed, "created_at": b.static["created_at"]}
            for b in sorted(raw.batches, key=lambda b: (b.static["created_at"], b.batch_id))
        ],
    }


async def _hash_values(redis: aioredis.Redis, key: str, total: int, limit: int) -> list[bytes]:
    if total <= limit:
        return list((await redis.hgetall(key)).values())
    values: list[bytes] = []
    async for _, value in redis.hscan_iter(key, count=500):
        values.append(value)
        if len(values) >= limit:
            break
    return values


async def read_snapshot(
    redis: aioredis.Redis, now: float, scan_limit: int = QUEUE_SCAN_LIMIT,
    limited: Iterable[str] = (),
) -> RawSnapshot:
    """Everything the dashboard shows, in two round trips for a normal queue size
    (``limited``: the tenants whose rate-limit buckets to read)."""
    limited = sorted(limited)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.SCHED_COUNTERS)
        pipe.hgetall(keys.SCHED_SERVED)
        pipe.hlen(keys.SCHED_QUEUED)
        pipe.hlen(keys.SCHED_INFLIGHT)
        pipe.hgetall(keys.WORKERS)
        pipe.zrange(keys.WORKERS_SEEN, 0, -1, withscores=True)
        pipe.lrange(keys.LENGTH_SAMPLES, 0, keys.LENGTH_SAMPLES_CAP - 1)
        pipe.lrange(keys.RECENT_ERRORS, 0, ERRORS_SHOWN - 1)
        pipe.get(keys.SCHED_LEASE)
        pipe.get(keys.SCHED_FENCE)
        pipe.zrange(keys.GATEWAYS_SEEN, 0, -1, withscores=True)
        pipe.time()
        pipe.hvals(keys.BACKGROUND_RESPONSES_TENANT)
        pipe.lrange(keys.LATENCY_SAMPLES, 0, keys.LATENCY_SAMPLES_CAP - 1)
        pipe.hgetall(keys.usage_bucket("1d", bucket_start(now, "1d")))
        for tenant in limited:
            pipe.hgetall(keys.tenant_rate(tenant))
        (counters, served, queued_total, inflight_total, heartbeats, seen, samples, errors,
         leader, fence, gateways, (seconds, micros), background, latencies, usage_today,
         *rate_buckets) = await pipe.execute()  # fmt: skip
    queued, inflight, slots, batches = await asyncio.gather(
        _hash_values(redis, keys.SCHED_QUEUED, queued_total, scan_limit),
        _hash_values(redis, keys.SCHED_INFLIGHT, inflight_total, scan_limit),
        _slot_counts(redis, [life for life, _ in gateways]),
        _active_batches(redis),
    )
    return RawSnapshot(
        now=now,
        counters=counters,
        served=served,
        queued=queued,
        queued_total=queued_total,
        inflight=inflight,
        inflight_total=inflight_total,
        heartbeats=heartbeats,
        seen={member: float(score) for member, score in seen},
        length_samples=samples,
        errors=errors,
        leader=leader,
        fence=fence,
        gateways={life: float(at) for life, at in gateways},
        gateway_slots=slots,
        redis_now=seconds + micros / 1e6,
        batches=batches,
        background_tenants=background,
        latencies=latencies,
        usage_today=usage_today,
        rate_buckets=dict(zip(limited, rate_buckets, strict=True)),
    )


async def _active_batches(redis: aioredis.Redis) -> list[BatchRecord]:
    store = BatchStore(redis, ttl_s=0)
    active = sorted(_text(i) for i in await redis.smembers(keys.BATCHES_ACTIVE))[:BATCHES_SHOWN]
    return [r for r in await store.load_many(active) if r is not None]


async def _slot_counts(redis: aioredis.Redis, lives: list[bytes]) -> dict[bytes, int]:
    if not lives:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for life in lives:
            pipe.hlen(keys.gateway_slots(_text(life)))
        return dict(zip(lives, await pipe.execute(), strict=True))


# --- the gateway side: state, routes, error log ----------------------------------------


class Dashboard:
    """Admin auth, the cached data builder and the recent-errors log of one gateway."""

    def __init__(self, settings: Settings, tenants: KeyStore, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.tenants = tenants
        self.redis = redis
        self.auth = AdminAuth(settings.admin_key, tenants)
        self.errors = RecentLog(redis, keys.RECENT_ERRORS, keys.RECENT_ERRORS_CAP)
        self.latencies = RecentLog(redis, keys.LATENCY_SAMPLES, keys.LATENCY_SAMPLES_CAP)
        self.snapshot_ttl_s = SNAPSHOT_TTL_S
        self._lock = asyncio.Lock()
        self._cached: dict[str, Any] | None = None
        self._cached_at = -math.inf

    async def data(self) -> dict[str, Any]:
        """The current JSON, read at most once per ``snapshot_ttl_s`` however many poll."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached_at < self.snapshot_ttl_s:
                return self._cached
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    raw = await read_snapshot(self.redis, time.time(), limited=[
                        t for t in self.tenants.tenants if self.tenants.limits_for(t).active])
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis_unavailable", op="dashboard", error=repr(exc))
                raise unavailable("Redis is not reachable; retry later.") from None
            self._cached = build_dashboard(
                raw,
                tenants=self.tenants.tenants,
                worker_alive_s=self.settings.worker_alive_s,
                model=self.settings.model_name,
                gateway_dead_after_s=self.settings.gateway_dead_after_s,
                limits=self.tenants.limits_for,
            )
            self._cached_at = time.monotonic()
            return self._cached

    def record_error(
        self, err: ApiError, *, path: str, tenant: str | None, request_id: str | None
    ) -> None:
        """Append an answered error to the shared recent-errors list (batched, best effort)."""
        self.errors.add({
            "t": time.time(),
            "status": err.status,
            "code": err.code,
            "message": err.message[:MESSAGE_CHARS],
            "tenant": tenant,
            "path": path[:200],
            "request_id": request_id,
        })  # fmt: skip

    def record_latency(self, tenant: str, ttft_s: float | None, e2e_s: float) -> None:
        """Append an answered request's latency to the shared list (batched, best effort)."""
        self.latencies.add({"t": time.time(), "tenant": tenant, "ttft": ttft_s, "e2e": e2e_s})

    async def close(self) -> None:
        await asyncio.gather(self.errors.close(), self.latencies.close())


def _asset_route(filename: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    body = (resources.files("services.gateway") / filename).read_bytes()

    async def asset(_: Request) -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return asset


async def dashboard_data(request: Request) -> Response:
    dashboard: Dashboard = request.app.state.dashboard
    dashboard.auth.check(request.headers.get("authorization"))
    return JSONResponse(await dashboard.data(), headers={"Cache-Control": "no-store"})


def install(app: FastAPI, dashboard: Dashboard) -> None:
    """Add the dashboard's routes; ``app.state.dashboard`` holds its state."""
    app.state.dashboard = dashboard
    for path, (filename, media_type) in ASSETS.items():
        app.add_api_route(
            path, _asset_route(filename, media_type), methods=["GET"], include_in_schema=False
        )
    app.add_api_route(
        "/dashboard/data",
        dashboard_data,
        methods=["GET"],
        summary="Dashboard data (admin key)",
        openapi_extra={"security": [{"bearerAuth": []}]},
        responses=documented_errors(ADMIN_ERRORS),
    )
    if not dashboard.auth.enabled:
        log.info("dashboard_disabled", detail="set FAIRWAY_ADMIN_KEY to enable /dashboard/data")
