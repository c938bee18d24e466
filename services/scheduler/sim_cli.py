"""``fairway simulate``: replay a trace through a named policy on virtual workers.

Example::

    fairway simulate --trace ../shared/data/azure_llm_2023_conv_trace.csv \\
        --policy fairway --load 1.0 --slo-ttft-ms 2000 --slo-tpot-ms 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from services.latency_model import LatencyModel
from services.logs import get_logger
from services.scheduler.policy import POLICY_NAMES, PolicyConfig
from services.scheduler.simulator import (
    DEFAULT_CPU_LATENCY,
    PREDICTORS,
    ClusterConfig,
    SimResult,
    Slo,
    fcfs_saturation_rps,
    make_requests,
    parse_tenants,
    rescale_arrivals,
    simulate,
)
from services.scheduler.traces import TraceError, load_trace

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", type=Path, required=True, help="Azure LLM trace CSV or JSONL (optionally .gz)"
    )
    parser.add_argument("--policy", choices=POLICY_NAMES, default="fairway")
    parser.add_argument(
        "--load",
        type=float,
        default=None,
        help="offered load as a fraction of FCFS's saturation throughput on the same workers",
    )
    parser.add_argument(
        "--tenants", default="", help="NAME:SHARE[:WEIGHT],... for traces without a tenant column"
    )
    parser.add_argument(
        "--background-tenants", default="",
        help="NAME,...: these tenants' requests are background (a batch's: spare capacity only)",
    )
    parser.add_argument("--gpu-workers", type=int, default=1)
    parser.add_argument("--cpu-workers", type=int, default=0)
    parser.add_argument(
        "--kv-tokens",
        type=int,
        default=None,
        help="KV limit per GPU worker in tokens (default: the latency model's; 0: unlimited)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="max_tokens of requests whose trace record has none (never below the true length)",
    )
    parser.add_argument("--predictor", choices=PREDICTORS, default="oracle")
    parser.add_argument(
        "--predictor-train",
        type=Path,
        default=None,
        help="scorer-format JSONL to train the fairway predictor on (default: shipped artifact)",
    )
    parser.add_argument(
        "--model", default="", help="model name for the fairway predictor when the trace has none"
    )
    parser.add_argument(
        "--oracle-noise", type=float, default=0.0, help="lognormal sigma of the oracle's error"
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="deadline (seconds after arrival) for requests whose record has none",
    )
    parser.add_argument(
        "--fail-if-late", action="store_true", help="requests ask to fail once the deadline is lost"
    )
    parser.add_argument(
        "--latency-model",
        type=Path,
        default=None,
        help='JSON: one LatencyModel (GPU) or {"gpu": {...}, "cpu": {...}}',
    )
    parser.add_argument(
        "--cpu-latency-model", type=Path, default=None, help="JSON LatencyModel for CPU workers"
    )
    parser.add_argument("--num-requests", type=int, default=None, help="use the first N arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--aging-rate", type=float, default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument(
        "--tail-slack", type=float, default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument(
        "--tail-target-s", type=float, default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument(
        "--express-share", type=float, default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument(
        "--late-first",
        action="store_true",
        default=None,
        help="requests past their tail guard precede the express tier (see PolicyConfig)",
    )
    parser.add_argument(
        "--kv-quantile", choices=("p50", "p90"), default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument(
        "--charge-predicted",
        action="store_true",
        help="VTC charges predicted output, settles at finish",
    )
    parser.add_argument(
        "--no-preempt-background",
        action="store_true",
        help="let running background requests finish while foreground ones wait (no hand-back)",
    )
    parser.add_argument(
        "--preempt-after-s", type=float, default=None, help="policy knob (see PolicyConfig)"
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write latency CDF and tenant service plots here"
    )


def load_latency_models(
    gpu_file: Path | None, cpu_file: Path | None
) -> tuple[LatencyModel, LatencyModel]:
    gpu, cpu = LatencyModel(), DEFAULT_CPU_LATENCY
    if gpu_file is not None:
        data = json.loads(gpu_file.read_text())
        if isinstance(data, dict) and ("gpu" in data or "cpu" in data):
            gpu = LatencyModel.from_dict(data["gpu"]) if "gpu" in data else gpu
            cpu = LatencyModel.from_dict(data["cpu"]) if "cpu" in data else cpu
        else:
            gpu = LatencyModel.load(gpu_file)
    if cpu_file is not None:
        cpu = LatencyModel.load(cpu_file)
    return gpu, cpu


def _check(args: argparse.Namespace) -> None:
    if args.gpu_workers < 0 or args.cpu_workers < 0 or args.gpu_workers + args.cpu_workers == 0:
        raise ValueError("need at least one worker (--gpu-workers/--cpu-workers >= 0)")
    if args.load is not None and not (args.load > 0 and math.isfinite(args.load)):
        raise ValueError("--load must be > 0")
    if args.kv_tokens is not None and args.kv_tokens < 0:
        raise ValueError("--kv-tokens must be >= 0")
    if args.max_tokens <= 0:
        raise ValueError("--max-tokens must be > 0")
    if args.oracle_noise < 0:
        raise ValueError("--oracle-noise must be >= 0")
    if args.num_requests is not None and args.num_requests <= 0:
        raise ValueError("--num-requests must be > 0")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        summary, result = run_simulation(args)
    except (TraceError, ValueError, OSError) as exc:
        print(f"fairway simulate: error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    e2e = summary["latency_s"]["e2e"]
    log.info(
        "simulated",
        policy=args.policy,
        requests=summary["requests"],
        mean_e2e_s=e2e["mean"],
        p99_e2e_s=e2e["p99"],
        throughput_rps=summary["throughput"]["requests_per_s"],
        json=str(args.json),
    )
    return 0


def run_simulation(args: argparse.Namespace) -> tuple[dict, SimResult]:
    records = load_trace(args.trace, args.num_requests)
    tenants = parse_tenants(args.tenants) if args.tenants else None
    requests = make_requests(
        records,
        predictor=args.predictor,
        tenants=tenants,
        max_tokens=args.max_tokens,
        oracle_noise=args.oracle_noise,
        seed=args.seed,
        train_file=str(args.predictor_train) if args.predictor_train else None,
        model=args.model,
        deadline_s=args.deadline_s,
        fail_if_late=args.fail_if_late,
        background_tenants=frozenset(filter(None, args.background_tenants.split(","))),
    )
    gpu, cpu = load_latency_models(args.latency_model, args.cpu_latency_model)
    kv = gpu.kv_tokens if args.kv_tokens is None else (args.kv_tokens or None)
    cluster = ClusterConfig(args.gpu_workers, args.cpu_workers, gpu, cpu, kv)
    knobs = {
        k: v
        for k, v in (
            ("aging_rate", args.aging_rate),
            ("tail_slack", args.tail_slack),
            ("tail_target_s", args.tail_target_s),
            ("express_share", args.express_share),
            ("late_first", args.late_first),
            ("kv_quantile", args.kv_quantile),
            ("preempt_after_s", args.preempt_after_s),
        )
        if v is not None
    }
    config = PolicyConfig(
        name=args.policy,
        tenant_weights={t.name: t.weight for t in tenants} if tenants else {},
        charge_predicted=args.charge_predicted,
        preempt_background=not args.no_preempt_background,
        latency=gpu,
        **knobs,
    )
    saturation = None
    time_scale = 1.0
    if args.load is not None:
        saturation = fcfs_saturation_rps(requests, cluster, config)
        requests, time_scale = rescale_arrivals(requests, args.load * saturation)
    result = simulate(requests, config, cluster)
    slo = Slo(
        None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
        None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000,
    )
    summary = result.summary(slo)
    summary["setup"] = {
        "trace": str(args.trace),
        "num_requests": len(requests),
        "load": args.load,
        "fcfs_saturation_rps": saturation,
        "time_scale": time_scale,
        "offered_rps": _offered_rps(requests),
        "predictor": args.predictor,
        "oracle_noise": args.oracle_noise,
        "max_tokens": args.max_tokens,
        "tenants": [{"name": t.name, "share": t.share, "weight": t.weight} for t in tenants]
        if tenants
        else None,
        "background_tenants": sorted(filter(None, args.background_tenants.split(","))),
        "seed": args.seed,
        "cluster": {
            "gpu_workers": args.gpu_workers,
            "cpu_workers": args.cpu_workers,
            "kv_tokens_per_gpu_worker": kv,
            "gpu_latency": gpu.to_dict(),
            "cpu_latency": cpu.to_dict(),
        },
        "policy": {
            "name": config.name,
            "fair": config.fair,
            "cost_order": config.cost_order,
            "consolidate": config.consolidate,
            "offload": config.offload,
            "aging_rate": config.aging_rate,
            "tail_slack": config.tail_slack,
            "tail_target_s": config.tail_target_s,
            "express_share": config.express_share,
            "late_first": config.late_first,
            "kv_quantile": config.kv_quantile,
            "charge_predicted": config.charge_predicted,
            "preempt_background": config.preempt_background,
            "preempt_after_s": config.preempt_after_s,
            "w_in": config.w_in,
            "w_out": config.w_out,
        },
    }
    return summary, result


def _offered_rps(requests: list) -> float | None:
    if len(requests) < 2:
        return None
    span = max(r.arrival for r in requests) - min(r.arrival for r in requests)
    return (len(requests) - 1) / span if span > 0 else None


def plot(result: SimResult, out_dir: Path) -> list[Path]:
    """Latency CDFs (e2e, TTFT) and cumulative service per tenant over time, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in result.requests if r.finish is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, label, values in (
        (axes[0], "end-to-end latency (s)", [r.finish - r.arrival for r in done]),
        (
            axes[1],
            "time to first token (s)",
            [r.first_token - r.arrival for r in done if r.first_token is not None],
        ),
    ):
        data = np.sort(np.asarray(values))
        if len(data):
            ax.plot(data, np.arange(1, len(data) + 1) / len(data))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{result.policy}: {label}")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    cdf = out_dir / f"latency_cdf_{result.policy}.png"
    fig.savefig(cdf, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    samples = result.tracker.samples
    for tenant in result.tracker.tenants:
        ax.plot([t for t, _ in samples], [s[tenant] for _, s in samples], label=tenant)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("service received (w_in*in + w_out*out)")
    ax.set_title(f"{result.policy}: service per tenant")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    service = out_dir / f"tenant_service_{result.policy}.png"
    fig.savefig(service, dpi=120)
    plt.close(fig)
    return [cdf, service]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairway simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
