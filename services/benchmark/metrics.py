"""Benchmark arithmetic over per-request records: pure functions, times as data.

Definitions (as ``vllm bench serve`` where it has them; times relative to the run start):

- TTFT: first content chunk - send. E2E latency (``e2el``): end of the response stream -
  send. TPOT: ``(e2el - ttft) / (output_tokens - 1)``, only over requests with more than one
  output token. ITL: gaps between consecutive content chunks (a chunk may hold several
  tokens), pooled over all requests. Latency statistics use successful requests only;
  percentiles interpolate linearly (``numpy.percentile``); an empty set reports 0.0, as
  vLLM does.
- Throughputs divide by the run's ``duration``; token totals count successful requests.
- Goodput (``request_goodput``): successful requests meeting every given SLO threshold,
  per second. A request with at most one output token has TPOT 0 for this test (vLLM).
- Service of a tenant (VTC's measure): ``w_in`` per input token, charged when the first
  chunk arrives (the prefill is done), plus ``w_out`` per output token, charged when its
  chunk arrives; a request's output tokens are spread evenly over its content chunks.
  Failed requests count what they received.
- Backlog: a tenant is backlogged while it has a request sent and not yet ended (the
  client's view of "has work in the system").
- Maximum service difference: for every pair of tenants and every maximal time interval
  in which both are backlogged, the largest ``|W_f(t1, t2) - W_g(t1, t2)|`` over
  ``t1 <= t2`` in that interval, where ``W(t1, t2)`` is the service received in
  ``(t1, t2]``; equivalently max - min of ``S_f(t) - S_g(t)`` over the interval. This is
  the quantity whose bound VTC proves (Sheng et al., OSDI 2024), here unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

MS = 1000.0


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request; times are seconds after the run started."""

    index: int
    tenant: str
    scheduled_time: float
    """When the arrival process wanted it sent."""
    requested_input_tokens: int = 0
    requested_output_tokens: int = 0
    send_time: float | None = None
    """None: never sent (the run's time limit came first)."""
    chunk_times: list[float] = field(default_factory=list)
    """Arrival of every chunk that carried text, the first one included."""
    end_time: float | None = None
    """End of the response (stream closed, error received, or gave up)."""
    input_tokens: int = 0
    """The server's ``usage.prompt_tokens`` when reported, else the requested length."""
    output_tokens: int = 0
    """The server's ``usage.completion_tokens`` when reported, else the chunk count."""
    success: bool = False
    error: str | None = None

    @property
    def sent(self) -> bool:
        return self.send_time is not None

    @property
    def first_token_time(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


def ttft(record: RequestRecord) -> float:
    assert record.send_time is not None and record.chunk_times
    return record.chunk_times[0] - record.send_time


def e2el(record: RequestRecord) -> float:
    assert record.send_time is not None and record.end_time is not None
    return record.end_time - record.send_time


def tpot(record: RequestRecord) -> float | None:
    """Mean time per output token after the first; None with one output token or fewer."""
    if record.output_tokens <= 1:
        return None
    return (e2el(record) - ttft(record)) / (record.output_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    return [b - a for a, b in pairwise(record.chunk_times)]


def distribution(values_s: Sequence[float], name: str) -> dict[str, float]:
    """``mean/median/std/p90/p99_{name}_ms`` of values given in seconds (0.0 when empty)."""
    data = np.asarray(values_s, dtype=float) * MS if len(values_s) else np.zeros(1)
    return {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
        f"p90_{name}_ms": float(np.percentile(data, 90)),
        f"p99_{name}_ms": float(np.percentile(data, 99)),
    }


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request latency thresholds in milliseconds; None means not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def as_dict(self) -> dict[str, float]:
        return {
            k: v
            for k, v in (
                ("ttft_ms", self.ttft_ms),
                ("tpot_ms", self.tpot_ms),
                ("e2el_ms", self.e2el_ms),
            )
            if v is not None
        }


def parse_slo(spec: str) -> Slo:
    """``"ttft_ms=200,tpot_ms=50"`` -> Slo; names ``ttft_ms``, ``tpot_ms``, ``e2el_ms``."""
    values: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in Slo.__slots__:
            raise ValueError(f"SLO entry {item!r}: expected ttft_ms=, tpot_ms= or e2el_ms=")
        if name in values:
            raise ValueError(f"SLO {name} given twice")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"SLO {name}: {text.strip()!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"SLO {name} must be a positive number of milliseconds")
        values[name] = value
    if not values:
        raise ValueError("empty SLO")
    return Slo(**values)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """A successful request within every threshold of ``slo`` (vLLM's goodput test)."""
    if not record.success:
        return False
    if slo.ttft_ms is not None and ttft(record) * MS > slo.ttft_ms:
        return False
    if slo.tpot_ms is not None and (tpot(record) or 0.0) * MS > slo.tpot_ms:
        return False
    return slo.e2el_ms is None or e2el(record) * MS <= slo.e2el_ms


def summarize(records: Sequence[RequestRecord], duration: float, slo: Slo | None = None) -> dict:
    """Counts, throughputs, goodput and latency statistics, with vLLM's key names."""
    ok = [r for r in records if r.success]
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    out: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": sum(1 for r in records if r.sent and not r.success),
        "not_sent": sum(1 for r in records if not r.sent),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    if slo is not None and not slo.is_empty():
        out["request_goodput"] = per_s(sum(1 for r in ok if meets_slo(r, slo)))
    out.update(distribution([ttft(r) for r in ok], "ttft"))
    out.update(distribution([t for r in ok if (t := tpot(r)) is not None], "tpot"))
    out.update(distribution([gap for r in ok for gap in itls(r)], "itl"))
    out.update(distribution([e2el(r) for r in ok], "e2el"))
    return out


# --- per-tenant service and fairness -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceWeights:
    input: float = 1.0
    output: float = 2.0


DEFAULT_WEIGHTS = ServiceWeights()
"""VTC's defaults: w_in 1, w_out 2."""


def service_events(
    records: Iterable[RequestRecord], weights: ServiceWeights = DEFAULT_WEIGHTS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tenant: (times, amounts) of service received, sorted by time."""
    raw: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        times, amounts = raw.setdefault(r.tenant, ([], []))
        if not r.chunk_times:
            continue
        per_chunk = weights.output * max(r.output_tokens, 0) / len(r.chunk_times)
        times.extend(r.chunk_times)
        amounts.extend([per_chunk] * len(r.chunk_times))
        amounts[-len(r.chunk_times)] += weights.input * r.input_tokens
    events = {}
    for tenant, (times, amounts) in raw.items():
        t, a = np.asarray(times, dtype=float), np.asarray(amounts, dtype=float)
        order = np.argsort(t, kind="stable")
        events[tenant] = (t[order], a[order])
    return events


def cumulative_service(events: tuple[np.ndarray, np.ndarray], at: np.ndarray) -> np.ndarray:
    """S(t) for each t in ``at``: all service received at times <= t."""
    times, amounts = events
    cum = np.concatenate(([0.0], np.cumsum(amounts)))
    return cum[np.searchsorted(times, np.asarray(at, dtype=float), side="right")]


def backlog_intervals(records: Iterable[RequestRecord]) -> dict[str, list[tuple[float, float]]]:
    """Per tenant: the union of [send, end] over its sent requests, as sorted disjoint intervals."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.send_time is not None and r.end_time is not None:
            spans.setdefault(r.tenant, []).append((r.send_time, r.end_time))
    return {tenant: merge_intervals(s) for tenant, s in spans.items()}


def merge_intervals(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def intersect_intervals(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Intersection of two sorted disjoint interval lists (empty overlaps dropped)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass(frozen=True, slots=True)
class ServiceDifference:
    value: float
    tenants: tuple[str, str]
    interval: tuple[float, float]
    """The joint backlog interval where the maximum occurred."""


def max_service_difference(
    records: Sequence[RequestRecord], weights: ServiceWeights = DEFAULT_WEIGHTS
) -> ServiceDifference | None:
    """The largest service difference between two jointly backlogged tenants (module doc).

    None with fewer than two tenants that sent requests; 0.0 when no two were ever
    backlogged at the same time.
    """
    backlog = backlog_intervals(records)
    tenants = sorted(backlog)
    if len(tenants) < 2:
        return None
    events = service_events(records, weights)
    cums = {t: np.concatenate(([0.0], np.cumsum(events[t][1]))) for t in tenants}
    best = ServiceDifference(0.0, (tenants[0], tenants[1]), (0.0, 0.0))
    for x, f in enumerate(tenants):
        for g in tenants[x + 1 :]:
            (tf, _), (tg, _) = events[f], events[g]
            for lo, hi in intersect_intervals(backlog[f], backlog[g]):
                # S at lo, then at every event of either tenant in (lo, hi].
                inside = [
                    t[np.searchsorted(t, lo, "right") : np.searchsorted(t, hi, "right")]
                    for t in (tf, tg)
                ]
                grid = np.concatenate(([lo], np.sort(np.concatenate(inside))))
                diff = (
                    cums[f][np.searchsorted(tf, grid, "right")]
                    - cums[g][np.searchsorted(tg, grid, "right")]
                )
                value = float(diff.max() - diff.min())
                if value > best.value:
                    best = ServiceDifference(value, (f, g), (lo, hi))
    return best


def per_tenant_summary(
    records: Sequence[RequestRecord],
    duration: float,
    slo: Slo | None = None,
    weights: ServiceWeights = DEFAULT_WEIGHTS,
) -> dict[str, dict]:
    """``summarize`` per tenant, plus its total ``service`` and ``service_rate`` (per s)."""
    by_tenant: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant, []).append(r)
    events = service_events(records, weights)
    out = {}
    for tenant in sorted(by_tenant):
        summary = summarize(by_tenant[tenant], duration, slo)
        del summary["duration"]
        service = float(events[tenant][1].sum())
        summary["service"] = service
        summary["service_rate"] = service / duration if duration > 0 else 0.0
        out[tenant] = summary
    return out
