"""Engine benchmark: continuous batching vs sequential and statically batched ``generate``.

    fairway bench engine [--model PATH|llama-100m|llama-1b] [--device cpu|cuda] [--dtype auto]
        [--generate-dtype DTYPE]
        [--concurrency 1,4,16,64] [--num-requests 64] [--prompt-len 32:256]
        [--min-output 16] [--max-output 512] [--seed 0] [--threads N] [--repeats 1]
        [--max-sequential-requests 8] [--logprobs K] [--json OUT.json]
    fairway bench engine --duration 600 [--concurrency 16] ...   (memory mode)

One seeded workload (prompt and output lengths uniform in their ranges, random token
ids, greedy, EOS ignored so every request produces exactly its output length, as in
vLLM's serving benchmark) goes, in the same run on the same model and inputs, through:

- ``engine``: LLMEngine with ``max_num_seqs = concurrency``; all requests submitted at
  t=0, then the step loop until all finish.
- ``static``: ``model.generate`` on batches of ``concurrency`` requests in submission
  order, left-padded, each batch running until its longest member is done.
- ``sequential``: ``model.generate`` one request at a time. It is the same for every
  concurrency level, so it runs once; only ``--max-sequential-requests`` requests, evenly
  spread over the workload ordered by size, are timed and the throughput is taken per
  token over them (``scaled``).

Definitions: output tokens/s = requested output tokens / wall time (static batching's
overrun tokens past a member's own length are not counted); tokens per CPU second use
the process CPU time instead, which other load on a shared machine hardly moves with one
torch thread. TTFT = first token - submission, where engine and static requests are all
submitted at t=0 (queueing included) and a sequential request at the start of its own
``generate`` call (queueing excluded). TPOT = (last token - first token) / (output
tokens - 1) per request; a static batch member's last token is the step that produced
its own last requested token. ``--generate-dtype`` loads the same weights for both
``generate`` baselines in another dtype (e.g. fp32, generate's fastest on a CPU, against
an engine that ``auto`` runs in bf16). With ``--repeats R`` the methods run R times
interleaved and the median-throughput run is reported, with every run's figure.

Memory mode (``--duration S``) streams requests through one engine for S seconds,
keeping ``concurrency`` requests in flight, and samples the process RSS from
``/proc/self/statm`` to show whether memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.logs import get_logger
from services.messages import MAX_LOGPROBS

if TYPE_CHECKING:
    import torch

    from services.engine import LLMEngine

log = get_logger(__name__)

MB = 2**20
CPU_KEY = "output_tokens_per_cpu_s"


# ---- workload and timings (pure) ---------------------------------------------------------


@dataclass
class Workload:
    """Prompts (token ids) and the exact number of output tokens of each request."""

    prompts: list[list[int]]
    output_lens: list[int]
    logprobs: int | None = None
    """Engine requests also return this many alternatives' log-probabilities per token."""

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: range | list[int]) -> Workload:
        return Workload([self.prompts[i] for i in indices], [self.output_lens[i] for i in indices],
                        self.logprobs)

    def summary(self) -> dict[str, Any]:
        prompt_lens = [len(p) for p in self.prompts]
        return {
            "num_requests": len(self),
            "total_prompt_tokens": sum(prompt_lens),
            "total_output_tokens": sum(self.output_lens),
            "mean_prompt_len": statistics.fmean(prompt_lens),
            "mean_output_len": statistics.fmean(self.output_lens),
            "max_output_len": max(self.output_lens),
        }


