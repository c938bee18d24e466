"""The control-plane benchmark's messaging floor on a real broker: RabbitMQ's own counters
see the floor's messages, its costs are measured, and the bound is their arithmetic."""

from __future__ import annotations

import aio_pika
import pytest

from bench import bench_control_plane as bench
from services.localinfra import RabbitServer
from tests.integration.system import own_vhost

pytestmark = pytest.mark.integration


async def test_messaging_floor_measures_the_messages_the_broker_counts(rabbit_server: RabbitServer):
    url = own_vhost(rabbit_server, "messaging-floor")
    counters = bench.BrokerCounters(rabbit_server)
    before = counters.sample()
    floor = await bench.messaging_floor(
        url, bench.descendants(rabbit_server.proc.pid), messages=300, latency_samples=20)
    after = counters.sample()

    sent = 300 + 20
    assert after["published"] - before["published"] >= sent
    assert after["delivered_quorum"] - before["delivered_quorum"] >= sent
    assert after["acknowledged"] - before["acknowledged"] >= sent
    per_request = bench.BrokerCounters.per_request(before, after, 20)
    assert per_request["published"] >= sent / 20
    assert per_request["delivered"] == round(
        per_request["delivered_quorum"] + per_request["delivered_classic"], 2)

    assert floor["queue_type"] == "quorum"
    for step in ("publish", "deliver"):
        assert floor[step]["broker_cpu_ms"] >= 0
        assert floor[step]["client_cpu_ms"] > 0
        assert floor[step]["messages_per_s"] > 0
    assert 0 < floor["hop_latency_ms"]["median"] <= floor["hop_latency_ms"]["p99"]

    # The floor's queue is gone: the benchmark leaves nothing on the broker.
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_queue(bench.FLOOR_QUEUE, passive=True)
    finally:
        await conn.close()
