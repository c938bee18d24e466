"""A request's ``priority`` through the real scheduler process: one tenant's urgent
request, sent after its bulk ones queued behind a busy slot, runs before them. A real
worker (echo engine, one slot), real RabbitMQ and Redis on their own vhost and database."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.one_slot import one_slot
from tests.integration.test_worker_resume import delivered

pytestmark = pytest.mark.integration


async def test_an_urgent_request_passes_its_tenants_queued_bulk_ones(
        rabbit_server, redis_server, model_cache, tmp_path):
    async with one_slot(rabbit_server, redis_server, model_cache, tmp_path, vhost="priority",
                        db=8) as slot:
        caller = slot.caller

        def rid(name: str) -> str:
            return f"{name}-{uuid.uuid4().hex[:8]}"

        busy = rid("busy")
        await slot.submit(busy, "acme", 40)
        await caller.wait(lambda: len(delivered(caller.replies.get(busy, []))[0]) >= 2)
        # The slot is busy for about a second: everything sent now queues behind it.
        bulk = [rid(f"bulk{i}") for i in range(3)]
        for name in bulk:
            await slot.submit(name, "acme", 8, priority=1)
        urgent, normal = rid("urgent"), rid("normal")
        await slot.submit(urgent, "acme", 8, priority=-1)
        await slot.submit(normal, "acme", 8)
        everyone = {busy, urgent, normal, *bulk}
        await caller.wait(lambda: everyone <= set(caller.finished_at))

        finished = sorted(everyone, key=caller.finished_at.__getitem__)
        assert finished[:3] == [busy, urgent, normal]
        assert set(finished[3:]) == set(bulk)
        for name in everyone - {busy}:
            final = caller.replies[name][-1]
            assert (final.finish_reason, final.completion_tokens) == ("length", 8)
