"""The Responses API: its requests read into chats, its answers written as responses."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from typing import Any

import pytest

from services.gateway.errors import ApiError
from services.gateway.replies import ChoiceStream
from services.gateway.responses import ChoiceAnswer, ResponseMeta, collect_answer
from services.gateway.responses_api import (
    ResponsesBody,
    answered_response,
    read_request,
    response_events,
    responses_error,
)
from services.gateway.schemas import ToolCalling, check_body, parse_body, to_completion_request
from services.messages import ErrorInfo, TokenLogprob, TopLogprob
from services.settings import Settings
from tests.unit.test_gateway_responses import done, filled, tok

META = ResponseMeta(request_id="resp_1", kind="chat", model="m", created=1700)
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def read(**fields: Any):
    return read_request(parse_body(json.dumps({"model": "m", **fields}).encode(), ResponsesBody))


def refused(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        read(**fields)
    assert caught.value.status == 400
    return caught.value


def test_a_string_input_is_a_user_message_after_the_instructions() -> None:
    chat = read(input="Hi", instructions="Be brief", max_output_tokens=7, temperature=0.5).chat
    assert [(m.role, m.content[0].text) for m in chat.messages] == [("system", "Be brief"), ("user", "Hi")]
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p) == (7, 0.5, None)
    assert not chat.logprobs and chat.tools is None


def test_input_items_become_the_conversation_with_its_calls_and_their_outputs() -> None:
    chat = read(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                     {"type": "input_text", "text": "in Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "7C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "20C"}]},
        {"role": "developer", "content": "Answer in one line."},
    ], tools=[WEATHER]).chat
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool", "developer"]
    assert chat.messages[0].content[0].text == "Weather in Oslo?"
    assistant = chat.messages[1]
    assert assistant.content[0].text == "Checking."  # the calls join the text before them
    assert [(c.id, c.function.arguments) for c in assistant.tool_calls] == [
        ("call_1", '{"city":"Oslo"}'), ("call_2", '{"city":"Rome"}')]
    assert [(m.tool_call_id, m.content[0].text) for m in chat.messages[2:4]] == [
        ("call_1", "7C"), ("call_2", "20C")]
    lone = read(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]).chat
    assert lone.messages[0].role == "assistant" and lone.messages[0].content is None


def test_a_continued_conversation_has_the_earlier_items_before_the_input() -> None:
    earlier = [{"type": "message", "role": "user", "content": "Hi"},
               {"type": "reasoning", "id": "rs_1", "summary": []},
               {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]}]
    body = parse_body(json.dumps({"model": "m", "input": "And you?", "instructions": "Be brief",
                                  "previous_response_id": "resp_0"}).encode(), ResponsesBody)
    request = read_request(body, earlier, store=True)
    assert [(m.role, m.content[0].text) for m in request.chat.messages] == [
        ("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "And you?")]
    assert request.items == [*earlier, {"type": "message", "role": "user", "content": "And you?"}]
    assert (request.echo["store"], request.echo["previous_response_id"]) == (True, "resp_0")
    bad = parse_body(json.dumps({"model": "m", "input": [{"role": "robot", "content": "x"}],
                                 "previous_response_id": "resp_0"}).encode(), ResponsesBody)
    with pytest.raises(ApiError) as caught:
        read_request(bad, earlier)
    assert caught.value.param == "input.0.role"  # the input's own index


def test_tools_tool_choice_format_logprobs_and_effort_map_to_the_chats_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = read(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                   parallel_tool_calls=False, include=["message.output_text.logprobs"], top_logprobs=3,
                   reasoning={"effort": "low"}, chat_template_kwargs={"enable_thinking": False})
    chat = request.chat
    [tool] = chat.tools
    assert (tool.function.name, tool.function.description, tool.function.parameters) == (
        "get_weather", "The weather", WEATHER["parameters"])
    assert chat.tool_choice.function.name == "get_weather" and chat.parallel_tool_calls is False
    assert (chat.logprobs, chat.top_logprobs) == (True, 3)
    assert (chat.reasoning_effort, chat.chat_template_kwargs) == ("low", {"enable_thinking": False})
    wire = to_completion_request(chat, request_id="resp_1", tenant="t", now=0.0, reply_to="q",
                                 max_model_len=2048, deadline_ms=None)
    assert {(a.name, a.value) for a in wire.chat_template_kwargs} == {
        ("enable_thinking", False), ("reasoning_effort", "low")}
    assert request.echo["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert request.echo["tools"] == [WEATHER] and request.echo["parallel_tool_calls"] is False
    formatted = read(input="x", text={"format": {"type": "json_schema", "name": "a", "schema": schema}}).chat
    assert formatted.response_format == {"type": "json_schema",
                                         "json_schema": {"name": "a", "schema": schema, "strict": None}}
    assert read(input="x", text={"format": {"type": "json_object"}}).chat.response_format == {
        "type": "json_object"}
    assert read(input="x", text={"format": {"type": "text"}}).chat.response_format is None
    assert not read(input="x", top_logprobs=3).chat.logprobs  # only with include, as OpenAI


def test_the_wire_request_is_a_chat_with_the_extensions_passed_through() -> None:
    chat = read(input="x", seed=5, top_k=4, stop=["\n"], min_tokens=2, guided_regex="[a-z]+",
                priority=4, include_stop_str_in_output=True, skip_special_tokens=False,
                spaces_between_special_tokens=False, bad_words=["no"]).chat
    wire = to_completion_request(chat, request_id="resp_1", tenant="t", now=0.0, reply_to="q",
                                 max_model_len=2048, deadline_ms=None)
    assert wire.kind == "chat" and wire.messages[0].content == "x"
    assert (wire.sampling.seed, wire.sampling.top_k, wire.sampling.stop, wire.sampling.min_tokens) == (
        5, 4, ["\n"], 2)
    assert (wire.sampling.structured.kind, wire.sampling.structured.spec) == ("regex", "[a-z]+")
    assert wire.priority == 4
    s = wire.sampling
    assert (s.include_stop_str_in_output, s.skip_special_tokens, s.bad_words) == (True, False, ["no"])
    assert not s.spaces_between_special_tokens
    assert read(input="x", allowed_token_ids=[3]).chat.allowed_token_ids == [3]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"previous_response_id": "resp_0"}, "previous_response_id", "keeps no such thing"),
    ({"background": True}, "background", "in a batch"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "keeps no such thing"),
    ({"truncation": "auto"}, "truncation", "truncation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type", "'input_image'"),
    ({"input": [{"type": "web_search_call", "id": "w"}]}, "input.0.type", "web_search_call"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "one of user"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id",
     "must be a string"),
    ({"input": ["x"]}, "input.0", "input item"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "built-in tool 'web_search'"),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice", "allowed_tools"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "'grammar'"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "verbosity"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema", "needs schema"),
    ({"reasoning": {"effort": 3}}, "reasoning.effort", "must be a string"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 keys"),
    ({"top_k": "many"}, "top_k", "top_k"),
    ({"input": []}, "input", "input"),
])
def test_what_this_server_does_not_serve_is_a_400_naming_its_field(fields, param, words) -> None:
    err = refused(**{"input": "x", **fields})
    assert err.param == param, err.message
    assert words in err.message


def test_the_chats_checks_name_the_responses_fields() -> None:
    settings = Settings(model_name="m", max_model_len=100)
    for fields, param, words in [
        ({"max_output_tokens": 101}, "max_output_tokens", "max_output_tokens (101) exceeds"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}},
                   "verbosity": None}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
         "not text.format and structured_outputs"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "text": {"format": {"type": "json_object"}}}, "tool_choice", "forced tool call"),
    ]:
        chat = read(input="x", **fields).chat
        with pytest.raises(ApiError) as caught:
            check_body(chat, settings)
            to_completion_request(chat, request_id="r", tenant="t", now=0.0, reply_to="q",
                                  max_model_len=100, deadline_ms=None)
        err = responses_error(caught.value)
        assert (err.param, words in err.message) == (param, True), err.message


THINKING = dataclasses.replace(META, reasoning_parser="qwen3")
AUTO = dataclasses.replace(META, tool_calling=ToolCalling(None, "hermes"))
HERMES_CALL = '<tool_call>{"name": "get_time", "arguments": {"tz": "utc"}}</tool_call>'
ECHO = read(input="x", metadata={"app": "a"}).echo


def without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in ("id", "item_id", "call_id")}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def test_a_finished_answer_is_a_completed_response_with_a_message() -> None:
    body = answered_response(META, ECHO, ChoiceAnswer(done(2), "Hello."))
    assert body["id"] == "resp_1" and body["object"] == "response" and body["created_at"] == 1700
    assert (body["status"], body["error"], body["incomplete_details"]) == ("completed", None, None)
    [item] = body["output"]
    assert item["id"].startswith("msg_")
    assert without_ids(item) == {"type": "message", "role": "assistant", "status": "completed", "content": [
        {"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}]}
    assert body["usage"] == {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 6}
    assert (body["metadata"], body["store"], body["text"]) == ({"app": "a"}, False, {"format": {"type": "text"}})


def test_an_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    body = answered_response(META, ECHO, ChoiceAnswer(done(3, "length"), "Hel"))
    assert (body["status"], body["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert body["output"][0]["status"] == "incomplete"


def test_thinking_and_calls_are_output_items_of_their_own() -> None:
    meta = dataclasses.replace(THINKING, tool_calling=ToolCalling(None, "hermes"))
    body = answered_response(meta, ECHO, ChoiceAnswer(done(9), "<think>Time?</think>Checking. " + HERMES_CALL))
    assert [item["type"] for item in body["output"]] == ["reasoning", "message", "function_call"]
    reasoning, message, call = body["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Time?"}] and reasoning["summary"] == []
    assert message["content"][0]["text"] == "Checking. "
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert (call["name"], json.loads(call["arguments"]), call["status"]) == ("get_time", {"tz": "utc"}, "completed")
    only_call = answered_response(AUTO, ECHO, ChoiceAnswer(done(9), HERMES_CALL))
    assert [item["type"] for item in only_call["output"]] == ["function_call"]


def chunks_of(text: str, cuts: list[int]) -> list:
    return [tok(i, text[a:b], a) for i, (a, b) in enumerate(itertools.pairwise([0, *cuts, len(text)]))]


async def run_events(meta: ResponseMeta, *replies, deadline_in: float = 5.0) -> list[tuple[str, dict]]:
    stream = ChoiceStream([filled(*replies)])
    first = await stream.next()
    deadline = asyncio.get_running_loop().time() + deadline_in
    raw = b"".join([piece async for piece in response_events(
        meta, ECHO, stream, first, deadline=deadline, timeout_s=7)])
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        kind_line, data_line = block.split(b"\n")
        kind = kind_line.removeprefix(b"event: ").decode()
        payload = json.loads(data_line.removeprefix(b"data: "))
        assert payload["type"] == kind
        events.append((kind, payload))
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    return events


async def test_a_stream_opens_a_message_streams_its_text_and_ends_with_the_whole_response() -> None:
    events = await run_events(META, *chunks_of("Hello there.", [5]), done(2))
    assert [kind for kind, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    item_id = events[2][1]["item"]["id"]
    deltas = [p for kind, p in events if kind == "response.output_text.delta"]
    assert all((p["item_id"], p["output_index"], p["content_index"]) == (item_id, 0, 0) for p in deltas)
    assert "".join(p["delta"] for p in deltas) == "Hello there."
    assert events[6][1]["text"] == "Hello there."
    final = events[-1][1]["response"]
    assert final["output"] == [events[8][1]["item"]] and final["output"][0]["id"] == item_id
    assert final["usage"]["output_tokens"] == 2


async def test_a_streamed_response_has_the_output_of_the_same_answer_whole() -> None:
    meta = dataclasses.replace(THINKING, tool_calling=ToolCalling(None, "hermes"))
    text = "<think>Need the time.</think>Checking. " + HERMES_CALL
    replies = [*chunks_of(text, [9, 20, 33, 45]), done(5)]
    events = await run_events(meta, *replies)
    final = events[-1][1]["response"]
    stream = ChoiceStream([filled(*replies)])
    [answer] = await collect_answer(stream)
    whole = answered_response(meta, ECHO, answer)
    assert without_ids(final["output"]) == without_ids(whole["output"])
    kinds = [kind for kind, _ in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert "".join(p["delta"] for k, p in events if k == "response.reasoning_text.delta") == "Need the time."
    [added] = [p["item"] for k, p in events if k == "response.output_item.added" and p["item"]["type"] == "function_call"]
    assert added["status"] == "in_progress" and added["arguments"] == ""
    assert [p["output_index"] for k, p in events if k == "response.output_item.done"] == [0, 1, 2]


async def test_a_named_call_streams_its_arguments_as_they_come() -> None:
    meta = dataclasses.replace(META, tool_calling=ToolCalling("get_weather"))
    events = await run_events(meta, *chunks_of('{"city": "Oslo"}', [5]), done(2))
    kinds = [kind for kind, _ in events]
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"]
    assert events[5][1]["arguments"] == '{"city": "Oslo"}' and events[5][1]["name"] == "get_weather"
    assert events[-1][1]["response"]["output"][0]["arguments"] == '{"city": "Oslo"}'


async def test_a_cut_stream_ends_incomplete_and_an_error_or_timeout_ends_it_failed() -> None:
    cut = await run_events(META, tok(0, "Hel"), done(1, "length"))
    assert cut[-1][0] == "response.incomplete"
    assert cut[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut[-2][1]["item"]["status"] == "incomplete"
    failed = await run_events(META, tok(0, "Hel"), done(1, "error", ErrorInfo("worker died", "server_error", status=500)))
    assert failed[-1][0] == "response.failed"
    assert failed[-1][1]["response"]["status"] == "failed"
    assert failed[-1][1]["response"]["error"]["message"] == "worker died"
    late = await run_events(META, tok(0, "Hel"), deadline_in=0.05)
    assert late[-1][0] == "response.failed" and "within 7 s" in late[-1][1]["response"]["error"]["message"]


async def test_an_empty_answer_is_an_empty_message_and_logprobs_go_with_the_text() -> None:
    empty = await run_events(META, done(0))
    assert empty[-1][1]["response"]["output"][0]["content"][0]["text"] == ""
    meta = dataclasses.replace(META, logprobs=True)
    entry = TokenLogprob("Hi", -0.5, [TopLogprob(7, "Hi", -0.5)])
    replies = [dataclasses.replace(tok(0, "Hi"), logprobs=[entry]), done(1)]
    events = await run_events(meta, *replies)
    [delta] = [p for k, p in events if k == "response.output_text.delta"]
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                  "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}]
    assert events[-1][1]["response"]["output"][0]["content"][0]["logprobs"] == delta["logprobs"]


def test_the_flex_service_tier_reaches_the_chat_and_the_answer_says_it() -> None:
    flex = read(input="hi", service_tier="flex")
    assert flex.chat.service_tier == "flex" and flex.echo["service_tier"] == "flex"
    plain = read(input="hi", service_tier="priority")
    assert plain.chat.service_tier == "priority" and plain.echo["service_tier"] == "default"
    assert read(input="hi").echo["service_tier"] == "default"


async def test_stored_input_items_are_the_requests_own_with_ids(redis_client) -> None:
    from services.gateway.responses_api import ResponseStore

    store = ResponseStore(redis_client, ttl_s=60)
    earlier = [{"type": "message", "role": "user", "content": "first"},
               {"id": "msg_out", "type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "ok"}], "status": "completed"}]
    request = read_request(parse_body(json.dumps({"model": "m", "input": [
        {"role": "user", "content": "second"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"}]}).encode(), ResponsesBody),
        earlier, store=True)
    assert request.inputs == 2 and len(request.items) == 4
    await store.keep("acme", request.items, {"id": "resp_9", "store": True, "status": "completed",
                                             "output": []}, request.inputs)
    listed = await store.input_items("resp_9", "acme")
    assert [(i["type"], i.get("role")) for i in listed] == [("message", "user"), ("function_call_output", None)]
    assert listed[0]["content"] == [{"type": "input_text", "text": "second"}]
    assert listed[0]["id"].startswith("msg_") and listed[1]["id"].startswith("item_")
    assert await store.input_items("resp_9", "acme") == listed  # the ids are kept
    # The conversation goes on from all of it, the ids notwithstanding.
    assert len(await store.conversation("resp_9", "acme")) == 4
    with pytest.raises(ApiError):
        await store.input_items("resp_9", "globex")
