"""The lease loop that batches and background responses run under, on a real Redis."""

from __future__ import annotations

import asyncio

from services import keys
from services.gateway.leases import LeasedRunner, Leases


class CancelLosingLeases(Leases):
    """Leases whose first ``take``, cancelled as its command completes, returns as if the
    cancel never came: what redis-py's ``asyncio.wait_for`` can do on Python 3.11."""

    def __init__(self, redis) -> None:
        super().__init__(redis, keys.background_response_lease)
        self.taking = asyncio.Event()
        self.lose_a_cancel = True

    async def take(self, job_id: str, owner: str, lease_s: float) -> bool:
        if self.lose_a_cancel:
            self.taking.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.lose_a_cancel = False
        return await super().take(job_id, owner, lease_s)


async def test_a_claim_loop_whose_cancel_is_lost_takes_no_job_once_closing(redis_client) -> None:
    """A gateway that stops while it takes a lease gives the job back, rather than run it
    on, unseen, holding the lease that another gateway waits for."""
    leases, ran = CancelLosingLeases(redis_client), []

    async def run(job_id: str, lost: asyncio.Event) -> None:
        ran.append(job_id)
        await asyncio.sleep(3600)

    async def active() -> list[str]:
        return ["resp_1"]

    runner = LeasedRunner("test", leases, active, run, owner="g1", lease_s=30, poll_s=0.01)
    runner.start()
    await leases.taking.wait()
    await asyncio.wait_for(runner.close(), 10)
    assert ran == [] and runner.running == {}
    assert await leases.take("resp_1", "g2", 30)  # another gateway goes on at once
