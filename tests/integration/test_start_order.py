"""Services started before Redis or RabbitMQ wait for them, then work; a SIGTERM while
they wait ends them at once.

Services start in any order (compose restarts, a Redis restart during a rollout): one
that exits because Redis is not up yet silently shrinks the system.
"""

from __future__ import annotations

import functools
import signal
import time
from urllib.parse import urlparse

import pytest
import redis
import uvloop
from aio_pika.exceptions import ChannelPreconditionFailed
from structlog.testing import capture_logs

from services import amqp, backoff, keys
from services import messages as m
from services.localinfra import RabbitServer, RedisServer, free_port
from services.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.integration.system import System, own_redis_db, own_vhost

pytestmark = pytest.mark.integration


def test_a_worker_and_a_scorer_started_before_redis_wait_for_it(rabbit_server, model_cache, tmp_path):
    port = free_port()
    system = System(amqp_url=own_vhost(rabbit_server, "worker-start"), redis_url=f"redis://127.0.0.1:{port}/0",
                    cache_dir=model_cache, log_dir=tmp_path)
    procs = {"early-worker": system.start("cpu-worker", name="early-worker"),
             "early-scorer": system.start("scorer", name="early-scorer")}
    server = RedisServer(workdir=tmp_path / "redis", port=port)
    try:
        _wait_for_log(system, procs, "waiting_for_redis")

        server.start()
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        beat = None
        while beat is None and time.monotonic() < deadline:
            beat = client.hget(keys.WORKERS, "cpu-early-worker")
            time.sleep(0.2)
        assert beat is not None, system.log("early-worker")[-3000:]
        assert m.decode(beat, m.WorkerHeartbeat).pool == "cpu"
        client.close()
        _wait_for_log(system, {"early-scorer": procs["early-scorer"]}, "scorer_started")
    finally:
        system.stop_all()
        server.stop()


def test_services_started_before_the_broker_wait_for_it_and_stop_on_sigterm(redis_server, model_cache,
                                                                           tmp_path):
    rabbit = RabbitServer(workdir=tmp_path / "rabbitmq")
    system = System(amqp_url=rabbit.url, redis_url=own_redis_db(redis_server, 4), cache_dir=model_cache,
                    log_dir=tmp_path)
    names = {"early-scheduler": "scheduler", "early-scorer": "scorer", "early-worker": "cpu-worker"}
    procs = {name: system.start(service, name=name) for name, service in names.items()}
    try:
        _wait_for_log(system, procs, "waiting_for_broker")
        # A signal while waiting ends the process at once and cleanly.
        started = time.monotonic()
        assert system.signal("early-scheduler", signal.SIGTERM, wait=20) == 0
        assert time.monotonic() - started < 10
        del procs["early-scheduler"]

        rabbit.start()
        client = redis.Redis.from_url(system.redis_url)
        deadline = time.monotonic() + 60
        while client.hget(keys.WORKERS, "cpu-early-worker") is None:
            assert procs["early-worker"].poll() is None, system.log("early-worker")[-3000:]
            assert time.monotonic() < deadline, "the worker never heartbeat"
            time.sleep(0.2)
        client.close()
        _wait_for_log(system, {"early-scorer": procs["early-scorer"]}, "scorer_started")
    finally:
        system.stop_all()
        rabbit.stop()


def test_a_broker_that_drops_connections_mid_handshake_is_waited_for(rabbit_server, monkeypatch):
    """A broker that is booting or shutting down takes the socket and drops it before the
    handshake; under uvloop aiormq then raises ``StopAsyncIteration`` (3-7% of tries here)
    as well as ``AMQPConnectionError``. The soak test caught a scorer that exited on it
    and left its queue unserved for 2.5 minutes."""
    monkeypatch.setattr(backoff, "FIRST_DELAY_S", 0.001)
    monkeypatch.setattr(amqp, "retry_until_up", functools.partial(backoff.retry_until_up, max_delay_s=0.001))
    url = urlparse(rabbit_server.url)
    proxy = TcpProxy(url.port).start()
    proxy.cut(refuse_s=4.0)  # every connection in the next 4 s is taken and dropped at once
    settings = Settings(amqp_url=url._replace(netloc=f"{url.netloc.rsplit(':', 1)[0]}:{proxy.port}").geturl())

    async def connect_and_close() -> None:
        connection = await amqp.connect(settings, "booting-test")
        await connection.close()

    try:
        with capture_logs() as logs:
            uvloop.run(connect_and_close())
    finally:
        proxy.close()
    assert proxy.connections == 1
    assert sum(x["event"] == "waiting_for_broker" for x in logs) >= 100, "too few dropped tries to tell"


