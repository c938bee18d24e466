"""OpenAI response shapes and SSE streams built from reply messages."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from typing import Any

import pytest

from services.gateway.replies import ChoiceStream, TimedReplies
from services.gateway.responses import (
    SSE_DONE,
    ChoiceAnswer,
    ResponseMeta,
    answer_error,
    collect_answer,
    completion_response,
    sse,
    sse_events,
)
from services.gateway.schemas import ToolCalling
from services.messages import ErrorInfo, FinalAnswer, TokenChunk, TokenLogprob, TopLogprob
from services.replies import ReplyStream

COMPLETION = ResponseMeta(request_id="cmpl-1", kind="completion", model="m", created=1700)
CHAT = ResponseMeta(request_id="chatcmpl-1", kind="chat", model="m", created=1700)


def tok(i: int, text: str, text_offset: int | None = None) -> TokenChunk:
    """Output token ``i`` (by default the texts of the tokens before it are one character
    each)."""
    return TokenChunk(request_id="r", token_offset=i, text_offset=i if text_offset is None else text_offset,
                      text=text, token_ids=[i])


def done(tokens: int, reason: str = "stop", error: ErrorInfo | None = None) -> FinalAnswer:
    return FinalAnswer(
        request_id="r",
        token_offset=tokens,
        text_offset=tokens,
        finish_reason=reason,
        prompt_tokens=4,
        completion_tokens=tokens,
        error=error,
    )


def filled(*replies: TokenChunk | FinalAnswer) -> TimedReplies:
    stream = ReplyStream("r")
    for reply in replies:
        stream.offer(reply)
    return TimedReplies(stream, opened_at=0.0)


async def run_sse(
    meta: ResponseMeta,
    stream: TimedReplies | ChoiceStream,
    *,
    include_usage: bool = False,
    continuous_usage: bool = False,
    deadline_in: float = 5.0,
):
    """Events of one stream, decoded; ``[DONE]`` stays a string."""
    choices = stream if isinstance(stream, ChoiceStream) else ChoiceStream([stream])
    first = await choices.next()
    deadline = asyncio.get_running_loop().time() + deadline_in
    raw = [
        e
        async for e in sse_events(
            meta, choices, first, include_usage=include_usage, deadline=deadline, timeout_s=7,
            continuous_usage=continuous_usage,
        )
    ]
    assert all(write.endswith(b"\n\n") for write in raw)  # whole events only
    events: list[Any] = []
    for event in b"".join(raw).split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        payload = event[6:].decode()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_completion_body_shape() -> None:
    body = completion_response(COMPLETION, [ChoiceAnswer(done(3, "length"), "abc")])
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700,
        "model": "m",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                     "text": "abc"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }


def test_chat_body_shape() -> None:
    body = completion_response(CHAT, [ChoiceAnswer(done(1), "hi")])
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
            "message": {"role": "assistant", "content": "hi"},
        }
    ]


async def test_a_named_service_tier_is_said_in_every_object() -> None:
    flex = dataclasses.replace(CHAT, service_tier="flex")
    assert completion_response(flex, [ChoiceAnswer(done(1), "hi")])["service_tier"] == "flex"
    assert "service_tier" not in completion_response(CHAT, [ChoiceAnswer(done(1), "hi")])
    events = await run_sse(flex, filled(tok(0, "h"), tok(1, "i"), done(2)), include_usage=True)
    assert all(e["service_tier"] == "flex" for e in events if e != "[DONE]") and len(events) > 2


async def test_continuous_usage_gives_every_chunk_its_choices_tokens_so_far() -> None:
    """vLLM's ``continuous_usage_stats``: the role chunk counts the prompt, each later
    chunk the tokens its choice generated so far, the finish chunk them all."""
    first = dataclasses.replace(tok(0, "h"), prompt_tokens=4)
    events = await run_sse(CHAT, filled(first, tok(1, "i"), done(2)), include_usage=True, continuous_usage=True)
    used = [(e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"], e["usage"]["total_tokens"])
            for e in events[:-2]]
    assert used == [(4, 0, 4), (4, 1, 5), (4, 2, 6), (4, 2, 6)]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2
    plain = await run_sse(CHAT, filled(first, tok(1, "i"), done(2)), include_usage=True)
    assert all(e["usage"] is None for e in plain[:-2])
    # One step's answer: its first tokens come with the final answer, which counts the prompt.
    one_step = dataclasses.replace(done(0), token_ids=[5, 6], text="ab", completion_tokens=2)
    whole = await run_sse(COMPLETION, filled(one_step), include_usage=True, continuous_usage=True)
    assert [e["usage"]["total_tokens"] for e in whole[:-2]] == [6, 6]


def test_answer_error_mapping() -> None:
    assert answer_error(done(2, "stop")) is None
    assert answer_error(done(2, "length")) is None
    err = answer_error(
        done(
            0,
            "error",
            ErrorInfo(message="prompt too long", status=400, code="context_length_exceeded"),
        )
    )
    assert err is not None and (err.status, err.code, err.message) == (
        400,
        "context_length_exceeded",
        "prompt too long",
    )
    err = answer_error(done(0, "error", ErrorInfo(message="weird", status=200)))
    assert err is not None and err.status == 500
    err = answer_error(done(0, "cancelled"))
    assert err is not None and err.status == 503


async def test_collect_answer_joins_text() -> None:
    [answer] = await collect_answer(ChoiceStream([filled(tok(0, "a"), tok(1, "b"), done(2))]))
    assert (answer.text, answer.final.completion_tokens, answer.logprobs) == ("ab", 2, [])


def scored(i: int, text: str, text_offset: int | None = None) -> TokenChunk:
    """``tok`` with the token's log-probability and two alternatives."""
    chunk = tok(i, text, text_offset)
    chunk.logprobs = [TokenLogprob(token=text, logprob=-0.5 * i,
                                   top=[TopLogprob(7, "x", -0.1), TopLogprob(8, text, -0.5 * i)])]
    return chunk


