"""The worker's engine thread outlives callers that stop waiting, and a loop that breaks
stops the worker instead of leaving it heartbeating with nothing running."""

from __future__ import annotations

import asyncio
import time

import pytest

from services import amqp
from services.engine import RequestOutput
from services.worker import EngineThread
from tests.unit.test_echo_engine import make, req


def finished(outputs: list[RequestOutput], timeout: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {o.request_id for o in outputs if o.finished}
        if done:
            return done
        time.sleep(0.01)
    return set()


def test_an_add_whose_caller_stopped_waiting_is_not_started_and_the_thread_goes_on():
    """A delivery's handler cancelled mid-add (the broker link went) cancels the add's
    future before the thread takes it: the thread skips it and serves the next one."""
    outputs: list[RequestOutput] = []
    deaths: list[BaseException] = []
    thread = EngineThread(make(rate=0), outputs.extend, on_death=deaths.append)
    gone = thread.add(req("gone", [1, 2], max_tokens=3))
    assert gone.cancel()
    kept = thread.add(req("kept", [1, 2], max_tokens=3))
    thread.start()
    try:
        kept.result(timeout=5)
        assert finished(outputs) == {"kept"}
        assert {o.request_id for o in outputs} == {"kept"}
        assert thread.is_alive() and not deaths
    finally:
        thread.stop()
        thread.join(5)


def test_a_broken_step_loop_reports_its_death():
    deaths: list[BaseException] = []
    engine = make(rate=0)

    def broken() -> bool:
        raise RuntimeError("boom")

    engine.has_unfinished_requests = broken  # type: ignore[method-assign]
    thread = EngineThread(engine, lambda _outputs: None, on_death=deaths.append)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert [str(exc) for exc in deaths] == ["boom"]


async def test_a_service_that_lost_a_vital_part_stops_at_once_and_fails(monkeypatch):
    """Not a drain that waits for work that can no longer run: ``hurry``, then ``stop``,
    then an error, so the supervisor starts it again."""
    monkeypatch.setattr(amqp, "freeze_heap", lambda: None)
    calls: list[str] = []
    failed = asyncio.Event()

    async def start() -> None:
        asyncio.get_running_loop().call_later(0.05, failed.set)

    async def stop() -> None:
        calls.append("stop")

    with pytest.raises(amqp.ServiceFailed):
        await amqp.run_until_signalled(start, stop, lambda: calls.append("hurry"), failed=failed)
    assert calls == ["hurry", "stop"]


async def test_a_signal_still_stops_a_service_that_can_fail(monkeypatch):
    import os
    import signal

    monkeypatch.setattr(amqp, "freeze_heap", lambda: None)
    calls: list[str] = []

    async def start() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        calls.append("stop")

    await amqp.run_until_signalled(start, stop, lambda: calls.append("hurry"), failed=asyncio.Event())
    assert calls == ["stop"]
