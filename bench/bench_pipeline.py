"""Requests/s and latency through the whole pipeline (gateway -> scorer -> scheduler -> worker).

    python bench/bench_pipeline.py --url http://127.0.0.1:8000 --api-key sk-fairway-dev \
        --num-requests 200 --concurrency 16 --max-tokens 16

Streams every request so time to first token is measured; prints JSON with
``vllm bench serve``-style key names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from services.settings import DEFAULT_MODEL_NAME


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, args, i: int) -> tuple[float, float, int]:
    body = {"model": args.model, "prompt": f"request {i}: tell me something", "max_tokens": args.max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - start, tokens


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=300, limits=limits) as client:
        await one(client, args, -1)  # warm-up
        sem = asyncio.Semaphore(args.concurrency)

        async def bounded(i: int):
            async with sem:
                return await one(client, args, i)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.num_requests)))
        duration = time.perf_counter() - start
    ttfts = [r[0] * 1000 for r in results]
    e2el = [r[1] * 1000 for r in results]
    out_tokens = sum(r[2] for r in results)
    return {
        "num_requests": args.num_requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "duration_s": duration,
        "request_throughput": args.num_requests / duration,
        "output_throughput": out_tokens / duration,
        "mean_ttft_ms": statistics.fmean(ttfts), "median_ttft_ms": percentile(ttfts, 50),
        "p99_ttft_ms": percentile(ttfts, 99),
        "mean_e2el_ms": statistics.fmean(e2el), "median_e2el_ms": percentile(e2el, 50),
        "p99_e2el_ms": percentile(e2el, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="sk-fairway-dev")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