async def test_completion_logprobs_in_the_legacy_shape() -> None:
    meta = dataclasses.replace(COMPLETION, logprobs=True)
    answers = await collect_answer(ChoiceStream([filled(scored(0, "he"), scored(1, "llo", 2), done(2))]))
    body = completion_response(meta, answers)
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["he", "llo"],
        "token_logprobs": [0.0, -0.5],
        "top_logprobs": [{"x": -0.1, "he": 0.0}, {"x": -0.1, "llo": -0.5}],
        "text_offset": [0, 2],
    }
    # Not asked for: null, as before.
    assert completion_response(COMPLETION, answers)["choices"][0]["logprobs"] is None


async def test_chat_logprobs_with_bytes_and_top_logprobs() -> None:
    meta = dataclasses.replace(CHAT, logprobs=True)
    answers = await collect_answer(ChoiceStream([filled(scored(0, "é"), done(1))]))
    content = completion_response(meta, answers)["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "é", "logprob": 0.0, "bytes": [195, 169], "top_logprobs": [
        {"token": "x", "logprob": -0.1, "bytes": [120]}, {"token": "é", "logprob": 0.0, "bytes": [195, 169]}]}]


async def test_streamed_logprobs_go_with_each_chunk_even_without_text() -> None:
    meta = dataclasses.replace(COMPLETION, logprobs=True)
    events = await run_sse(meta, filled(scored(0, "ab"), scored(1, "", 2), scored(2, "c", 2), done(3)))
    chunks = [c["choices"][0] for c in events[:-1]]
    assert [c["text"] for c in chunks] == ["ab", "", "c", ""]  # a token without text still goes
    assert [c["logprobs"]["text_offset"] if c["logprobs"] else None for c in chunks] == [
        [0], [2], [2], None]
    chat = await run_sse(dataclasses.replace(CHAT, logprobs=True), filled(scored(0, "ab"), done(1)))
    assert [c["choices"][0]["logprobs"] for c in chat[:-1]][1]["content"][0]["token"] == "ab"


