"""``fairway provision`` on a real node: every service's and tenant's RabbitMQ user, with
least privilege, and the topology, through the management API. (``fairway amqp-user``,
one tenant's user on the node ``fairway up`` started, is tested in test_up.py.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services import topology
from services.client import AmqpClient
from services.localinfra import RabbitServer, free_port, rabbitmqctl
from services.provision import SERVICE_USERS, VHOST, plan
from tests.integration.system import run_fairway

pytestmark = pytest.mark.integration


def permissions(rabbit: RabbitServer, vhost: str) -> dict[str, tuple[str, str, str]]:
    out = rabbitmqctl(rabbit, "list_permissions", "-p", vhost, "--quiet", "--no-table-headers")
    return {user: (configure, write, read)
            for user, configure, write, read in (line.split("\t") for line in out.splitlines())}


async def reply_queue_of(url: str) -> str:
    """What a producer's client declares, which its user must be allowed to."""
    async with AmqpClient(url) as client:
        return client.reply_queue.name


def test_provision_makes_every_user_and_the_topology_through_the_management_api(tmp_path: Path):
    rabbit = RabbitServer(workdir=tmp_path / "rabbit", management_port=free_port())
    rabbit.start()
    try:
        rabbitmqctl(rabbit, "add_user", "admin", "admin-secret")
        rabbitmqctl(rabbit, "set_user_tags", "admin", "administrator")
        passwords = {user: f"{service}-secret" for service, user in SERVICE_USERS.items()}
        env = {
            "FAIRWAY_PROVISION_API": f"http://127.0.0.1:{rabbit.management_port}",
            "FAIRWAY_PROVISION_ADMIN_USER": "admin",
            "FAIRWAY_PROVISION_ADMIN_PASSWORD": "admin-secret",
            "FAIRWAY_PROVISION_TENANTS": "acme:acme-secret",
            "FAIRWAY_PROVISION_AMQP_HOST": f"127.0.0.1:{rabbit.port}",
            **{f"FAIRWAY_PROVISION_{service.upper()}_PASSWORD": passwords[user]
               for service, user in SERVICE_USERS.items()},
        }
        done = run_fairway({**os.environ, **env}, "provision")
        assert done.returncode == 0, done.stderr
        expected = plan(passwords, {"acme": "acme-secret"})
        granted = permissions(rabbit, VHOST)
        assert {user: granted.get(user) for user in expected} == {
            user: (grant.configure, grant.write, grant.read) for user, (_, grant) in expected.items()}
        queues = rabbitmqctl(rabbit, "list_queues", "-p", VHOST, "--quiet", "--no-table-headers",
                             "name").split()
        assert set(topology.SHARED_QUEUES) <= set(queues)
        url = f"amqp://acme:acme-secret@127.0.0.1:{rabbit.port}/{VHOST}"
        assert asyncio.run(reply_queue_of(url)).startswith(f"{topology.REPLY_QUEUE_PREFIX}.acme.")
        assert run_fairway({**os.environ, **env}, "provision").returncode == 0  # again: idempotent
    finally:
        rabbit.stop()
