"""RabbitMQ users for every service and tenant, each with least-privilege permissions.

Everything lives on a dedicated vhost (``fairway`` by default). The topology (exchanges,
queues, bindings) is declared once by an administrator (:func:`declare_topology`); the
services then run with ``FAIRWAY_DECLARE_TOPOLOGY=false`` and only check it exists, so
none of them may create or delete a shared queue. What each user may touch (RabbitMQ's
three regular expressions: configure = declare/delete, write = publish/bind, read =
consume/bind):

======================  ========================  ==============================  ============================
user                    configure                 write                           read
======================  ========================  ==============================  ============================
fairway-gateway         its reply queues          fairway.requests,               its reply queues
                                                  fairway.control (cancels)
fairway-scorer          nothing                   fairway.scored, amq.default     fairway.scorer,
                                                  (error replies)                 fairway.scorer.feedback
fairway-scheduler       its control queues        fairway.work, amq.default,      fairway.scheduler,
                                                  its control queues              fairway.scheduler.events,
                                                                                  fairway.control, its
                                                                                  control queues
fairway-worker          its control queues        fairway.events, amq.default,    fairway.work.<pool>,
                                                  its control queues              fairway.control, its
                                                                                  control queues
<tenant>                its reply queues          fairway.requests                its reply queues
======================  ========================  ==============================  ============================

"Its reply queues" are ``fairway.replies.<user>.*`` and "its control queues"
``fairway.control.<user>.*``. A tenant therefore cannot read another tenant's replies,
publish a cancel, read work, or publish anywhere but the requests exchange; and since
RabbitMQ checks the ``user_id`` property against the authenticated user, it cannot claim
to be another tenant either (the scorer takes the tenant from ``user_id``; only the
gateway's user is trusted to name the tenant of an HTTP request). A limitation of
RabbitMQ: publishing to the default exchange (``amq.default``, how replies reach a
reply queue) cannot be limited per queue, so the services that answer (scorer,
scheduler, workers) may publish to any queue by name; tenants get no such right.

Two ways to apply it: :func:`provision_rabbitmqctl` on the broker's host (tests, and
``fairway amqp-user`` for one tenant) and :func:`provision_http` through the management
API (``fairway provision``, e.g. as a one-shot job beside the broker).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from services import topology

VHOST = "fairway"
SERVICE_USERS = {
    "gateway": "fairway-gateway",
    "scorer": "fairway-scorer",
    "scheduler": "fairway-scheduler",
    "worker": "fairway-worker",
}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Grant:
    configure: str
    write: str
    read: str


def check_user_name(name: str) -> str:
    """User names become queue-name prefixes: no dots (``a`` would match ``a.b``'s queues)."""
    if not _NAME.match(name):
        raise ValueError(f"RabbitMQ user {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def _any(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


def _own(prefix: str, user: str) -> str:
    return re.escape(f"{prefix}.{user}.") + ".*"


def service_grants() -> dict[str, Grant]:
    """Permissions of each service's user, by user name."""
    esc = re.escape
    replies = lambda user: _own(topology.REPLY_QUEUE_PREFIX, user)
    control = lambda user: _own(topology.CONTROL_QUEUE_PREFIX, user)
    gw, sc, sh, wk = (SERVICE_USERS[k] for k in ("gateway", "scorer", "scheduler", "worker"))
    pools = "|".join(esc(topology.work_queue(pool)) for pool in topology.POOLS)
    return {
        gw: Grant(_any(replies(gw)), _any(esc(topology.REQUESTS_EXCHANGE), esc(topology.CONTROL_EXCHANGE)),
                  _any(replies(gw))),
        sc: Grant("^$", _any(esc(topology.SCORED_EXCHANGE), "amq\\.default"),
                  _any(esc(topology.SCORER_QUEUE), esc(topology.SCORER_FEEDBACK_QUEUE))),
        sh: Grant(_any(control(sh)), _any(esc(topology.WORK_EXCHANGE), esc(topology.CONTROL_EXCHANGE),
                                          "amq\\.default", control(sh)),
                  _any(esc(topology.SCHEDULER_QUEUE), esc(topology.SCHEDULER_EVENTS_QUEUE),
                       esc(topology.CONTROL_EXCHANGE), control(sh))),
        wk: Grant(_any(control(wk)), _any(esc(topology.EVENTS_EXCHANGE), "amq\\.default", control(wk)),
                  _any(pools, esc(topology.CONTROL_EXCHANGE), control(wk))),
    }


def tenant_grant(user: str) -> Grant:
    """An AMQP producer: its own reply queues, and publishing requests; nothing else."""
    own = _any(_own(topology.REPLY_QUEUE_PREFIX, check_user_name(user)))
    return Grant(own, _any(re.escape(topology.REQUESTS_EXCHANGE)), own)


def plan(passwords: dict[str, str], tenants: dict[str, str]) -> dict[str, tuple[str, Grant]]:
    """User -> (password, grant) for the service users in ``passwords`` and every tenant."""
    grants = service_grants()
    users = {user: (password, grants[user]) for user, password in passwords.items()}
    for user, password in tenants.items():
        if user in grants:
            raise ValueError(f"tenant {user!r} would take a service's user name")
        users[user] = (password, tenant_grant(user))
    return users


def provision_rabbitmqctl(run: Callable[..., str], users: dict[str, tuple[str, Grant]],
                          vhost: str = VHOST) -> None:
    """Apply with ``rabbitmqctl`` (``run(*args)`` runs it; idempotent)."""
    if vhost not in run("list_vhosts", "--quiet", "--no-table-headers").split():
        run("add_vhost", vhost)
    existing = {line.split("\t")[0] for line in
                run("list_users", "--quiet", "--no-table-headers").splitlines()}
    for user, (password, grant) in users.items():
        check_user_name(user)
        if user in existing:
            run("change_password", user, password)
        else:
            run("add_user", user, password)
        run("set_permissions", "-p", vhost, user, grant.configure, grant.write, grant.read)


def local_rabbitmqctl(amqp_url: str, cache_dir: Path) -> Callable[..., str]:
    """``run(*args)`` with ``rabbitmqctl`` for the broker of ``amqp_url`` on this machine:
    the private node ``fairway up`` started under its cache directory when that one runs
    (its own node name and Erlang cookie), else the machine's own node."""
    from services.localinfra import RabbitServer, pid_alive, rabbitmqctl, up_infra_dir

    private = RabbitServer(workdir=up_infra_dir(cache_dir) / "rabbitmq",
                           port=urlparse(amqp_url).port or 5672)
    if pid_alive(private.workdir / "pid"):
        return lambda *args: rabbitmqctl(private, *args)
    return lambda *args: subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                                        timeout=60, check=True).stdout


def provision_http(api_url: str, admin: tuple[str, str], users: dict[str, tuple[str, Grant]],
                   vhost: str = VHOST, timeout: float = 30.0) -> None:
    """Apply through the management HTTP API (idempotent PUTs)."""
    import httpx

    with httpx.Client(base_url=api_url.rstrip("/"), auth=admin, timeout=timeout) as client:
        v = quote(vhost, safe="")
        client.put(f"/api/vhosts/{v}").raise_for_status()
        client.put(f"/api/permissions/{v}/{quote(admin[0], safe='')}",
                   json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
        for user, (password, grant) in users.items():
            u = quote(check_user_name(user), safe="")
            client.put(f"/api/users/{u}", json={"password": password, "tags": ""}).raise_for_status()
            client.put(f"/api/permissions/{v}/{u}", json={
                "configure": grant.configure, "write": grant.write, "read": grant.read,
            }).raise_for_status()


async def declare_topology(admin_url: str) -> None:
    """Declare every exchange, queue and binding once, as an administrator."""
    import aio_pika

    connection = await aio_pika.connect(admin_url)
    try:
        await topology.declare(await connection.channel())
    finally:
        await connection.close()


def _pairs(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        user, sep, password = item.partition(":")
        if not sep or not password:
            raise ValueError(f"expected user:password, got {item!r}")
        out[check_user_name(user)] = password
    return out


def main(env: dict[str, str] | None = None) -> int:
    """``fairway provision``: users, permissions and topology from ``FAIRWAY_PROVISION_*``.

    - ``FAIRWAY_PROVISION_API``: management API, e.g. ``http://rabbitmq:15672``
    - ``FAIRWAY_PROVISION_ADMIN_USER`` / ``_ADMIN_PASSWORD``: the broker's administrator
    - ``FAIRWAY_PROVISION_VHOST`` (default ``fairway``)
    - ``FAIRWAY_PROVISION_<SERVICE>_PASSWORD`` for GATEWAY, SCORER, SCHEDULER, WORKER
    - ``FAIRWAY_PROVISION_TENANTS``: ``user:password,...`` of AMQP producers (optional)
    - ``FAIRWAY_PROVISION_AMQP_HOST`` (default ``rabbitmq:5672``) to declare the topology
    """
    env = dict(os.environ if env is None else env)
    vhost = env.get("FAIRWAY_PROVISION_VHOST", VHOST)
    required = ["FAIRWAY_PROVISION_API", "FAIRWAY_PROVISION_ADMIN_USER",
                "FAIRWAY_PROVISION_ADMIN_PASSWORD",
                *(f"FAIRWAY_PROVISION_{service.upper()}_PASSWORD" for service in SERVICE_USERS)]
    missing = [name for name in required if not env.get(name)]
    if missing:
        print(f"fairway provision: set {', '.join(missing)}", file=sys.stderr)
        return 2
    admin = (env["FAIRWAY_PROVISION_ADMIN_USER"], env["FAIRWAY_PROVISION_ADMIN_PASSWORD"])
    passwords = {user: env[f"FAIRWAY_PROVISION_{service.upper()}_PASSWORD"]
                 for service, user in SERVICE_USERS.items()}
    try:
        users = plan(passwords, _pairs(env.get("FAIRWAY_PROVISION_TENANTS", "")))
    except ValueError as exc:
        print(f"fairway provision: {exc}", file=sys.stderr)
        return 2
    provision_http(env["FAIRWAY_PROVISION_API"], admin, users, vhost)
    host = env.get("FAIRWAY_PROVISION_AMQP_HOST", "rabbitmq:5672")
    url = f"amqp://{quote(admin[0], safe='')}:{quote(admin[1], safe='')}@{host}/{quote(vhost, safe='')}"
    asyncio.run(declare_topology(url))
    print(f"fairway: provisioned {len(users)} RabbitMQ users on vhost {vhost!r}", file=sys.stderr)
    return 0