async def test_completion_stream_with_usage() -> None:
    events = await run_sse(
        COMPLETION, filled(tok(0, "a"), tok(1, ""), tok(2, "b"), done(3)), include_usage=True
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-1" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["a", "b", ""]  # empty chunk skipped
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "stop"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 0}}


async def test_chat_stream_starts_with_role_and_has_no_usage_by_default() -> None:
    events = await run_sse(CHAT, filled(tok(0, "he"), tok(1, "llo", 2), done(2, "length")))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "he"}, None),
        ({"content": "llo"}, None),
        ({}, "length"),
    ]


async def test_stream_of_a_request_without_tokens() -> None:
    events = await run_sse(CHAT, filled(done(0)))
    assert [c["choices"][0]["finish_reason"] for c in events[:-1]] == [None, "stop"]


async def test_error_after_headers_is_an_error_event() -> None:
    error = ErrorInfo(message="worker died", type="server_error", status=500)
    events = await run_sse(
        COMPLETION, filled(tok(0, "a"), done(1, "error", error)), include_usage=True
    )
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {"message": "worker died", "type": "server_error", "param": None, "code": None}
    }
    assert not any("usage" in e and e["usage"] for e in events[:-1] if isinstance(e, dict))


async def test_timeout_ends_the_stream_with_an_error() -> None:
    stream = filled(tok(0, "a"))
    events = await run_sse(COMPLETION, stream, deadline_in=0.05)
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["code"] == "timeout"
    assert events[2] == "[DONE]"
    assert not stream.arrived and stream.final is None  # the caller cancels it downstream


async def test_stream_waits_for_late_tokens() -> None:
    stream = filled(tok(0, "a"))

    async def late() -> None:
        await asyncio.sleep(0.02)
        stream.stream.offer(tok(1, "b"))
        stream.stream.offer(done(2))

    task = asyncio.create_task(late())
    events = await run_sse(COMPLETION, stream)
    await task
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b", ""]


async def test_replies_already_waiting_go_out_in_one_write_and_none_waits() -> None:
    """Each event is its own, but the events of replies that were already in the stream
    share a write; a reply that is not there yet never holds back what is."""
    stream = filled(tok(0, "a"), tok(1, "b"))
    choices = ChoiceStream([stream])
    first = await choices.next()
    writes = []

    async def late() -> None:
        await asyncio.sleep(0.02)
        assert len(writes) == 1, "the waiting replies were held back"
        stream.stream.offer(tok(2, "c"))
        stream.stream.offer(done(3))

    task = asyncio.create_task(late())
    deadline = asyncio.get_running_loop().time() + 5
    async for write in sse_events(COMPLETION, choices, first, include_usage=True, deadline=deadline,
                                  timeout_s=7):
        writes.append(write)
    await task
    assert [w.count(b"data: ") for w in writes] == [2, 4]  # a b | c, finish, usage, [DONE]


@pytest.mark.parametrize("text", ["plain", "ünïcödé ✓", 'quote " and \n newline', "cr \r lf",
                                  "nel \x85 ls \u2028 ps \u2029 vt \x0b ff \x0c fs \x1c"])
def test_sse_event_is_one_data_line(text: str) -> None:
    """Also for clients that split lines like ``str.splitlines`` (httpx's aiter_lines)."""
    event = sse({"t": text})
    assert event.count(b"\n") == 2 and event.endswith(b"\n\n")
    assert json.loads(event[6:-2]) == {"t": text}
    assert event.decode().splitlines() == [event[:-2].decode(), ""]
    assert SSE_DONE == b"data: [DONE]\n\n"


def child(request_id: str, *replies: TokenChunk | FinalAnswer) -> TimedReplies:
    stream = ReplyStream(request_id)
    for reply in replies:
        stream.offer(dataclasses.replace(reply, request_id=request_id))
    return TimedReplies(stream, opened_at=0.0)


async def test_n_choices_are_read_together_and_counted_once_for_the_prompt() -> None:
    choices = ChoiceStream([child("r-0", tok(0, "a"), done(1)),
                            child("r-1", tok(0, "x"), tok(1, "y"), done(2, "length"))])
    body = completion_response(dataclasses.replace(COMPLETION, n=2), await collect_answer(choices))
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"), (1, "xy", "length")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 0}}


