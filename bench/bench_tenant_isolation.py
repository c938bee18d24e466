"""How much a heavy tenant slows a light one, on a running system.

    FAIRWAY_API_KEYS=light:sk-light,heavy:sk-heavy fairway up
    python bench/bench_tenant_isolation.py --url http://127.0.0.1:8000 \
        --light-key sk-light --heavy-key sk-heavy --json isolation.json

The light tenant sends short streamed requests one after another (``--light-requests``,
``--light-max-tokens``, EOS ignored), first alone, then while the heavy tenant keeps
``--heavy-streams`` long requests in flight. It reports the light tenant's latency in
both phases (``vllm bench serve``'s key names) and ``e2el_ratio``: its mean end-to-end
latency beside the heavy tenant over alone (issue 4's goal: at most 1.2), and the heavy
tenant's output throughput meanwhile. VTC puts the light tenant's request first, and
the slot kept for tenants with nothing in flight (``FAIRWAY_IDLE_TENANT_SLOTS``) lets it
start at once even when the heavy tenant fills every other slot; what is left is
sharing decode steps, whose cost on a CPU grows with the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np

from services.benchmark.metrics import RequestRecord
from services.benchmark.serve import discover_model, stream_completion


def body(model: str, max_tokens: int, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


def latency(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.success]
    e2el = [(r.end_time - r.send_time) * 1000 for r in ok]
    ttft = [(r.chunk_times[0] - r.send_time) * 1000 for r in ok]
    tpot = [(r.end_time - r.chunk_times[0]) * 1000 / (r.output_tokens - 1)
            for r in ok if r.output_tokens > 1]
    out = {"completed": len(ok), "failed": len(records) - len(ok)}
    for name, values in (("e2el", e2el), ("ttft", ttft), ("tpot", tpot)):
        if values:
            out |= {f"mean_{name}_ms": float(np.mean(values)),
                    f"median_{name}_ms": float(np.median(values)),
                    f"p90_{name}_ms": float(np.percentile(values, 90))}
    return out


async def light_phase(client: httpx.AsyncClient, endpoint: str, args, model: str,
                      clock) -> list[RequestRecord]:
    records = []
    for i in range(args.light_requests):
        record = RequestRecord(index=i, tenant="light", scheduled_time=clock())
        await stream_completion(client, endpoint, body(model, args.light_max_tokens, f"Say hi {i}."),
                                args.light_key, record, clock)
        records.append(record)
        await asyncio.sleep(args.light_gap_s)
    return records


async def heavy_load(client: httpx.AsyncClient, endpoint: str, args, model: str, clock,
                     stop: asyncio.Event, done: list[RequestRecord]) -> None:
    async def one_stream(slot: int) -> None:
        n = 0
        while not stop.is_set():
            record = RequestRecord(index=n, tenant="heavy", scheduled_time=clock())
            await stream_completion(client, endpoint,
                                    body(model, args.heavy_max_tokens, f"Tell a long story {slot}-{n}."),
                                    args.heavy_key, record, clock)
            done.append(record)
            n += 1

    await asyncio.gather(*(one_stream(slot) for slot in range(args.heavy_streams)))


async def run(args) -> dict:
    model = args.model or await discover_model(args.url, args.light_key)
    endpoint = f"{args.url.rstrip('/')}/v1/completions"
    clock = time.perf_counter
    limits = httpx.Limits(max_connections=args.heavy_streams + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        alone = await light_phase(client, endpoint, args, model, clock)
        stop, heavy_done = asyncio.Event(), []
        heavy = asyncio.create_task(heavy_load(client, endpoint, args, model, clock, stop, heavy_done))
        await asyncio.sleep(args.warmup_s)
        started, before = clock(), len(heavy_done)
        beside = await light_phase(client, endpoint, args, model, clock)
        window = clock() - started
        finished_in_window = [r for r in heavy_done[before:] if r.success]
        stop.set()
        await heavy
    report = {"config": {k: v for k, v in vars(args).items() if "key" not in k}, "model": model,
              "alone": latency(alone), "beside_heavy": latency(beside),
              "heavy_output_throughput": sum(r.output_tokens for r in finished_in_window) / window,
              "heavy_failed": sum(not r.success for r in heavy_done)}
    if report["alone"].get("mean_e2el_ms") and report["beside_heavy"].get("mean_e2el_ms"):
        report["e2el_ratio"] = report["beside_heavy"]["mean_e2el_ms"] / report["alone"]["mean_e2el_ms"]
    return report


def light_arguments(parser: argparse.ArgumentParser) -> None:
    """The server and the light (interactive) tenant's requests."""
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--light-key", required=True)
    parser.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    parser.add_argument("--light-requests", type=int, default=20)
    parser.add_argument("--light-max-tokens", type=int, default=20)
    parser.add_argument("--light-gap-s", type=float, default=0.2)


def print_report(report: dict, path: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    light_arguments(parser)
    parser.add_argument("--heavy-key", required=True)
    parser.add_argument("--heavy-streams", type=int, default=40,
                        help="more than a worker's slots (FAIRWAY_MAX_RUNNING, 32) fills them")
    parser.add_argument("--heavy-max-tokens", type=int, default=300)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print_report(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
