"""``fairway up`` (the README's run command) keeps the system up: a service killed with
``kill -9`` is started again, and the restarted gateway frees its previous life's
admission slots and cancels its requests at once.

It runs ``fairway up --no-infra --engine echo`` against the session's servers, on its
own RabbitMQ vhost and Redis database.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import redis

from services import keys
from services.localinfra import free_port
from services.settings import DEFAULT_MODEL_NAME
from tests.integration.system import TENANT_KEYS, own_redis_db, own_vhost, run_fairway

pytestmark = pytest.mark.integration

KEY = TENANT_KEYS["acme"]
ROOT = Path(__file__).resolve().parents[2]


def started_pids(log: Path, name: str) -> list[int]:
    """Pids of every start of ``name`` that ``fairway up`` logged, in order."""
    return [int(pid) for pid in re.findall(rf"started {name}\b[^\n]*\(pid (\d+)\)", log.read_text())]


def start_up(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--engine", "echo", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_up(up: subprocess.Popen, log: Path) -> None:
    up.send_signal(signal.SIGTERM)
    try:
        code = up.wait(60)
    except subprocess.TimeoutExpired:
        up.kill()
        raise
    assert code == 0, log.read_text()[-3000:]


def complete(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": DEFAULT_MODEL_NAME, "prompt": "again", "max_tokens": 3},
                      timeout=30)


def up_env(**env: str) -> dict[str, str]:
    return {**os.environ, "FAIRWAY_API_KEYS": f"acme:{KEY}", "FAIRWAY_METRICS_PORT": "0",
            "FAIRWAY_LOG_FORMAT": "json", "FAIRWAY_MAX_MODEL_LEN": "1024", "FAIRWAY_THREADS": "1",
            **env}


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_restarts_a_killed_gateway_which_frees_what_its_last_life_held(
        rabbit_server, redis_server, model_cache, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    redis_url = own_redis_db(redis_server, 3)
    env = up_env(FAIRWAY_AMQP_URL=own_vhost(rabbit_server, "fairway-up"), FAIRWAY_REDIS_URL=redis_url,
                 FAIRWAY_CACHE_DIR=str(model_cache), FAIRWAY_PORT=str(port),
                 FAIRWAY_ECHO_TOKENS_PER_S="200")
    log = tmp_path / "up.log"
    up = start_up(env, log, "--no-infra")
    store = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: ready(url), 120, "fairway up never became ready")
        body = {"model": DEFAULT_MODEL_NAME, "prompt": "outlive me", "max_tokens": 1000,
                "stream": True, "ignore_eos": True}  # 5 s at 200 tokens/s
        with pytest.raises(httpx.HTTPError), httpx.stream(
                "POST", f"{url}/v1/completions", json=body,
                headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                    assert store.zcard(keys.tenant_inflight("acme")) == 1
                    os.kill(started_pids(log, "gateway")[-1], signal.SIGKILL)
                    break
            for _ in lines:  # until the connection breaks
                pass
        killed_at = time.monotonic()
        wait_until(lambda: len(started_pids(log, "gateway")) == 2, 30, "the gateway was not restarted")
        wait_until(lambda: store.zcard(keys.tenant_inflight("acme")) == 0, 30,
                   "the killed gateway's admission slot is still held")
        freed_after = time.monotonic() - killed_at
        assert store.hexists(keys.request_markers(request_id), keys.MARKER_CANCELLED)
        print(f"\nkilled gateway's slot freed {freed_after:.1f} s after the kill")
        assert freed_after < 15, f"slot freed only after {freed_after:.1f} s"
        wait_until(lambda: ready(url), 60, "the restarted gateway never became ready")
        answer = complete(url)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert "gateway exited with -9" in log.read_text()
    finally:
        store.close()
        stop_up(up, log)


def test_up_restarts_the_redis_server_it_started(model_cache, tmp_path):
    """With no Redis at the configured URL, ``fairway up`` runs its own; killed, it comes
    back on its append-only file and the services carry on without a restart of their own.

    The README's AMQP producer steps work on the RabbitMQ node it started: ``fairway
    amqp-user`` reaches that node (a bare ``rabbitmqctl`` does not), and the example
    producer, as that user, gets its answer.

    Its ``FAIRWAY_MAX_MODEL_LEN`` is above the model's own context (2048): every service
    serves the model's, so the gateway advertises it and the scorer, not a worker, refuses
    a prompt over it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for built in model_cache.iterdir():  # the tiny model, without building it again
        (cache / built.name).symlink_to(built)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = up_env(FAIRWAY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                 FAIRWAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                 FAIRWAY_CACHE_DIR=str(cache), FAIRWAY_PORT=str(port), FAIRWAY_MAX_MODEL_LEN="4096")
    log = tmp_path / "up.log"
    up = start_up(env, log)
    try:
        wait_until(lambda: ready(url), 180, "fairway up never became ready")
        assert complete(url).status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        card = httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()["data"][0]
        assert card["max_model_len"] == 2048
        too_long = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30, json={
            "model": DEFAULT_MODEL_NAME, "prompt": "word " * 800, "max_tokens": 100})  # 2500 tokens
        assert too_long.status_code == 400, too_long.text
        error = too_long.json()["error"]
        assert error["code"] == "context_length_exceeded" and "is 2048 tokens" in error["message"]
        os.kill(started_pids(log, "redis-server")[-1], signal.SIGKILL)
        wait_until(lambda: len(started_pids(log, "redis-server")) == 2, 30, "Redis was not restarted")
        wait_until(lambda: ready(url), 60, "the system did not recover")
        answer = complete(url)
        assert answer.status_code == 200, answer.text
        text = log.read_text()
        assert "redis-server exited with -9" in text
        assert not re.search(r"(gateway|scorer|scheduler|cpu-worker) exited", text), text[-3000:]

        made = run_fairway(env, "amqp-user", "acme", "acme-secret")
        assert made.returncode == 0, made.stderr
        refused = run_fairway(env, "amqp-user", "acme.other", "x")
        assert refused.returncode == 2 and "use 1-64 letters" in refused.stderr
        amqp_port = urlparse(env["FAIRWAY_AMQP_URL"]).port
        produced = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "amqp_producer.py"), "--max-tokens", "5",
             "--url", f"amqp://acme:acme-secret@127.0.0.1:{amqp_port}/", "Hello"],
            env=env, capture_output=True, text=True, timeout=60, check=False)
        assert produced.returncode == 0, produced.stderr
        assert "[length; " in produced.stderr and "5 completion tokens]" in produced.stderr
    finally:
        stop_up(up, log)
