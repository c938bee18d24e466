"""retry_until_up: the start-order wait every service uses for the broker and Redis."""

from __future__ import annotations

import pytest

from services import backoff


class Fatal(ConnectionError):
    """A subclass of a retried error that must still fail at once (bad credentials)."""


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(backoff.asyncio, "sleep", sleep)
    return slept


async def test_retries_with_doubling_capped_delays_until_it_answers(sleeps):
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 8:
            raise ConnectionError("refused")
        return "up"

    assert await backoff.retry_until_up(attempt, (ConnectionError,), "waiting", max_delay_s=1.0) == "up"
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


async def test_fatal_and_unlisted_errors_are_raised_at_once(sleeps):
    async def fatal() -> None:
        raise Fatal("bad credentials")

    async def other() -> None:
        raise ValueError("bad url")

    with pytest.raises(Fatal):
        await backoff.retry_until_up(fatal, (ConnectionError,), "waiting", fatal=(Fatal,))
    with pytest.raises(ValueError, match="bad url"):
        await backoff.retry_until_up(other, (ConnectionError,), "waiting")
    assert sleeps == []