async def test_a_batch_echoes_each_choice_its_own_prompt_and_counts_every_prompt_once() -> None:
    """Two prompts, two choices each: choices 0-1 answer the first prompt, 2-3 the second."""
    first = dataclasses.replace(done(1), prompt_tokens=4)
    second = dataclasses.replace(done(1), prompt_tokens=9, cached_tokens=8)
    meta = dataclasses.replace(COMPLETION, echo=("Hi ", "Bye "), n=2)
    streams = [child("b-0", tok(0, "a"), first), child("b-1", tok(0, "b"), first),
               child("b-2", tok(0, "c"), second), child("b-3", tok(0, "d"), second)]
    body = completion_response(meta, await collect_answer(ChoiceStream(streams)))
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "Hi a"), (1, "Hi b"), (2, "Bye c"), (3, "Bye d")]
    assert body["usage"] == {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17,
                             "prompt_tokens_details": {"cached_tokens": 8}}
    streams = [child("b-0", tok(0, "a"), first), child("b-1", tok(0, "b"), first),
               child("b-2", tok(0, "c"), second), child("b-3", tok(0, "d"), second)]
    events = await run_sse(meta, ChoiceStream(streams), include_usage=True)
    texts: dict[int, str] = {}
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "Hi a", 1: "Hi b", 2: "Bye c", 3: "Bye d"}
    assert events[-2]["usage"] == {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17,
                             "prompt_tokens_details": {"cached_tokens": 8}}


async def test_a_token_id_prompt_is_echoed_with_the_text_its_worker_spelled() -> None:
    """The gateway cannot spell token ids: the echo of such a prompt is the text the
    first reply brings, beside a text prompt's own in the same batch."""
    meta = dataclasses.replace(COMPLETION, echo=("Hi ", None))

    def streams() -> ChoiceStream:
        return ChoiceStream([child("e-0", tok(0, "a"), done(1)),
                             child("e-1", dataclasses.replace(tok(0, "b"), echoed_prompt="<s>Bye "), done(1))])

    body = completion_response(meta, await collect_answer(streams()))
    assert [c["text"] for c in body["choices"]] == ["Hi a", "<s>Bye b"]
    events = await run_sse(meta, streams())
    texts = {0: "", 1: ""}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == {0: "Hi a", 1: "<s>Bye b"}


async def test_n_choices_stream_interleaved_each_with_its_own_end() -> None:
    late = child("r-1", tok(0, "x"))
    choices = ChoiceStream([child("r-0", tok(0, "a"), done(1)), late])

    async def finish_late() -> None:
        await asyncio.sleep(0.02)
        late.stream.offer(dataclasses.replace(tok(1, "y"), request_id="r-1"))
        late.stream.offer(dataclasses.replace(done(2), request_id="r-1"))

    task = asyncio.create_task(finish_late())
    events = await run_sse(dataclasses.replace(CHAT, n=2), choices, include_usage=True)
    await task
    chunks = events[:-1]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:2]] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    per_choice: dict[int, list] = {0: [], 1: []}
    for c in chunks[2:-1]:
        choice = c["choices"][0]
        per_choice[choice["index"]].append(choice["delta"].get("content") or choice["finish_reason"])
    assert per_choice == {0: ["a", "stop"], 1: ["x", "y", "stop"]}
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 0}}


async def test_an_error_in_one_choice_ends_the_answer() -> None:
    error = ErrorInfo(message="worker died", type="server_error", status=500)
    pending = child("r-1")
    choices = ChoiceStream([child("r-0", tok(0, "a"), done(1, "error", error)), pending])
    answers = await collect_answer(choices)
    assert answer_error(answers[0].final) is not None  # not waiting for the other choice
    choices.close()


