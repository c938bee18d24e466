"""The Batch API through the openai client against the running system: a file of
requests in, its answers and errors out as files, each tenant seeing only its own."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from services.settings import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME


def upload(client: openai.OpenAI, rows: list[dict | str]):
    data = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()
    return client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")


def finished(client: openai.OpenAI, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch.status}: {batch.request_counts}")


def lines_of(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_batch_of_chats_is_answered_as_files(acme, globex):
    """Each line runs as the chat it holds; answers in the output file in input order with
    their usage, a request the gateway refuses (unknown model) in the error file."""
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}],
                      "max_tokens": 4 + i, "seed": i}} for i in range(5)]
    rows.insert(2, {"custom_id": "wrong-model", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}})
    source = upload(acme, rows)
    assert (source.purpose, source.status, source.bytes) == ("batch", "processed", source.bytes)
    batch = acme.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    done = finished(acme, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
    assert done.metadata == {"job": "nightly"} and done.completed_at >= done.in_progress_at
    output = lines_of(acme, done.output_file_id)
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(5)]
    for i, o in enumerate(output):
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert body["object"] == "chat.completion" and body["id"] == o["response"]["request_id"]
        assert body["usage"]["completion_tokens"] <= 4 + i
    assert done.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
    [error] = lines_of(acme, done.error_file_id)
    assert error["custom_id"] == "wrong-model" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"
    # It ran as the same chat sent on its own does.
    alone = acme.chat.completions.create(**rows[0]["body"])
    assert alone.usage.prompt_tokens == output[0]["response"]["body"]["usage"]["prompt_tokens"]
    assert batch.id in [b.id for b in acme.batches.list()]
    # Another tenant sees none of it.
    for call in (lambda: globex.batches.retrieve(batch.id), lambda: globex.files.content(done.output_file_id),
                 lambda: globex.files.retrieve(source.id), lambda: globex.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in globex.batches.list()]
    with pytest.raises(openai.ConflictError):  # it has ended
        acme.batches.cancel(batch.id)
    assert acme.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(source.id)


def test_a_bad_input_file_fails_the_batch_with_its_line_errors(acme):
    source = upload(acme, [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                            "body": {"model": MODEL, "prompt": "x"}}, "{not json"])
    batch = acme.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [
        (1, "mismatched_url", "url"), (2, "invalid_json_line", None)]
    for bad, param in (({"endpoint": "/v1/embeddings"}, "endpoint"),
                       ({"completion_window": "1h"}, "completion_window")):
        args = {"input_file_id": source.id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **bad}
        with pytest.raises(openai.BadRequestError) as refused:
            acme.batches.create(**args)
        assert refused.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as missing:
        acme.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                            completion_window="24h")
    assert missing.value.body["param"] == "input_file_id"


def test_a_batch_of_responses_and_one_cancelled(acme):
    """The Responses API as a batch endpoint; and a batch cancelled while it runs ends
    cancelled with the answers it had."""
    rows = [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
             "body": {"model": MODEL, "input": "Say hi.", "max_output_tokens": 3}}]
    done = finished(acme, acme.batches.create(input_file_id=upload(acme, rows).id, endpoint="/v1/responses",
                                              completion_window="24h").id)
    [answer] = lines_of(acme, done.output_file_id)
    assert answer["response"]["body"]["object"] == "response"
    assert answer["response"]["body"]["usage"]["output_tokens"] == done.usage.output_tokens

    long = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}}
            for i in range(40)]
    batch = acme.batches.create(input_file_id=upload(acme, long).id, endpoint="/v1/completions",
                                completion_window="24h")
    cancelling = acme.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = finished(acme, batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts.completed < 40


def test_a_flex_request_is_served_in_the_background_tier(acme):
    """OpenAI's service_tier "flex" asks for what a batch's requests get: spare capacity."""
    answer = acme.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, service_tier="flex")
    assert answer.service_tier == "flex" and answer.usage.completion_tokens <= 2
    plain = acme.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.service_tier is None
