"""``fairway bench serve``: replay a workload against an OpenAI-compatible server.

Every request is a streaming ``POST /v1/completions`` with ``max_tokens`` from the
trace, ``ignore_eos: true`` and ``stream_options.include_usage``, sent by its tenant's
API key at its arrival time (see :mod:`services.benchmark.workload` and
:mod:`services.benchmark.arrivals`). The run is bounded: at most ``--max-concurrency``
requests in flight (requests beyond wait in the client, and their latency counts from
when they are sent), each request at most ``--request-timeout`` seconds, and the whole
run at most ``--max-duration`` seconds (requests not sent by then are reported as
``not_sent``). Errors are recorded per request, never raised. The JSON report uses
``vllm bench serve``'s key names (see :mod:`services.benchmark.metrics` for the
definitions); the exit status is 1 when no request completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from services.benchmark.metrics import (
    DEFAULT_WEIGHTS,
    RequestRecord,
    ServiceWeights,
    Slo,
    e2el,
    itls,
    max_service_difference,
    parse_slo,
    per_tenant_summary,
    summarize,
    ttft,
)
from services.benchmark.workload import (
    TenantSpec,
    WorkItem,
    WorkloadConfig,
    build_workload,
    parse_tenants,
    read_dataset_source,
    read_trace_source,
)
from services.logs import get_logger

log = get_logger(__name__)

MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str
    endpoint: str = "/v1/completions"
    max_concurrency: int = 256
    request_timeout: float = 600.0
    max_duration: float = 3600.0
    progress: bool = True


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration: float
    """From the run's start to the end of its last request."""


def request_body(item: WorkItem, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": item.prompt,
        "max_tokens": item.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    return f"HTTP {status}: {message}"[:MAX_ERROR_CHARS]


async def stream_completion(
    client: httpx.AsyncClient,
    endpoint: str,
    body: dict[str, Any],
    api_key: str,
    record: RequestRecord,
    clock: Callable[[], float],
) -> None:
    """Send one streaming request and fill ``record`` from its SSE events.

    Only chunks that carry text count as tokens (a chunk with just a finish reason does
    not). A stream must end with ``data: [DONE]``; an ``{"error": ...}`` event fails it.
    """
    record.send_time = clock()
    usage: dict | None = None
    done = False
    headers = {"Authorization": f"Bearer {api_key}"}
    async with client.stream("POST", endpoint, json=body, headers=headers) as response:
        if response.status_code != 200:
            record.error = _error_text(response.status_code, await response.aread())
            record.end_time = clock()
            return
        # Read to the end even after [DONE] so the connection goes back to the pool.
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = clock()
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if event.get("error") is not None and record.error is None:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                record.error = f"stream error: {message}"[:MAX_ERROR_CHARS]
            for choice in event.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    record.chunk_times.append(now)
                    break
            if event.get("usage"):
                usage = event["usage"]
    record.end_time = clock()
    if usage is not None:
        record.input_tokens = int(usage.get("prompt_tokens") or record.input_tokens)
        record.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        record.output_tokens = len(record.chunk_times)
    if record.error is None and not done:
        record.error = "stream ended without [DONE]"
    elif record.error is None and not record.chunk_times:
        record.error = "no token received"
    record.success = record.error is None


async def run_benchmark(
    items: Sequence[WorkItem],
    api_keys: dict[str, str],
    model: str,
    config: ClientConfig,
    *,
    model_override: bool = False,
) -> RunResult:
    """Send ``items`` at their arrival times; every item gets a record, in item order.

    ``model`` is used for items that name none (or for all with ``model_override``).
    """
    loop = asyncio.get_running_loop()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    records = [
        RequestRecord(
            index=item.index,
            tenant=item.tenant,
            scheduled_time=item.arrival,
            requested_input_tokens=item.input_tokens,
            requested_output_tokens=item.max_tokens,
            input_tokens=item.input_tokens,
        )
        for item in items
    ]
    semaphore = asyncio.Semaphore(config.max_concurrency)
    run_deadline = loop.time() + config.max_duration
    progress = _progress_bar(len(items), config.progress)

    async def one(item: WorkItem, record: RequestRecord, client: httpx.AsyncClient) -> None:
        body = request_body(item, model if model_override or not item.model else item.model)
        try:
            async with asyncio.timeout_at(run_deadline):
                async with semaphore:
                    async with asyncio.timeout(config.request_timeout):
                        await stream_completion(
                            client, config.endpoint, body, api_keys[item.tenant], record, clock
                        )
        except TimeoutError:
            if record.sent:
                record.error = (
                    "run time limit reached"
                    if loop.time() >= run_deadline
                    else f"request timed out after {config.request_timeout:g} s"
                )
        except Exception as exc:  # noqa: BLE001 - errors are data in a benchmark
            record.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        if record.sent and record.end_time is None:
            record.end_time = clock()
        if record.error is not None:
            record.success = False
        progress.update(1)

    limits = httpx.Limits(
        max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
    )
    timeout = httpx.Timeout(config.request_timeout, pool=None)
    try:
        async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout) as client:
            tasks = []
            for item, record in zip(items, records):
                if item.arrival >= config.max_duration:
                    progress.update(1)
                    continue
                delay = item.arrival - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(item, record, client)))
            await asyncio.gather(*tasks)
            duration = clock()
    finally:
        progress.close()
    return RunResult(records, duration)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="req", desc="bench serve")


