"""Work the gateways run in the background, one gateway per job at a time, under a lease.

A job (a batch, a background response) lives in Redis; every gateway looks for jobs
not yet ended and takes a lease on each it can (``SET NX PX``), renews it while it runs
the job and lets it go when it stops. A gateway that dies stops renewing: its leases
lapse and another gateway (or its own restart) takes the jobs over, so nothing a dead
gateway was running is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from services.logs import get_logger
from services.redis_client import RELEASE_LEASE_LUA, RENEW_LEASE_LUA
from services.runtime import cancel_until_done

log = get_logger("gateway.leases")

RETRIED_STATUSES = (429, 503)
"""Answers that say "not now" (tenant at its admission limit, no spare capacity, system
unavailable): a job's request waits and is tried again; any other answer is its result."""


class Leases:
    """Leases on jobs by id, each a key of ``key(job_id)`` holding its runner's name."""

    def __init__(self, redis: Any, key: Callable[[str], str]) -> None:
        self.redis = redis
        self.key = key
        self._renew = redis.register_script(RENEW_LEASE_LUA)
        self._release = redis.register_script(RELEASE_LEASE_LUA)

    async def take(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self.redis.set(self.key(job_id), owner, nx=True, px=int(lease_s * 1000)))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self._renew(keys=[self.key(job_id)], args=[owner, int(lease_s * 1000)]))

    async def release(self, job_id: str, owner: str) -> None:
        await self._release(keys=[self.key(job_id)], args=[owner])


RunJob = Callable[[str, asyncio.Event], Awaitable[None]]
"""(job id, lost) -> run the job while ``lost`` is not set (the lease went to another)."""


class LeasedRunner:
    """Takes a lease on each job ``active()`` lists and no gateway holds, and runs it
    (``run``) while the lease is its own."""

    def __init__(self, name: str, leases: Leases, active: Callable[[], Awaitable[list[str]]],
                 run: RunJob, *, owner: str, lease_s: float = 15.0, poll_s: float = 1.0,
                 max_jobs: int | None = None) -> None:
        """``active``: the jobs not yet ended, in the order to take them; ``max_jobs``:
        the most jobs held at once (None: no limit)."""
        self.name = name
        self.leases = leases
        self.active = active
        self.run = run
        self.owner = owner
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_jobs = max_jobs
        self.running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        self._closing = False

    def wake(self) -> None:
        """Look for jobs now (one was just made here), not at the next poll."""
        self._woken.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._claim_loop(), name=f"{self.name}-runner")

    async def close(self) -> None:
        """Stop: jobs under way are given up (whoever takes them next goes on), and the
        leases let go so that another gateway goes on at once."""
        self._closing = True  # a claim loop that lost its cancel takes no job meanwhile
        await cancel_until_done(lambda: (self._task, *self.running.values()))

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._closing:
            self._woken.clear()
            try:
                for job_id in await self.active() if not self._full() else ():
                    if self._full() or self._closing:
                        break
                    if job_id not in self.running and await self.leases.take(job_id, self.owner, self.lease_s):
                        if self._closing:  # a cancel of this loop was lost: give it back
                            await self.leases.release(job_id, self.owner)
                            return
                        self.running[job_id] = asyncio.create_task(self._hold(job_id))
                failures = 0
            except (RedisError, OSError) as exc:
                if failures == 0:
                    log.warning("lease_claim_failed", jobs=self.name, error=repr(exc))
                failures += 1
            # Redis away: look again less and less often (at most every 30 polls).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s * min(2 ** failures, 30) * random.uniform(0.5, 1.5)):
                    await self._woken.wait()

    def _full(self) -> bool:
        return self.max_jobs is not None and len(self.running) >= self.max_jobs

    async def _hold(self, job_id: str) -> None:
        """Run a job while the lease is ours; let it go after, also when cancelled."""
        lost = asyncio.Event()
        renew = asyncio.create_task(self._renew(job_id, lost))
        try:
            await self.run(job_id, lost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down: the lease lapses, someone goes on
            log.warning("leased_job_interrupted", jobs=self.name, job_id=job_id, error=repr(exc))
        finally:
            renew.cancel()
            self.running.pop(job_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.leases.release(job_id, self.owner))

    async def _renew(self, job_id: str, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.leases.renew(job_id, self.owner, self.lease_s):
                    lost.set()
                    return
            except (RedisError, OSError) as exc:
                log.warning("lease_renew_failed", jobs=self.name, job_id=job_id, error=repr(exc))
