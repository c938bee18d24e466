"""Background responses on a real Redis: queued, run once by one gateway at a time,
cancelled, deleted, tried again after "not now", and taken over when a gateway stops."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from services import keys
from services.gateway.background import (
    BackgroundRun,
    BackgroundRunner,
    BackgroundStore,
    cancel,
    event_data,
    event_kind,
    fair_order,
)
from services.gateway.errors import ApiError, invalid, too_many_in_flight
from services.gateway.responses import KEEPALIVE, sse
from services.gateway.responses_api import ResponseStore
from tests.waits import until

QUESTION = {"type": "message", "role": "user", "content": "How far is the moon?"}


def event(kind: str, sequence: int, **fields: Any) -> bytes:
    return sse({"type": kind, "sequence_number": sequence, **fields}, event=kind)


class FakeModel:
    """Runs a background response as the gateway would: answers the question (storing
    it through the run's store; streamed, as ``response_events`` does: its events, the
    answer stored before the last of them), or raises the errors planned per run;
    ``hold`` keeps each run waiting (after its first delta) until released."""

    def __init__(self, errors: list[ApiError] | None = None, hold: bool = False, words: int = 3) -> None:
        self.errors = list(errors or [])
        self.hold = hold
        self.words = words
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.runs: list[BackgroundRun] = []
        self.cancelled = 0

    @property
    def request_ids(self) -> list[str]:
        return [run.request_id for run in self.runs]

    async def __call__(self, tenant: str, body: bytes, run: BackgroundRun, store: ResponseStore,
                       emit) -> None:
        self.runs.append(run)
        if self.errors:
            raise self.errors.pop(0)
        text = json.loads(body)["input"]
        words = [f"far{i} " for i in range(self.words)]
        sequence = run.first_sequence or 0
        if emit is not None:
            await emit(event("response.in_progress", sequence, response={"id": run.response_id}))
            await emit(b"".join(event("response.output_text.delta", sequence + 1 + i, delta=w)
                                for i, w in enumerate(words[:1])))
            sequence += 2
        self.started.set()
        if self.hold:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        response = {"id": run.response_id, "object": "response", "created_at": int(time.time()) + 5,
                    "status": "completed", "background": True, "store": True,
                    "output": [{"id": "msg_out", "type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": "".join(words)}]}]}
        if emit is not None:
            for w in words[1:]:
                await emit(event("response.output_text.delta", sequence, delta=w))
                sequence += 1
        await store.keep(tenant, [{"type": "message", "role": "user", "content": text}], response, 1)
        if emit is not None:
            await emit(event("response.output_text.done", sequence, text="".join(words))
                       + event("response.completed", sequence + 1, response=response))


@pytest.fixture
def stores(redis_client):
    return BackgroundStore(redis_client, ttl_s=600, per_tenant=3), ResponseStore(redis_client, ttl_s=600)


async def queue(stores, tenant: str = "acme", text: str = "How far is the moon?", stream: bool = False) -> str:
    jobs, responses = stores
    response_id = f"resp_{uuid.uuid4().hex}"
    queued = {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "queued",
              "background": True, "store": True, "output": [], "error": None}
    record = responses.record(tenant, [{"type": "message", "role": "user", "content": text}], queued, 1)
    first = [event("response.created", 0, response=queued), event("response.queued", 1, response=queued)]
    await jobs.queue(tenant, response_id, json.dumps({"model": "m", "input": text}).encode(), record,
                     first if stream else None)
    return response_id


async def read_events(jobs: BackgroundStore, response_id: str, after: int = -1) -> list[dict]:
    return [event_data(e) for e in [e async for e in jobs.events(response_id, after)]]


def runner(stores, model: FakeModel, owner: str = "g1", outcomes: list[str] | None = None) -> BackgroundRunner:
    jobs, responses = stores
    return BackgroundRunner(jobs, responses, model, owner=owner, concurrency=4, lease_s=0.6, poll_s=0.02,
                            retry_s=0.01, on_outcome=(outcomes if outcomes is not None else []).append)


async def waiting(jobs: BackgroundStore) -> list[str]:
    """The responses not yet ended, oldest first."""
    return [response_id for response_id, _ in await jobs.oldest(100)]


async def test_a_queued_response_runs_once_and_its_answer_is_stored_as_queued(stores, redis_client) -> None:
    jobs, responses = stores
    response_id = await queue(stores)
    queued = await responses.get(response_id, "acme")
    assert queued["status"] == "queued" and queued["background"]
    listed = await responses.input_items(response_id, "acme")
    assert await waiting(jobs) == [response_id]
    model, outcomes = FakeModel(), []
    await jobs.leases.take(response_id, "g1", 5)
    await runner(stores, model, outcomes=outcomes).run(response_id)
    done = await responses.get(response_id, "acme")
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"].startswith("far")
    # The answer keeps the id, creation time and input item ids the client was given.
    assert (done["id"], done["created_at"]) == (response_id, queued["created_at"])
    assert await responses.input_items(response_id, "acme") == listed
    assert model.request_ids == [response_id] and outcomes == ["completed"]
    assert await waiting(jobs) == [] and not await redis_client.exists(keys.background_response(response_id))
    assert await redis_client.zcard(keys.tenant_background_responses("acme")) == 0
    assert len(await responses.conversation(response_id, "acme")) == 2  # question and answer


async def test_a_tenant_past_its_cap_is_a_429_until_one_ends(stores) -> None:
    made = [await queue(stores) for _ in range(3)]
    await queue(stores, tenant="globex")  # another tenant's cap is its own
    with pytest.raises(ApiError) as caught:
        await queue(stores)
    assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
    await cancel(*stores, made[0], "acme")
    await queue(stores)


async def test_cancelling_is_for_background_responses_of_ones_own_and_idempotent(stores) -> None:
    jobs, responses = stores
    response_id = await queue(stores)
    cancelled = await cancel(jobs, responses, response_id, "acme")
    assert cancelled["status"] == "cancelled" and (await responses.get(response_id, "acme")) == cancelled
    assert await cancel(jobs, responses, response_id, "acme") == cancelled
    assert await waiting(jobs) == []
    # A runner that took it just before finds nothing to run.
    model = FakeModel()
    await runner(stores, model).run(response_id)
    assert model.request_ids == [] and (await responses.get(response_id, "acme"))["status"] == "cancelled"
    # Gone on from it cannot be: it never answered.
    with pytest.raises(ApiError) as caught:
        await responses.conversation(response_id, "acme")
    assert caught.value.status == 400 and "cancelled" in caught.value.message
    with pytest.raises(ApiError) as caught:
        await cancel(jobs, responses, response_id, "globex")
    assert caught.value.status == 404
    await responses.keep("acme", [QUESTION], {"id": "resp_plain", "store": True, "status": "completed",
                                              "output": []}, 1)
    with pytest.raises(ApiError) as caught:
        await cancel(jobs, responses, "resp_plain", "acme")
    assert caught.value.status == 400 and "background" in caught.value.message


async def test_a_response_cancelled_while_it_runs_stops_and_its_answer_is_never_stored(stores) -> None:
    jobs, responses = stores
    response_id = await queue(stores)
    model, outcomes = FakeModel(hold=True), []
    one = runner(stores, model, outcomes=outcomes)
    one.start()
    try:
        await model.started.wait()
        assert (await responses.get(response_id, "acme"))["status"] == "in_progress"
        with pytest.raises(ApiError):  # not an answer yet
            await responses.conversation(response_id, "acme")
        assert (await cancel(jobs, responses, response_id, "acme"))["status"] == "cancelled"

        async def stopped() -> bool:
            return model.cancelled == 1 and outcomes == ["cancelled"]
        await until(stopped, 10.0)
        assert (await responses.get(response_id, "acme"))["status"] == "cancelled"
    finally:
        await one.close()


async def test_a_response_deleted_while_it_runs_stops_and_is_not_stored_again(stores, redis_client) -> None:
    jobs, responses = stores
    response_id = await queue(stores)
    model = FakeModel(hold=True)
    one = runner(stores, model)
    one.start()
    try:
        await model.started.wait()
        await responses.delete(response_id, "acme")

        async def stopped() -> bool:
            return model.cancelled == 1
        await until(stopped, 10.0)
        assert not await redis_client.exists(keys.stored_response(response_id))
        assert await waiting(jobs) == [] and await redis_client.zcard(keys.tenant_background_responses("acme")) == 0
    finally:
        await one.close()


async def test_not_now_is_tried_again_with_a_new_request_id_and_an_error_fails_it(stores) -> None:
    jobs, responses = stores
    model, outcomes = FakeModel([too_many_in_flight(4), too_many_in_flight(4)]), []
    first = await queue(stores)
    await jobs.leases.take(first, "g1", 30)
    await runner(stores, model, outcomes=outcomes).run(first)
    assert (await responses.get(first, "acme"))["status"] == "completed"
    assert outcomes == ["retried", "retried", "completed"]
    assert model.request_ids[0] == first and len(set(model.request_ids)) == 3
    assert all(r.startswith(first) for r in model.request_ids)
    second = await queue(stores)
    await jobs.leases.take(second, "g1", 30)
    model.errors = [invalid("The prompt is too long.", param="input", code="context_length_exceeded")]
    await runner(stores, model, outcomes=outcomes).run(second)
    failed = await responses.get(second, "acme")
    assert failed["status"] == "failed" and outcomes[-1] == "failed"
    assert failed["error"] == {"code": "context_length_exceeded", "message": "The prompt is too long."}
    assert await waiting(jobs) == []


async def test_a_gateway_that_stops_mid_run_hands_it_over_and_it_is_answered_once(stores) -> None:
    """The first gateway's run is under way when it stops (SIGTERM: its leases let go;
    kill -9: they lapse); the second takes it over and runs it from the start."""
    jobs, responses = stores
    response_id = await queue(stores)
    held, taker, outcomes_two = FakeModel(hold=True), FakeModel(), []
    one = runner(stores, held, owner="g1")
    two = runner(stores, taker, owner="g2", outcomes=outcomes_two)
    one.start()
    try:
        await held.started.wait()
        two.start()
        await asyncio.sleep(0.3)
        assert outcomes_two == []  # g1 holds the lease
        await one.close()

        async def answered() -> bool:
            return (await responses.get(response_id, "acme"))["status"] == "completed"
        await until(answered, 10.0)
        # The run counts its outcome just after it stored the answer.
        await until(lambda: outcomes_two != [], 5.0)
        assert outcomes_two == ["completed"] and held.cancelled == 1
        # Its request has an id of its own: the first run's may still be under way downstream.
        assert held.request_ids == [response_id] and taker.request_ids[0].startswith(f"{response_id}-")
        assert await jobs.job(response_id) is None and await waiting(jobs) == []
    finally:
        await two.close()


async def test_a_run_whose_lease_went_to_another_gateway_stops_without_storing(stores) -> None:
    jobs, responses = stores
    response_id = await queue(stores)
    model, outcomes = FakeModel(hold=True), []
    await jobs.leases.take(response_id, "g1", 30)
    lost = asyncio.Event()
    run = asyncio.create_task(runner(stores, model, outcomes=outcomes).run(response_id, lost))
    await model.started.wait()
    lost.set()
    await run
    assert outcomes == ["handed_over"] and model.cancelled == 1
    assert (await responses.get(response_id, "acme"))["status"] == "in_progress"
    assert await waiting(jobs) == [response_id]  # whoever holds the lease goes on


async def test_a_streamed_response_keeps_its_events_numbered_for_readers_live_and_late(stores) -> None:
    jobs, responses = stores
    response_id = await queue(stores, stream=True)
    model = FakeModel(words=4)
    one = runner(stores, model)
    live = asyncio.create_task(read_events(jobs, response_id))  # reading before it runs
    one.start()
    try:
        events = await asyncio.wait_for(live, 10)
    finally:
        await one.close()
    assert [e["type"] for e in events] == [
        "response.created", "response.queued", "response.in_progress", *["response.output_text.delta"] * 4,
        "response.output_text.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(9))
    assert model.runs[0].first_sequence == 2
    assert events[-1]["response"]["id"] == response_id
    assert (await responses.get(response_id, "acme"))["status"] == "completed"
    # A reader that comes back later gets the events after the last it had, and the end.
    assert [e["sequence_number"] for e in await read_events(jobs, response_id, after=5)] == [6, 7, 8]
    assert await read_events(jobs, response_id, after=8) == []


async def test_a_reader_of_a_queued_response_gets_keep_alives_until_it_runs(redis_client) -> None:
    """A streamed response waits in the queue for spare capacity: its reader gets an SSE
    comment every keepalive_s meanwhile (no proxy takes the stream for dead), then the
    events."""
    jobs = BackgroundStore(redis_client, ttl_s=600, per_tenant=3, keepalive_s=0.1)
    stores = jobs, ResponseStore(redis_client, ttl_s=600)
    response_id = await queue(stores, stream=True)
    pieces: list[bytes] = []

    async def read() -> None:
        async for piece in jobs.events(response_id, -1):
            pieces.append(piece)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.45)  # queued: nothing runs it yet
    waited = list(pieces)
    assert [event_kind(p) for p in waited[:2]] == [b"response.created", b"response.queued"]
    assert 3 <= waited.count(KEEPALIVE) <= 5 and set(waited[2:]) == {KEEPALIVE}
    one = runner(stores, FakeModel(words=2))
    one.start()
    try:
        await asyncio.wait_for(reader, 10)
    finally:
        await one.close()
    assert event_kind(pieces[-1]) == b"response.completed"
    assert [event_data(p)["type"] for p in pieces if p != KEEPALIVE][2] == "response.in_progress"


async def test_a_streamed_response_run_again_goes_on_with_its_last_event_only(stores) -> None:
    """The first gateway sent some deltas and stopped; the new run's own deltas would not
    continue them, so its stream goes on with response.completed (the whole answer)."""
    jobs, responses = stores
    response_id = await queue(stores, stream=True)
    held, taker = FakeModel(hold=True), FakeModel(words=5)
    one, two = runner(stores, held, owner="g1"), runner(stores, taker, owner="g2")
    one.start()
    try:
        await held.started.wait()
        await one.close()
        two.start()
        events = await asyncio.wait_for(read_events(jobs, response_id), 10)
    finally:
        await two.close()
    assert [e["type"] for e in events] == [
        "response.created", "response.queued", "response.in_progress", "response.output_text.delta",
        "response.completed"]
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(numbers) and numbers[:4] == [0, 1, 2, 3]
    assert taker.runs[0].first_sequence == 4
    text = events[-1]["response"]["output"][0]["content"][0]["text"]
    assert text == "far0 far1 far2 far3 far4 " == (await responses.get(response_id, "acme"))[
        "output"][0]["content"][0]["text"]


async def test_a_streamed_response_that_fails_or_is_cancelled_ends_its_stream(stores) -> None:
    jobs, responses = stores
    failing = await queue(stores, stream=True)
    await jobs.leases.take(failing, "g1", 30)
    await runner(stores, FakeModel([invalid("Too long.", param="input")])).run(failing)
    events = await read_events(jobs, failing)
    assert [e["type"] for e in events][-1] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "Too long."
    assert events[-1]["sequence_number"] == 2
    # Cancelled while a reader waits for more: its stream ends (no event says more).
    waiting = await queue(stores, stream=True)
    reader = asyncio.create_task(read_events(jobs, waiting))
    await asyncio.sleep(0.2)
    assert not reader.done()
    await cancel(jobs, responses, waiting, "acme")
    assert [e["type"] for e in await asyncio.wait_for(reader, 5)] == ["response.created", "response.queued"]


def test_a_tenant_with_many_queued_does_not_take_every_slot_from_one_with_few() -> None:
    waiting = [("a1", "acme"), ("a2", "acme"), ("a3", "acme"), ("g1", "globex"), ("a4", "acme"), ("g2", "globex")]
    assert fair_order(waiting, Counter()) == ["a1", "g1", "a2", "g2", "a3", "a4"]
    assert fair_order(waiting, Counter(acme=2)) == ["g1", "g2", "a1", "a2", "a3", "a4"]
    assert fair_order(waiting, Counter(acme=1, globex=1)) == ["a1", "g1", "a2", "g2", "a3", "a4"]
    assert fair_order([], Counter(acme=3)) == []


async def test_the_runner_takes_another_tenants_response_before_more_of_a_busy_ones(redis_client) -> None:
    jobs, responses = BackgroundStore(redis_client, ttl_s=600, per_tenant=10), ResponseStore(redis_client, 600)
    stores = (jobs, responses)
    first = [await queue(stores) for _ in range(4)]
    model = FakeModel(hold=True)
    one = BackgroundRunner(jobs, responses, model, owner="g1", concurrency=2, poll_s=0.02)
    one.start()
    try:
        async def two_running() -> bool:
            return len(model.runs) == 2
        await until(two_running, 10.0)
        assert {r.response_id for r in model.runs} == set(first[:2])
        late = await queue(stores, tenant="globex")  # queued after acme's two waiting ones
        await cancel(jobs, responses, first[0], "acme")  # a slot frees

        async def three_running() -> bool:
            return len(model.runs) == 3
        await until(three_running, 10.0)
        assert model.runs[2].response_id == late  # not acme's third
    finally:
        await one.close()