async def discover_model(url: str, api_key: str) -> str:
    """The first model that ``GET /v1/models`` lists (as ``vllm bench serve`` does)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models", headers={"Authorization": f"Bearer {api_key}"})
        response.raise_for_status()
        models = response.json().get("data") or []
        if not models:
            raise ValueError("the server lists no models")
        return str(models[0]["id"])


# --- the report -----------------------------------------------------------------------


def offered_rate(items: Sequence[WorkItem]) -> float | str:
    """Mean arrival rate of the workload, ``(n - 1) / span``; "inf" when all arrive at once
    (``vllm bench serve`` writes an infinite ``request_rate`` the same way)."""
    span = items[-1].arrival - items[0].arrival if items else 0.0
    return (len(items) - 1) / span if span > 0 else "inf"


def build_report(
    run: RunResult,
    *,
    slo: Slo | None = None,
    weights: ServiceWeights = DEFAULT_WEIGHTS,
    meta: dict[str, Any] | None = None,
    detailed: bool = False,
) -> dict[str, Any]:
    """The JSON report: ``meta`` first, then vLLM-named metrics, tenants and fairness."""
    records = run.records
    report: dict[str, Any] = dict(meta or {})
    report.update(summarize(records, run.duration, slo))
    report["total_input_tokens_requested"] = sum(
        r.requested_input_tokens for r in records if r.success
    )
    # How late requests went out against their arrival times (client saturation or
    # --max-concurrency); large values mean the offered load was not what was asked for.
    lags = [r.send_time - r.scheduled_time for r in records if r.send_time is not None]
    report["p99_send_lag_ms"] = float(np.percentile(lags, 99)) * 1000 if lags else 0.0
    report["per_tenant"] = per_tenant_summary(records, run.duration, slo, weights)
    difference = max_service_difference(records, weights)
    report["max_service_difference"] = None if difference is None else difference.value
    report["max_service_difference_tenants"] = (
        None if difference is None else list(difference.tenants)
    )
    report["service_weights"] = {"input": weights.input, "output": weights.output}
    report["error_counts"] = dict(Counter(r.error for r in records if r.error).most_common(20))
    if detailed:
        ok = [r.success for r in records]
        report["tenants"] = [r.tenant for r in records]
        report["send_times"] = [r.send_time for r in records]
        report["input_lens"] = [r.input_tokens for r in records]
        report["output_lens"] = [r.output_tokens if r.success else 0 for r in records]
        report["ttfts"] = [ttft(r) if s else 0.0 for r, s in zip(records, ok)]
        report["e2els"] = [e2el(r) if s else 0.0 for r, s in zip(records, ok)]
        report["itls"] = [itls(r) if s else [] for r, s in zip(records, ok)]
        report["errors"] = [r.error or "" for r in records]
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A human-readable table in the style of ``vllm bench serve``."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "<10") -> None:
        lines.append(f"{label:<40}{value:{fmt}}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    if report["not_sent"]:
        row("Requests not sent (time limit):", report["not_sent"])
    row("Benchmark duration (s):", report["duration"], "<10.2f")
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"], "<10.2f")
    if "request_goodput" in report:
        row("Request goodput (req/s):", report["request_goodput"], "<10.2f")
    row("Output token throughput (tok/s):", report["output_throughput"], "<10.2f")
    row("Total token throughput (tok/s):", report["total_token_throughput"], "<10.2f")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {name.upper()} (ms):", report[f"{stat}_{name}_ms"], "<10.2f")
    if len(report["per_tenant"]) > 1:
        lines.append("{s:{c}^50}".format(s=" Tenants (service = w_in*in + w_out*out) ", c="-"))
        for tenant, summary in report["per_tenant"].items():
            lines.append(
                f"{tenant:<20}{summary['completed']:>6} done  service {summary['service']:>12.0f}"
            )
        if report["max_service_difference"] is not None:
            row("Max service difference:", report["max_service_difference"], "<10.0f")
    lines.append("=" * 50)
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------


def _slo(text: str) -> Slo:
    try:
        return parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _weights(text: str) -> ServiceWeights:
    try:
        w_in, w_out = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected W_IN,W_OUT, e.g. 1,2") from None
    if not (w_in >= 0 and w_out >= 0 and math.isfinite(w_in + w_out)):
        raise argparse.ArgumentTypeError("weights must be finite and >= 0")
    return ServiceWeights(w_in, w_out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument(
        "--api-key", help="API key of the single default tenant (without --tenants)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--trace", type=Path, help="Azure CSV or JSONL trace (.gz ok); first N arrivals"
    )
    source.add_argument(
        "--dataset",
        type=Path,
        help='JSONL of {"prompt", "output_tokens"} or the JSONL trace format; sampled',
    )
    parser.add_argument(
        "--arrivals",
        choices=["auto", "trace", "gamma"],
        default="auto",
        help="trace: the source's timestamps; gamma: generated at --rate "
        "(Poisson at burstiness 1). auto: trace for --trace, gamma for --dataset "
        "or per-tenant rates",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        help="requests/s ('inf': all at once). Gamma: the rate (default inf); "
        "trace: rescale the trace to this mean rate",
    )
    parser.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape of generated gaps: 1 Poisson, <1 burstier, >1 steadier",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="trace arrivals: multiply the trace's gaps by this (0.5: twice as fast)",
    )
    parser.add_argument(
        "--num-requests",
        type=_positive_int,
        default=1000,
        help="a trace's first N arrivals, or N rows sampled from a dataset (default 1000)",
    )
    parser.add_argument(
        "--tenants", help="NAME:KEY[:SHARE|:rate=R],... (see services/benchmark/workload.py)"
    )
    parser.add_argument(
        "--slo",
        type=_slo,
        default=None,
        help="goodput thresholds, e.g. ttft_ms=500,tpot_ms=50[,e2el_ms=..]",
    )
    parser.add_argument(
        "--model",
        help="model for every request (default: the trace's, else the first of GET /v1/models)",
    )
    parser.add_argument(
        "--max-input-tokens",
        type=_positive_int,
        default=None,
        help="cap on synthesized prompt lengths (fit a small model's context)",
    )
    parser.add_argument(
        "--max-output-tokens", type=_positive_int, default=None, help="cap on max_tokens"
    )
    parser.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=256,
        help="requests in flight at most (also the connection limit)",
    )
    parser.add_argument("--request-timeout", type=_positive_float, default=600.0)
    parser.add_argument(
        "--max-duration",
        type=_positive_float,
        default=3600.0,
        help="stop the run after this many seconds",
    )
    parser.add_argument(
        "--service-weights",
        type=_weights,
        default=DEFAULT_WEIGHTS,
        help="W_IN,W_OUT of the per-tenant service measure (default 1,2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="write the report here")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots into this folder")
    parser.add_argument(
        "--save-detailed",
        action="store_true",
        help="add per-request lists (ttfts, itls, input_lens, ...) to the JSON",
    )
    parser.add_argument("--disable-tqdm", action="store_true")


def _tenants(args: argparse.Namespace) -> list[TenantSpec]:
    if args.tenants:
        return parse_tenants(args.tenants)
    if not args.api_key:
        raise ValueError("give --api-key or --tenants")
    return [TenantSpec("default", args.api_key)]


def _workload_config(args: argparse.Namespace, tenants: list[TenantSpec]) -> WorkloadConfig:
    arrivals = args.arrivals
    if arrivals == "auto":
        own_rates = tenants[0].rate is not None
        arrivals = "trace" if args.trace is not None and not own_rates else "gamma"
    return WorkloadConfig(
        num_requests=args.num_requests,
        arrivals=arrivals,
        rate=args.rate,
        burstiness=args.burstiness,
        time_scale=args.time_scale,
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        seed=args.seed,
    )


async def run_async(args: argparse.Namespace) -> int:
    try:
        tenants = _tenants(args)
        config = _workload_config(args, tenants)
        source = (
            read_trace_source(args.trace)
            if args.trace is not None
            else read_dataset_source(args.dataset)
        )
        items = build_workload(source, tenants, config)
    except (ValueError, OSError) as exc:  # TraceError is a ValueError
        print(f"fairway bench serve: {exc}", file=sys.stderr)
        return 2
    if len(items) < config.num_requests:
        log.warning("bench_fewer_requests", requested=config.num_requests, available=len(items))
    model = args.model
    if model is None and any(item.model is None for item in items):
        try:
            model = await discover_model(args.url, tenants[0].api_key)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            print(
                f"fairway bench serve: cannot list models at {args.url} ({exc}); give --model",
                file=sys.stderr,
            )
            return 2
    client = ClientConfig(
        url=args.url,
        endpoint=args.endpoint,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
        max_duration=args.max_duration,
        progress=not args.disable_tqdm,
    )
    log.info(
        "bench_serve_start",
        url=args.url,
        requests=len(items),
        tenants=[t.name for t in tenants],
        arrivals=config.arrivals,
        rate=config.rate,
        model=model,
    )
    run = await run_benchmark(
        items,
        {t.name: t.api_key for t in tenants},
        model or "",
        client,
        model_override=args.model is not None,
    )
    meta = {
        "date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "base_url": args.url,
        "endpoint": args.endpoint,
        "model_id": model,
        "source": str(args.trace or args.dataset),
        "num_prompts": len(items),
        "arrivals": config.arrivals,
        "request_rate": offered_rate(items),
        "burstiness": config.burstiness,
        "time_scale": config.time_scale,
        "max_concurrency": client.max_concurrency,
        "seed": config.seed,
        "tenant_specs": [{k: v for k, v in asdict(t).items() if k != "api_key"} for t in tenants],
        "slo": args.slo.as_dict() if args.slo else None,
    }
    report = build_report(
        run, slo=args.slo, weights=args.service_weights, meta=meta, detailed=args.save_detailed
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(format_summary(report))
    if args.plot is not None:
        from services.benchmark.plots import write_plots

        for path in write_plots(run.records, args.plot, args.service_weights):
            print(f"plot: {path}")
    log.info(
        "bench_serve_done",
        json=str(args.json),
        completed=report["completed"],
        failed=report["failed"],
        duration=round(run.duration, 3),
    )
    return 0 if report["completed"] > 0 else 1


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fairway bench serve`` (parsed by :func:`add_arguments`)."""
    return asyncio.run(run_async(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairway bench serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
