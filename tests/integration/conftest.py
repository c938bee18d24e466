"""The running system: scheduler, scorer, a CPU worker and the gateway as subprocesses.

It lives for the whole session on its own vhost and Redis database: the unit tests that
run beside it flush database 0 and declare the topology on the default vhost, and must
never meet its scheduler (which would take their lease) or its consumers.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.integration.system import TENANT_KEYS, System, own_redis_db, own_vhost


@pytest.fixture(scope="session")
def system(rabbit_server, redis_server, model_cache, tmp_path_factory) -> Iterator[System]:
    sys_ = System(amqp_url=own_vhost(rabbit_server, "fairway-system"), redis_url=own_redis_db(redis_server, 2),
                  cache_dir=model_cache,
                  log_dir=tmp_path_factory.mktemp("logs"))
    for service in ("scheduler", "scorer", "cpu-worker", "gateway"):
        sys_.start(service)
    try:
        sys_.wait_ready()
        yield sys_
    finally:
        sys_.stop_all()


@pytest.fixture(scope="session")
def acme_key() -> str:
    return TENANT_KEYS["acme"]


@pytest.fixture(scope="session")
def globex_key() -> str:
    return TENANT_KEYS["globex"]


@pytest.fixture(scope="session")
def acme(system, acme_key) -> openai.OpenAI:
    """The openai client of tenant acme, on the running system."""
    return openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=acme_key, max_retries=0)


@pytest.fixture(scope="session")
def globex(system, globex_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=globex_key, max_retries=0)