def make_workload(
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    token_ids: list[int],
    seed: int,
) -> Workload:
    """Seeded workload: lengths uniform in the inclusive ranges, prompt tokens drawn from
    ``token_ids`` (ordinary tokens of the vocabulary)."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_requests):
        n = rng.randint(*prompt_len)
        prompts.append([rng.choice(token_ids) for _ in range(n)])
        outputs.append(rng.randint(*output_len))
    return Workload(prompts, outputs)


@dataclass
class RequestTiming:
    """Times (perf_counter seconds) of one request: submission and each output token."""

    submit: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submit

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def latency_stats(values_s: list[float], name: str) -> dict[str, float]:
    """``{name}_mean/p50/p99_ms`` (0.0 for an empty list); percentiles interpolate linearly."""
    if not values_s:
        return {f"{name}_mean_ms": 0.0, f"{name}_p50_ms": 0.0, f"{name}_p99_ms": 0.0}
    import numpy as np

    data = np.asarray(values_s) * 1000.0
    return {
        f"{name}_mean_ms": float(data.mean()),
        f"{name}_p50_ms": float(np.percentile(data, 50)),
        f"{name}_p99_ms": float(np.percentile(data, 99)),
    }


def summarize_method(
    method: str,
    timings: list[RequestTiming],
    seconds: float,
    process_cpu_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Throughput and latency of one method over its requests (one entry per request).
    With the process CPU time it also gives tokens per CPU second, which other load on
    the machine hardly moves when torch runs one thread."""
    tokens = sum(len(t.token_times) for t in timings)
    result: dict[str, Any] = {
        "method": method,
        "num_requests": len(timings),
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
    if process_cpu_s is not None:
        result["process_cpu_s"] = process_cpu_s
        result["output_tokens_per_cpu_s"] = tokens / process_cpu_s if process_cpu_s > 0 else 0.0
    result |= latency_stats([t.ttft for t in timings if t.token_times], "ttft")
    result |= latency_stats([v for t in timings if (v := t.tpot) is not None], "tpot")
    return result | extra


def speedup(a: dict[str, Any], b: dict[str, Any], key: str = "output_tokens_per_s") -> float:
    """Ratio of output tokens/s (or another throughput ``key``) of ``a`` over ``b``."""
    return a[key] / b[key]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def linear_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0.0 with fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def representative_subset(workload: Workload, count: int) -> list[int]:
    """Indices of ``count`` requests evenly spaced over the workload sorted by output
    length then prompt length (all of them when ``count`` covers the workload), so a timed
    subset sees the same mix of context lengths, which set the cost per token."""
    if count >= len(workload):
        return list(range(len(workload)))
    order = sorted(
        range(len(workload)), key=lambda i: (workload.output_lens[i], len(workload.prompts[i]))
    )
    if count == 1:
        return [order[len(order) // 2]]
    picks = {order[round(k * (len(order) - 1) / (count - 1))] for k in range(count)}
    return sorted(picks)


def rss_slope_per_min(samples: list[tuple[float, float]], since: float = 0.0) -> float:
    """Least-squares MB per minute over the (seconds, MB) samples taken at ``since`` or later."""
    kept = [(t, m) for t, m in samples if t >= since]
    return 60.0 * linear_slope([t for t, _ in kept], [m for _, m in kept])


# ---- the three methods ----------------------------------------------------------------


def _engine_requests(workload: Workload, prefix: str):
    from services.engine import EngineRequest
    from services.messages import SamplingParams

    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                logprobs=workload.logprobs)
        yield EngineRequest(f"{prefix}{i}", prompt, params)


def run_engine(engine: LLMEngine, workload: Workload) -> dict[str, Any]:
    """All requests submitted at t=0, then ``step()`` until every one has finished."""
    steps = 0
    preemptions = engine.stats().num_preemptions
    cpu = time.process_time()
    start = time.perf_counter()
    timings = {}
    for req in _engine_requests(workload, "bench-"):
        engine.add_request(req)
        timings[req.request_id] = RequestTiming(start)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            if out.error:
                raise RuntimeError(f"engine request {out.request_id} failed: {out.error}")
            timings[out.request_id].token_times.extend(now for _ in out.new_token_ids)
    seconds = time.perf_counter() - start
    return summarize_method(
        "engine",
        list(timings.values()),
        seconds,
        process_cpu_s=time.process_time() - cpu,
        steps=steps,
        preemptions=engine.stats().num_preemptions - preemptions,
        ttft_includes_queueing=True,
    )


class _StepClock:
    """A ``generate`` streamer that records when each decoding step produced its tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:  # the first call carries the prompt, not a new token
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _generation_config(model: torch.nn.Module, max_new_tokens: int, pad_token_id: int):
    import copy

    config = copy.deepcopy(model.generation_config)
    # None would be filled in from the model's own config; an empty list disables EOS.
    config.eos_token_id = []
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.pad_token_id = pad_token_id
    return config


def generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    device: str,
) -> tuple[list[float], Any]:
    """One left-padded ``generate`` call; per-step token times and the output ids."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    clock = _StepClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=_generation_config(model, max_new_tokens, pad_token_id),
            streamer=clock,
        )
    if out.shape[1] != width + max_new_tokens or len(clock.times) != max_new_tokens:
        raise RuntimeError(
            f"generate produced {out.shape[1] - width} tokens ({len(clock.times)} steps), "
            f"expected {max_new_tokens}"
        )
    return clock.times, out


def run_static(
    model: torch.nn.Module, workload: Workload, batch_size: int, pad_token_id: int, device: str
) -> dict[str, Any]:
    """Batches of ``batch_size`` in order; all requests submitted at t=0."""
    cpu = time.process_time()
    start = time.perf_counter()
    timings: list[RequestTiming] = []
    generated = 0
    for first in range(0, len(workload), batch_size):
        batch = workload.subset(range(first, min(first + batch_size, len(workload))))
        longest = max(batch.output_lens)
        times, _ = generate_batch(model, batch.prompts, longest, pad_token_id, device)
        generated += len(batch) * longest
        timings.extend(RequestTiming(start, times[:n]) for n in batch.output_lens)
    seconds = time.perf_counter() - start
    return summarize_method(
        "static",
        timings,
        seconds,
        process_cpu_s=time.process_time() - cpu,
        batch_size=batch_size,
        generated_tokens_with_overrun=generated,
        ttft_includes_queueing=True,
    )


def run_sequential(
    model: torch.nn.Module,
    workload: Workload,
    max_requests: int,
    pad_token_id: int,
    device: str,
) -> dict[str, Any]:
    """One request per ``generate`` call over ``max_requests`` requests spread evenly over
    the workload ordered by size (``representative_subset``); the throughput of that
    subset stands for the whole workload (per output token)."""
    chosen = representative_subset(workload, max_requests)
    timed = workload.subset(chosen)
    timings: list[RequestTiming] = []
    seconds = 0.0
    cpu = time.process_time()
    for prompt, n in zip(timed.prompts, timed.output_lens, strict=True):
        start = time.perf_counter()
        times, _ = generate_batch(model, [prompt], n, pad_token_id, device)
        seconds += time.perf_counter() - start
        timings.append(RequestTiming(start, times))
    result = summarize_method(
        "sequential", timings, seconds, process_cpu_s=time.process_time() - cpu
    )
    scaled = len(timed) < len(workload)
    result |= {
        "requests_timed": len(timed),
        "timed_request_indices": chosen,
        "scaled": scaled,
        "note": (
            f"timed {len(timed)} of {len(workload)} requests, evenly spaced in order of size; "
            "output_tokens_per_s is theirs and stands for the whole workload; "
            "estimated_seconds scales their time by output tokens"
            if scaled
            else "every request timed"
        ),
        "estimated_seconds": seconds * sum(workload.output_lens) / sum(timed.output_lens),
        "ttft_includes_queueing": False,
    }
    return result


# ---- setup -------------------------------------------------------------------------------


def resolve_model(model: str | None, cache_dir: Path) -> str:
    """A path or hub id as given; a name from RANDOM_LLAMA_SHAPES is built locally."""
    from services.models import RANDOM_LLAMA_SHAPES, ensure_random_llama, resolve_model_path

    if model in RANDOM_LLAMA_SHAPES:
        return str(ensure_random_llama(cache_dir, model))
    return resolve_model_path(model, cache_dir)


def ordinary_token_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of the model's vocabulary that are not special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]


def _warm_up_engine(engine: LLMEngine, workload: Workload, concurrency: int) -> None:
    warm = Workload(
        [p[:16] for p in workload.prompts[:concurrency]], [4] * min(concurrency, len(workload))
    )
    for req in _engine_requests(warm, "warm-"):
        engine.add_request(req)
    while engine.has_unfinished_requests():
        engine.step()


def _engine_config(args: argparse.Namespace, concurrency: int, workload: Workload):
    from services.engine import EngineConfig

    longest = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens, strict=True))
    kv_tokens = args.kv_tokens or concurrency * (longest + args.block_size)
    return EngineConfig(
        max_num_seqs=concurrency,
        kv_cache_tokens=kv_tokens,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max(longest, 16),
        # Every method computes every prompt: a warm-up pass must not leave the measured
        # one its prompts cached (bench/bench_prefix_cache.py measures the cache).
        enable_prefix_caching=False,
    )