async def test_an_echoed_completion_starts_with_the_prompt_and_its_logprobs() -> None:
    meta = dataclasses.replace(COMPLETION, logprobs=True, echo=("Hi",))
    first = scored(0, "!")
    first.prompt_logprobs = [TokenLogprob(token="H", logprob=0.0),
                             TokenLogprob(token="i", logprob=-2.0, top=[TopLogprob(3, "o", -1.0)])]
    body = completion_response(meta, await collect_answer(ChoiceStream([filled(first, done(1))])))
    choice = body["choices"][0]
    assert choice["text"] == "Hi!"
    assert choice["logprobs"] == {
        "tokens": ["H", "i", "!"],
        "token_logprobs": [None, -2.0, 0.0],  # nothing predicts the first
        "top_logprobs": [None, {"o": -1.0, "i": -2.0}, {"x": -0.1, "!": 0.0}],
        "text_offset": [0, 1, 2],
    }
    events = await run_sse(meta, filled(first, scored(1, "?", 1), done(2)))
    chunks = [c["choices"][0] for c in events[:-1]]
    assert [c["text"] for c in chunks] == ["Hi!", "?", ""]
    assert chunks[0]["logprobs"]["tokens"] == ["H", "i", "!"]
    assert chunks[1]["logprobs"]["text_offset"] == [3]
    plain = dataclasses.replace(COMPLETION, echo=("Hi",))  # echo without logprobs: the text only
    events = await run_sse(plain, filled(tok(0, "!"), done(1)))
    assert [(c["choices"][0]["text"], c["choices"][0]["logprobs"]) for c in events[:-1]] == [
        ("Hi!", None), ("", None)]


async def test_prompt_logprobs_in_vllms_shape_beside_an_echo_that_lists_fewer() -> None:
    """vLLM's ``prompt_logprobs``: per prompt token (null for the first), the token and
    its position's most likely ones by id, with rank and text; a completion's in each
    choice, a chat's at the top. An echo asking fewer alternatives lists only those."""
    first = scored(0, "!")
    first.prompt_logprobs = [
        TokenLogprob(token="H", logprob=0.0, token_id=5),
        TokenLogprob(token="i", logprob=-2.0, token_id=6, rank=3,
                     top=[TopLogprob(3, "o", -1.0), TopLogprob(4, "a", -1.5)]),
        TokenLogprob(token="!", logprob=-0.1, token_id=8, rank=1,
                     top=[TopLogprob(8, "!", -0.1), TopLogprob(9, "?", -3.0)]),
    ]
    answers = await collect_answer(ChoiceStream([filled(first, done(1))]))
    expected = [None,
                {"6": {"logprob": -2.0, "rank": 3, "decoded_token": "i"},
                 "3": {"logprob": -1.0, "rank": 1, "decoded_token": "o"},
                 "4": {"logprob": -1.5, "rank": 2, "decoded_token": "a"}},
                {"8": {"logprob": -0.1, "rank": 1, "decoded_token": "!"},
                 "9": {"logprob": -3.0, "rank": 2, "decoded_token": "?"}}]
    meta = dataclasses.replace(COMPLETION, logprobs=True, top_logprobs=1, echo=("Hi!",), prompt_logprobs=2)
    choice = completion_response(meta, answers)["choices"][0]
    assert choice["prompt_logprobs"] == expected
    assert choice["logprobs"]["top_logprobs"][1] == {"o": -1.0, "i": -2.0}  # the echo's one alternative
    one = dataclasses.replace(COMPLETION, prompt_logprobs=1)
    assert [list(p or {}) for p in completion_response(one, answers)["choices"][0]["prompt_logprobs"]] == [
        [], ["6", "3"], ["8"]]
    chat = completion_response(dataclasses.replace(CHAT, prompt_logprobs=2), answers)
    assert chat["prompt_logprobs"] == expected and "prompt_logprobs" not in chat["choices"][0]
    assert "prompt_logprobs" not in completion_response(COMPLETION, answers)["choices"][0]


