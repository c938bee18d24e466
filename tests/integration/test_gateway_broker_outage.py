"""The gateway's streams across a broker outage, on a private RabbitMQ node restarted
mid-stream and the shared Redis.

A stream stays open while the broker is away and goes on once the gateway has reconnected:
its reply queue outlives the link, and a worker that resumes the request sends again what
came before its resume point, which fills what never reached the queue. A request that
got done meanwhile without its final answer reaching the gateway gets one clear error,
as does every stream still open when the broker stays away too long.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest

from services import keys, topology
from services.gateway.backend import Backend
from services.gateway.metrics import GatewayMetrics
from services.localinfra import RabbitServer, rabbitmqctl
from services.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.integration.replies import ANSWER, Worker, chunk, final, read, request
from tests.waits import until

pytestmark = pytest.mark.integration

@pytest.fixture
async def gateway(tmp_path, redis_url, request):
    """A gateway backend on its own broker node; ``request.param``: settings to change."""
    server = RabbitServer(tmp_path / "rabbit")
    await asyncio.to_thread(server.start)
    proxy = TcpProxy(server.port).start()
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", redis_url=redis_url,
                        model_name="tiny",
                        instance_id=f"outage-{uuid.uuid4().hex[:8]}", amqp_reconnect_s=0.5,
                        heartbeat_interval_s=0.2, **getattr(request, "param", {}))
    backend = Backend(settings, GatewayMetrics("tiny"))
    backend.link_loss.grace_s = 0.5
    backend.start()
    try:
        await until(lambda: backend.amqp_connected, timeout_s=60)
        yield backend, server, proxy
    finally:
        await backend.close()
        proxy.close()
        await asyncio.to_thread(server.stop)


async def test_streams_go_on_after_a_broker_restart_and_a_lost_answer_is_an_error(gateway, redis_client):
    backend, server, _ = gateway
    worker = Worker(server.url, backend.reply_queue_name)
    running, done_unanswered = f"run-{uuid.uuid4().hex}", f"lost-{uuid.uuid4().hex}"
    streams = {rid: (await backend.submit(request(rid), time.time())).stream.stream
               for rid in (running, done_unanswered)}
    await worker.send(chunk(running, 0, 2))
    await until(lambda: streams[running].ready, timeout_s=60)
    assert await read(streams[running]) == ("Sunny", [])

    await asyncio.to_thread(server.stop)
    await asyncio.sleep(1.0)  # longer than the grace of an answer lost: nothing is judged while away
    assert not any(s.finished for s in streams.values()), "a stream ended when the link dropped"
    await asyncio.to_thread(server.start)
    await until(lambda: backend.amqp_connected, timeout_s=60)

    # Chunk 2-3 never reached the queue (its publish died with the broker); the worker
    # resuming from its point at token 4 sends tokens 0-3 again, then the rest and the end.
    await worker.send(chunk(running, 0, 4), chunk(running, 4, 6), final(running))
    await until(lambda: streams[running].finished, timeout_s=60)
    text, finals = await read(streams[running])
    assert "Sunny" + text == "".join(ANSWER)
    assert [f.finish_reason for f in finals] == ["length"]
    # The queue survived the restart, and what the gateway took it acked (so that a
    # dropped link would have the broker requeue what it had in transit).
    listed = await asyncio.to_thread(rabbitmqctl, server, "list_queues", "-q", "--no-table-headers",
                                     "name", "durable", "messages_ready", "messages_unacknowledged")
    assert f"{backend.reply_queue_name}\ttrue\t0\t0" in listed.splitlines(), listed

    # Done (its completion event reached the scheduler) with its answer lost by the broker.
    await redis_client.hset(keys.request_markers(done_unanswered), keys.MARKER_DONE, "1")
    await until(lambda: streams[done_unanswered].finished, timeout_s=10)
    _, finals = await read(streams[done_unanswered])
    assert [(f.finish_reason, f.error.code, f.error.status) for f in finals] == [
        ("error", "broker_connection_lost", 503)]
    assert not await redis_client.hexists(keys.request_markers(done_unanswered), keys.MARKER_CANCELLED)
    metrics = backend.metrics.render().decode()
    assert 'fairway:gateway_broker_outage_streams_total{outcome="open"} 2.0' in metrics
    assert 'fairway:gateway_broker_outage_streams_total{outcome="answer_lost"} 1.0' in metrics


async def test_an_answer_sent_while_the_gateway_is_away_reaches_it(gateway, redis_client):
    """The whole answer arrives and the request is done while the gateway's link is cut;
    then the broker is killed (``kill -9``) and started again. The answer waits in the
    queue through both, and the done marker is no loss while the gateway cannot read it."""
    backend, server, proxy = gateway
    backend.link_loss.grace_s = 0.1  # two housekeeping rounds, well within a reconnect attempt
    rid = f"away-{uuid.uuid4().hex}"
    stream = (await backend.submit(request(rid), time.time())).stream.stream
    proxy.cut(refuse_s=600)
    await until(lambda: not backend.amqp_connected, timeout_s=30)
    await Worker(server.url, backend.reply_queue_name).send(chunk(rid, 0, 6), final(rid))
    await redis_client.hset(keys.request_markers(rid), keys.MARKER_DONE, "1")
    await asyncio.sleep(2.0)  # ten housekeeping rounds
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)
    assert not stream.finished

    proxy.cut(refuse_s=0)
    await until(lambda: stream.finished, timeout_s=60)
    text, finals = await read(stream)
    assert (text, [f.finish_reason for f in finals]) == ("".join(ANSWER), ["length"])
    assert 'outcome="answer_lost"' not in backend.metrics.render().decode()


@pytest.mark.parametrize("gateway", [{"broker_outage_grace_s": 1.0}], indirect=True)
async def test_streams_fail_when_the_broker_stays_away_and_their_requests_are_cancelled(gateway, redis_client):
    backend, server, _ = gateway
    rid = f"away-{uuid.uuid4().hex}"
    stream = (await backend.submit(request(rid), time.time())).stream.stream
    await asyncio.to_thread(server.stop)
    await until(lambda: stream.finished, timeout_s=10)
    _, finals = await read(stream)
    assert [(f.finish_reason, f.error.code) for f in finals] == [("error", "broker_connection_lost")]
    assert backend.link_loss.watched == []
    # A reconnect attempt that fails calls the close callbacks again: the failed stream
    # has nothing more to wait for and is not watched again.
    backend._on_connection_lost()
    assert backend.link_loss.watched == []
    assert 'fairway:gateway_broker_outage_streams_total{outcome="failed"} 1.0' in backend.metrics.render().decode()

    async def cancelled() -> bool:
        return bool(await redis_client.hexists(keys.request_markers(rid), keys.MARKER_CANCELLED))
    async with asyncio.timeout(10):  # written by the housekeeping loop, broker or not
        while not await cancelled():
            await asyncio.sleep(0.1)


async def test_a_reply_queue_left_with_other_arguments_is_declared_anew(amqp_url, redis_url):
    """An earlier life of the gateway (another version) left its queue with arguments
    this one does not declare, which the broker refuses to change: the gateway deletes
    that queue and declares its own rather than fail to start."""
    settings = Settings(amqp_url=amqp_url, redis_url=redis_url, model_name="tiny",
                        instance_id=f"args-{uuid.uuid4().hex[:8]}")
    backend = Backend(settings, GatewayMetrics("tiny"))
    old_arguments = {"x-expires": (topology.REPLY_QUEUE_EXPIRES_S + 60) * 1000}
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(backend.reply_queue_name, durable=True, arguments=old_arguments)
        backend.start()
        try:
            await until(lambda: backend.amqp_connected, timeout_s=30)
        finally:
            await backend.close()
        # Declaring it as the gateway does succeeds only if those are its arguments now.
        await topology.declare_reply_queue(connection, backend.reply_queue_name)
        channel = await connection.channel()
        await channel.queue_delete(backend.reply_queue_name)
    finally:
        await connection.close()
