"""Engine throughput with many tenant LoRA adapters in one batch vs a single adapter.

    fairway bench lora --device cuda --dtype bfloat16 --model PATH --json lora.json
    fairway bench lora --quick                       # CPU smoke run on the tiny model

Random adapters (rank ``--rank``, on q/k/v/o) are written for the model first, so nothing
is downloaded. Each configuration serves the same ``--num-requests`` requests (prompt
``--prompt-len`` tokens, exactly ``--output-len`` greedy tokens, all submitted at once) with
their adapters drawn uniformly or Zipf-distributed from N adapters, with ``--max-loras``
device slots (an N above the slots makes the pool page adapters in and out, as S-LoRA).
Reported: output tokens/s, steps, adapter loads and evictions; ``base`` runs without any
adapter. Goal (issue #8): every N within 1.5x of one adapter's throughput.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from services.benchmark.engine import resolve_model
from services.engine import EngineConfig, EngineRequest, LLMEngine, LoraRequest
from services.engine.lora import random_lora_adapter
from services.messages import SamplingParams
from services.models import load_model, load_tokenizer
from services.settings import Settings

GOAL_RATIO = 1.5


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers like 1,8,32")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="path or hub id, or a random shape: llama-100m, llama-1b (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--adapters", type=_int_list, default=[1, 8, 32, 128],
                        help="adapter counts to compare with 1")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=32, help="device pool slots")
    parser.add_argument("--distribution", choices=["uniform", "zipf"], default="uniform")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small CPU-sized run")
    parser.add_argument("--json", dest="json_path", type=Path, default=None)


def _assignments(n_adapters: int, n_requests: int, distribution: str, gen: torch.Generator) -> list[int]:
    if distribution == "uniform":
        return torch.randint(0, n_adapters, (n_requests,), generator=gen).tolist()
    weights = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** 1.1
    return torch.multinomial(weights, n_requests, replacement=True, generator=gen).tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    model: Any, tokenizer: Any, args: argparse.Namespace, adapters: list[LoraRequest],
    prompts: list[list[int]], assignment: list[int] | None,
) -> dict[str, Any]:
    """Serve every prompt (with its assigned adapter) through a fresh engine; timed."""
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.max_num_seqs * (args.prompt_len + args.output_len + 16),
        max_model_len=args.prompt_len + args.output_len + 16,
        max_loras=args.max_loras, max_lora_rank=max(args.rank, 1), max_cpu_loras=max(len(adapters), 1),
        enable_prefix_caching=False,  # every prompt computed: the adapters' cost, not the cache's
    )  # fmt: skip
    engine = LLMEngine(model, tokenizer, config, args.device)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):  # adapters are read from disk here, not timed
        lora = adapters[assignment[i]] if assignment is not None else None
        engine.add_request(EngineRequest(f"r{i}", prompt, params, lora=lora))
    _sync(args.device)
    start = time.perf_counter()
    steps = tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
        steps += 1
    _sync(args.device)
    seconds = time.perf_counter() - start
    pool = engine.lora.pool if engine.lora is not None else None
    return {
        "output_tokens": tokens, "seconds": round(seconds, 4), "steps": steps,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "adapter_loads": pool.num_loads if pool else 0,
        "adapter_evictions": pool.num_evictions if pool else 0,
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.adapters, args.num_requests, args.prompt_len, args.output_len = [1, 4, 8], 16, 32, 16
        args.max_loras, args.max_num_seqs = min(args.max_loras, 4), 16
    settings = Settings()
    path = resolve_model(args.model, settings.cache_dir)
    tokenizer = load_tokenizer(path)
    base = load_model(path, args.device, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = int(base.config.vocab_size)
    prompts = torch.randint(10, vocab, (args.num_requests, args.prompt_len), generator=gen).tolist()
    results: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in vars(args).items() if k != "func"},
                               "model": path, "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fairway-lora-bench-") as tmp:
        cpu_model = base if args.device == "cpu" else None
        if cpu_model is None:
            cpu_model = load_model(path, "cpu", "float32")
        adapters = [
            LoraRequest(f"a{i}", str(random_lora_adapter(Path(tmp) / f"a{i}", cpu_model,
                                                         rank=args.rank, seed=i)))
            for i in range(max(args.adapters))
        ]  # fmt: skip
        # One model for every run: the engine wraps it once, later engines reuse the wrap.
        measure(base, tokenizer, args, adapters, prompts[:4], [0] * 4)  # warm-up
        results["runs"]["base"] = measure(base, tokenizer, args, adapters, prompts, None)
        for n in args.adapters:
            assignment = _assignments(n, args.num_requests, args.distribution, gen)
            run_result = measure(base, tokenizer, args, adapters, prompts, assignment)
            run_result["distinct_adapters"] = len(set(assignment))
            results["runs"][str(n)] = run_result
            print(json.dumps({"adapters": n, **run_result}), flush=True)
    one = results["runs"].get("1", {}).get("tokens_per_s")
    if one:
        ratios = {n: round(one / r["tokens_per_s"], 3) for n, r in results["runs"].items()
                  if n != "base" and r["tokens_per_s"]}  # fmt: skip
        results["summary"] = {"slowdown_vs_one_adapter": ratios, "goal_ratio": GOAL_RATIO,
                              "goal_met": all(v <= GOAL_RATIO for v in ratios.values())}  # fmt: skip
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_path:
        args.json_path.write_text(text)
    return 0
