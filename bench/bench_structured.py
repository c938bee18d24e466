"""What structured outputs cost the engine: decode speed with every request held to a
language against the same requests free, and what compiling a language costs.

    python bench/bench_structured.py [--model PATH|llama-100m] [--concurrency 16]
        [--max-tokens 128] [--threads N] [--json OUT.json]

Each method runs ``--concurrency`` seeded, sampled requests (the same prompts) through
one LLMEngine until all finish; ``output_tokens_per_s`` is the tokens produced over the
wall time, and ``ms_per_token_step`` the wall time per decode step per running request.
The methods: ``free`` (EOS ignored, every request its ``--max-tokens``), and
``json_schema``, ``json_object``, ``regex`` and ``choice`` (each request's answer held to
that language: answers end where it is complete, so their lengths differ).
``mask_us_per_row`` is what filling, applying and following one request's token mask
costs per step, timed on the grammar state alone; ``compile_ms`` the cold set-up of the
tokenizer's grammar compiler and each language's first compile (cached after).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from services.benchmark.engine import resolve_model
from services.engine.engine import LLMEngine
from services.engine.interface import EngineConfig, EngineRequest
from services.engine.structured import GrammarCompiler
from services.messages import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
}
LANGUAGES = {
    "json_schema": StructuredOutput("json_schema", json.dumps(SCHEMA), any_whitespace=False),
    "json_object": StructuredOutput("json_object", any_whitespace=False),
    "regex": StructuredOutput("regex", r"[a-z]+( [a-z]+){0,40}\."),
    "choice": StructuredOutput("choice", choices=[f"option {i}" for i in range(100)]),
}


def run_method(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, Any]:
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(EngineRequest(f"r{i}", prompt, p))
    tokens = steps = row_steps = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        row_steps += len(outs)
        tokens += sum(len(o.new_token_ids) for o in outs)
    wall = time.perf_counter() - start
    return {"output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ms_per_token_step": round(wall * 1000 / max(row_steps, 1), 3),
            "mean_output_tokens": round(tokens / len(prompts), 1)}


def mask_cost(grammars: GrammarCompiler, vocab_size: int, spec: StructuredOutput, steps: int) -> float:
    """Microseconds per step to fill, apply and follow one request's mask (greedy over
    random logits, restarted when the language ends)."""
    gen = torch.Generator().manual_seed(0)
    state = grammars.state(spec)
    total = 0.0
    for _ in range(steps):
        logits = torch.randn(vocab_size, generator=gen)
        start = time.perf_counter()
        state.mask(logits)
        ended = state.accept(int(logits.argmax()))
        total += time.perf_counter() - start
        if ended:
            state = grammars.state(spec)
    return total / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model path, llama-100m or llama-1b (default: the tiny model)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=os.environ.get("FAIRWAY_CACHE_DIR",
                                                                str(Path.home() / ".cache" / "fairway")))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model, Path(args.cache_dir))
    config = EngineConfig(max_num_seqs=args.concurrency, kv_cache_tokens=args.concurrency * 1024)
    engine = LLMEngine.from_pretrained(path, "cpu", "float32", config)
    tok = engine.tokenizer
    prompts = [tok(f"Describe person number {i} as JSON.")["input_ids"] for i in range(args.concurrency)]

    start = time.perf_counter()
    grammars = GrammarCompiler(tok, engine.vocab_size, engine.eos_token_ids)
    compile_ms: dict[str, float] = {"tokenizer_info": round((time.perf_counter() - start) * 1000, 2)}
    for name, spec in LANGUAGES.items():
        start = time.perf_counter()
        grammars.state(spec)
        compile_ms[name] = round((time.perf_counter() - start) * 1000, 2)
        start = time.perf_counter()
        grammars.state(spec)
        compile_ms[f"{name}_cached"] = round((time.perf_counter() - start) * 1000, 3)

    def sampled(seed: int, **kw: Any) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=seed, **kw)

    run_method(engine, prompts[:2], [sampled(0, ignore_eos=True)] * 2)  # warm-up
    methods = {"free": run_method(engine, prompts,
                                  [sampled(i, ignore_eos=True) for i in range(len(prompts))])}
    for name, spec in LANGUAGES.items():
        methods[name] = run_method(engine, prompts,
                                   [sampled(i, structured=spec) for i in range(len(prompts))])
        methods[name]["mask_us_per_row"] = round(mask_cost(grammars, engine.vocab_size, spec, 400), 1)
    result = {"model": path, "vocab_size": engine.vocab_size, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
              "compile_ms": compile_ms, "methods": methods}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