@dataclass
class _Setup:
    path: str
    tokenizer: Any
    engine_model: torch.nn.Module
    generate_model: torch.nn.Module | None
    workload: Workload
    pad_token_id: int


def _setup(args: argparse.Namespace, with_generate: bool) -> _Setup:
    import torch

    from services.models import load_model, load_tokenizer
    from services.settings import get_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model, args.cache_dir or get_settings().cache_dir)
    tokenizer = load_tokenizer(path)
    # The engine swaps the attention of its model, so generate gets its own copy.
    engine_model = load_model(path, args.device, args.dtype)
    generate_dtype = args.generate_dtype or args.dtype
    generate_model = load_model(path, args.device, generate_dtype) if with_generate else None
    vocab = int(engine_model.config.vocab_size)
    workload = make_workload(
        args.num_requests,
        args.prompt_len,
        (args.min_output, args.max_output),
        ordinary_token_ids(tokenizer, vocab),
        args.seed,
    )
    workload.logprobs = args.logprobs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _Setup(path, tokenizer, engine_model, generate_model, workload, pad)


def _header(args: argparse.Namespace, setup: _Setup) -> dict[str, Any]:
    import torch
    import transformers

    model = setup.engine_model
    return {
        "benchmark": "engine",
        "model": args.model or Path(setup.path).name,
        "model_path": setup.path,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "generate_dtype": (
            None
            if setup.generate_model is None
            else str(next(setup.generate_model.parameters()).dtype).removeprefix("torch.")
        ),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": args.seed,
        "loadavg_start": os.getloadavg(),
    }


