"""What a batch costs interactive traffic, on a running system, and how fast it runs.

    FAIRWAY_API_KEYS=light:sk-light,batch:sk-batch fairway up
    python bench/bench_batch.py --url http://127.0.0.1:8000 \
        --light-key sk-light --batch-key sk-batch --json batch.json

An interactive tenant sends short streamed requests one after another (as
``bench_tenant_isolation.py``'s light tenant) in three phases: alone; while another
tenant's batch of ``--batch-requests`` long requests runs through the Batch API (in the
background: the scheduler starts a batch request only when no other request waits);
and while the same requests are sent as ordinary streams, ``--direct-concurrency`` at a
time (what a client without the Batch API does). It reports the interactive tenant's
latency in each phase (``vllm bench serve``'s key names), each over alone
(``*_e2el_ratio``), and the batch work's output throughput during the interactive phase
and, for the batch, over its whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time

import httpx
from bench_tenant_isolation import latency, light_arguments, light_phase, print_report

from services.benchmark.metrics import RequestRecord
from services.benchmark.serve import discover_model, stream_completion


def batch_rows(model: str, args) -> list[dict]:
    return [{"custom_id": f"job-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": f"Tell a long story {i}.", "max_tokens": args.batch_max_tokens,
                      "ignore_eos": True}} for i in range(args.batch_requests)]


async def run_batch(client: httpx.AsyncClient, args, rows: list[dict]) -> str:
    auth = {"Authorization": f"Bearer {args.batch_key}"}
    data = "\n".join(json.dumps(row) for row in rows).encode()
    uploaded = await client.post(f"{args.url}/v1/files", headers=auth, data={"purpose": "batch"},
                                 files={"file": ("jobs.jsonl", io.BytesIO(data))})
    uploaded.raise_for_status()
    created = await client.post(f"{args.url}/v1/batches", headers=auth, json={
        "input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    created.raise_for_status()
    return created.json()["id"]


async def batch_state(client: httpx.AsyncClient, args, batch_id: str) -> dict:
    answer = await client.get(f"{args.url}/v1/batches/{batch_id}",
                              headers={"Authorization": f"Bearer {args.batch_key}"})
    answer.raise_for_status()
    return answer.json()


async def batch_phase(client, endpoint, args, model, clock) -> dict:
    batch_id = await run_batch(client, args, batch_rows(model, args))
    started = clock()
    while (await batch_state(client, args, batch_id))["request_counts"]["completed"] < 1:
        await asyncio.sleep(0.2)  # under way: its requests hold slots
    before = await batch_state(client, args, batch_id)
    window_start = clock()
    beside = await light_phase(client, endpoint, args, model, clock)
    window = clock() - window_start
    after = await batch_state(client, args, batch_id)
    while after["status"] not in ("completed", "failed", "expired", "cancelled"):
        await asyncio.sleep(0.5)
        after = await batch_state(client, args, batch_id)
    whole = clock() - started
    answered = after["request_counts"]["completed"] - before["request_counts"]["completed"]
    return {"interactive": latency(beside), "batch_status": after["status"],
            "batch_requests_completed": after["request_counts"]["completed"],
            "batch_output_tokens": after["usage"]["output_tokens"],
            "batch_output_throughput": after["usage"]["output_tokens"] / whole,
            "batch_duration_s": whole,
            # Requests the batch finished while the interactive tenant ran (no per-request times).
            "batch_requests_per_s_beside": answered / window}


async def direct_phase(client, endpoint, args, model, clock) -> dict:
    rows = batch_rows(model, args)
    done: list[RequestRecord] = []
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)

    async def sender() -> None:
        while not queue.empty():
            row = queue.get_nowait()
            record = RequestRecord(index=len(done), tenant="batch", scheduled_time=clock())
            request = {**row["body"], "stream": True, "stream_options": {"include_usage": True}}
            await stream_completion(client, endpoint, request, args.batch_key, record, clock)
            done.append(record)

    started = clock()
    senders = [asyncio.create_task(sender()) for _ in range(args.direct_concurrency)]
    while not done:
        await asyncio.sleep(0.2)
    before, window_start = len(done), clock()
    beside = await light_phase(client, endpoint, args, model, clock)
    window = clock() - window_start
    answered = len(done) - before
    await asyncio.gather(*senders)
    whole = clock() - started
    return {"interactive": latency(beside), "direct_requests_completed": sum(r.success for r in done),
            "direct_output_throughput": sum(r.output_tokens for r in done if r.success) / whole,
            "direct_duration_s": whole, "direct_requests_per_s_beside": answered / window}


async def run(args) -> dict:
    model = args.model or await discover_model(args.url, args.light_key)
    endpoint = f"{args.url.rstrip('/')}/v1/completions"
    clock = time.perf_counter
    limits = httpx.Limits(max_connections=args.direct_concurrency + 8)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        alone = latency(await light_phase(client, endpoint, args, model, clock))
        batch = await batch_phase(client, endpoint, args, model, clock)
        direct = await direct_phase(client, endpoint, args, model, clock)
    report = {"config": {k: v for k, v in vars(args).items() if "key" not in k}, "model": model,
              "alone": alone, "beside_batch": batch, "beside_direct": direct}
    if alone.get("mean_e2el_ms"):
        for name, phase in (("batch", batch), ("direct", direct)):
            if phase["interactive"].get("mean_e2el_ms"):
                report[f"{name}_e2el_ratio"] = phase["interactive"]["mean_e2el_ms"] / alone["mean_e2el_ms"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    light_arguments(parser)
    parser.add_argument("--batch-key", required=True)
    parser.add_argument("--batch-requests", type=int, default=48)
    parser.add_argument("--batch-max-tokens", type=int, default=128)
    parser.add_argument("--direct-concurrency", type=int, default=8,
                        help="the same as the gateway's FAIRWAY_BATCH_CONCURRENCY, for a like comparison")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.url = args.url.rstrip("/")
    print_report(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
