"""The Batch API's input checks (pure) and its runner on a real Redis, with the request
execution faked: results written once per line, resumed after a runner dies, retried
when the tenant is at its limit, cancelled, expired, finalized again after a crash."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services import keys
from services.gateway.batches import (
    BatchInputError,
    BatchRunner,
    BatchStore,
    batch_usage,
    parse_batch_input,
)
from services.gateway.files import FileStore
from services.gateway.responses import cursor_page as page
from tests.waits import until

CHAT = "/v1/chat/completions"


def line(custom_id: str, **over) -> dict:
    row = {"custom_id": custom_id, "method": "POST", "url": CHAT,
           "body": {"model": "m", "messages": [{"role": "user", "content": custom_id}]}}
    row.update(over)
    return row


def jsonl(rows: list) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


# --- the input file ----------------------------------------------------------------------


def test_a_good_file_gives_its_requests_in_order_and_blank_lines_are_skipped() -> None:
    lines = parse_batch_input(jsonl([line("a"), "", line("b"), "   "]), CHAT, 10)
    assert [(x.custom_id, x.body["messages"][0]["content"]) for x in lines] == [("a", "a"), ("b", "b")]


@pytest.mark.parametrize(("row", "code", "param"), [
    ("not json", "invalid_json_line", None),
    ("[1, 2]", "invalid_json_line", None),
    (line("", ), "missing_required_parameter", "custom_id"),
    (line("x", method="GET"), "invalid_method", "method"),
    (line("x", url="/v1/completions"), "mismatched_url", "url"),
    (line("x", body="hi"), "missing_required_parameter", "body"),
    (line("x", body={"messages": []}), "missing_required_parameter", "body.model"),
    (line("x", body={"model": "m", "stream": True}), "invalid_value", "body.stream"),
], ids=["not-json", "not-object", "no-custom-id", "method", "url", "body", "model", "stream"])
def test_a_bad_line_is_named_by_its_number(row, code, param) -> None:
    with pytest.raises(BatchInputError) as bad:
        parse_batch_input(jsonl([line("ok"), row]), CHAT, 10)
    assert bad.value.errors == [{"code": code, "message": bad.value.errors[0]["message"], "param": param,
                                 "line": 2}]


def test_duplicate_ids_empty_files_too_many_lines_and_bad_bytes_are_refused() -> None:
    with pytest.raises(BatchInputError) as dup:
        parse_batch_input(jsonl([line("a"), line("b"), line("a")]), CHAT, 10)
    assert [(e["code"], e["line"]) for e in dup.value.errors] == [("duplicate_custom_id", 3)]
    for data, code in ((b"\n \n", "empty_file"), (jsonl([line(str(i)) for i in range(4)]), "too_many_requests"),
                       (b"\xff\xfe{}", "invalid_json_line")):
        with pytest.raises(BatchInputError) as bad:
            parse_batch_input(data, CHAT, 3)
        assert bad.value.errors[0]["code"] == code and bad.value.errors[0]["line"] is None
    with pytest.raises(BatchInputError) as many:  # every bad line, up to a cap
        parse_batch_input(jsonl(["x"] * 500), CHAT, 1000)
    assert len(many.value.errors) == 100


def test_usage_adds_chat_and_responses_answers() -> None:
    chat = {"response": {"body": {"usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                            "prompt_tokens_details": {"cached_tokens": 2}}}}}
    resp = {"response": {"body": {"usage": {"input_tokens": 4, "output_tokens": 1}}}}
    assert batch_usage([chat, resp]) == {
        "input_tokens": 9, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}


def test_pages_follow_the_cursor() -> None:
    items = [{"id": str(i)} for i in range(5)]
    first = page(items, 2, None)
    assert [i["id"] for i in first["data"]] == ["0", "1"] and first["has_more"] and first["last_id"] == "1"
    rest = page(items, 10, "3")
    assert [i["id"] for i in rest["data"]] == ["4"] and not rest["has_more"]
    assert page(items, 2, "unknown")["data"] == []


# --- the runner on Redis ---------------------------------------------------------------------


class FakeRequests:
    """Answers each request as the gateway would: 200 with usage, or the status given per
    custom id (a list: one per attempt); ``hold`` keeps the named requests waiting."""

    def __init__(self, statuses: dict[str, list[int]] | None = None, hold: set[str] = frozenset()) -> None:
        self.statuses = statuses or {}
        self.hold = set(hold)
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def __call__(self, tenant: str, endpoint: str, body: dict) -> tuple[int, dict, str]:
        custom_id = body["messages"][0]["content"]
        self.calls.append(custom_id)
        if custom_id in self.hold:
            await self.release.wait()
        planned = self.statuses.get(custom_id)
        status = planned.pop(0) if planned else 200
        if status != 200:
            return status, {"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                      "code": str(status)}}, f"req-{custom_id}"
        return 200, {"id": f"req-{custom_id}", "tenant": tenant,
                     "usage": {"prompt_tokens": 2, "completion_tokens": 3}}, f"req-{custom_id}"


async def new_batch(store: BatchStore, rows: list, *, expires_in: float = 3600):
    data = jsonl(rows)
    lines = parse_batch_input(data, CHAT, 100)
    now = int(time.time())
    static = {"endpoint": CHAT, "input_file_id": "file-in", "completion_window": "24h", "created_at": now,
              "expires_at": now + expires_in, "metadata": None, "model": "m"}
    return await store.create("acme", static, data, lines, None)


def runner(store: BatchStore, files: FileStore, execute, **kw) -> BatchRunner:
    kw.setdefault("concurrency", 2)
    return BatchRunner(store, files, execute, owner=kw.pop("owner", "g1"), max_requests=100,
                       poll_s=0.05, retry_s=0.01, **kw)


@pytest.fixture
def stores(redis_client):
    return BatchStore(redis_client, ttl_s=600), FileStore(redis_client, ttl_s=600)


async def output_of(files: FileStore, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in (await files.content(file_id, "acme")).splitlines()]


async def test_a_batch_runs_every_line_once_and_ends_with_its_files(stores, redis_client) -> None:
    store, files = stores
    requests = FakeRequests({"c": [400]})
    batch = await new_batch(store, [line(x) for x in "abcde"])
    assert batch.status == "in_progress" and batch.total == 5
    assert await store.active() == [batch.batch_id]
    await runner(store, files, requests).run(batch.batch_id)
    done = await store.load(batch.batch_id)
    assert done.status == "completed" and (done.completed, done.failed) == (4, 1)
    assert done.times.keys() >= {"in_progress_at", "finalizing_at", "completed_at"}
    assert done.usage == {"input_tokens": 8, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 12,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 20}
    output = await output_of(files, done.output_file_id)
    assert [o["custom_id"] for o in output] == ["a", "b", "d", "e"]  # in input order
    assert output[0]["response"] == {"status_code": 200, "request_id": "req-a",
                                     "body": {"id": "req-a", "tenant": "acme",
                                              "usage": {"prompt_tokens": 2, "completion_tokens": 3}}}
    errors = await output_of(files, done.error_file_id)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("c", 400)]
    assert sorted(requests.calls) == list("abcde")
    assert await store.active() == [] and not await redis_client.exists(keys.batch_results(batch.batch_id))
    assert 0 < await redis_client.ttl(keys.batch(batch.batch_id)) <= 600
    assert (await files.get(done.output_file_id, "acme"))["purpose"] == "batch_output"
    assert [b.batch_id for b in await store.listed("acme")] == [batch.batch_id]


async def test_a_tenants_batches_are_listed_newest_first_and_gone_ones_forgotten(stores, redis_client) -> None:
    store, _ = stores
    made = [await new_batch(store, [line("a")]) for _ in range(3)]
    index = keys.tenant_batches("acme")
    await redis_client.zadd(index, {b.batch_id: score for score, b in enumerate(made)})
    await redis_client.delete(keys.batch(made[1].batch_id))  # expired
    assert [b.batch_id for b in await store.listed("acme")] == [made[2].batch_id, made[0].batch_id]
    assert await redis_client.zscore(index, made[1].batch_id) is None
    assert await store.listed("globex") == []


async def test_a_tenant_at_its_limit_waits_and_is_tried_again(stores) -> None:
    store, files = stores
    requests = FakeRequests({"a": [429, 503, 200], "b": [400]})
    batch = await new_batch(store, [line("a"), line("b")])
    outcomes: list[str] = []
    await runner(store, files, requests, on_outcome=outcomes.append).run(batch.batch_id)
    done = await store.load(batch.batch_id)
    assert (done.status, done.completed, done.failed) == ("completed", 1, 1)
    assert requests.calls.count("a") == 3
    assert sorted(outcomes) == ["completed", "failed", "retried", "retried"]


async def test_a_runner_that_dies_loses_nothing_and_no_line_is_answered_twice(stores) -> None:
    """The first runner answers some lines and dies with two under way (cancelled, as a
    killed gateway's requests are); the next one runs only the lines without a result."""
    store, files = stores
    first = FakeRequests(hold={"c", "d"})
    batch = await new_batch(store, [line(x) for x in "abcdef"])
    dying = asyncio.create_task(runner(store, files, first).run(batch.batch_id))
    while len(await store.answered(batch.batch_id)) < 2:
        await asyncio.sleep(0.01)
    dying.cancel()
    await asyncio.gather(dying, return_exceptions=True)
    assert (await store.load(batch.batch_id)).status == "in_progress"
    second = FakeRequests()
    await runner(store, files, second, owner="g2").run(batch.batch_id)
    done = await store.load(batch.batch_id)
    output = await output_of(files, done.output_file_id)
    assert [o["custom_id"] for o in output] == list("abcdef") and done.completed == 6
    assert set(second.calls) == set("abcdef") - {"a", "b"}
    # A late result of the dead runner's (it lost its lease) changes nothing now.
    assert not await store.record(batch.batch_id, 0, {"custom_id": "a"}, ok=True)


async def test_one_runner_at_a_time_holds_a_batch_and_another_goes_on_when_it_stops(stores) -> None:
    store, files = stores
    held = FakeRequests(hold=set("abcd"))
    batch = await new_batch(store, [line(x) for x in "abcd"])
    one, two = runner(store, files, held, owner="g1"), runner(store, files, FakeRequests(), owner="g2")
    one.start()
    while len(held.calls) < 2:
        await asyncio.sleep(0.01)
    two.start()
    await asyncio.sleep(0.3)
    assert (await store.load(batch.batch_id)).completed == 0  # g2 found the lease taken
    await one.close()  # a SIGTERM: its requests are given up and its lease let go
    try:
        for _ in range(200):
            if (await store.load(batch.batch_id)).status == "completed":
                break
            await asyncio.sleep(0.05)
        done = await store.load(batch.batch_id)
        assert done.status == "completed" and done.completed == 4
    finally:
        await two.close()


async def test_a_batch_made_on_this_gateway_starts_at_once_not_at_the_next_poll(stores) -> None:
    store, files = stores
    requests = FakeRequests()
    idle = runner(store, files, requests)
    idle.poll_s = idle._leased.poll_s = 30.0  # its first look (empty) came before the batch
    idle.start()
    try:
        await asyncio.sleep(0.05)
        batch = await new_batch(store, [line("a")])
        await until(lambda: requests.calls == ["a"], timeout_s=2)
        assert (await store.load(batch.batch_id)).status in ("in_progress", "finalizing", "completed")
    finally:
        await idle.close()


async def test_a_cancelled_batch_keeps_the_answers_it_had(stores) -> None:
    store, files = stores
    requests = FakeRequests(hold={"c"})
    batch = await new_batch(store, [line(x) for x in "abc"])
    running = asyncio.create_task(runner(store, files, requests, concurrency=1).run(batch.batch_id))
    while "c" not in requests.calls:
        await asyncio.sleep(0.01)
    assert await store.move(batch.batch_id, ("validating", "in_progress"), "cancelling")
    await asyncio.wait_for(running, 5)
    done = await store.load(batch.batch_id)
    assert done.status == "cancelled" and done.times.keys() >= {"cancelling_at", "cancelled_at"}
    assert [o["custom_id"] for o in await output_of(files, done.output_file_id)] == ["a", "b"]
    assert done.error_file_id is None and await store.active() == []
    assert not await store.move(batch.batch_id, ("validating", "in_progress"), "cancelling")


async def test_an_expired_batch_reports_what_it_could_not_run(stores) -> None:
    store, files = stores
    batch = await new_batch(store, [line(x) for x in "ab"], expires_in=-1)
    requests = FakeRequests()
    await runner(store, files, requests).run(batch.batch_id)
    done = await store.load(batch.batch_id)
    assert done.status == "expired" and "expired_at" in done.times and requests.calls == []
    errors = await output_of(files, done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errors] == [
        ("a", "batch_expired", None), ("b", "batch_expired", None)]
    assert (done.completed, done.failed) == (0, 2)


async def test_a_finalization_cut_short_is_done_again(stores) -> None:
    """A gateway that died while writing the files left the batch finalizing: the next
    run writes them (under the same ids) and ends it."""
    store, files = stores
    batch = await new_batch(store, [line("a")])
    await store.record(batch.batch_id, 0, {"custom_id": "a", "response": {
        "status_code": 200, "request_id": "r", "body": {}}, "error": None}, ok=True)
    assert await store.move(batch.batch_id, ("in_progress",), "finalizing", ending="completed")
    await runner(store, files, FakeRequests()).run(batch.batch_id)
    done = await store.load(batch.batch_id)
    assert done.status == "completed" and done.output_file_id.endswith("-output")
    assert [o["custom_id"] for o in await output_of(files, done.output_file_id)] == ["a"]


async def test_another_tenants_file_reads_as_not_found(stores) -> None:
    _, files = stores
    info = await files.create("acme", "in.jsonl", "batch", b"{}")
    assert (await files.get(info["id"], "acme"))["bytes"] == 2
    with pytest.raises(Exception, match="No such File object") as other:
        await files.content(info["id"], "globex")
    assert other.value.status == 404
    assert [f["id"] for f in await files.listed("acme", "batch")] == [info["id"]]
    assert await files.listed("acme", "batch_output") == [] and await files.listed("globex") == []
    await files.delete(info["id"], "acme")
    assert await files.listed("acme") == []


# --- the gateway's side ----------------------------------------------------------------------


async def test_a_batch_request_runs_as_the_same_request_sent_over_http_but_in_the_background(
    redis_url, redis_client
) -> None:
    """What the gateway submits for a batch line is what it submits for the same body
    sent over HTTP, marked background; a refusal comes back as its status and error."""
    import httpx

    from services.gateway.app import create_app, execute_batch_request
    from services.settings import Settings
    from tests.unit.test_adapters import FakeSubmission

    app = create_app(Settings(model_name="tiny", api_keys="acme:key-acme", redis_url=redis_url))
    submitted = []

    async def submit_all(requests, arrived_at, limits=None):
        submitted.extend(requests)
        return [FakeSubmission(request) for request in requests]

    state = app.state.gateway
    state.backend.submit_all = submit_all
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        status, answer, request_id = await execute_batch_request(state, "acme", CHAT, body)
        assert status == 200 and answer["object"] == "chat.completion" and answer["id"] == request_id
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            sent = await http.post(CHAT, json=body, headers={"Authorization": "Bearer key-acme"})
        assert sent.status_code == 200, sent.text
        batch, direct = submitted
        assert batch.background and not direct.background
        assert (batch.tenant, batch.messages, batch.sampling) == (direct.tenant, direct.messages, direct.sampling)
        status, answer, _ = await execute_batch_request(state, "acme", "/v1/completions",
                                                        {"model": "other", "prompt": "x"})
        assert status == 404 and answer["error"]["code"] == "model_not_found"
        status, answer, _ = await execute_batch_request(state, "acme", CHAT, {"model": "tiny", "messages": 3})
        assert status == 400 and answer["error"]["param"] == "messages"
    finally:
        await app.state.dashboard.close()
        await state.backend.redis.aclose()
