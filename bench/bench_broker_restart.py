"""How soon a service publishes again after RabbitMQ restarts; prints JSON.

    python bench/bench_broker_restart.py [--restarts 8] [--intervals 5,1] [--max-down-s 5]
        [--seed 0] [--json OUT.json]

For each reconnect interval it opens a connection as every service does
(``services.amqp.connect`` with ``FAIRWAY_AMQP_RECONNECT_S`` set to that interval) on a
private broker, then restarts the broker ``--restarts`` times, each time leaving it down
for a random extra 0 to ``--max-down-s`` seconds (the same draws for every interval). An
outage of fixed length would land every restart at the same point of the reconnect
schedule; outages of any length are what a deployment meets. After each restart it
measures from the moment the broker accepts a fresh connection (``broker_ready``) to the
service's first publish the broker confirms again (``publishing_again_s``): what the
service loses to waiting between attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services import amqp
from services.localinfra import RabbitServer
from services.logs import configure
from services.settings import Settings

QUEUE = "bench.broker_restart"


async def broker_ready(url: str, timeout_s: float = 120.0) -> float:
    """The moment a fresh connection to the broker opens (it may accept the socket and
    drop it mid-handshake while it boots)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                connection = await aio_pika.connect(url, timeout=2)
            except Exception:  # noqa: BLE001 - booting: refused, dropped or timed out
                await asyncio.sleep(0.02)
                continue
            ready = time.monotonic()
            await connection.close()
            return ready


async def publishing_again(channel: aio_pika.abc.AbstractChannel, timeout_s: float = 120.0) -> float:
    """The moment a publish on the service's channel is confirmed again."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"x"), QUEUE, timeout=1)
                return time.monotonic()
            except Exception:  # noqa: BLE001 - not reconnected yet
                await asyncio.sleep(0.02)


async def measure(server: RabbitServer, interval_s: float, downs_s: list[float]) -> dict:
    settings = Settings(amqp_url=server.url, amqp_reconnect_s=interval_s)
    connection = await amqp.connect(settings, "bench")
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(QUEUE, durable=True)
        delays = []
        for down_s in downs_s:
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(server.start)
            ready = await broker_ready(server.url)
            delays.append(max(0.0, await publishing_again(channel) - ready))
        return {
            "reconnect_interval_s": interval_s,
            "publishing_again_s": [round(d, 3) for d in delays],
            "mean_s": round(statistics.fmean(delays), 3),
            "max_s": round(max(delays), 3),
        }
    finally:
        await connection.close()


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fairway-bench-broker-") as workdir:
        server = RabbitServer(Path(workdir))
        server.start()
        try:
            await broker_ready(server.url)
            rng = random.Random(args.seed)
            downs_s = [rng.uniform(0.0, args.max_down_s) for _ in range(args.restarts)]
            results = [await measure(server, float(i), downs_s) for i in args.intervals.split(",")]
        finally:
            server.stop()
    return {"restarts": args.restarts, "extra_down_s": [round(d, 2) for d in downs_s],
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--max-down-s", type=float, default=5.0,
                        help="each restart leaves the broker down a random 0..this many seconds more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intervals", default="5,1",
                        help="reconnect intervals in seconds, comma-separated (aio-pika's default is 5)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    configure(level="WARNING", service="bench")
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
