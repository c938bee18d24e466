"""Shared fixtures: private Redis and RabbitMQ servers for the test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.localinfra import RabbitServer, RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str):
    """A client on a flushed database, so tests do not see each other's keys."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def rabbit_server(tmp_path_factory) -> Iterator[RabbitServer]:
    server = RabbitServer(workdir=tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def amqp_url(rabbit_server: RabbitServer) -> str:
    return rabbit_server.url


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Cache dir holding the default tiny model, built once per run (or reused from env)."""
    cache = Path(os.environ.get("FAIRWAY_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    from services.models import ensure_default_model

    ensure_default_model(cache)
    return cache
