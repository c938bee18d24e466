"""A scheduler whose schedule loop dies gives up its term and leads again, on real Redis
and RabbitMQ, instead of holding the lease while nothing is scheduled (no other replica
could take over from it)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from services.scheduler.service import SchedulerService
from services.settings import Settings
from tests.integration.system import own_redis_db, own_vhost

pytestmark = pytest.mark.integration


async def wait_for(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def test_a_scheduler_whose_schedule_loop_dies_starts_a_new_term(rabbit_server, redis_server):
    settings = Settings(amqp_url=own_vhost(rabbit_server, "scheduler-vital"),
                        redis_url=own_redis_db(redis_server, 5), instance_id="vital", lease_ttl_s=1.5)
    service = SchedulerService(settings)
    calls, failed_in_term = 0, 0
    publish_metrics = service._publish_metrics

    def metrics_failing_once(*args, **kwargs) -> None:
        nonlocal calls, failed_in_term
        calls += 1
        if calls == 1:  # outside the loop's own error handling: the loop dies of it
            failed_in_term = service.store.fence
            raise RuntimeError("metrics bug")
        publish_metrics(*args, **kwargs)

    service._publish_metrics = metrics_failing_once  # type: ignore[method-assign]
    with capture_logs() as logs:
        await service.start()
        try:
            await wait_for(lambda: calls >= 1)
            await wait_for(lambda: service.store.fence > failed_in_term >= 1)  # a new term...
            await wait_for(lambda: calls >= 3)  # ...whose schedule loop runs
            assert not service.lost.is_set()
        finally:
            await service.stop()
    [died] = [e for e in logs if e["event"] == "vital_task_died"]
    assert died["task"].endswith("_schedule_loop")
    assert str(died["exc_info"][1]) == "metrics bug"
