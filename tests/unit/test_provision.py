"""Least-privilege RabbitMQ permissions: what each user's regular expressions let through.

The permissions are proven against a real broker by the fault suite (every service runs
as its own user there, and tests/faults/test_isolation.py tries what a tenant must not
do); here the expressions themselves are checked, as RabbitMQ matches them (full match
of a resource name, PCRE syntax that Python's ``re`` shares for these patterns).
"""

from __future__ import annotations

import re

import pytest

from services import provision, topology
from services.provision import (
    SERVICE_USERS,
    Grant,
    check_user_name,
    plan,
    service_grants,
    tenant_grant,
)


def allowed(pattern: str, resource: str) -> bool:
    return re.search(pattern, resource) is not None


GW, SC, SH, WK = (SERVICE_USERS[k] for k in ("gateway", "scorer", "scheduler", "worker"))
SHARED_QUEUES = [topology.SCORER_QUEUE, topology.SCHEDULER_QUEUE, topology.SCHEDULER_EVENTS_QUEUE,
                 topology.SCORER_FEEDBACK_QUEUE, topology.DEAD_LETTER_QUEUE,
                 *[topology.work_queue(p) for p in topology.POOLS]]


def test_no_service_may_configure_a_shared_queue_or_exchange():
    for user, grant in service_grants().items():
        for name in SHARED_QUEUES + [topology.REQUESTS_EXCHANGE, topology.CONTROL_EXCHANGE,
                                     topology.WORK_EXCHANGE, topology.EVENTS_EXCHANGE]:
            assert not allowed(grant.configure, name), (user, name)


@pytest.mark.parametrize(("user", "reads", "not_reads"), [
    (GW, ["fairway.replies.fairway-gateway.gw1"], ["fairway.replies.acme.x", "fairway.scorer"]),
    (SC, ["fairway.scorer", "fairway.scorer.feedback"], ["fairway.scheduler", "fairway.work.cpu"]),
    (SH, ["fairway.scheduler", "fairway.scheduler.events", "fairway.control",
          "fairway.control.fairway-scheduler.abc"], ["fairway.work.cpu", "fairway.control.fairway-worker.x"]),
    (WK, ["fairway.work.cpu", "fairway.work.gpu", "fairway.control",
          "fairway.control.fairway-worker.abc"], ["fairway.scheduler", "fairway.replies.acme.x"]),
])
def test_each_service_reads_only_its_queues(user, reads, not_reads):
    grant = service_grants()[user]
    assert all(allowed(grant.read, name) for name in reads)
    assert not any(allowed(grant.read, name) for name in not_reads)


def test_who_may_publish_where():
    grants = service_grants()
    assert allowed(grants[GW].write, "fairway.requests") and allowed(grants[GW].write, "fairway.control")
    assert not allowed(grants[GW].write, "amq.default")  # the gateway answers nobody over AMQP
    assert not allowed(grants[SC].write, "fairway.control") and allowed(grants[SC].write, "fairway.scored")
    assert allowed(grants[SH].write, "fairway.work") and not allowed(grants[SH].write, "fairway.events")
    assert allowed(grants[SH].write, "fairway.control")  # hand-backs of background requests
    assert allowed(grants[WK].write, "fairway.events") and not allowed(grants[WK].write, "fairway.work")
    assert not allowed(grants[WK].write, "fairway.control")


def test_a_tenant_may_only_publish_requests_and_use_its_own_reply_queues():
    grant = tenant_grant("acme")
    own = topology.reply_queue("acme.1234")
    assert allowed(grant.configure, own) and allowed(grant.read, own)
    for other in ("fairway.replies.globex.1", "fairway.replies.acme", "fairway.replies.acmex.1",
                  "fairway.scorer", "fairway.work.cpu"):
        assert not allowed(grant.read, other) and not allowed(grant.configure, other), other
    assert allowed(grant.write, "fairway.requests")
    for exchange in ("fairway.control", "amq.default", "fairway.scored", "fairway.work", "fairway.events"):
        assert not allowed(grant.write, exchange), exchange


@pytest.mark.parametrize("name", ["a.b", "", "x" * 65, "sp ace", "ü", "a*"])
def test_user_names_that_would_break_the_queue_prefixes_are_refused(name):
    with pytest.raises(ValueError):
        check_user_name(name)


def test_a_tenant_cannot_take_a_service_users_name():
    with pytest.raises(ValueError):
        plan({}, {GW: "pw"})


def test_rabbitmqctl_plan_is_idempotent():
    calls: list[tuple[str, ...]] = []
    existing = {"vhosts": "/\n", "users": "guest\t[administrator]\nacme\t[]\n"}

    def run(*args: str) -> str:
        calls.append(args)
        return {"list_vhosts": existing["vhosts"], "list_users": existing["users"]}.get(args[0], "")

    users = plan({GW: "gw-pw"}, {"acme": "acme-pw"})
    provision.provision_rabbitmqctl(run, users, "fairway")
    assert ("add_vhost", "fairway") in calls
    assert ("add_user", GW, "gw-pw") in calls and ("change_password", "acme", "acme-pw") in calls
    gw: Grant = users[GW][1]
    assert ("set_permissions", "-p", "fairway", GW, gw.configure, gw.write, gw.read) in calls


def test_tenant_pairs_are_parsed_and_checked():
    assert provision._pairs("a:1, b:two:three") == {"a": "1", "b": "two:three"}
    with pytest.raises(ValueError):
        provision._pairs("nopassword")
    with pytest.raises(ValueError):
        provision._pairs("a.b:pw")


def test_provision_names_the_settings_it_misses(capsys):
    assert provision.main({"FAIRWAY_PROVISION_API": "http://127.0.0.1:1"}) == 2
    said = capsys.readouterr().err
    assert "FAIRWAY_PROVISION_ADMIN_USER" in said and "FAIRWAY_PROVISION_WORKER_PASSWORD" in said
    assert "FAIRWAY_PROVISION_API" not in said
    env = {name: "x" for name in ("FAIRWAY_PROVISION_API", "FAIRWAY_PROVISION_ADMIN_USER",
                                  "FAIRWAY_PROVISION_ADMIN_PASSWORD")}
    env |= {f"FAIRWAY_PROVISION_{service.upper()}_PASSWORD": "x" for service in provision.SERVICE_USERS}
    assert provision.main({**env, "FAIRWAY_PROVISION_TENANTS": "acme"}) == 2  # no password
    assert "expected user:password" in capsys.readouterr().err
