"""Process tuning every service applies once it has started, and its background tasks."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from services.logs import get_logger

log = get_logger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_early_stops: list[int] = []


def catch_early_stops() -> None:
    """Catch SIGTERM and SIGINT from a service process's first line, until the service
    puts its own handlers in place and takes what came (:func:`early_stops`). A stop that
    comes while it imports its modules (torch alone takes seconds) then stops it cleanly,
    exit 0, instead of killing it with the signal."""
    def on_signal(sig: int, frame: object) -> None:
        _early_stops.append(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def early_stops() -> list[int]:
    """The stop signals caught before the service's own handlers were in place."""
    return list(_early_stops)


def freeze_heap() -> None:
    """Take everything alive now (modules, the model and tokenizer, the app) out of the
    garbage collector's sight. Each full collection would otherwise walk all of it while
    the event loop waits, every few tens of seconds under load: 20-130 ms pauses in the
    gateway, scheduler and torch-loaded services on our 2-core CI machine, against about
    4 ms once frozen, landing on whichever requests are in flight. What the service
    allocates later is collected as before. vLLM does the same once its engine is up."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("heap_frozen", objects=gc.get_freeze_count(),
             ms=round((time.perf_counter() - started) * 1000, 1))


class BackgroundTasks:
    """Tasks that run outside the task that started them (which may be cancelled), each
    referenced until it ends so the loop cannot drop it. One that fails is logged as
    ``background_task_failed`` with its traceback: never a bare "Task exception was
    never retrieved" on stderr, which no log pipeline reads."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background_task_failed", task=task.get_coro().__qualname__,
                      exc_info=(type(exc), exc, exc.__traceback__))

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Until every task running now has ended (their failures are logged, not raised)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


CANCEL_AGAIN_S = 1.0


async def cancel_until_done(tasks: Callable[[], Iterable[asyncio.Task[Any] | None]],
                            again_s: float = CANCEL_AGAIN_S) -> None:
    """Cancel the tasks ``tasks()`` names until none is left running. One cancel is not
    always enough: on Python 3.11 a cancel that lands as a redis-py command completes
    (its ``asyncio.wait_for``) can be lost, and the loop goes on. ``tasks`` is asked again
    each round, for tasks started meanwhile."""
    while pending := {task for task in tasks() if task is not None and not task.done()}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=again_s)


def start_vital(coro: Coroutine[Any, Any, Any], broken: asyncio.Event) -> asyncio.Task[Any]:
    """Run a loop the service cannot work without (it streams tokens, renews a lease,
    schedules). Such a loop ends when it is cancelled or once ``broken`` is set; if it ends
    any other way, with an error or without, it is logged as ``vital_task_died`` and
    ``broken`` is set, so the service recovers (a scheduler gives up its term and starts a
    new one) or stops and exits non-zero for its supervisor to restart it, instead of
    running on with a part missing: heartbeating while no token leaves, holding a lease
    while nothing is scheduled."""
    task = asyncio.create_task(coro)

    def done(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and broken.is_set():
            return  # it saw the event and ended, as it should
        log.error("vital_task_died", task=task.get_coro().__qualname__,
                  exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
        broken.set()

    task.add_done_callback(done)
    return task
