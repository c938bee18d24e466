"""A worker started while Redis is down keeps running and heartbeats once Redis is up.

Services start in any order (compose restarts, a Redis restart during a rollout): a
worker whose first heartbeat meets no Redis must not exit, or its pool silently shrinks.
"""

from __future__ import annotations

import time

import pytest
import redis

from services import keys
from services import messages as m
from services.localinfra import RedisServer, free_port
from tests.integration.system import System, own_vhost

pytestmark = pytest.mark.integration


def test_a_worker_started_before_redis_heartbeats_once_redis_is_up(rabbit_server, model_cache, tmp_path):
    port = free_port()
    system = System(amqp_url=own_vhost(rabbit_server, "worker-start"), redis_url=f"redis://127.0.0.1:{port}/0",
                    cache_dir=model_cache, log_dir=tmp_path)
    worker = system.start("cpu-worker", name="early-worker")
    server = RedisServer(workdir=tmp_path / "redis", port=port)
    try:
        deadline = time.monotonic() + 60
        while "heartbeat_failed" not in system.log("early-worker"):
            assert worker.poll() is None, system.log("early-worker")[-3000:]
            assert time.monotonic() < deadline, "the worker never tried to heartbeat"
            time.sleep(0.2)
        assert worker.poll() is None, "the worker exited when Redis was down"

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
    finally:
        system.stop_all()
        server.stop()
