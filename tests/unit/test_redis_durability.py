"""A service says so, loudly, when its Redis could lose what Fairway keeps there; which
Redis errors mean "wait, it cannot serve now" rather than "this is wrong"; and a start
step that needs Redis waits for it."""

from __future__ import annotations

import pytest
from redis import exceptions as e
from structlog.testing import capture_logs

from services import backoff
from services.redis_client import (
    cannot_serve,
    check_durability,
    durability_problems,
    refuses_writes,
    when_up,
    why_unavailable,
)


async def test_an_evicting_redis_is_reported_at_error_level(redis_client):
    before = (await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await redis_client.config_set("maxmemory-policy", "allkeys-lru")
        with capture_logs() as logs:
            assert await check_durability(redis_client) == ["redis_may_evict_keys"]
        assert [(x["event"], x["log_level"], x["maxmemory_policy"]) for x in logs] == [
            ("redis_may_evict_keys", "error", "allkeys-lru")]
    finally:
        await redis_client.config_set("maxmemory-policy", before)
    with capture_logs() as logs:  # the test server: noeviction, AOF on
        assert await check_durability(redis_client) == []
    assert logs == []


def test_durability_problems_from_info():
    safe_memory, aof = {"maxmemory_policy": "noeviction"}, {"aof_enabled": 1}
    assert durability_problems(safe_memory, aof) == []
    for policy in ("allkeys-lru", "volatile-ttl", "allkeys-random"):
        assert [p for p, _ in durability_problems({"maxmemory_policy": policy}, aof)] == [
            "redis_may_evict_keys"]
    assert [p for p, _ in durability_problems(safe_memory, {"aof_enabled": 0})] == [
        "redis_without_append_only_file"]
    assert durability_problems({}, {}) == []  # a server that does not say: nothing to report


def test_what_counts_as_redis_cannot_serve_now():
    for exc in (e.ConnectionError("refused"), e.BusyLoadingError("loading"), e.TimeoutError(),
                e.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
                e.ReadOnlyError("read only replica"), e.MaxConnectionsError(), TimeoutError(),
                ConnectionResetError(),
                e.ResponseError("MISCONF Errors writing to the AOF file: No space left on device")):
        assert cannot_serve(exc), exc
    for exc in (e.ResponseError("NOTLEADER"), e.ResponseError("ERR wrong number of arguments"),
                e.DataError("bad value"), ValueError("a bug"), KeyError("x")):
        assert not cannot_serve(exc), exc


def test_what_a_client_is_told_when_redis_fails_it():
    told = {exc: why_unavailable(exc) for exc in (
        e.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        e.ReadOnlyError("You can't write against a read only replica."),
        e.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"),
        e.BusyLoadingError("Redis is loading the dataset in memory"),
        e.TimeoutError("Timeout reading from socket"), TimeoutError(),
        e.ConnectionError("Connection refused"), ConnectionResetError())}
    assert list(told.values()) == [
        "Redis is out of memory (its maxmemory is reached)",
        "Redis is read-only (a replica that is not promoted yet)",
        "Redis refuses writes because it cannot persist them (MISCONF)",
        "Redis is loading its data",
        "Redis did not answer in time", "Redis did not answer in time",
        "Redis is not reachable", "Redis is not reachable"]
    assert [refuses_writes(exc) for exc in told] == [True] * 3 + [False] * 5


async def test_a_start_step_waits_while_redis_cannot_serve_and_fails_on_anything_else(monkeypatch):
    monkeypatch.setattr(backoff, "FIRST_DELAY_S", 0.001)
    outcomes = [e.ConnectionError("Connection refused"), e.BusyLoadingError("loading"),
                e.OutOfMemoryError("maxmemory"), "loaded"]
    calls = 0

    async def step():
        nonlocal calls
        calls += 1
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await when_up(step) == "loaded" and calls == 4

    async def broken():
        raise e.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(e.ResponseError, match="WRONGTYPE"):
        await when_up(broken)