def _new_engine(args: argparse.Namespace, setup: _Setup, concurrency: int) -> LLMEngine:
    from services.engine import LLMEngine

    config = _engine_config(args, concurrency, setup.workload)
    return LLMEngine(setup.engine_model, setup.tokenizer, config, args.device)


def _config_dict(engine: LLMEngine) -> dict[str, int]:
    c = engine.config
    return {
        "max_num_seqs": c.max_num_seqs,
        "kv_cache_tokens": c.num_blocks * c.block_size,
        "block_size": c.block_size,
        "max_num_batched_tokens": c.max_num_batched_tokens,
    }


# ---- comparison mode ---------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle one for an even count), with
    every run's throughput attached: on a shared machine single runs are noisy."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    chosen = ordered[(len(ordered) - 1) // 2]
    return chosen | {"runs_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs]}


def measure(args: argparse.Namespace) -> dict:
    """The comparison at every concurrency level; returns the JSON-ready result."""
    setup = _setup(args, with_generate=True)
    workload = setup.workload
    assert setup.generate_model is not None
    gen_model, pad, device = setup.generate_model, setup.pad_token_id, args.device
    result = _header(args, setup) | {
        "workload": workload.summary()
        | {
            "prompt_len": list(args.prompt_len),
            "output_len": [args.min_output, args.max_output],
            "distribution": "uniform",
            "sampling": "greedy, ignore_eos",
            "engine_logprobs": args.logprobs,
        },
        "repeats": args.repeats,
        "levels": [],
    }
    sequential_runs: list[dict[str, Any]] = []
    sequential: dict[str, Any] = {}
    for concurrency in args.concurrency:
        engine = _new_engine(args, setup, concurrency)
        _warm_up_engine(engine, workload, concurrency)
        warm = [p[:16] for p in workload.prompts[:concurrency]]
        generate_batch(gen_model, warm, 4, pad, device)
        engine_runs, static_runs = [], []
        for _ in range(args.repeats):  # interleaved, so a noisy spell hits every method
            if not sequential:  # the same at every level: measured with the first one
                sequential_runs.append(
                    run_sequential(gen_model, workload, args.max_sequential_requests, pad, device)
                )
            engine_runs.append(run_engine(engine, workload) | {"config": _config_dict(engine)})
            static_runs.append(run_static(gen_model, workload, concurrency, pad, device))
        if not sequential:
            sequential = result["sequential"] = median_run(sequential_runs)
        del engine
        engine_result, static = median_run(engine_runs), median_run(static_runs)
        level = {
            "concurrency": concurrency,
            "engine": engine_result,
            "static": static,
            "sequential": sequential,
            "engine_vs_sequential": speedup(engine_result, sequential),
            "engine_vs_static": speedup(engine_result, static),
            "static_vs_sequential": speedup(static, sequential),
            "engine_vs_static_per_repeat": [
                speedup(e, st) for e, st in zip(engine_runs, static_runs, strict=True)
            ],
            "per_cpu_second": {
                "engine_vs_sequential": speedup(engine_result, sequential, CPU_KEY),
                "engine_vs_static": speedup(engine_result, static, CPU_KEY),
                "static_vs_sequential": speedup(static, sequential, CPU_KEY),
            },
        }
        result["levels"].append(level)
        log.info(
            "bench_level",
            concurrency=concurrency,
            engine_tokens_per_s=round(engine_result["output_tokens_per_s"], 1),
            static_tokens_per_s=round(static["output_tokens_per_s"], 1),
            engine_vs_sequential=round(level["engine_vs_sequential"], 2),
            engine_vs_static=round(level["engine_vs_static"], 2),
        )
    result["loadavg_end"] = os.getloadavg()
    return result


# ---- memory mode -------------------------------------------------------------------------


def measure_memory(args: argparse.Namespace) -> dict:
    """Stream requests through one engine for ``args.duration`` seconds, ``concurrency``
    in flight, sampling RSS every ``args.sample_interval`` seconds."""
    setup = _setup(args, with_generate=False)
    concurrency = max(args.concurrency)
    engine = _new_engine(args, setup, concurrency)
    _warm_up_engine(engine, setup.workload, concurrency)
    pool = list(_engine_requests(setup.workload, "mem-"))
    rng = random.Random(args.seed)
    in_flight: set[str] = set()
    submitted = completed = tokens = 0

    def submit() -> None:
        nonlocal submitted
        template = rng.choice(pool)
        request_id = f"mem-{submitted}"
        engine.add_request(type(template)(request_id, template.prompt_token_ids, template.sampling))
        in_flight.add(request_id)
        submitted += 1

    start = time.perf_counter()
    samples: list[tuple[float, float]] = [(0.0, rss_bytes() / MB)]
    next_sample = args.sample_interval
    while (elapsed := time.perf_counter() - start) < args.duration:
        while len(in_flight) < concurrency:
            submit()
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                in_flight.discard(out.request_id)
                completed += 1
        if elapsed >= next_sample:
            samples.append((elapsed, rss_bytes() / MB))
            next_sample += args.sample_interval
    for request_id in list(in_flight):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    seconds = time.perf_counter() - start
    samples.append((seconds, rss_bytes() / MB))
    ys = [m for _, m in samples]
    return _header(args, setup) | {
        "mode": "memory",
        "duration_s": seconds,
        "concurrency": concurrency,
        "config": _config_dict(engine),
        "requests_completed": completed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "rss_start_mb": ys[0],
        "rss_end_mb": ys[-1],
        "rss_max_mb": max(ys),
        "rss_slope_mb_per_min": rss_slope_per_min(samples),
        # Buffers that grow to the largest batch seen settle in the first moments.
        "rss_slope_after_first_10pct_mb_per_min": rss_slope_per_min(samples, 0.1 * seconds),
        "rss_samples": [[round(t, 2), round(m, 2)] for t, m in samples],
        "note": "RSS sampled from /proc/self/statm after model load and engine warm-up",
    }


# ---- CLI -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers like 1,4,16")
    return values


def _int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError("expected LOW:HIGH with 1 <= LOW <= HIGH")
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="path or hub id; llama-100m or llama-1b builds a random Llama of that size locally "
        "(default: the built-in tiny model)",
    )
    parser.add_argument("--device", default="cpu")
    dtypes = ["auto", "float32", "float16", "bfloat16"]
    parser.add_argument("--dtype", default="auto", choices=dtypes)
    parser.add_argument(
        "--generate-dtype",
        default=None,
        choices=dtypes,
        help="dtype of the generate baselines (default: --dtype); e.g. float32 to compare a "
        "bf16 engine with generate at its fastest on a CPU",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=_int_range, default=(32, 256), help="LOW:HIGH")
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per method (interleaved); the median is kept"
    )
    parser.add_argument(
        "--max-sequential-requests",
        type=int,
        default=8,
        help="sequential generate calls timed; throughput is per token over them",
    )
    parser.add_argument(
        "--kv-tokens", type=int, default=0, help="KV pool (0: enough for every running request)"
    )
    parser.add_argument(
        "--logprobs", type=int, default=None,
        help="engine requests also return K alternatives' log-probabilities (their cost)",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where models are built")
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="memory mode: stream requests through the engine for this many seconds",
    )
    parser.add_argument("--sample-interval", type=float, default=5.0, help="memory mode RSS period")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")


def run(args: argparse.Namespace) -> int:
    if args.min_output < 1 or args.max_output < args.min_output or args.num_requests < 1:
        raise SystemExit("need 1 <= --min-output <= --max-output and --num-requests >= 1")
    if args.repeats < 1 or args.max_sequential_requests < 1:
        raise SystemExit("--repeats and --max-sequential-requests must be at least 1")
    if args.logprobs is not None and not 0 <= args.logprobs <= MAX_LOGPROBS:
        raise SystemExit(f"--logprobs must be in [0, {MAX_LOGPROBS}]")
    result = measure_memory(args) if args.duration > 0 else measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
