"""Private Redis and RabbitMQ server processes on loopback, for `fairway up` and tests.

Fault-injection tests kill and restart them, so each is a small process handle
rather than a fixture-only context.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and that this process has not handed out
    before: whoever gets one binds it later (a service starting up), and the kernel may
    offer the same free port to the next caller in between (two services of one test
    system were given one port)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class RedisServer:
    """redis-server on loopback with AOF persistence (appendfsync everysec)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def up_infra_dir(cache_dir: Path) -> Path:
    """Where ``fairway up`` keeps the Redis and RabbitMQ servers it starts itself."""
    return Path(cache_dir).expanduser() / "infra"


def pid_alive(pid_file: Path) -> bool:
    """The process a pid file names is running."""
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@dataclass
class RabbitServer:
    """A private RabbitMQ node (own node name, ports and data dir)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    management_port: int | None = None
    """Where the management plugin's HTTP API listens on loopback; None: not enabled."""

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def nodename(self) -> str:
        return f"fairway{self.port}@localhost"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.workdir),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq"),
            RABBITMQ_PID_FILE=str(self.workdir / "pid"),
        )
        return env

    def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = "loopback_users = none\n"
        plugins = "[]"
        if self.management_port is not None:
            plugins = "[rabbitmq_management]"
            config += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
        (self.workdir / "enabled_plugins").write_text(f"{plugins}.\n")
        (self.workdir / "rabbitmq.conf").write_text(config)
        # The child keeps its own copy of the log's descriptor; ours can close right away.
        with open(self.workdir / "stdout.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_BIN)],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, timeout)
        if self.management_port is not None:
            wait_for_port(self.management_port, timeout)

    def kill(self) -> None:
        """kill -9 the whole node (beam and epmd children of its session)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def rabbitmqctl(server: RabbitServer, *args: str) -> str:
    """Run ``rabbitmqctl`` against a private node (user and permission management)."""
    out = subprocess.run(
        [str(RABBITMQ_BIN.with_name("rabbitmqctl")), "-n", server.nodename, *args],
        env=server.env(), capture_output=True, text=True, timeout=60, check=True,
    )
    return out.stdout


@contextlib.asynccontextmanager
async def memory_alarm(server: RabbitServer) -> AsyncIterator[None]:
    """Raise the node's memory alarm, as RabbitMQ does when it runs short of memory (a
    watermark of 1 byte), and restore the watermark after: every connection that
    publishes meanwhile is blocked."""
    def ctl(*args: str) -> str:
        return rabbitmqctl(server, *args).strip()

    watermark = await asyncio.to_thread(ctl, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", "absolute", "1")
    try:
        yield
    finally:
        # The watermark reads as a fraction (0.4), or as {absolute,Bytes} or {relative,F}.
        kind, _, value = watermark.strip("{}").rpartition(",")
        restore = ["absolute", value] if kind == "absolute" else [value]
        await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", *restore)
