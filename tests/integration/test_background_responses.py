"""Background responses through the openai client against the running system: queued
at once, polled to their answer, cancelled while they run, each tenant's its own."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from services.settings import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME


def polled(client: openai.OpenAI, response_id: str, until: tuple[str, ...], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status in until:
            return response
        time.sleep(0.05)
    raise TimeoutError(f"response {response_id} still {response.status}")


def test_a_background_response_is_queued_at_once_and_polled_to_its_answer(acme, globex):
    """It answers as the same request sent and waited on does (seeded), keeps the id it
    was given, and is gone on from as any stored response is; another tenant sees none of it."""
    ask = {"model": MODEL, "input": "Tell me about the sea.", "max_output_tokens": 12,
           "extra_body": {"seed": 7}}
    queued = acme.responses.create(**ask, background=True, metadata={"job": "sea"})
    assert (queued.status, queued.background, queued.output) == ("queued", True, [])
    assert queued.metadata == {"job": "sea"}
    done = polled(acme, queued.id, ("completed", "incomplete", "failed"))
    assert done.status in ("completed", "incomplete"), done.error
    assert (done.id, done.created_at, done.background) == (queued.id, queued.created_at, True)
    waited = acme.responses.create(**ask)
    assert done.output_text == waited.output_text and done.usage.output_tokens == waited.usage.output_tokens
    [item] = acme.responses.input_items.list(done.id).data
    assert item.content[0].text == "Tell me about the sea."
    more = acme.responses.create(model=MODEL, input="And the sky?", max_output_tokens=4,
                                 previous_response_id=done.id, background=True)
    assert polled(acme, more.id, ("completed", "incomplete")).usage.input_tokens > waited.usage.input_tokens
    assert acme.responses.cancel(done.id).status == done.status  # ended: cancelling changes nothing
    for call in (lambda: globex.responses.retrieve(queued.id), lambda: globex.responses.cancel(queued.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def cancelled_runs(system) -> float:
    text = httpx.get(f"{system.gateway_url}/metrics", timeout=5).text
    found = re.search(r'^fairway:gateway_background_responses_total\{outcome="cancelled"\} (\S+)$', text,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_background_response_cancelled_while_it_runs_stops_and_is_never_answered(acme, system):
    """Cancelled mid-answer, it stays cancelled (its answer is never stored) and the
    gateway that ran it stops its request."""
    before = cancelled_runs(system)
    long = acme.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=900,
                                 background=True, extra_body={"ignore_eos": True})
    polled(acme, long.id, ("in_progress",), timeout=60)
    time.sleep(0.5)
    cancelled = acme.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.id == long.id
    assert acme.responses.cancel(long.id).status == "cancelled"  # idempotent
    deadline = time.monotonic() + 30
    while cancelled_runs(system) == before:  # the runner polls for it once a second
        assert time.monotonic() < deadline, "the run was not stopped"
        time.sleep(0.1)
    assert acme.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as caught:
        acme.responses.create(model=MODEL, input="Go on", previous_response_id=long.id)
    assert "cancelled" in caught.value.message


def test_a_plain_response_cannot_be_cancelled_and_a_bad_background_one_is_refused_at_once(acme):
    plain = acme.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        acme.responses.cancel(plain.id)
    assert caught.value.body["param"] == "response_id"
    with pytest.raises(openai.BadRequestError) as caught:
        acme.responses.create(model=MODEL, input="Hi", background=True, store=False)
    assert caught.value.body["param"] == "background"
    with pytest.raises(openai.NotFoundError):
        acme.responses.cancel("resp_unknown")


def test_a_streamed_background_response_is_read_again_from_where_a_client_left(acme):
    """The stream of a background response (stream and background true) begins as it is
    queued; a client that drops it mid-way reads the rest with GET ?stream=true and
    starting_after, and another reads it all again once it ended."""
    stream = acme.responses.create(model=MODEL, input="Tell me a tale.", max_output_tokens=40, background=True,
                                   stream=True, extra_body={"ignore_eos": True, "seed": 3})
    first = []
    for event in stream:
        first.append(event)
        if event.type == "response.output_text.delta" and len(first) > 6:
            break
    stream.close()  # the connection drops; the response runs on
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert first[0].response.status == "queued" and first[0].response.background
    response_id = first[0].response.id
    rest = list(acme.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.incomplete"  # cut by max_output_tokens, as asked
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text == acme.responses.retrieve(response_id).output_text
    again = list(acme.responses.retrieve(response_id, stream=True))
    assert [e.sequence_number for e in again] == numbers
    plain = acme.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        list(acme.responses.retrieve(plain.id, stream=True))
    assert caught.value.body["param"] == "stream"
