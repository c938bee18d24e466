"""The running system: scheduler, scorer, a CPU worker and the gateway as subprocesses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.system import TENANT_KEYS, System


@pytest.fixture(scope="session")
def system(amqp_url, redis_url, model_cache, tmp_path_factory) -> Iterator[System]:
    sys_ = System(amqp_url=amqp_url, redis_url=redis_url, cache_dir=model_cache,
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
