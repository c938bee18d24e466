"""An AMQP producer's streams (``services.client.AmqpClient``) across broker outages, on a
private RabbitMQ node behind a TCP proxy that can cut the client's link.

The client's reply queue outlives its connection and the broker keeps the replies it
confirmed, even through ``kill -9``: a stream goes on once the client has reconnected,
with what was sent while it was away. A broker that stays away too long ends each open
stream with one clear error.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from services import topology
from services.client import AmqpClient
from services.localinfra import RabbitServer, rabbitmqctl
from tests.faults.proxy import TcpProxy
from tests.integration.replies import ANSWER, Worker, chunk, final, read
from tests.integration.system import own_vhost
from tests.waits import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(tmp_path):
    """A private broker with the topology declared, and a proxy in front of it."""
    server = RabbitServer(tmp_path / "rabbit")
    await asyncio.to_thread(server.start)
    proxy = TcpProxy(server.port).start()
    try:
        connection = await aio_pika.connect(server.url)
        async with connection:
            await topology.declare(await connection.channel())
        yield server, proxy
    finally:
        proxy.close()
        await asyncio.to_thread(server.stop)


def client_url(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def queues(server: RabbitServer) -> list[str]:
    """``name  messages_ready  messages_unacknowledged`` of every queue on the node."""
    listed = await asyncio.to_thread(rabbitmqctl, server, "list_queues", "-q", "--no-table-headers",
                                     "name", "messages_ready", "messages_unacknowledged")
    return listed.splitlines()


def ready(rows: list[str], queue: str) -> int:
    """Messages ready in ``queue``, from :func:`queues`."""
    return next(int(row.split("\t")[1]) for row in rows if row.startswith(f"{queue}\t"))


async def test_a_stream_lives_through_a_broker_crash_with_its_replies_in_the_queue(broker):
    server, proxy = broker
    async with AmqpClient(client_url(proxy), reconnect_s=0.3) as client:
        request = client.completion("tiny", "weather?", max_tokens=len(ANSWER))
        stream = await client.publish(request)
        rid, queue = request.request_id, client.reply_queue.name
        worker = Worker(server.url, queue)
        await worker.send(chunk(rid, 0, 2))
        await until(lambda: stream.ready, timeout_s=30)
        assert await read(stream) == ("Sunny", [])

        proxy.cut(refuse_s=600)  # the client is away ...
        await until(lambda: not client.connected, timeout_s=30)
        await worker.send(chunk(rid, 2, 4), chunk(rid, 4, 6), final(rid))  # ... as the rest is sent
        # Those three wait in the queue (with the first chunk, if its ack was not sent yet).
        assert ready(await queues(server), queue) in (3, 4)
        # RabbitMQ 3.10 writes a queue's declaration to Mnesia's log in the background: a
        # kill -9 within seconds of declaring the client's queue lost it once on a loaded
        # CI machine ("Recovering 0 queues of type rabbit_classic_queue"), and the replies
        # with it. A broker that has been up a while has synced it, as here.
        await asyncio.to_thread(rabbitmqctl, server, "eval", "mnesia:sync_log().")
        await asyncio.to_thread(server.kill)  # and the broker dies with them in the queue
        await asyncio.to_thread(server.start)
        assert not stream.finished

        proxy.cut(refuse_s=0)  # the client may come back
        await until(lambda: stream.finished, timeout_s=60)
        text, finals = await read(stream)
        assert "Sunny" + text == "".join(ANSWER)
        assert [f.finish_reason for f in finals] == ["length"]
        # What the client took it acked, so a dropped link would have it requeued.
        async with asyncio.timeout(10):
            while f"{queue}\t0\t0" not in await queues(server):
                await asyncio.sleep(0.1)
    # A client that closes deletes its queue (one that dies leaves it to expire).
    assert not any(row.startswith(queue) for row in await queues(server))


async def test_streams_fail_when_the_broker_stays_away(broker):
    """The link stalls (no reset: bytes just stop, as on a cut network path), which the
    AMQP heartbeat notices; the broker stays away past the grace, and the open stream
    gets one clear error."""
    _, proxy = broker
    async with AmqpClient(client_url(proxy), reconnect_s=0.3, outage_grace_s=1.0, heartbeat_s=1) as client:
        stream = await client.publish(client.completion("tiny", "weather?", max_tokens=4))
        proxy.stall()
        await asyncio.sleep(0.5)
        assert not stream.finished, "a stream ended when the link stalled"
        await until(lambda: stream.finished, timeout_s=15)
        _, finals = await read(stream)
        assert [(f.finish_reason, f.error.code, f.error.status) for f in finals] == [
            ("error", "broker_connection_lost", 503)]
        # A request sent later, once the broker is back, is served as usual.
        proxy.resume()
        await until(lambda: client.connected, timeout_s=30)
        request = client.completion("tiny", "again?", max_tokens=len(ANSWER))
        stream = await client.publish(request)
        await Worker(client_url(proxy), client.reply_queue.name).send(chunk(request.request_id, 0, 6),
                                                                      final(request.request_id))
        await until(lambda: stream.finished, timeout_s=30)
        text, finals = await read(stream)
        assert (text, [f.finish_reason for f in finals]) == ("".join(ANSWER), ["length"])



async def test_a_client_of_a_system_that_is_not_up_fails_clearly_and_leaves_no_connection(rabbit_server):
    """No topology on the vhost (the system never started): entering the client fails
    with the broker's "not found", and its connection is closed, not left behind."""
    vhost = "client-without-topology"
    url = await asyncio.to_thread(own_vhost, rabbit_server, vhost)
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match="fairway.requests"):
        async with AmqpClient(url):
            pass
    async with asyncio.timeout(10):
        while vhost in (await asyncio.to_thread(rabbitmqctl, rabbit_server, "list_connections", "-q",
                                                "--no-table-headers", "vhost")).split():
            await asyncio.sleep(0.1)
