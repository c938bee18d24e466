"""Capped recent-event lists in a real Redis: batching, order, cap, failures."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from services.recent import RecentLog, decode_entries, encode_entry

KEY = "fairway:test:recent"


async def test_entries_are_batched_capped_and_newest_first(redis_client) -> None:
    log = RecentLog(redis_client, KEY, cap=5, flush_interval_s=0.2)
    for i in range(8):
        log.add({"i": i})
    assert await redis_client.llen(KEY) == 0  # nothing written before the flush interval
    await asyncio.sleep(0.6)
    entries = decode_entries(await redis_client.lrange(KEY, 0, -1))
    assert [e["i"] for e in entries] == [7, 6, 5, 4, 3]
    log.add({"i": 8})
    await log.close()  # flushes what is left
    assert decode_entries(await redis_client.lrange(KEY, 0, 0)) == [{"i": 8}]
    assert await redis_client.llen(KEY) == 5


async def test_unreachable_redis_drops_entries_quietly() -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    log = RecentLog(client, KEY, cap=3, flush_interval_s=0.01)
    log.add({"message": "x"})
    await log.close()
    await client.aclose()


def test_encoding_survives_odd_text_and_skips_bad_entries() -> None:
    text = encode_entry({"message": "caf\u00e9 \ud800"})
    assert text.isascii()
    assert decode_entries([text, b"{broken", b"[1]", text.encode()]) == [
        {"message": "caf\u00e9 \ud800"}
    ] * 2
