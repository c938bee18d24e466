"""What prefix caching buys: requests that share a long system prompt, with the engine's
prefix cache off and on.

    python bench/bench_prefix_cache.py [--model PATH|llama-100m] [--system-tokens 512]
        [--requests 16] [--max-tokens 8] [--threads N] [--json OUT.json] [--plot DIR]

Every request is the same ``--system-tokens``-token system prompt followed by a question
of its own (about 20 tokens), answering ``--max-tokens`` tokens greedily. Two workloads
per method: ``one_at_a_time`` (each request alone, so its time to first token is its
prefill: what a user waits) and ``all_at_once`` (every request queued together, the
engine's throughput, after one request with the system prompt was served: a server that
has served it before) and ``cold_burst`` (all at once on a cold cache: with it on, the
first computes the system prompt and the others wait for its blocks instead of computing
them too). ``one_at_a_time`` starts cold: its first request computes the system prompt
and, with the cache on, the rest find it cached. ``hit_rate`` is the cached share of the prompt tokens
looked up (vLLM's ``prefix_cache_hits / prefix_cache_queries``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from services.benchmark.engine import ordinary_token_ids, resolve_model
from services.engine.engine import LLMEngine
from services.engine.interface import EngineConfig, EngineRequest
from services.messages import SamplingParams


def one_at_a_time(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    ttfts = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"seq-{i}", prompt, params))
        added, first = time.perf_counter(), None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and any(o.new_token_ids for o in outs):
                first = time.perf_counter()
        ttfts.append(((first or time.perf_counter()) - added) * 1000)
    return {"wall_s": round(time.perf_counter() - start, 3),
            "ttft_ms_first": round(ttfts[0], 1),
            "ttft_ms_p50_rest": round(statistics.median(ttfts[1:]), 1),
            "ttft_ms_mean": round(statistics.fmean(ttfts), 1)}


def all_at_once(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"batch-{i}", prompt, params))
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "requests_per_s": round(len(prompts) / wall, 2),
            "output_tokens": tokens}


def run(path: str, caching: bool, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    longest = max(len(p) for p in prompts) + max_tokens
    config = EngineConfig(max_num_seqs=len(prompts), kv_cache_tokens=len(prompts) * (longest + 16),
                          max_model_len=longest + 16, enable_prefix_caching=caching)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    result: dict[str, Any] = {}
    for name, method, warm in (("one_at_a_time", one_at_a_time, prompts[0][-16:]),
                               ("all_at_once", all_at_once, prompts[-1]),
                               ("cold_burst", all_at_once, prompts[0][-16:])):
        engine = LLMEngine.from_pretrained(path, "cpu", "float32", config)
        # First-call costs; all at once then finds the system prompt cached, as a server
        # that has served it before does (one at a time and the cold burst start cold).
        engine.add_request(EngineRequest("warm", warm, params))
        while engine.has_unfinished_requests():
            engine.step()
        queries, hits = engine.stats().prefix_cache_queries, engine.stats().prefix_cache_hits
        result[name] = method(engine, prompts, params)
        stats = engine.stats()
        queried = stats.prefix_cache_queries - queries
        result[name]["hit_rate"] = round((stats.prefix_cache_hits - hits) / queried, 3) if queried else 0.0
    return result


def plot(result: dict[str, Any], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(methods, [result["methods"][m]["one_at_a_time"]["ttft_ms_p50_rest"] for m in methods])
    left.set_ylabel("ms")
    left.set_title("time to first token (p50, after the first)")
    right.bar(methods, [result["methods"][m]["all_at_once"]["requests_per_s"] for m in methods])
    right.set_title("requests/s, all queued at once")
    fig.suptitle(f"{result['requests']} requests sharing a {result['system_tokens']}-token system prompt")
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    fig.savefig(directory / "prefix_cache.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model path, llama-100m or llama-1b (default: the tiny model)")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=os.environ.get("FAIRWAY_CACHE_DIR",
                                                                str(Path.home() / ".cache" / "fairway")))
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="a directory for prefix_cache.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model, Path(args.cache_dir))
    tokenizer = LLMEngine.from_pretrained(path, "cpu", "float32", EngineConfig(kv_cache_tokens=64)).tokenizer
    rng = random.Random(0)
    vocabulary = ordinary_token_ids(tokenizer, len(tokenizer))
    system = [rng.choice(vocabulary) for _ in range(args.system_tokens)]
    prompts = [system + tokenizer(f" Question {i}: what happens to request number {i} next?",
                                  add_special_tokens=False)["input_ids"] for i in range(args.requests)]
    methods = {"off": run(path, False, prompts, args.max_tokens),
               "on": run(path, True, prompts, args.max_tokens)}
    off, on = methods["off"], methods["on"]
    result = {"model": path, "system_tokens": args.system_tokens, "requests": args.requests,
              "prompt_tokens_mean": round(statistics.fmean(len(p) for p in prompts), 1),
              "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
              "methods": methods,
              "ttft_speedup": round(off["one_at_a_time"]["ttft_ms_p50_rest"]
                                    / on["one_at_a_time"]["ttft_ms_p50_rest"], 2),
              "throughput_speedup": round(on["all_at_once"]["requests_per_s"]
                                          / off["all_at_once"]["requests_per_s"], 2),
              "cold_burst_speedup": round(on["cold_burst"]["requests_per_s"]
                                          / off["cold_burst"]["requests_per_s"], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
