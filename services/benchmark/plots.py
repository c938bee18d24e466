"""Plots of a benchmark run: latency CDFs and per-tenant service over time.

matplotlib is optional (``pip install matplotlib``) and imported only here, with the
non-interactive Agg backend so it runs on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.benchmark.metrics import (
    DEFAULT_WEIGHTS,
    RequestRecord,
    ServiceWeights,
    cumulative_service,
    e2el,
    service_events,
    ttft,
)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: Sequence[float], label: str) -> None:
    data = np.sort(np.asarray(values_ms, dtype=float))
    if data.size:
        ax.step(data, np.arange(1, data.size + 1) / data.size, where="post", label=label)


def write_plots(
    records: Sequence[RequestRecord],
    out_dir: str | Path,
    weights: ServiceWeights = DEFAULT_WEIGHTS,
) -> list[Path]:
    """Write ``latency_cdf.png`` and ``tenant_service.png`` into ``out_dir``; returns the paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    tenants = sorted({r.tenant for r in records})
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, metric) in zip(axes, (("TTFT", ttft), ("E2E latency", e2el))):
        _cdf(ax, [metric(r) * 1000 for r in ok], "all")
        if len(tenants) > 1:
            for tenant in tenants:
                _cdf(ax, [metric(r) * 1000 for r in ok if r.tenant == tenant], tenant)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency CDF ({len(ok)} successful requests)")
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    events = service_events(records, weights)
    end = max((r.end_time for r in records if r.end_time is not None), default=0.0)
    grid = np.linspace(0.0, end, 400)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tenant in tenants:
        ax.plot(grid, cumulative_service(events[tenant], grid), label=tenant)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(f"service ({weights.input:g}*input + {weights.output:g}*output tokens)")
    ax.set_title("Per-tenant cumulative service")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "tenant_service.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