async def test_chat_bytes_are_the_tokens_own_where_their_text_is_part_of_a_character() -> None:
    meta = dataclasses.replace(CHAT, logprobs=True)
    half = tok(0, "")
    half.logprobs = [TokenLogprob(token="\ufffd", logprob=-1.0, raw=b"\xe2\x82",
                                  top=[TopLogprob(5, "\ufffd", -1.0, raw=b"\xe2")])]
    rest = tok(1, "€")
    rest.logprobs = [TokenLogprob(token="\ufffd", logprob=-0.5, raw=b"\xac")]
    [answer] = await collect_answer(ChoiceStream([filled(half, rest, done(2))]))
    content = completion_response(meta, [answer])["choices"][0]["logprobs"]["content"]
    assert bytes(content[0]["bytes"] + content[1]["bytes"]).decode() == "€"
    assert content[0]["top_logprobs"][0]["bytes"] == [0xE2]


async def test_tokens_named_by_id_tell_apart_what_their_text_does_not() -> None:
    """vLLM's ``return_tokens_as_token_ids``: two halves of one character both read as
    U+FFFD, and would share one key of a completion's ``top_logprobs``; by id they do
    not. Offsets still count the text."""
    first = tok(0, "")
    first.logprobs = [TokenLogprob(token="\ufffd", logprob=-1.0, raw=b"\xe2\x82", token_id=11,
                                   top=[TopLogprob(12, "\ufffd", -0.5, raw=b"\xe2")])]
    second = tok(1, "\u20ac")
    second.logprobs = [TokenLogprob(token="\ufffd", logprob=-0.5, raw=b"\xac", token_id=13)]
    answers = await collect_answer(ChoiceStream([filled(first, second, done(2))]))
    by_text = completion_response(dataclasses.replace(COMPLETION, logprobs=True), answers)
    assert by_text["choices"][0]["logprobs"]["top_logprobs"][0] == {"\ufffd": -0.5}  # one key of two
    meta = dataclasses.replace(COMPLETION, logprobs=True, tokens_as_ids=True)
    assert completion_response(meta, answers)["choices"][0]["logprobs"] == {
        "tokens": ["token_id:11", "token_id:13"],
        "token_logprobs": [-1.0, -0.5],
        "top_logprobs": [{"token_id:12": -0.5, "token_id:11": -1.0}, {"token_id:13": -0.5}],
        "text_offset": [0, 1],
    }
    chat = dataclasses.replace(CHAT, logprobs=True, tokens_as_ids=True)
    content = completion_response(chat, answers)["choices"][0]["logprobs"]["content"]
    assert [(c["token"], bytes(c["bytes"])) for c in content] == [
        ("token_id:11", b"token_id:11"), ("token_id:13", b"token_id:13")]
    assert content[0]["top_logprobs"] == [{"token": "token_id:12", "logprob": -0.5,
                                           "bytes": list(b"token_id:12")}]


# ---- forced tool calls -----------------------------------------------------------------

NAMED = dataclasses.replace(CHAT, tool_calling=ToolCalling("get_weather"))
REQUIRED = dataclasses.replace(CHAT, tool_calling=ToolCalling(None))
CALLS = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'


def test_a_forced_call_is_answered_as_tool_calls_not_content() -> None:
    named = completion_response(NAMED, [ChoiceAnswer(done(3), '{"city": "Oslo"}')])["choices"][0]
    assert named["finish_reason"] == "stop"  # vLLM's for a named function
    assert named["message"]["content"] is None
    [call] = named["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    required = completion_response(REQUIRED, [ChoiceAnswer(done(9), CALLS)])["choices"][0]
    assert required["finish_reason"] == "tool_calls"
    assert [c["function"] for c in required["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}, {"name": "get_time", "arguments": "{}"}]
    assert len({c["id"] for c in required["message"]["tool_calls"]}) == 2


def test_a_forced_call_cut_by_max_tokens_is_content() -> None:
    for meta in (NAMED, REQUIRED):
        choice = completion_response(meta, [ChoiceAnswer(done(3, "length"), '[{"na')])["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"] == {"role": "assistant", "content": '[{"na'}


async def test_a_named_call_streams_its_arguments_as_they_come() -> None:
    events = await run_sse(NAMED, filled(tok(0, '{"ci'), tok(1, 'ty": 1}', 4), done(2)))
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in events[:-1]]
    assert deltas[0] == ({"role": "assistant", "content": None}, None)
    first, second = deltas[1][0]["tool_calls"], deltas[2][0]["tool_calls"]
    assert first[0]["id"].startswith("call_")
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"ci'}}]
    assert second == [{"index": 0, "function": {"arguments": 'ty": 1}'}}]
    assert deltas[3] == ({}, "stop")


async def test_a_required_call_list_streams_whole_once_complete() -> None:
    half = len(CALLS) // 2
    events = await run_sse(REQUIRED, filled(tok(0, CALLS[:half]), tok(1, CALLS[half:], half), done(2)))
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in events[:-1]]
    assert len(deltas) == 3
    calls = deltas[1][0]["tool_calls"]
    assert [(c["index"], c["function"]) for c in calls] == [
        (0, {"name": "get_weather", "arguments": '{"city": "Oslo"}'}), (1, {"name": "get_time", "arguments": "{}"})]
    assert deltas[2] == ({}, "tool_calls")
    cut = await run_sse(REQUIRED, filled(tok(0, '[{"na'), done(1, "length")))
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in cut[1:-1]] == [
        ({"content": '[{"na'}, None), ({}, "length")]


