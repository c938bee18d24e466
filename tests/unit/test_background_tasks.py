"""Background tasks are kept until they end, and one that fails is a log event; a vital
loop that dies breaks its service instead of leaving it running with a part missing."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from services.runtime import BackgroundTasks, cancel_until_done, start_vital


async def fails_after(delay: float) -> None:
    await asyncio.sleep(delay)
    raise ConnectionError("link dropped")


async def test_a_failing_task_is_logged_with_its_traceback_and_forgotten():
    tasks = BackgroundTasks()
    finished = asyncio.Event()

    async def succeeds() -> None:
        await asyncio.sleep(0.01)
        finished.set()

    with capture_logs() as logs:
        tasks.spawn(succeeds())
        failing = tasks.spawn(fails_after(0.02))
        assert len(tasks) == 2
        await tasks.wait()
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    assert finished.is_set() and len(tasks) == 0
    assert isinstance(failing.exception(), ConnectionError)
    failures = [e for e in logs if e["event"] == "background_task_failed"]
    assert len(failures) == 1, logs
    assert failures[0]["task"] == "fails_after"
    assert failures[0]["log_level"] == "error"
    exc_type, exc, _tb = failures[0]["exc_info"]
    assert exc_type is ConnectionError and str(exc) == "link dropped"


async def test_a_cancelled_task_is_not_a_failure():
    tasks = BackgroundTasks()
    with capture_logs() as logs:
        task = tasks.spawn(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await tasks.wait()
        await asyncio.sleep(0)
    assert len(tasks) == 0
    assert not [e for e in logs if e["event"] == "background_task_failed"]


async def test_wait_returns_at_once_with_nothing_running():
    async with asyncio.timeout(1):
        await BackgroundTasks().wait()


@pytest.mark.parametrize("raises", [True, False])
async def test_a_vital_loop_that_fails_or_returns_breaks_its_service(raises: bool):
    broken = asyncio.Event()

    async def output_loop() -> None:
        await asyncio.sleep(0.01)
        if raises:
            raise RuntimeError("output loop bug")

    with capture_logs() as logs:
        task = start_vital(output_loop(), broken)
        await asyncio.wait_for(broken.wait(), 1)
    assert task.done()
    [died] = [e for e in logs if e["event"] == "vital_task_died"]
    assert died["task"].endswith("output_loop") and died["log_level"] == "error"
    assert (died["exc_info"] is not None) == raises


async def test_a_vital_loop_that_ends_on_its_event_or_is_cancelled_is_no_death():
    broken = asyncio.Event()

    async def until_broken() -> None:
        while not broken.is_set():
            await asyncio.sleep(0.005)

    with capture_logs() as logs:
        ends = start_vital(until_broken(), broken)
        cancelled = start_vital(asyncio.sleep(10), asyncio.Event())
        await asyncio.sleep(0.02)
        broken.set()
        cancelled.cancel()
        await asyncio.gather(ends, cancelled, return_exceptions=True)
        await asyncio.sleep(0)
    assert not [e for e in logs if e["event"] == "vital_task_died"]


async def test_cancelling_until_done_outlasts_a_lost_cancel_and_takes_tasks_started_meanwhile():
    """A loop that swallows its first cancel (as one lost in redis-py's wait_for on Python
    3.11 goes on) and starts another task before it ends: both are ended."""
    started: list[asyncio.Task[None]] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def loses_a_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            started.append(asyncio.create_task(forever()))
        await asyncio.sleep(3600)

    loop = asyncio.create_task(loses_a_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done(lambda: (loop, *started), again_s=0.05), 5)
    assert loop.cancelled() and len(started) == 1 and started[0].cancelled()
