"""Arrival times of benchmark requests, in seconds after the start of the run.

Generated arrivals follow ``vllm bench serve``: the first request at 0, then gaps drawn
from a gamma distribution with shape ``burstiness`` and mean ``1/rate``, which is a
Poisson process at burstiness 1, burstier below 1 (coefficient of variation of the gaps
``1/sqrt(burstiness)``) and more regular above. An infinite rate sends everything at 0.
Unlike newer vLLM versions the gaps are not renormalised to a fixed total span: the
sampled process is kept as drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def gamma_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Offsets of ``n`` arrivals at ``rate`` requests/s with gamma(shape=burstiness) gaps."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if not rate > 0:
        raise ValueError("rate must be > 0")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError("burstiness must be a positive finite number")
    if n == 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def trace_arrivals(
    timestamps: Sequence[float], time_scale: float | None = None, rate: float | None = None
) -> np.ndarray:
    """A trace's own arrival times, shifted to start at 0 and optionally rescaled.

    ``time_scale`` multiplies every gap (0.5 replays twice as fast). ``rate`` instead
    picks the scale that gives a mean rate of ``rate`` requests/s over the replayed span,
    ``(n - 1) / span``; an infinite rate sends everything at 0. At most one may be given.
    """
    if time_scale is not None and rate is not None:
        raise ValueError("give a time scale or a rate for the trace, not both")
    times = np.asarray(timestamps, dtype=float)
    if times.size == 0:
        return times
    if np.any(np.diff(times) < 0):
        raise ValueError("trace timestamps must be non-decreasing")
    times = times - times[0]
    if time_scale is not None:
        if not (time_scale >= 0 and math.isfinite(time_scale)):
            raise ValueError("time scale must be a finite number >= 0")
        return times * time_scale
    if rate is not None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        span = times[-1]
        if math.isinf(rate) or span == 0:
            return np.zeros_like(times)
        return times * ((times.size - 1) / (rate * span))
    return times


def apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainder method)."""
    w = np.asarray(weights, dtype=float)
    if w.size == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be positive finite numbers")
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    # Ties go to the earlier weight, so the split is deterministic.
    order = sorted(range(w.size), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def merged_tenant_arrivals(
    n: int, rates: Sequence[float], burstiness: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Independent arrival streams, one per tenant at its own rate, merged in time order.

    Tenant ``i`` gets ``apportion(n, rates)[i]`` requests, so every stream spans about
    the same time ``n / sum(rates)``. Returns (offsets, tenant index) sorted by offset.
    """
    counts = apportion(n, rates)
    offsets = [gamma_arrivals(c, r, burstiness, rng) for c, r in zip(counts, rates)]
    owners = [np.full(c, i) for i, c in enumerate(counts)]
    times, who = np.concatenate(offsets), np.concatenate(owners).astype(int)
    order = np.argsort(times, kind="stable")
    return times[order], who[order]