AUTO = dataclasses.replace(CHAT, tool_calling=ToolCalling(None, "hermes"))
HERMES_CALL = '<tool_call>{"name": "get_time", "arguments": {"tz": "utc"}}</tool_call>'


def test_a_call_the_model_chose_to_make_is_read_out_of_its_answer() -> None:
    called = completion_response(AUTO, [ChoiceAnswer(done(9), "Checking. " + HERMES_CALL)])["choices"][0]
    assert called["finish_reason"] == "tool_calls"
    assert called["message"]["content"] == "Checking. "
    assert [c["function"] for c in called["message"]["tool_calls"]] == [
        {"name": "get_time", "arguments": '{"tz": "utc"}'}]
    plain = completion_response(AUTO, [ChoiceAnswer(done(2), "It is noon.")])["choices"][0]
    assert (plain["finish_reason"], plain["message"]) == ("stop", {"role": "assistant", "content": "It is noon."})


async def test_a_chosen_call_streams_whole_between_its_content() -> None:
    text = "Checking. " + HERMES_CALL
    events = await run_sse(AUTO, filled(tok(0, text[:12]), tok(1, text[12:30], 12), tok(2, text[30:], 30),
                                        done(3)))
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in events[:-1]]
    assert deltas[1] == ({"content": "Checking. "}, None)
    [call] = [d["tool_calls"] for d, _ in deltas if "tool_calls" in d]
    assert [(c["index"], c["function"]) for c in call] == [(0, {"name": "get_time", "arguments": '{"tz": "utc"}'})]
    assert deltas[-1] == ({}, "tool_calls")
    assert not any("<tool" in d.get("content", "") for d, _ in deltas)


THINKING = dataclasses.replace(CHAT, reasoning_parser="qwen3")


def test_a_thinking_models_answer_has_its_thinking_apart() -> None:
    message = completion_response(THINKING, [ChoiceAnswer(done(5), "<think>Hm.</think>Paris.")])[
        "choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Paris.", "reasoning_content": "Hm."}
    plain = completion_response(THINKING, [ChoiceAnswer(done(1), "Paris.")])["choices"][0]["message"]
    assert plain == {"role": "assistant", "content": "Paris.", "reasoning_content": None}
    cut = completion_response(THINKING, [ChoiceAnswer(done(2, "length"), "<think>Hm")])["choices"][0]
    assert cut["message"] == {"role": "assistant", "content": None, "reasoning_content": "Hm"}


