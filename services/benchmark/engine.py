"""Engine throughput: N concurrent requests through LLMEngine vs sequential model.generate.

    fairway bench engine [--model PATH] [--device cpu] [--num-requests 16]
        [--prompt-len 128] [--output-len 128] [--json OUT.json]

Lengths are fixed with EOS ignored (as in vLLM's serving benchmark); the default model is
the built-in tiny one.
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


def measure(args: argparse.Namespace) -> dict:
    path = resolve_model_path(args.model, get_settings().cache_dir)
    rng = random.Random(0)
    engine = LLMEngine.from_pretrained(
        path,
        args.device,
        args.dtype,
        EngineConfig(max_num_seqs=args.num_requests, kv_cache_tokens=args.kv_tokens),
    )
    vocab = engine.vocab_size
    prompts = [
        [rng.randrange(5, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)
    ]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    # Warm-up, then the measured run.
    engine.add_request(
        EngineRequest("warm", prompts[0][:16], SamplingParams(max_tokens=4, ignore_eos=True))
    )
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", ids, params))
    generated = 0
    steps = 0
    while engine.has_unfinished_requests():
        generated += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    engine_s = time.perf_counter() - start

    model = load_model(path, args.device, args.dtype)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.do_sample = False
    config.max_new_tokens = args.output_len
    sequential = prompts[: args.generate_requests]
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompts[0][:16]], device=args.device), generation_config=config
        )
        start = time.perf_counter()
        for ids in sequential:
            model.generate(torch.tensor([ids], device=args.device), generation_config=config)
        generate_s = time.perf_counter() - start
    result = {
        "model": path,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "engine_s": engine_s,
        "engine_steps": steps,
        "engine_output_tokens_per_s": generated / engine_s,
        "generate_requests": len(sequential),
        "generate_s": generate_s,
        "generate_output_tokens_per_s": len(sequential) * args.output_len / generate_s,
        "stats": engine.stats().__dict__,
    }
    result["speedup"] = (
        result["engine_output_tokens_per_s"] / result["generate_output_tokens_per_s"]
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument(
        "--generate-requests",
        type=int,
        default=4,
        help="sequential generate() calls timed (throughput is per token)",
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    text = json.dumps(measure(args), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
