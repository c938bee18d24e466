"""A running Fairway system for integration tests: every service a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.localinfra import RabbitServer, RedisServer, free_port, rabbitmqctl

TENANT_KEYS = {"acme": "sk-acme-test", "globex": "sk-globex-test"}
ADMIN_KEY = "sk-admin-test-dashboard"


def run_fairway(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A ``fairway`` command line as a user runs it, its output captured."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def own_vhost(rabbit: RabbitServer, vhost: str) -> str:
    """An AMQP URL on a fresh vhost, so a system's queues are shared with no other test."""
    rabbitmqctl(rabbit, "add_vhost", vhost)
    rabbitmqctl(rabbit, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{vhost}"


def own_redis_db(redis: RedisServer, db: int) -> str:
    """A Redis URL on database `db`; 0 belongs to the unit tests' flushed client."""
    return f"redis://127.0.0.1:{redis.port}/{db}"


@dataclass
class System:
    amqp_url: str
    redis_url: str
    cache_dir: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """Prometheus port of each started non-gateway process (a free one each)."""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FAIRWAY_AMQP_URL=self.amqp_url,
            FAIRWAY_REDIS_URL=self.redis_url,
            FAIRWAY_CACHE_DIR=str(self.cache_dir),
            FAIRWAY_PORT=str(self.port),
            FAIRWAY_API_KEYS=",".join(f"{t}:{k}" for t, k in TENANT_KEYS.items()),
            FAIRWAY_ADMIN_KEY=ADMIN_KEY,
            FAIRWAY_LOG_FORMAT="json",
            FAIRWAY_INSTANCE_ID=name,
            FAIRWAY_MAX_RUNNING="8",
            FAIRWAY_KV_TOKENS="16384",
            FAIRWAY_MAX_MODEL_LEN="1024",
            FAIRWAY_THREADS="1",
            FAIRWAY_HEARTBEAT_INTERVAL_S="0.5",
            FAIRWAY_TOOL_CALL_PARSER="hermes",
        )
        env.update(self.extra_env)
        return env

    def start(self, service: str, name: str | None = None, **env: str) -> subprocess.Popen:
        name = name or service
        proc_env = self.env(name)
        if service != "gateway":
            self.metrics_ports[name] = free_port()
            proc_env["FAIRWAY_METRICS_PORT"] = str(self.metrics_ports[name])
        proc_env.update(env)
        # The child keeps its own copy of the log's descriptor; ours can close right away.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli", service],
                                    env=proc_env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def signal(self, name: str, sig: int = signal.SIGTERM, wait: float = 30) -> int | None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.signal(name)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)[-3000:]}")
            try:
                last = httpx.get(f"{self.gateway_url}/ready", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.3)
        raise TimeoutError(f"system not ready: {last!r}")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