async def test_a_broker_lost_while_setting_up_is_waited_for_and_a_wrong_topology_is_fatal(
        rabbit_server, monkeypatch):
    """Connect and set up (channel, queues, consumers) are retried together: a broker that
    goes away between them is waited for, each failed try's connection is closed; a queue
    that exists with other arguments fails at once (no retry fixes it)."""
    monkeypatch.setattr(backoff, "FIRST_DELAY_S", 0.001)
    settings = Settings(amqp_url=rabbit_server.url)
    tries = []

    async def set_up(connection):
        tries.append(connection)
        if len(tries) < 3:
            await connection.close()  # the broker went away after the handshake
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        return queue.name

    connection, queue = await amqp.open_until_up(settings, "set-up-test", set_up)
    try:
        assert len(tries) == 3 and connection is tries[2] and not connection.is_closed
        assert all(c.is_closed for c in tries[:2]) and queue
        channel = await connection.channel()
        await channel.declare_queue("fairway.test.set-up", durable=False, auto_delete=True)

        async def declare_it_durable(connection):
            tries.append(connection)
            channel = await connection.channel()
            await channel.declare_queue("fairway.test.set-up", durable=True)

        with pytest.raises(ChannelPreconditionFailed):
            await amqp.open_until_up(settings, "set-up-test", declare_it_durable)
        assert len(tries) == 4 and tries[3].is_closed
    finally:
        await connection.close()


def test_a_scorer_with_a_broken_artifact_fails_at_once_not_after_redis(model_cache, tmp_path):
    """A wrong setting is reported as soon as the service starts, not hidden behind
    ``waiting_for_redis`` until the infrastructure is up."""
    artifact = tmp_path / "predictor.npz"
    artifact.write_text("not an artifact")
    system = System(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                    redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_dir=model_cache,
                    log_dir=tmp_path)
    proc = system.start("scorer", FAIRWAY_PREDICTOR_ARTIFACT=str(artifact))
    try:
        assert proc.wait(60) == 1
    finally:
        system.stop_all()
    log = system.log("scorer")
    assert "not a predictor artifact of `fairway predictor train`" in log
    assert "waiting_for_redis" not in log


def _wait_for_log(system: System, procs: dict, event: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        while event not in system.log(name):
            assert proc.poll() is None, f"{name} exited: {system.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never logged {event}"
            time.sleep(0.2)


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler of its own for SIGTERM (Linux's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("service", ["scorer", "gateway"])
def test_a_sigterm_while_a_service_imports_its_modules_stops_it_cleanly(redis_server, rabbit_server,
                                                                       model_cache, tmp_path, service):
    """The soak test sent a SIGTERM to a scorer 2 s after it was started: it was still
    importing torch, before its event loop put its handlers in, and the signal killed it
    (exit -15). The process catches stop signals from its first line on, so it exits 0."""
    system = System(amqp_url=own_vhost(rabbit_server, f"early-stop-{service}"),
                    redis_url=own_redis_db(redis_server, 5), cache_dir=model_cache, log_dir=tmp_path)
    proc = system.start(service)
    try:
        deadline = time.monotonic() + 10
        while not catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, system.log(service)[-3000:]
            time.sleep(0.005)
        assert "_started" not in system.log(service) and "heap_frozen" not in system.log(service)
    finally:
        code = system.signal(service, signal.SIGTERM, wait=60)
    assert code == 0, system.log(service)[-3000:]
    assert "stop_requested_while_starting" in system.log(service)
