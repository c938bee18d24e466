"""A service's broker connection tries again every ``amqp_reconnect_s`` while the broker
is down, so it is back within about that long once the broker is (aio-pika's default, 5 s,
kept services away for seconds after a restart: ``bench/bench_broker_restart.py``)."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest

from services import amqp
from services.localinfra import RabbitServer
from services.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_service_tries_to_reconnect_every_interval_and_publishes_again(tmp_path, caplog):
    server = RabbitServer(tmp_path / "rabbit")
    server.start()
    try:
        connection = await amqp.connect(Settings(amqp_url=server.url, amqp_reconnect_s=0.5), "test")
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("test.reconnect", durable=True)
        await asyncio.to_thread(server.stop)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aio_pika.robust_connection"):
            await asyncio.sleep(3.0)
        attempts = [r for r in caplog.records if r.getMessage().startswith("Connection attempt")]
        assert len(attempts) >= 3, [r.getMessage() for r in attempts]  # one per 5 s by default
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(60):
            while True:
                try:
                    await channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name, timeout=1)
                    break
                except Exception:  # noqa: BLE001 - not reconnected yet
                    await asyncio.sleep(0.05)
        await connection.close()
    finally:
        server.stop()
