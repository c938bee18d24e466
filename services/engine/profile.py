"""Measure what a prefill token and a decode step cost on this engine, and fit the
worker latency model (``services.latency_model.LatencyModel``) to it.

Used by ``fairway profile-engine --json OUT.json [--model PATH] [--device cpu]``; the
JSON feeds placement and the simulator's virtual workers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from services.engine.engine import LLMEngine
from services.engine.interface import EngineConfig, EngineRequest
from services.latency_model import LatencyModel
from services.logs import get_logger
from services.messages import SamplingParams

log = get_logger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_CONTEXT_LENS = (64, 256, 1024)
DEFAULT_PREFILL_LENS = (32, 128, 512)


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _prompt(rng: random.Random, engine: LLMEngine, length: int) -> list[int]:
    return [rng.randrange(0, engine.vocab_size) for _ in range(length)]


def measure_prefill(engine: LLMEngine, length: int, repeats: int, rng: random.Random) -> float:
    """Median seconds to prefill one ``length``-token prompt and sample its first token."""
    times = []
    for r in range(repeats):
        engine.add_request(
            EngineRequest(
                f"prefill-{length}-{r}",
                _prompt(rng, engine, length),
                SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            )
        )
        start = time.perf_counter()
        _drain(engine)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_decode(
    engine: LLMEngine, batch: int, context: int, steps: int, rng: random.Random
) -> tuple[float, int]:
    """Median seconds of a decode-only step with ``batch`` requests of ``context`` tokens
    each, and the total context (KV tokens) over the batch at the middle of the run."""
    # Requests prefilled early decode while later ones still prefill: they must not be
    # done before the timed steps (or those would run a smaller batch), so they may run to
    # the context limit and are cancelled after the timed steps.
    pool = engine.allocator.num_blocks * engine.allocator.block_size
    longest = min(engine.max_model_len, pool // batch)
    params = SamplingParams(max_tokens=longest - context, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(
            EngineRequest(f"decode-{batch}-{context}-{b}", _prompt(rng, engine, context), params)
        )
    # Prefill everything first (possibly over several steps) so timed steps only decode.
    while (
        any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running)
        or engine.scheduler.waiting
    ):
        engine.step()
    engine.step()
    times = []
    for _ in range(steps):
        if len(engine.scheduler.running) != batch:
            raise RuntimeError(f"decode profile lost requests: {len(engine.scheduler.running)}")
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for seq in list(engine.scheduler.running):
        engine.abort_request(seq.request_id)
    _drain(engine)
    return statistics.median(times), batch * (context + 1 + steps // 2)


def profile_engine(
    path: str,
    device: str = "cpu",
    dtype: str = "auto",
    config: EngineConfig | None = None,
    *,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    context_lens: tuple[int, ...] = DEFAULT_CONTEXT_LENS,
    prefill_lens: tuple[int, ...] = DEFAULT_PREFILL_LENS,
    decode_steps: int = 8,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure prefill time per prompt length and decode step time per (batch, context),
    and fit a LatencyModel. Combinations that do not fit the engine are skipped."""
    config = config or EngineConfig(max_num_seqs=max(batch_sizes))
    engine = LLMEngine.from_pretrained(path, device, dtype, config)
    rng = random.Random(seed)
    pool = engine.allocator.num_blocks * engine.allocator.block_size
    measurements: list[dict[str, Any]] = []

    measure_prefill(engine, 16, 1, rng)  # warm-up
    prefill: list[tuple[int, float]] = []
    for length in prefill_lens:
        if length + 1 > min(engine.max_model_len, pool):
            continue
        seconds = measure_prefill(engine, length, repeats, rng)
        prefill.append((length, seconds))
        measurements.append(
            {
                "kind": "prefill",
                "tokens": length,
                "seconds": seconds,
                "ms_per_token": seconds * 1000 / length,
            }
        )
        log.info("profiled_prefill", tokens=length, ms=round(seconds * 1000, 2))

    decode: list[tuple[int, int, float]] = []
    for context in context_lens:
        for batch in batch_sizes:
            prefill_steps = -(-batch * context // config.max_num_batched_tokens)
            per_seq = context + decode_steps + 2 + prefill_steps
            if (
                batch > config.max_num_seqs
                or per_seq > engine.max_model_len
                or batch * per_seq > pool
            ):
                continue
            seconds, ctx_tokens = measure_decode(engine, batch, context, decode_steps, rng)
            decode.append((batch, ctx_tokens, seconds))
            measurements.append(
                {
                    "kind": "decode",
                    "batch": batch,
                    "context_len": context,
                    "context_tokens": ctx_tokens,
                    "seconds": seconds,
                    "step_ms": seconds * 1000,
                    "tokens_per_s": batch / seconds if seconds > 0 else 0.0,
                }
            )
            log.info("profiled_decode", batch=batch, context=context, ms=round(seconds * 1000, 2))

    name = Path(path).name or path
    model = LatencyModel.fit(
        prefill, decode, max_batch=config.max_num_seqs, kv_tokens=pool, name=f"{name}@{device}"
    )
    return {
        "model": name,
        "model_path": path,
        "device": device,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "config": {
            "max_num_seqs": config.max_num_seqs,
            "kv_cache_tokens": pool,
            "block_size": config.block_size,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_model_len": engine.max_model_len,
        },
        "latency_model": model.to_dict(),
        "measurements": measurements,
    }


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, required=True, help="where to write the profile")
    parser.add_argument(
        "--model", default=None, help="model path or hub id (default: built-in tiny model)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--batch-sizes", type=_int_list, default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--context-lens", type=_int_list, default=DEFAULT_CONTEXT_LENS)
    parser.add_argument("--prefill-lens", type=_int_list, default=DEFAULT_PREFILL_LENS)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace) -> int:
    from services.models import resolve_model_path
    from services.settings import get_settings

    path = resolve_model_path(args.model, get_settings().cache_dir)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    result = profile_engine(
        path,
        args.device,
        args.dtype,
        config,
        batch_sizes=args.batch_sizes,
        context_lens=args.context_lens,
        prefill_lens=args.prefill_lens,
        decode_steps=args.decode_steps,
        repeats=args.repeats,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    log.info("profile_written", path=str(args.json), **result["latency_model"])
    return 0
