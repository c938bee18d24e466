"""``GET /v1/organization/usage/completions``: token usage over time, as OpenAI's usage API.

The admin key reads every tenant's usage; a tenant's own API key reads its own (asking
for another tenant's is a 403), so each customer can follow what it is billed for. The
usage is what the scheduler recorded as requests finished (:mod:`services.usage`):
``input_tokens``, ``input_cached_tokens``, ``output_tokens`` and ``num_model_requests``
(one per choice), in buckets of ``1m``, ``1h`` or ``1d`` from ``start_time`` (inclusive)
to ``end_time`` (exclusive, now by default), grouped by ``tenant`` and/or ``model``.
Every bucket of the range is listed, an empty one with no results; a page holds
``limit`` buckets and ``next_page`` goes on from the next.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import FastAPI, Query, Request
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from services import keys
from services.gateway.auth import AdminAuth, KeyStore, bearer_token
from services.gateway.errors import ApiError, documented_errors, invalid, unavailable
from services.logs import get_logger
from services.usage import GROUPS, BucketWidth, bucket_starts, summarize

log = get_logger(__name__)

DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}
MAX_LIMIT = {"1m": 1440, "1h": 168, "1d": 31}
"""Buckets per page, by width: OpenAI's defaults and maxima."""
REDIS_TIMEOUT_S = 5.0


@dataclass
class UsageReader:
    """Reads the usage buckets from Redis for whoever the key allows."""

    redis: aioredis.Redis
    tenants: KeyStore
    auth: AdminAuth

    def allowed(self, authorization: str | None, asked: set[str] | None) -> set[str] | None:
        """The tenants a key may read, of those ``asked`` (None: every tenant): a tenant's
        key its own; the admin key any. 401/403 otherwise."""
        token = bearer_token(authorization)
        own = self.tenants.lookup(token) if token is not None else None
        if own is None:
            self.auth.check(authorization)
            return asked
        if asked is not None and asked != {own}:
            raise ApiError(403, "A tenant's API key reads only its own usage.", reason="forbidden",
                           param="tenants", code="insufficient_permissions")
        return {own}

    async def buckets(self, width: str, starts: list[int]) -> list[dict[str, int]]:
        """Each bucket's fields (tenant, model, measure -> count)."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S), self.redis.pipeline(transaction=False) as pipe:
                for start in starts:
                    pipe.hgetall(keys.usage_bucket(width, start))
                raw = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis_unavailable", op="usage", error=repr(exc))
            raise unavailable("Redis is not reachable, so usage cannot be read; retry later.") from None
        return [{name.decode(): int(value) for name, value in fields.items()} for fields in raw]


def listed(request: Request, name: str) -> list[str] | None:
    """A list query parameter, given repeated (``name=a&name=b``, also ``name[]=``) or
    comma-separated; None when absent."""
    values = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


async def completions_usage(
    request: Request,
    start_time: int = Query(ge=0, description="Unix seconds, inclusive"),
    end_time: int | None = Query(None, ge=0, description="Unix seconds, exclusive; now by default"),
    bucket_width: BucketWidth = "1d",
    limit: int | None = Query(None, ge=1),
    page: str | None = None,
) -> Response:
    reader: UsageReader = request.app.state.usage
    tenants = listed(request, "tenants")
    allowed = reader.allowed(request.headers.get("authorization"),
                             None if tenants is None else set(tenants))
    group_by = listed(request, "group_by") or []
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise invalid(f"group_by takes {', '.join(GROUPS)}; not {unknown[0]!r}.", param="group_by")
    models = listed(request, "models")
    if limit is None:
        limit = DEFAULT_LIMIT[bucket_width]
    if limit > MAX_LIMIT[bucket_width]:
        raise invalid(f"limit is at most {MAX_LIMIT[bucket_width]} for bucket_width {bucket_width}.",
                      param="limit")
    end = int(time.time()) + 1 if end_time is None else end_time
    first = start_time
    if page is not None:
        if not page.isdigit() or not start_time <= int(page) < max(end, start_time + 1):
            raise invalid("page is not one this query's next_page gave.", param="page")
        first = int(page)
    if end <= start_time:
        raise invalid("end_time must be after start_time.", param="end_time")
    starts = bucket_starts(first, end, bucket_width)
    shown, rest = starts[:limit], starts[limit:]
    fields = await reader.buckets(bucket_width, shown)
    data = [summarize(start, bucket_width, found, group_by, allowed, None if models is None else set(models))
            for start, found in zip(shown, fields, strict=True)]
    return JSONResponse({"object": "page", "data": data, "has_more": bool(rest),
                         "next_page": str(rest[0]) if rest else None},
                        headers={"Cache-Control": "no-store"})


def install(app: FastAPI, reader: UsageReader) -> None:
    """Add the usage route; ``app.state.usage`` holds its reader."""
    app.state.usage = reader
    list_params = [
        {"name": name, "in": "query", "required": False, "description": description,
         "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True}
        for name, description in (
            ("tenants", "Only these tenants (a tenant's own key: only itself)"),
            ("models", "Only these models"),
            ("group_by", f"Group results by any of {', '.join(GROUPS)}"))]
    app.add_api_route(
        "/v1/organization/usage/completions", completions_usage, methods=["GET"],
        summary="Token usage per tenant and model (admin key, or a tenant's own)",
        openapi_extra={"security": [{"bearerAuth": []}], "parameters": list_params},
        responses=documented_errors({
            400: "Invalid query parameters",
            401: "Missing or invalid key",
            403: "Admin endpoints disabled, or a tenant's key asking for another tenant",
            503: "Redis unavailable (Retry-After)",
        }),
    )

