"""What background mode costs a response, on a running system.

    FAIRWAY_API_KEYS=acme:sk-acme fairway up --engine echo
    python bench/bench_background.py --url http://127.0.0.1:8000 --api-key sk-acme --json background.json

Sends the same short Responses API request ``--requests`` times, one after another, in
three ways: waited on (``background`` false, answered whole); in the background and
polled (``GET /v1/responses/{id}`` every ``--poll-ms``) until it ended; in the
background and streamed (``stream`` and ``background``: the time to its first text
delta and to its last event). It reports each way's end-to-end latency (mean, p50, p90,
p99 in ms, as ``vllm bench serve`` names them) and the background ways' over the waited
one. With ``--redis-url``, also the Redis memory a streamed response's kept events take
(``MEMORY USAGE`` of its events over their count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np

from services import keys
from services.benchmark.serve import discover_model


def summary(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s) * 1000.0
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p90_{name}_ms": float(np.percentile(ms, 90)), f"p99_{name}_ms": float(np.percentile(ms, 99))}


async def waited(client: httpx.AsyncClient, body: dict) -> float:
    started = time.perf_counter()
    answer = await client.post("/v1/responses", json=body)
    answer.raise_for_status()
    return time.perf_counter() - started


async def polled(client: httpx.AsyncClient, body: dict, poll_s: float) -> float:
    started = time.perf_counter()
    queued = await client.post("/v1/responses", json={**body, "background": True})
    queued.raise_for_status()
    response_id = queued.json()["id"]
    while True:
        status = (await client.get(f"/v1/responses/{response_id}")).json()["status"]
        if status not in ("queued", "in_progress"):
            return time.perf_counter() - started
        await asyncio.sleep(poll_s)


async def streamed(client: httpx.AsyncClient, body: dict) -> tuple[float, float, str]:
    """(time to the first text delta, time to the last event, response id)."""
    started, first, response_id = time.perf_counter(), None, ""
    async with client.stream("POST", "/v1/responses", json={**body, "background": True, "stream": True}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started, response_id


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=120) as client:
        model = args.model or await discover_model(args.url, args.api_key)
        body = {"model": model, "input": "Count the waves on the shore.", "max_output_tokens": args.max_tokens,
                "ignore_eos": True}
        for _ in range(3):  # warm-up
            await waited(client, body)
        times = {"waited": [], "polled": [], "streamed": [], "streamed_first_delta": []}
        stream_ids = []
        for _ in range(args.requests):
            times["waited"].append(await waited(client, body))
            times["polled"].append(await polled(client, body, args.poll_ms / 1000.0))
            first, last, response_id = await streamed(client, body)
            times["streamed_first_delta"].append(first)
            times["streamed"].append(last)
            stream_ids.append(response_id)
    report: dict = {"model": model, "requests": args.requests, "max_output_tokens": args.max_tokens,
                    "poll_ms": args.poll_ms}
    for name, values in times.items():
        report |= summary(f"{name}_e2el" if name != "streamed_first_delta" else "streamed_ttft", values)
    for way in ("polled", "streamed"):
        report[f"{way}_over_waited_mean_e2el_ms"] = report[f"mean_{way}_e2el_ms"] - report["mean_waited_e2el_ms"]
    if args.redis_url:
        import redis

        r = redis.Redis.from_url(args.redis_url)
        sizes = [(r.memory_usage(keys.background_response_events(i)) or 0, r.xlen(keys.background_response_events(i)))
                 for i in stream_ids]
        report["events_per_streamed_response"] = float(np.mean([n for _, n in sizes]))
        report["redis_bytes_per_event"] = sum(b for b, _ in sizes) / max(1, sum(n for _, n in sizes))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default=None, help="default: the first the gateway serves")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--redis-url", default=None, help="the system's Redis, to size the kept events")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
