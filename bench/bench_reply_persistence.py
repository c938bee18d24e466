"""What keeping replies through a broker crash costs, and whether they are kept; prints JSON.

    python bench/bench_reply_persistence.py [--messages 20000] [--kept 200] [--json OUT.json]

Replies go to a caller's reply queue with ``services.amqp.reply`` (persistent), and the
gateway's and an AMQP client's reply queues are durable (``topology.declare_reply_queue``),
so the broker keeps what it confirmed through a restart. On a private broker this measures:

- ``cost``: for an exclusive queue (what AMQP clients had before, where persistence is
  moot), a durable queue with transient messages and one with persistent messages (what
  replies are now): messages/s through one publisher with confirms (64 in flight) and one
  consumer acking every 50 messages, and the broker's CPU per message (its processes'
  user + system time from ``/proc``). The client is the bottleneck of messages/s on a
  small machine; the broker's CPU is the cost.
- ``kept``: ``--kept`` confirmed messages each, transient and persistent, left in a durable
  queue with no consumer, then the broker killed with ``kill -9`` and started again: how
  many of each are still there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_control_plane import cpu_seconds, descendants
from services import topology
from services.localinfra import RabbitServer

BODY = b"x" * 120
"""About a token chunk's size."""
ACK_EVERY = 50
WINDOW = 64


def broker_cpu_s(server: RabbitServer) -> float:
    """User + system CPU seconds of the broker's processes."""
    assert server.proc is not None
    return sum(cpu_seconds(pid) for pid in descendants(server.proc.pid))


async def through(server: RabbitServer, mode: str, messages: int) -> dict:
    connection = await aio_pika.connect(server.url)
    try:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        name = f"bench.reply_persistence.{mode}.{time.monotonic_ns()}"
        if mode == "exclusive":
            queue = await consumer.declare_queue(name, exclusive=True)
        else:
            queue = await topology.declare_reply_queue(connection, name)
        got, done = 0, asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            got += 1
            if got % ACK_EVERY == 0 or got == messages:
                await message.ack(multiple=True)
            if got == messages:
                done.set()

        await queue.consume(on_message)
        delivery = (aio_pika.DeliveryMode.NOT_PERSISTENT if mode == "durable_transient"
                    else aio_pika.DeliveryMode.PERSISTENT)
        cpu0, started = broker_cpu_s(server), time.perf_counter()
        pending: set[asyncio.Future] = set()
        for _ in range(messages):
            pending.add(asyncio.ensure_future(publisher.default_exchange.publish(
                aio_pika.Message(BODY, delivery_mode=delivery), routing_key=name)))
            if len(pending) >= WINDOW:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        await done.wait()
        elapsed, cpu = time.perf_counter() - started, broker_cpu_s(server) - cpu0
        if mode != "exclusive":
            await queue.delete(if_unused=False, if_empty=False)
        return {"messages_per_s": round(messages / elapsed), "broker_cpu_us_per_message": round(1e6 * cpu / messages, 1)}
    finally:
        await connection.close()


async def fill(server: RabbitServer, kept: int) -> dict[str, str]:
    """``kept`` confirmed messages of each kind in a durable queue of its own."""
    names = {kind: f"bench.reply_persistence.kept.{kind}" for kind in ("transient", "persistent")}
    connection = await aio_pika.connect(server.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for kind, name in names.items():
            await topology.declare_reply_queue(connection, name)
            delivery = aio_pika.DeliveryMode.PERSISTENT if kind == "persistent" else aio_pika.DeliveryMode.NOT_PERSISTENT
            await asyncio.gather(*(channel.default_exchange.publish(aio_pika.Message(BODY, delivery_mode=delivery),
                                                                    routing_key=name) for _ in range(kept)))
    finally:
        await connection.close()
    return names


async def count(server: RabbitServer, names: dict[str, str], timeout_s: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:  # the listener opens before the node takes connections after a crash
        try:
            connection = await aio_pika.connect(server.url)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        channel = await connection.channel()
        out = {}
        for kind, name in names.items():
            queue = await channel.declare_queue(name, passive=True)
            out[kind] = queue.declaration_result.message_count or 0
        return out
    finally:
        await connection.close()


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fairway-bench-persist-") as tmp:
        server = RabbitServer(Path(tmp) / "rabbit")
        await asyncio.to_thread(server.start)
        try:
            cost = {}
            for mode in ("exclusive", "durable_transient", "durable_persistent"):
                await through(server, mode, min(2000, args.messages))  # warm-up
                cost[mode] = await through(server, mode, args.messages)
                print(f"{mode}: {cost[mode]}", file=sys.stderr)
            names = await fill(server, args.kept)
            before = await count(server, names)
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            after = await count(server, names)
        finally:
            await asyncio.to_thread(server.stop)
    return {
        "messages": args.messages,
        "message_bytes": len(BODY),
        "cost": cost,
        "kept": {"confirmed": args.kept, "before_kill": before, "after_kill_9_and_start": after},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--kept", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