async def test_thinking_streams_as_reasoning_content_then_the_answer_with_its_calls() -> None:
    meta = dataclasses.replace(THINKING, tool_calling=ToolCalling(None, "hermes"))
    text = "<think>Need the time.</think>Checking. " + HERMES_CALL
    cuts = [0, 9, 20, 33, 45, len(text)]
    replies = [tok(i, text[a:b], a) for i, (a, b) in enumerate(itertools.pairwise(cuts))]
    events = await run_sse(meta, filled(*replies, done(len(replies))))
    deltas = [c["choices"][0]["delta"] for c in events[1:-2]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Need the time."
    assert "".join(d.get("content") or "" for d in deltas) == "Checking. "
    [call] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert call[0]["function"]["name"] == "get_time"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def with_prompt_ids(reply: TokenChunk | FinalAnswer, ids: list[int]) -> TokenChunk | FinalAnswer:
    return dataclasses.replace(reply, prompt_token_ids=ids)


async def test_token_ids_of_a_completion_come_per_choice_with_its_prompts() -> None:
    """vLLM's ``return_token_ids``: each choice's output ids, and the ids of the prompt it
    answers; streamed, each chunk its new ids and a choice's first its prompt's."""
    meta = dataclasses.replace(COMPLETION, token_ids=True, n=1)

    def streams() -> ChoiceStream:
        return ChoiceStream([child("t-0", with_prompt_ids(tok(0, "a"), [1, 5]), tok(1, "b"), done(2)),
                             child("t-1", with_prompt_ids(done(0), [1, 9, 9]))])

    body = completion_response(meta, await collect_answer(streams()))
    assert [(c["token_ids"], c["prompt_token_ids"]) for c in body["choices"]] == [
        ([0, 1], [1, 5]), ([], [1, 9, 9])]
    assert "prompt_token_ids" not in body
    events = await run_sse(meta, streams())
    ids: dict[int, list[int]] = {0: [], 1: []}
    prompts: dict[int, list[list[int]]] = {0: [], 1: []}
    for event in events[:-1]:
        for choice in event["choices"]:
            ids[choice["index"]] += choice["token_ids"]
            if "prompt_token_ids" in choice:
                prompts[choice["index"]].append(choice["prompt_token_ids"])
    assert ids == {0: [0, 1], 1: []}
    assert prompts == {0: [[1, 5]], 1: [[1, 9, 9]]}
    assert "token_ids" not in completion_response(COMPLETION, [ChoiceAnswer(done(1), "a")])["choices"][0]


async def test_token_ids_of_a_chat_hold_every_token_once_even_while_parsers_hold_text_back() -> None:
    """A chat's prompt ids are the response's (on the first chunk, streamed); its chunks'
    ids, joined, are the answer's even where the reasoning parser holds text back."""
    for meta in (dataclasses.replace(CHAT, token_ids=True), dataclasses.replace(THINKING, token_ids=True)):
        text = "<think>Hm.</think>Paris."
        cuts = [0, 3, 7, 12, 18, len(text)]
        replies = [tok(i, text[a:b], a) for i, (a, b) in enumerate(itertools.pairwise(cuts))]
        replies[0] = with_prompt_ids(replies[0], [1, 2, 3])
        body = completion_response(meta, await collect_answer(ChoiceStream([filled(*replies, done(5))])))
        assert body["prompt_token_ids"] == [1, 2, 3]
        assert body["choices"][0]["token_ids"] == [0, 1, 2, 3, 4]
        events = await run_sse(meta, filled(*replies, done(5)))
        chunks = events[:-1]
        assert chunks[0]["prompt_token_ids"] == [1, 2, 3]
        assert all("prompt_token_ids" not in c for c in chunks[1:])
        assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == [0, 1, 2, 3, 4]


async def test_what_stopped_an_answer_is_said_as_vllms_stop_reason() -> None:
    """The stop string matched or the stop token named; null for the model's own end."""
    for why in (" three", 7, None):
        final = dataclasses.replace(done(1), stop_reason=why)
        body = completion_response(COMPLETION, [ChoiceAnswer(final, "a")])
        assert body["choices"][0]["stop_reason"] == why
        events = await run_sse(CHAT, filled(tok(0, "a"), final))
        assert [c["choices"][0]["stop_reason"] for c in events[:-1] if c["choices"][0]["finish_reason"]] == [why]
        assert all("stop_reason" not in c["choices"][0] for c in events[:-1]
                   if not c["choices"][0]["finish_reason"])
