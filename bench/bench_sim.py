"""Scheduling goals of the simulator issue, measured by trace replay.

    python bench/bench_sim.py --azure ../shared/data/azure_llm_2023_conv_trace.csv \\
        --alpaca ../shared/data/alpaca_eval_model_outputs_train.jsonl.gz --out out/bench_sim

Scenarios (each runs the production SchedulerPolicy in the simulator):

- ``headline``: Azure conversation trace at load 1.0 (offered load = FCFS's saturation
  throughput on the same workers), fcfs/vtc/rtlm/fairway; goals: fairway mean e2e
  <= 0.75x fcfs, p99 <= 1.1x, goodput >= 1.5x. Variants: noisy oracle, two CPU workers,
  a KV limit that binds.
- ``headline_tail_target``: the same (oracle and noisy oracle) with fairway given a tail
  target (``tail_target_s`` = FCFS's p99 TTFT on the run, ``late_first``, express share
  0.3, no aging, ``tail_slack`` 0.08; chosen on this trace). With the default per-request
  guard every request may be passed for only 10% of its FCFS wait, which under this
  trace's long backlog leaves ~16% of mean latency to gain; a target lets requests FCFS
  would serve well inside the tail wait up to it.
- ``predictor``: prompts held out of the AlpacaEval training file (split by prompt),
  Poisson arrivals, load 1.0; fairway with the scorer's predictor (trained on the other
  prompts) vs the oracle; goal: mean e2e within 1.1x.
- ``consolidation``: saturation throughput with KV admission by predicted length vs by
  ``max_tokens`` when the KV limit binds; goal >= 2x. ``kv_per_request_ratio`` is the
  most it could gain in batch size: mean (prompt + max_tokens) / (prompt + output).
- ``fairness``: two tenants at 4:1 request rates; goals: max service difference between
  backlogged tenants within VTC's bound and >= 5x below FCFS's; the light tenant's mean
  latency within 1.2x of what it gets alone. ``light_first_bound``: the light tenant
  always first (not fair), the least latency admission order can give it.
- ``deadlines``: every request asks to fail once its deadline is lost; attainment and
  expiries, fcfs vs fairway.
- ``background``: a chat tenant (70% of the requests) beside a batch tenant (30%) at
  load 0.8 and 1.0, fairway: the batch's requests as ordinary ones, as background ones
  that keep their slots, and as background ones handed back when a chat request would
  wait 0.5 s (the default) or any time for room; each tenant's latency, the output
  throughput and the hand-backs.
- ``priority``: two tenants at equal rates; one of them marks a fifth of its requests
  (its interactive ones) ``priority`` 0 and the rest (bulk) 1, at load 0.8 and 1.0,
  fairway with and without the priorities: each class's latency, and the other
  tenant's (which priorities within a tenant must leave as it was).

Writes ``results.json`` (every figure, the setup and the goal checks) under ``--out``,
the held-out trace as JSONL (so any run can be repeated with ``fairway simulate``), and
with ``--plot`` latency CDFs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.latency_model import LatencyModel
from services.scheduler.policy import POLICY_NAMES, PolicyConfig
from services.scheduler.simulator import (
    ClusterConfig,
    SimRequest,
    Slo,
    fcfs_saturation_rps,
    make_requests,
    parse_tenants,
    rescale_arrivals,
    simulate,
)
from services.scheduler.traces import TraceRecord, load_trace, write_jsonl

SLO = Slo(ttft_s=2.0, tpot_s=0.05)
SECTIONS = ("headline", "predictor", "consolidation", "fairness", "deadlines", "background",
            "priority")


def log(msg: str) -> None:
    print(f"[bench_sim {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(name: str, value: float | None, target: float, op: str) -> dict:
    ok = value is not None and (value <= target if op == "<=" else value >= target)
    return {"goal": name, "value": value, "target": f"{op} {target}", "pass": bool(ok)}


def brief(summary: dict) -> dict:
    """The figures a reader compares, out of a full summary."""
    e2e, ttft = summary["latency_s"]["e2e"], summary["latency_s"]["ttft"]
    return {
        "mean_e2e_s": e2e["mean"],
        "p50_e2e_s": e2e["p50"],
        "p99_e2e_s": e2e["p99"],
        "mean_ttft_s": ttft["mean"],
        "p99_ttft_s": ttft["p99"],
        "throughput_rps": summary["throughput"]["requests_per_s"],
        "goodput_rps": summary.get("goodput", {}).get("requests_per_s"),
        "preemptions": summary["preemptions"],
        "pools": summary["pools"],
        "max_service_difference": summary["fairness"]["max_service_difference"],
        "vtc_bound": summary["fairness"]["vtc_bound"],
        "tenants": {
            t: {
                k: v[k]
                for k in (
                    "requests",
                    "service",
                    "mean_e2e_s",
                    "p99_e2e_s",
                    "mean_ttft_s",
                    "mean_tpot_s",
                )
            }
            for t, v in summary["tenants"].items()
        },
    }


def at_load(
    requests: list[SimRequest], cluster: ClusterConfig, load: float
) -> tuple[list[SimRequest], float]:
    saturation = fcfs_saturation_rps(requests, cluster, PolicyConfig(latency=cluster.gpu_latency))
    return rescale_arrivals(requests, load * saturation)[0], saturation


def run_policies(
    requests: list[SimRequest], cluster: ClusterConfig, policies: tuple[str, ...], **knobs
) -> dict[str, dict]:
    out = {}
    for name in policies:
        started = time.perf_counter()
        config = PolicyConfig(name=name, latency=cluster.gpu_latency, **knobs)
        result = simulate(requests, config, cluster)
        out[name] = brief(result.summary(SLO))
        out[name]["wall_s"] = round(time.perf_counter() - started, 2)
        out[name]["_result"] = result
    return out


def strip(results: dict[str, dict]) -> dict[str, dict]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_result"} for k, v in results.items()}


def headline_entry(
    loaded: list[SimRequest],
    saturation: float,
    workload: dict,
    cluster: ClusterConfig,
    results: dict[str, dict],
) -> dict:
    """Setup, figures and goals (fairway against fcfs) of one headline run."""
    f, w = results["fcfs"], results["fairway"]
    return {
        "setup": {
            "trace": "azure conv",
            "requests": len(loaded),
            "load": 1.0,
            "fcfs_saturation_rps": saturation,
            "max_tokens": 1024,
            "predictor": "oracle",
            **workload,
            "gpu_workers": cluster.gpu_workers,
            "cpu_workers": cluster.cpu_workers,
            "kv_tokens": cluster.kv_tokens,
            "slo_ttft_ms": SLO.ttft_s * 1000,
            "slo_tpot_ms": SLO.tpot_s * 1000,
        },
        "policies": strip(results),
        "goals": [
            check("fairway/fcfs mean e2e", w["mean_e2e_s"] / f["mean_e2e_s"], 0.75, "<="),
            check("fairway/fcfs p99 e2e", w["p99_e2e_s"] / f["p99_e2e_s"], 1.1, "<="),
            check(
                "fairway/fcfs goodput", w["goodput_rps"] / max(f["goodput_rps"], 1e-9), 1.5, ">="
            ),
        ],
    }


def headline(records: list[TraceRecord], plot_dir: Path | None) -> dict:
    variants = {
        "default": ({}, {}),
        "oracle_noise_0.5": ({"oracle_noise": 0.5}, {}),
        "cpu_workers_2": ({}, {"cpu_workers": 2}),
        "kv_32768": ({}, {"kv_tokens": 32768}),
    }
    out = {}
    for label, (workload, cluster_kw) in variants.items():
        cluster = ClusterConfig(**{"kv_tokens": LatencyModel().kv_tokens, **cluster_kw})
        requests = make_requests(records, max_tokens=1024, **workload)
        loaded, saturation = at_load(requests, cluster, 1.0)
        results = run_policies(loaded, cluster, POLICY_NAMES)
        out[label] = headline_entry(loaded, saturation, workload, cluster, results)
        log(f"headline {label}: " + ", ".join(_fmt(g) for g in out[label]["goals"]))
        if plot_dir is not None and label == "default":
            plot_cdfs(
                {n: results[n]["_result"] for n in ("fcfs", "fairway")},
                plot_dir / "headline_cdf.png",
            )
    return out


# Fairway with an operator's tail target (PolicyConfig.tail_target_s): the guard fires
# only past the target, late requests precede a larger express tier, and the guard
# itself (not aging) keeps requests from starving. The target (a wait) is set to FCFS's
# p99 time to first token on the same trace and load - a queueing SLO an operator would
# take from the system as it runs today; it is known here only because the FCFS run is
# in hand. The knobs were chosen on this trace.
TAIL_TARGET_KNOBS = {
    "late_first": True,
    "express_share": 0.3,
    "aging_rate": 0.0,
    "tail_slack": 0.08,
}


def headline_tail_target(records: list[TraceRecord]) -> dict:
    out = {}
    for label, workload in (("oracle", {}), ("oracle_noise_0.5", {"oracle_noise": 0.5})):
        cluster = ClusterConfig(kv_tokens=LatencyModel().kv_tokens)
        requests = make_requests(records, max_tokens=1024, **workload)
        loaded, saturation = at_load(requests, cluster, 1.0)
        results = run_policies(loaded, cluster, ("fcfs",))
        f = results["fcfs"]
        knobs = {**TAIL_TARGET_KNOBS, "tail_target_s": f["p99_ttft_s"]}
        results.update(run_policies(loaded, cluster, ("fairway",), **knobs))
        out[label] = headline_entry(
            loaded, saturation, {**workload, "fairway_knobs": knobs}, cluster, results
        )
        log(f"headline tail_target {label}: " + ", ".join(_fmt(g) for g in out[label]["goals"]))
    return out


def alpaca_holdout(alpaca: Path, out_dir: Path, seed: int) -> tuple[Path, Path]:
    """Held-out prompts as a JSONL trace (Poisson arrivals), the rest as predictor training."""
    from services.scorer.evaluate import normalize_record, read_jsonl, split_by_prompt

    raw = list(read_jsonl(alpaca))
    rows = []
    for r in raw:
        row = normalize_record(r)
        row["input_tokens"] = int(r.get("prompt_tokens_llama2") or 1)
        rows.append(row)
    train, test = split_by_prompt(rows, 0.2, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test))
    arrivals = np.cumsum(rng.exponential(1.0, len(test)))
    records = [
        TraceRecord(
            timestamp=float(arrivals[i]),
            input_tokens=max(test[j]["input_tokens"], 1),
            output_tokens=max(test[j]["output_tokens"], 1),
            prompt=test[j]["prompt"],
            model=test[j].get("model"),
        )
        for i, j in enumerate(order)
    ]
    trace = out_dir / "alpaca_holdout_trace.jsonl"
    write_jsonl(records, trace)
    train_file = out_dir / "alpaca_predictor_train.jsonl"
    with train_file.open("w", encoding="utf-8") as handle:
        for r in train:
            handle.write(
                json.dumps({k: r[k] for k in ("prompt", "output_tokens", "model") if k in r}) + "\n"
            )
    return trace, train_file


def predictor(trace: Path, train_file: Path) -> dict:
    records = load_trace(trace)
    cluster = ClusterConfig(kv_tokens=LatencyModel().kv_tokens)
    oracle = make_requests(records, max_tokens=2048)
    loaded, saturation = at_load(oracle, cluster, 1.0)
    scale = {r.request_id: r.arrival for r in loaded}
    out: dict = {
        "setup": {
            "trace": str(trace),
            "requests": len(records),
            "load": 1.0,
            "fcfs_saturation_rps": saturation,
            "max_tokens": 2048,
            "train_file": str(train_file),
        },
        "policies": {},
    }
    learned = make_requests(
        records, predictor="fairway", max_tokens=2048, train_file=str(train_file)
    )
    learned = [replace(r, arrival=scale[r.request_id]) for r in learned]
    actual = np.array([r.output_tokens for r in learned])
    p50 = np.array([r.predicted_p50 for r in learned])
    from scipy.stats import kendalltau

    out["prediction_quality"] = {
        "kendall_tau_p50": float(kendalltau(actual, p50).statistic),
        "median_abs_log_error": float(np.median(np.abs(np.log(p50 / actual)))),
        "fraction_above_p90": float(np.mean(actual > np.array([r.predicted_p90 for r in learned]))),
    }
    for label, reqs in (("oracle", loaded), ("fairway_predictor", learned)):
        out["policies"][label] = strip(run_policies(reqs, cluster, ("fcfs", "fairway")))
    o = out["policies"]["oracle"]["fairway"]["mean_e2e_s"]
    p = out["policies"]["fairway_predictor"]["fairway"]["mean_e2e_s"]
    out["goals"] = [check("fairway mean e2e, scorer's predictor / oracle", p / o, 1.1, "<=")]
    log("predictor: " + ", ".join(_fmt(g) for g in out["goals"]))
    return out


def consolidation(
    azure: list[TraceRecord], alpaca_trace: Path | None, train_file: Path | None
) -> dict:
    """Saturation throughput (all requests waiting at t=0) of fairway, admitting by the
    predicted output quantile vs by ``max_tokens``, with KV memory the binding limit."""
    sources: dict[str, tuple[list[TraceRecord], int, dict]] = {
        "azure/oracle": (azure, 1024, {}),
        "azure/oracle_noise_0.5": (azure, 1024, {"oracle_noise": 0.5}),
    }
    if alpaca_trace is not None:
        alpaca = load_trace(alpaca_trace)
        sources["alpaca_holdout/oracle"] = (alpaca, 2048, {})
        sources["alpaca_holdout/oracle_noise_0.5"] = (alpaca, 2048, {"oracle_noise": 0.5})
        if train_file is not None:
            fairway = {"predictor": "fairway", "train_file": str(train_file)}
            sources["alpaca_holdout/scorer_predictor"] = (alpaca, 2048, fairway)
    out: dict = {}
    for name, (records, max_tokens, workload) in sources.items():
        requests = make_requests(records, max_tokens=max_tokens, **workload)
        burst = [replace(r, arrival=0.0) for r in requests]
        # What admission by the true length could at most gain in batch size over
        # max_tokens: KV per request (prompt + max_tokens) / (prompt + output).
        out[f"{name}/kv_per_request_ratio"] = float(
            np.mean([r.input_tokens + r.max_tokens for r in requests])
            / np.mean([r.input_tokens + r.output_tokens for r in requests])
        )
        for kv in (8192, 16384, 32768):
            for quantile in ("p90", "p50") if kv == 8192 else ("p90",):
                cluster = ClusterConfig(kv_tokens=kv)
                row: dict = {"max_tokens": max_tokens}
                for label, consolidate in (("predicted", True), ("max_tokens", False)):
                    config = PolicyConfig(
                        name="fairway",
                        consolidate=consolidate,
                        kv_quantile=quantile,
                        latency=cluster.gpu_latency,
                    )
                    summary = simulate(burst, config, cluster).summary()
                    row[label] = {
                        "throughput_rps": summary["completed"] / summary["makespan_s"],
                        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
                        "preemptions": summary["preemptions"],
                    }
                ratio = row["predicted"]["throughput_rps"] / row["max_tokens"]["throughput_rps"]
                row["ratio"] = ratio
                key = f"{name}/kv{kv}/{quantile}"
                out[key] = row
                log(f"consolidation {key}: {ratio:.2f}x")
    out["goals"] = [
        check(f"throughput predicted/max_tokens, {key}", row["ratio"], 2.0, ">=")
        for key, row in out.items()
        if "/kv8192/" in key and isinstance(row, dict)
    ]
    return out


# Diagnostic model: decode steps that cost the same at any batch size and near-free
# prefill, so co-batching does not slow a tenant down. It separates what the scheduler
# controls (queueing) from what the engine's batching costs.
BATCH_INSENSITIVE = LatencyModel(
    prefill_ms_per_token=0.005, decode_per_seq_ms=0.0, name="diagnostic-batch-insensitive"
)


def fairness(records: list[TraceRecord]) -> dict:
    tenants = parse_tenants("heavy:0.8,light:0.2")
    requests = make_requests(records, tenants=tenants, max_tokens=1024)
    out: dict = {}
    for model_label, model in (
        ("default_model", LatencyModel()),
        ("batch_insensitive", BATCH_INSENSITIVE),
    ):
        cluster = ClusterConfig(gpu_latency=model, kv_tokens=model.kv_tokens)
        for load in (1.0, 2.0):
            loaded, saturation = at_load(requests, cluster, load)
            results = run_policies(loaded, cluster, ("fcfs", "vtc", "fairway"))
            light_only = [r for r in loaded if r.tenant == "light"]
            alone = {
                name: brief(
                    simulate(light_only, PolicyConfig(name=name, latency=model), cluster).summary(
                        SLO
                    )
                )
                for name in ("vtc", "fairway")
            }
            # Diagnostic: the light tenant always first (weight 1e6, not fair) - the least
            # latency any order of admission can give it on this shared engine; the rest
            # of its gap to "alone" is the batch it decodes in and the prefills it shares.
            first = brief(
                simulate(
                    loaded,
                    PolicyConfig(name="fairway", latency=model, tenant_weights={"light": 1e6}),
                    cluster,
                ).summary(SLO)
            )["tenants"]["light"]
            entry: dict = {
                "light_first_bound": {
                    **first,
                    "mean_e2e_over_alone": first["mean_e2e_s"] / alone["fairway"]["mean_e2e_s"],
                },
                "setup": {
                    "load": load,
                    "fcfs_saturation_rps": saturation,
                    "tenants": "heavy:0.8,light:0.2",
                    "latency_model": model.to_dict(),
                },
                "policies": strip(results),
                "light_alone": alone,
                "goals": [],
            }
            fcfs_diff = results["fcfs"]["max_service_difference"]
            for name in ("vtc", "fairway"):
                r = results[name]
                entry["goals"] += [
                    check(
                        f"{name} max service difference / VTC bound",
                        r["max_service_difference"] / r["vtc_bound"],
                        1.0,
                        "<=",
                    ),
                    check(
                        f"fcfs / {name} max service difference",
                        fcfs_diff / max(r["max_service_difference"], 1e-9),
                        5.0,
                        ">=",
                    ),
                    check(
                        f"{name} light tenant mean e2e / alone",
                        r["tenants"]["light"]["mean_e2e_s"] / alone[name]["mean_e2e_s"],
                        1.2,
                        "<=",
                    ),
                ]
            key = f"{model_label}/load_{load}"
            out[key] = entry
            log(f"fairness {key}: " + ", ".join(_fmt(g) for g in entry["goals"]))
    return out


def deadlines(records: list[TraceRecord]) -> dict:
    """Every request asks to fail once its deadline (seconds after arrival) is lost."""
    cluster = ClusterConfig(kv_tokens=LatencyModel().kv_tokens)
    out: dict = {}
    for deadline_s in (20.0, 60.0, 120.0):
        requests = make_requests(records, max_tokens=1024, deadline_s=deadline_s, fail_if_late=True)
        loaded, _ = at_load(requests, cluster, 1.0)
        row = {}
        for name in ("fcfs", "fairway"):
            summary = simulate(loaded, PolicyConfig(name=name), cluster).summary(SLO)
            row[name] = {
                "attainment": summary["deadlines"]["attainment"],
                "expired": summary["expired"],
                "mean_e2e_s": summary["latency_s"]["e2e"]["mean"],
            }
        out[f"deadline_{deadline_s:g}s"] = row
        log(
            f"deadlines {deadline_s:g}s: attainment fcfs {row['fcfs']['attainment']:.3f}, "
            f"fairway {row['fairway']['attainment']:.3f}"
        )
    return out


def background(records: list[TraceRecord]) -> dict:
    tenants = parse_tenants("chat:0.7,batch:0.3")
    cluster = ClusterConfig(kv_tokens=LatencyModel().kv_tokens)
    ordinary = make_requests(records, tenants=tenants, max_tokens=1024)
    variants = (
        ("ordinary", False, {}),
        ("background", True, {"preempt_background": False}),
        ("background_hand_back", True, {}),
        ("background_hand_back_at_once", True, {"preempt_after_s": 0.0}),
    )
    out: dict = {}
    for load in (0.8, 1.0):
        loaded, _ = at_load(ordinary, cluster, load)  # the same arrivals for every variant
        row = {}
        for label, batch_in_background, knobs in variants:
            requests = [replace(r, background=batch_in_background and r.tenant == "batch") for r in loaded]
            config = PolicyConfig(name="fairway", latency=cluster.gpu_latency, **knobs)
            summary = simulate(requests, config, cluster).summary(SLO)
            row[label] = {**brief(summary), "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"]}
        out[f"load_{load:g}"] = row
        log(f"background load {load:g}: chat mean e2e / mean ttft / tok/s " + ", ".join(
            f"{label} {v['tenants']['chat']['mean_e2e_s']:.2f}/{v['tenants']['chat']['mean_ttft_s']:.2f}/"
            f"{v['output_tokens_per_s']:.0f}" for label, v in row.items()))
    return out


def class_latency(requests: list[SimRequest]) -> dict:
    """Mean and p99 time to first token and end-to-end latency of finished requests."""
    done = [r for r in requests if r.finish is not None]
    ttft = np.array([r.first_token - r.arrival for r in done])
    e2e = np.array([r.finish - r.arrival for r in done])
    return {
        "requests": len(done),
        "mean_ttft_s": float(ttft.mean()),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "mean_e2e_s": float(e2e.mean()),
        "p99_e2e_s": float(np.percentile(e2e, 99)),
    }


def priority(records: list[TraceRecord], seed: int = 0) -> dict:
    tenants = parse_tenants("app:0.5,other:0.5")
    cluster = ClusterConfig(kv_tokens=LatencyModel().kv_tokens)
    requests = make_requests(records, tenants=tenants, max_tokens=1024, seed=seed)
    drawn = np.random.default_rng(seed + 7).random(len(requests)) < 0.2
    urgent_ids = {r.request_id for r, urgent in zip(requests, drawn, strict=True) if urgent}
    out: dict = {}
    for load in (0.8, 1.0):
        loaded, _ = at_load(requests, cluster, load)
        row = {}
        for label, prioritized in (("no_priority", False), ("priority", True)):
            marked = [replace(r, priority=int(prioritized and r.tenant == "app" and r.request_id not in urgent_ids))
                      for r in loaded]
            config = PolicyConfig(name="fairway", latency=cluster.gpu_latency)
            result = simulate(marked, config, cluster)
            app = [r for r in result.requests if r.tenant == "app"]
            row[label] = {
                "app_interactive": class_latency([r for r in app if r.request_id in urgent_ids]),
                "app_bulk": class_latency([r for r in app if r.request_id not in urgent_ids]),
                "other": class_latency([r for r in result.requests if r.tenant == "other"]),
                "max_service_difference": result.summary(SLO)["fairness"]["max_service_difference"],
            }
        out[f"load_{load:g}"] = row
        log(f"priority load {load:g}: mean ttft interactive/bulk/other " + ", ".join(
            f"{label} {v['app_interactive']['mean_ttft_s']:.2f}/{v['app_bulk']['mean_ttft_s']:.2f}/"
            f"{v['other']['mean_ttft_s']:.2f}" for label, v in row.items()))
    return out


def _fmt(goal: dict) -> str:
    verdict = "PASS" if goal["pass"] else "FAIL"
    return f"{goal['goal']} = {goal['value']:.3f} ({verdict} {goal['target']})"


def plot_cdfs(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results.items():
        done = [r for r in result.requests if r.finish is not None]
        for ax, values in (
            (axes[0], [r.finish - r.arrival for r in done]),
            (axes[1], [r.first_token - r.arrival for r in done]),
        ):
            data = np.sort(values)
            ax.plot(data, np.arange(1, len(data) + 1) / len(data), label=name)
    for ax, label in zip(axes, ("end-to-end latency (s)", "time to first token (s)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--azure", type=Path, default=ROOT.parent / "shared/data/azure_llm_2023_conv_trace.csv"
    )
    parser.add_argument(
        "--alpaca",
        type=Path,
        default=ROOT.parent / "shared/data/alpaca_eval_model_outputs_train.jsonl.gz",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench_sim")
    parser.add_argument(
        "--num-requests", type=int, default=None, help="first N Azure arrivals (quick runs)"
    )
    parser.add_argument("--only", nargs="*", choices=SECTIONS)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or SECTIONS)
    started = time.perf_counter()
    azure = load_trace(args.azure, args.num_requests)
    results: dict = {"azure_trace": str(args.azure), "num_azure_requests": len(azure)}
    alpaca_trace = train_file = None
    if args.alpaca.exists() and ({"predictor", "consolidation"} & only):
        alpaca_trace, train_file = alpaca_holdout(args.alpaca, args.out, args.seed)
    if "headline" in only:
        results["headline"] = headline(azure, args.out if args.plot else None)
        results["headline_tail_target"] = headline_tail_target(azure)
    if "predictor" in only and alpaca_trace is not None and train_file is not None:
        results["predictor"] = predictor(alpaca_trace, train_file)
    if "consolidation" in only:
        results["consolidation"] = consolidation(azure, alpaca_trace, train_file)
    if "fairness" in only:
        results["fairness"] = fairness(azure)
    if "deadlines" in only:
        results["deadlines"] = deadlines(azure)
    if "background" in only:
        results["background"] = background(azure)
    if "priority" in only:
        results["priority"] = priority(azure, args.seed)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out / 'results.json'} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
