"""Token usage per tenant and model over time, for billing and capacity reports.

The scheduler records each request as it finishes on a worker, in the same atomic write
that ends the request, so a redelivered completion event counts once and a scheduler
killed in between loses nothing: input tokens (the prompt), the part of them a worker
read from its prefix cache, output tokens (all of its runs', when it was handed back
and resumed) and one model request per choice. A request cancelled while it ran counts
what it used; one that never ran (refused, cancelled in the queue) counts nothing.

Usage is kept in Redis in buckets of a minute, an hour and a day (one hash per bucket,
a field per tenant, model and measure), each kept for its own retention, and read back
by the gateway's usage API in OpenAI's shape (``/v1/organization/usage/completions``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from services import keys

BucketWidth = Literal["1m", "1h", "1d"]
WIDTH_S: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86_400}
MINUTE_RETENTION_S = 2 * 86_400
HOUR_RETENTION_S = 32 * 86_400
"""How long minute and hour buckets are kept; day buckets for ``usage_retention_days``."""
MEASURES = ("input_tokens", "input_cached_tokens", "output_tokens", "num_model_requests")
GROUPS = ("tenant", "model")
_SEP = "\t"


@dataclass(frozen=True, slots=True)
class Usage:
    """What one finished request used."""

    input_tokens: int
    input_cached_tokens: int
    output_tokens: int
    num_model_requests: int = 1


def bucket_start(at: float, width: str) -> int:
    """Unix time of the start of the ``width`` bucket holding ``at`` (UTC-aligned)."""
    size = WIDTH_S[width]
    return int(at // size) * size


def retention_s(width: str, retention_days: int) -> int:
    return {"1m": MINUTE_RETENTION_S, "1h": HOUR_RETENTION_S, "1d": retention_days * 86_400}[width]


def usage_field(tenant: str, model: str, measure: str) -> str:
    return _SEP.join((tenant, model, measure))


def record_commands(tenant: str, model: str, usage: Usage, at: float,
                    retention_days: int) -> list[list[str | int]]:
    """The Redis commands that add ``usage`` to each bucket width at time ``at``."""
    commands: list[list[str | int]] = []
    for width in WIDTH_S:
        key = keys.usage_bucket(width, bucket_start(at, width))
        for measure in MEASURES:
            value = getattr(usage, measure)
            if value:
                commands.append(["HINCRBY", key, usage_field(tenant, model, measure), value])
        commands.append(["EXPIRE", key, retention_s(width, retention_days)])
    return commands


def bucket_starts(start_time: int, end_time: int, width: str) -> list[int]:
    """Starts of the buckets that overlap ``[start_time, end_time)``."""
    size = WIDTH_S[width]
    return list(range(bucket_start(start_time, width), end_time, size))


def summarize(start: int, width: str, fields: dict[str, int], group_by: Iterable[str],
              tenants: set[str] | None, models: set[str] | None) -> dict[str, Any]:
    """One bucket in OpenAI's shape: its results, one per group of ``group_by`` (one for
    all when empty, null in the fields not grouped by), of the tenants and models asked."""
    grouped = tuple(g for g in GROUPS if g in set(group_by))
    totals: dict[tuple[str | None, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(MEASURES, 0))
    for name, value in fields.items():
        tenant, model, measure = name.split(_SEP)
        if (tenants is not None and tenant not in tenants) or (models is not None and model not in models):
            continue
        if measure not in MEASURES:
            continue
        key = tuple({"tenant": tenant, "model": model}[g] if g in grouped else None for g in GROUPS)
        totals[key][measure] += value
    results = [
        {"object": "organization.usage.completions.result", **measures,
         **dict(zip(GROUPS, group, strict=True))}
        for group, measures in sorted(totals.items(), key=lambda item: tuple(v or "" for v in item[0]))
    ]
    return {"object": "bucket", "start_time": start, "end_time": start + WIDTH_S[width], "results": results}
