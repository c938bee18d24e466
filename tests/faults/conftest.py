"""The fault suite's own servers and system, and the shared checker.

The suite kills and restarts RabbitMQ and Redis, so it does not use the session's
servers: it starts its own pair on loopback (same classes), provisions least-privilege
RabbitMQ users on a dedicated vhost for every service and AMQP tenant
(:mod:`services.provision`, as ``fairway provision`` does), declares the topology as the
administrator, and runs every service as a real subprocess under its own user (two CPU
workers, so one can die). Service AMQP links go through a :class:`TcpProxy` each,
which scenarios stall or cut.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import hypothesis  # noqa: F401  (imported early: its lazy import at session end trips on trio)
import pytest
import redis.asyncio as aioredis

from services import keys
from services.localinfra import RabbitServer, RedisServer, rabbitmqctl
from services.provision import SERVICE_USERS, VHOST, declare_topology, plan, provision_rabbitmqctl
from tests.faults.checker import Checker
from tests.faults.proxy import TcpProxy
from tests.integration.system import TENANT_KEYS, System

_CHECKERS: list[Checker] = []

WORKERS = ("cpu-worker-a", "cpu-worker-b")
AMQP_TENANTS = ("initech", "umbrella")
SERVICE_ENV = {
    "FAIRWAY_DECLARE_TOPOLOGY": "false",
    "FAIRWAY_TRUSTED_AMQP_USERS": SERVICE_USERS["gateway"],
    "FAIRWAY_AMQP_HEARTBEAT_S": "2",  # a dead or stalled peer is noticed within seconds
    "FAIRWAY_LEASE_TTL_S": "1",
    "FAIRWAY_WORKER_TIMEOUT_S": "3",
    "FAIRWAY_REQUEST_TIMEOUT_S": "60",
    "FAIRWAY_MAX_RUNNING": "4",
    # Admission: the overload scenario bursts at 3x this; the others stay within it.
    "FAIRWAY_MAX_QUEUED_PER_TENANT": "8",
    "FAIRWAY_MAX_QUEUED_TOKENS_PER_TENANT": "600",
    "FAIRWAY_MAX_QUEUED_TOTAL": "16",
    # Any wait for a slot has running background requests handed back: the hand-back
    # scenario and the soak's batches exercise it whatever the speed of the machine.
    "FAIRWAY_PREEMPT_BACKGROUND_AFTER_S": "0",
}


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter):
    for checker in _CHECKERS:
        if checker.all_rows():
            path = checker.write()
            terminalreporter.write_sep("=", f"fault scenarios (also in {path}.md/.json)")
            terminalreporter.write(checker.markdown())


@dataclass
class FaultSystem:
    """The running system plus handles on everything a scenario may break."""

    system: System
    rabbit: RabbitServer
    redis: RedisServer
    amqp_url: str
    """Admin URL on the Fairway vhost (the checker's tap and test harness)."""
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    """Unix time each service was last (re)started through :meth:`start`."""

    @property
    def gateway_url(self) -> str:
        return self.system.gateway_url

    def start(self, name: str, **env: str) -> None:
        service = "cpu-worker" if name.startswith("cpu-worker") else name
        self.started_at[name] = time.time()
        self.system.start(service, name=name, FAIRWAY_AMQP_URL=self.service_url(name), **env)

    def service_url(self, name: str) -> str:
        """The service's own least-privilege user, through its proxy."""
        user = SERVICE_USERS["worker" if name.startswith("cpu-worker") else name]
        return f"amqp://{user}:{password(user)}@127.0.0.1:{self.proxies[name].port}/{VHOST}"

    def tenant_url(self, tenant: str) -> str:
        """An AMQP producer's URL (straight to the broker)."""
        return f"amqp://{tenant}:{password(tenant)}@127.0.0.1:{self.rabbit.port}/{VHOST}"

    def pid(self, name: str) -> int:
        return self.system.procs[name].pid

    async def wait_workers(self, names=WORKERS, timeout: float = 180) -> None:
        """Until each named worker heartbeats (and the gateway is ready)."""
        client = aioredis.from_url(self.system.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for name, proc in self.system.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{self.system.log(name)[-3000:]}")
                seen = await client.zrangebyscore(keys.WORKERS_SEEN, time.time() - 2, "+inf",
                                                  withscores=True)
                # A restarted worker counts once it beats, not on its killed namesake's last beat.
                alive = {w.decode().removeprefix("cpu-") for w, at in seen
                         if at >= self.started_at.get(w.decode().removeprefix("cpu-"), 0)}
                if all(n in alive for n in names):
                    break
                await asyncio.sleep(0.2)
            else:
                raise TimeoutError(f"workers {names} not heartbeating")
        finally:
            await client.aclose()
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(f"{self.gateway_url}/ready", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("gateway not ready")


@pytest.fixture(scope="package")
def fault_servers(tmp_path_factory) -> Iterator[tuple[RabbitServer, RedisServer]]:
    rabbit = RabbitServer(workdir=tmp_path_factory.mktemp("fault-rabbitmq"))
    redis = RedisServer(workdir=tmp_path_factory.mktemp("fault-redis"))
    rabbit.start()
    redis.start()
    try:
        yield rabbit, redis
    finally:
        rabbit.stop()
        redis.stop()


def password(user: str) -> str:
    return f"secret-{user}"


def provision(rabbit: RabbitServer) -> str:
    """Users and permissions on the Fairway vhost, topology declared; the admin's URL."""
    users = plan({user: password(user) for user in SERVICE_USERS.values()},
                 {tenant: password(tenant) for tenant in AMQP_TENANTS})
    provision_rabbitmqctl(lambda *args: rabbitmqctl(rabbit, *args), users, VHOST)
    rabbitmqctl(rabbit, "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    admin_url = f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{VHOST}"
    asyncio.run(declare_topology(admin_url))
    return admin_url


@pytest.fixture(scope="package")
def fault_system(fault_servers, model_cache, tmp_path_factory) -> Iterator[FaultSystem]:
    rabbit, redis = fault_servers
    admin_url = provision(rabbit)
    names = ("scheduler", "scorer", *WORKERS, "gateway")
    proxies = {name: TcpProxy(rabbit.port).start() for name in names}
    system = System(amqp_url=admin_url, redis_url=redis.url, cache_dir=model_cache,
                    log_dir=tmp_path_factory.mktemp("fault-logs"), extra_env=dict(SERVICE_ENV))
    fs = FaultSystem(system=system, rabbit=rabbit, redis=redis, amqp_url=admin_url, proxies=proxies)
    try:
        for name in names:
            fs.start(name)
        asyncio.run(fs.wait_workers())
        yield fs
    finally:
        system.stop_all()
        for proxy in proxies.values():
            proxy.close()


@pytest.fixture(scope="package")
async def checker(fault_system) -> AsyncIterator[Checker]:
    checker = Checker(fault_system.system.redis_url)
    _CHECKERS.append(checker)
    await checker.start_tap(fault_system.amqp_url)
    try:
        yield checker
    finally:
        await checker.stop_tap()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(90, connect=5)) as client:
        yield client


@pytest.fixture(scope="package")
def keys_by_tenant() -> dict[str, str]:
    return dict(TENANT_KEYS)


__all__ = ["FaultSystem", "rabbitmqctl"]
