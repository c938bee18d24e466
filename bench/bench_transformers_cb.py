"""Our engine vs transformers' own continuous-batching manager (``generate_batch``).

    python bench/bench_transformers_cb.py [--model PATH] [--num-requests 16] [--json OUT.json]

Issue 5 asks to decide by measurement whether to build on transformers 5.x's
``init_continuous_batching``/``generate_batch``. Both run the same prompts with the same
fixed output lengths (greedy, EOS ignored) on the same model and device.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from services.engine import EngineConfig, EngineRequest, LLMEngine
from services.messages import SamplingParams
from services.models import load_model, resolve_model_path
from services.settings import get_settings


def run_engine(path: str, prompts: list[list[int]], output_len: int, device: str) -> float:
    engine = LLMEngine.from_pretrained(path, device, "float32",
                                       EngineConfig(max_num_seqs=len(prompts), kv_cache_tokens=32768))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request(EngineRequest("warm", prompts[0][:8], SamplingParams(max_tokens=2, ignore_eos=True)))
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", ids, params))
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


def run_transformers(path: str, prompts: list[list[int]], output_len: int, device: str) -> float:
    model = load_model(path, device, "float32")
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = output_len
    config.do_sample = False
    config.eos_token_id = None
    model.generate_batch(prompts[:2], generation_config=config)  # warm-up
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=config)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    path = resolve_model_path(args.model, get_settings().cache_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    result = {
        "model": path, "device": args.device, "torch_threads": torch.get_num_threads(),
        "num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "fairway_engine_output_tokens_per_s": run_engine(path, prompts, args.output_len, args.device),
    }
    try:
        result["transformers_cb_output_tokens_per_s"] = run_transformers(
            path, prompts, args.output_len, args.device)
        result["fairway_vs_transformers_cb"] = (result["fairway_engine_output_tokens_per_s"]
                                                / result["transformers_cb_output_tokens_per_s"])
    except Exception as exc:  # noqa: BLE001 - report why the manager could not run here
        result["transformers_cb_error"] = f"{type(exc).__name__}: {exc}"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
