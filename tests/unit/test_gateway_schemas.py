"""Request validation and mapping to the wire message (pure functions, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.gateway.errors import ApiError
from services.gateway.schemas import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    UNIMPLEMENTED_FIELDS,
    ChatCompletionBody,
    CompletionBody,
    ToolCalling,
    check_body,
    choice_requests,
    include_usage,
    parse_body,
    reasoning_parser_for,
    resolve_deadline_ms,
    served_tier,
    to_completion_request,
    tool_calling,
)
from services.messages import (
    INT64_MAX,
    INT64_MIN,
    ChatMessage,
    CompletionRequest,
    StructuredOutput,
    TemplateArg,
    TokenBias,
    Tool,
    ToolCall,
    decode,
    encode,
)
from services.settings import Settings

MODEL = "test-model"
SETTINGS = Settings(model_name=MODEL, max_model_len=1024)


def _check(raw: bytes | str | dict[str, Any], model_cls: type = CompletionBody) -> Any:
    data = json.dumps(raw).encode() if isinstance(raw, dict) else raw
    body = parse_body(data.encode() if isinstance(data, str) else data, model_cls)
    check_body(body, SETTINGS)
    return body


def _error(raw: bytes | str | dict[str, Any], model_cls: type = CompletionBody) -> ApiError:
    with pytest.raises(ApiError) as info:
        _check(raw, model_cls)
    return info.value


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"nul",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"a": 1' + b"0" * 5000 + b"}",
    ],
)
def test_malformed_json_is_400(raw: bytes) -> None:
    err = _error(raw)
    assert err.status == 400
    assert err.code == "invalid_json"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 1025}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop.0"),
        ({"stop": 7}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"seed": 2**64}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"priority": 2**63}, "priority"),
        ({"priority": -(2**63) - 1}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"return_token_ids": "yes"}, "return_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids.0"),
        ({"allowed_token_ids": list(range(65537))}, "allowed_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["x"] * 129}, "prompt"),
        ({"prompt": [[1, 2], "a"]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [3, -1]}, "prompt"),
        ({"prompt": [[1], [2**31]]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"model": 5}, "model"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"logit_bias": {"1": 101.0}}, "logit_bias.1"),
        ({"logit_bias": {"hello": 5.0}}, "logit_bias"),
        ({"logit_bias": {"-3": 5.0}}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
    ],
)
def test_bad_completion_fields_are_400_with_param(fields: dict[str, Any], param: str) -> None:
    err = _error(completion(**fields))
    assert (err.status, err.param) == (400, param)
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_400(value: str) -> None:
    err = _error(f'{{"model": "{MODEL}", "prompt": "x", "temperature": {value}}}')
    assert (err.status, err.param) == (400, "temperature")


def test_missing_required_fields_are_400() -> None:
    assert _error({"prompt": "x"}).param == "model"
    assert _error({"model": MODEL}).param == "prompt"
    assert _error({"model": MODEL}, ChatCompletionBody).param == "messages"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "x"}], "messages.0.role"),
        ([{"role": "tool", "content": "x"}], "messages.0.tool_call_id"),
        ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages.0.tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
         "messages.0.tool_calls"),
        ([{"role": "assistant"}], "messages.0.content"),
        ([{"content": "x"}], "messages.0.role"),
        ([{"role": "user"}], "messages.0.content"),
        ([{"role": "user", "content": None}], "messages.0.content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages.0.content",
        ),
        ("hello", "messages"),
    ],
)
def test_bad_chat_messages_are_400(messages: Any, param: str) -> None:
    err = _error(chat(messages=messages), ChatCompletionBody)
    assert (err.status, err.param) == (400, param)


def test_non_text_content_part_is_refused_in_words() -> None:
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    err = _error(chat(messages=[{"role": "user", "content": parts}]), ChatCompletionBody)
    assert (err.status, err.param) == (400, "messages.0.content")
    assert "only text content parts are supported, not 'image_url'" in err.message


def test_chat_limits_and_unsupported() -> None:
    assert (
        _error(chat(max_completion_tokens=5000), ChatCompletionBody).param
        == "max_completion_tokens"
    )
    assert _error(chat(top_logprobs=2), ChatCompletionBody).param == "top_logprobs"
    assert _error(chat(logprobs=True, top_logprobs=21), ChatCompletionBody).param == "top_logprobs"
    assert _error(chat(tools=[{"type": "function"}]), ChatCompletionBody).param == "tools.0.function"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"use_beam_search": True}, "use_beam_search"),
    ],
)
def test_features_that_would_change_a_chat_answer_are_refused(fields: dict[str, Any], param: str) -> None:
    """A client that asks for a tool call or audio must not get free text as if it had
    been honoured."""
    err = _error(chat(**fields), ChatCompletionBody)
    assert (err.status, err.code, err.param) == (400, "unsupported", param)


@pytest.mark.parametrize(("prompt", "words"), [
    ([[1, 2], "a"], "must not mix text and token-id prompts"),
    ([[1], []], "prompt 1 has no token ids"),
    ([7, -1], "the prompt: token ids must be integers in [0, 2147483647]"),
    ({"text": "a"}, "must be a string, a list of strings, a list of token ids or a list of token-id lists"),
])
def test_a_bad_prompt_is_refused_in_words(prompt: Any, words: str) -> None:
    err = _error(completion(prompt=prompt))
    assert (err.status, err.param) == (400, "prompt")
    assert words in err.message


@pytest.mark.parametrize(("name", "refused"), [
    ("logits_processors", ["m.f"]), ("prompt_embeds", "AAAA"),
    ("guided_whitespace_pattern", r"[ ]*"),
])
def test_vllms_fields_that_would_change_the_answer_are_refused_by_name(name: str, refused: Any) -> None:
    """Fairway acts as each of these at its default, which a client may also send."""
    err = _error(completion(**{name: refused}))
    assert (err.status, err.code, err.param) == (400, "unsupported", name)
    _check(completion(**{name: UNIMPLEMENTED_FIELDS[name][0]}))
    _check(completion(**{name: None}))


def test_neutral_values_of_unimplemented_features_are_accepted() -> None:
    _check(chat(response_format={"type": "text"}, tool_choice="none", function_call="auto",
                modalities=["text"], repetition_penalty=1, min_p=0, min_tokens=0,
                use_beam_search=False, guided_json=None), ChatCompletionBody)
    _check(completion(repetition_penalty=1.0, min_tokens=0))


def test_unknown_model_is_404() -> None:
    err = _error(completion(model="gpt-4"))
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")


def test_unknown_fields_and_nulls_are_accepted() -> None:
    body = _check(
        completion(temperature=None, stop=None, n=None, user="someone", unknown_field=[1, 2])
    )
    assert body.temperature is None and body.n is None


def to_request(body: Any, **overrides: Any) -> CompletionRequest:
    args: dict[str, Any] = {
        "request_id": "c",
        "tenant": "t",
        "now": 0.0,
        "reply_to": "r",
        "max_model_len": SETTINGS.max_model_len,
        "deadline_ms": None,
    }
    return to_completion_request(body, **{**args, **overrides})


def test_an_empty_prompt_is_accepted_as_openai_does() -> None:
    assert to_request(_check(completion(prompt=""))).prompt == ""
    assert to_request(_check(completion(prompt=[""]))).prompt == ""


def test_completion_request_mapping() -> None:
    body = _check(
        completion(
            prompt=["the prompt"],
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            seed=42,
            stop="END",
            stop_token_ids=[2],
            ignore_eos=True,
            fail_if_late=True,
            user="other-tenant",
        )
    )
    req = to_request(
        body,
        request_id="cmpl-1",
        tenant="acme",
        now=1000.0,
        reply_to="fairway.replies.gw",
        deadline_ms=1500,
    )
    assert req.tenant == "acme"  # from the key, never from "user"
    assert (req.kind, req.prompt, req.messages, req.model) == (
        "completion",
        "the prompt",
        [],
        MODEL,
    )
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.5, 0.9, 40)
    assert (s.seed, s.stop, s.stop_token_ids, s.ignore_eos) == (42, ["END"], [2], True)
    assert (req.created, req.deadline, req.fail_if_late, req.reply_to) == (
        1000.0,
        1001.5,
        True,
        "fairway.replies.gw",
    )
    assert decode(encode(req), CompletionRequest) == req


def test_include_stop_str_in_output_reaches_the_sampling_parameters() -> None:
    assert to_request(_check(completion(include_stop_str_in_output=True))).sampling.include_stop_str_in_output
    assert not to_request(_check(completion())).sampling.include_stop_str_in_output
    assert _error(completion(include_stop_str_in_output="yes")).param == "include_stop_str_in_output"


def test_skip_special_tokens_defaults_to_true_and_false_reaches_the_worker() -> None:
    assert not to_request(_check(completion(skip_special_tokens=False))).sampling.skip_special_tokens
    assert to_request(_check(completion(skip_special_tokens=None))).sampling.skip_special_tokens
    assert to_request(_check(completion())).sampling.skip_special_tokens


def test_spaces_between_special_tokens_defaults_to_true_and_false_reaches_the_worker() -> None:
    sampling = to_request(_check(completion(spaces_between_special_tokens=False))).sampling
    assert not sampling.spaces_between_special_tokens
    assert to_request(_check(completion())).sampling.spaces_between_special_tokens
    assert _error(completion(spaces_between_special_tokens="no")).param == "spaces_between_special_tokens"


def test_prompt_logprobs_reach_the_worker_unstreamed_and_as_many_as_an_echo_needs() -> None:
    assert to_request(_check(completion(prompt_logprobs=3))).sampling.prompt_logprobs == 3
    assert to_request(_check(completion(prompt_logprobs=1, echo=True, logprobs=4))).sampling.prompt_logprobs == 4
    assert to_request(_check(completion(echo=True, logprobs=2))).sampling.prompt_logprobs == 2
    assert to_request(_check(completion(logprobs=2))).sampling.prompt_logprobs is None
    assert _error(completion(prompt_logprobs=3, stream=True)).param == "prompt_logprobs"
    assert _error(completion(prompt_logprobs=21)).param == "prompt_logprobs"
    assert _error(completion(prompt_logprobs=-1)).param == "prompt_logprobs"


def test_return_tokens_as_token_ids_is_a_boolean() -> None:
    assert _check(completion(return_tokens_as_token_ids=True)).return_tokens_as_token_ids
    assert _error(completion(return_tokens_as_token_ids=3)).param == "return_tokens_as_token_ids"


def test_bad_words_reach_the_sampling_parameters() -> None:
    assert to_request(_check(completion(bad_words=["fox", " dog"]))).sampling.bad_words == ["fox", " dog"]
    assert _error(completion(bad_words=["x"] * 129)).param == "bad_words"


def test_allowed_token_ids_reach_the_sampling_parameters() -> None:
    assert to_request(_check(completion(allowed_token_ids=[5, 6]))).sampling.allowed_token_ids == [5, 6]
    assert to_request(_check(completion(allowed_token_ids=None))).sampling.allowed_token_ids == []


def test_return_token_ids_reaches_the_wire_message() -> None:
    assert to_request(_check(chat(return_token_ids=True), ChatCompletionBody)).return_token_ids
    assert not to_request(_check(completion())).return_token_ids


def test_priority_reaches_the_wire_message_and_defaults_to_zero() -> None:
    assert to_request(_check(chat(priority=-3), ChatCompletionBody)).priority == -3
    assert to_request(_check(completion(priority=2**63 - 1))).priority == 2**63 - 1
    assert to_request(_check(completion(priority=-(2**63)))).priority == -(2**63)
    assert to_request(_check(completion())).priority == 0


def test_penalties_bias_and_minimums_reach_the_wire_message() -> None:
    body = _check(chat(presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.1,
                       min_p=0.05, min_tokens=8, max_tokens=20,
                       logit_bias={"50256": -100, "7": 2.5}), ChatCompletionBody)
    req = to_request(body)
    s = req.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.25, 1.1)
    assert (s.min_p, s.min_tokens) == (0.05, 8)
    assert s.logit_bias == [TokenBias(50256, -100.0), TokenBias(7, 2.5)]
    assert decode(encode(req), CompletionRequest) == req
    plain = to_request(_check(completion())).sampling  # neutral values when left out
    assert (plain.presence_penalty, plain.frequency_penalty, plain.repetition_penalty,
            plain.min_p, plain.min_tokens, plain.logit_bias) == (0.0, 0.0, 1.0, 0.0, 0, [])


def test_logprobs_requests_map_to_the_number_of_alternatives() -> None:
    def asked(body: dict[str, Any], cls: type = CompletionBody) -> int | None:
        return to_request(_check(body, cls)).sampling.logprobs

    assert asked(completion()) is None
    assert (asked(completion(logprobs=0)), asked(completion(logprobs=5))) == (0, 5)
    assert asked(chat(), ChatCompletionBody) is None
    assert asked(chat(logprobs=False, top_logprobs=0), ChatCompletionBody) is None
    assert asked(chat(logprobs=True), ChatCompletionBody) == 0
    assert asked(chat(logprobs=True, top_logprobs=20), ChatCompletionBody) == 20
    # echo with logprobs asks for the prompt's too (as lm-eval-harness's loglikelihood does).
    echoed = to_request(_check(completion(echo=True, logprobs=1, max_tokens=1))).sampling
    assert (echoed.logprobs, echoed.prompt_logprobs) == (1, 1)
    assert to_request(_check(completion(echo=True))).sampling.prompt_logprobs is None
    assert to_request(_check(completion(logprobs=1))).sampling.prompt_logprobs is None


def test_n_beyond_what_the_tenant_may_hold_is_refused_up_front() -> None:
    body = parse_body(json.dumps(completion(n=9)).encode(), CompletionBody)
    check_body(body, Settings(model_name=MODEL, max_queued_per_tenant=9))
    with pytest.raises(ApiError) as refused:
        check_body(body, Settings(model_name=MODEL, max_queued_per_tenant=8))
    assert (refused.value.status, refused.value.param) == (400, "n")


def test_n_choices_are_child_requests_with_their_own_ids_and_seeds() -> None:
    request = to_request(_check(completion(n=3, seed=INT64_MAX - 1)), request_id="cmpl-9")
    children = choice_requests(request, 3)
    assert [c.request_id for c in children] == ["cmpl-9-0", "cmpl-9-1", "cmpl-9-2"]
    assert [c.sampling.seed for c in children] == [INT64_MAX - 1, INT64_MAX, INT64_MIN]  # wraps
    assert all(c.prompt == request.prompt and c.tenant == request.tenant for c in children)
    unseeded = choice_requests(to_request(_check(completion(n=2))), 2)
    assert [c.sampling.seed for c in unseeded] == [None, None]  # each gets one of its own id
    assert choice_requests(request, 1) == [request]


def test_a_batch_of_prompts_is_n_child_requests_per_prompt_numbered_as_openai_does() -> None:
    """Choice ``i`` answers prompt ``i // n``; each prompt's choices are seeded as if it
    came alone, so a batch answers what its prompts sent one by one would."""
    body = _check(completion(prompt=["one", "two", ""], n=2, seed=7))
    request = to_request(body, request_id="cmpl-b")
    children = choice_requests(request, 2, body.prompt)
    assert [(c.request_id, c.prompt, c.sampling.seed) for c in children] == [
        ("cmpl-b-0", "one", 7), ("cmpl-b-1", "one", 8), ("cmpl-b-2", "two", 7),
        ("cmpl-b-3", "two", 8), ("cmpl-b-4", "", 7), ("cmpl-b-5", "", 8)]
    alone = choice_requests(to_request(_check(completion(prompt=["two", "x"])), request_id="r"),
                            1, ["two", "x"])
    assert [(c.request_id, c.prompt) for c in alone] == [("r-0", "two"), ("r-1", "x")]


def test_token_id_prompts_go_as_ids_one_or_a_batch() -> None:
    """OpenAI's token-id shapes: a list of ids is one prompt, a list of lists a batch;
    the ids travel as they are (the scorer checks them against the vocabulary), and an
    echo is asked of the worker, which alone can spell them."""
    one = to_request(_check(completion(prompt=[5, 6, 7], echo=True)))
    assert (one.prompt, one.prompt_token_ids, one.echo) == ("", [5, 6, 7], True)
    body = _check(completion(prompt=[[5, 6], [7]]))
    children = choice_requests(to_request(body, request_id="ids"), 1, body.prompt)
    assert [(c.request_id, c.prompt_token_ids) for c in children] == [("ids-0", [5, 6]), ("ids-1", [7])]
    text = to_request(_check(completion(prompt="hi")))
    assert (text.prompt, text.prompt_token_ids, text.echo) == ("hi", None, False)
    assert decode(encode(one)) == one


def test_a_batch_with_more_choices_than_the_tenant_may_hold_is_400() -> None:
    limited = Settings(model_name=MODEL, max_model_len=1024, max_queued_per_tenant=4)
    for fields, param in (({"prompt": ["a", "b"], "n": 3}, "prompt"), ({"n": 5}, "n")):
        body = parse_body(json.dumps(completion(**fields)).encode(), CompletionBody)
        with pytest.raises(ApiError) as info:
            check_body(body, limited)
        assert (info.value.status, info.value.param) == (400, param)
    check_body(parse_body(json.dumps(completion(prompt=["a", "b"], n=2)).encode(), CompletionBody),
               limited)


def test_chat_request_mapping_and_defaults() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "developer", "content": "in French"},
    ]
    req = to_request(_check(chat(messages=messages, seed=-5), ChatCompletionBody))
    assert req.kind == "chat" and req.prompt == ""
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "ab"), ("developer", "in French")]
    # The client's seed is kept (one without gets a seed of its request id at the worker).
    assert (req.sampling.seed, req.sampling.max_tokens, req.deadline) == (
        -5,
        DEFAULT_CHAT_MAX_TOKENS,
        None,
    )
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.top_k) == (1.0, 1.0, 0)


def test_vllms_prompt_fields_travel_to_the_scorer() -> None:
    """add_special_tokens, add_generation_prompt, continue_final_message (which turns the
    generation prompt off unless set) and chat_template_kwargs, as vLLM takes them."""
    plain = to_request(_check(chat(), ChatCompletionBody))
    assert (plain.add_special_tokens, plain.add_generation_prompt, plain.continue_final_message,
            plain.chat_template_kwargs) == (None, True, False, [])
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]
    body = _check(chat(messages=prefill, continue_final_message=True, add_special_tokens=True,
                       chat_template_kwargs={"enable_thinking": False, "style": "terse"}),
                  ChatCompletionBody)
    req = to_request(body)
    assert (req.add_special_tokens, req.add_generation_prompt, req.continue_final_message) == (True, False, True)
    assert req.chat_template_kwargs == [TemplateArg("enable_thinking", False), TemplateArg("style", "terse")]
    assert decode(encode(req)) == req
    assert to_request(_check(completion(add_special_tokens=False))).add_special_tokens is False
    assert to_request(_check(completion(truncate_prompt_tokens=-1))).truncate_prompt_tokens == -1
    assert _error(completion(truncate_prompt_tokens=0)).param == "truncate_prompt_tokens"
    assert _error(completion(truncate_prompt_tokens=-2)).param == "truncate_prompt_tokens"


@pytest.mark.parametrize(("fields", "param"), [
    ({"continue_final_message": True}, "continue_final_message"),  # the last message is the user's
    ({"continue_final_message": True, "add_generation_prompt": True,
      "messages": [{"role": "assistant", "content": "x"}]}, "continue_final_message"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"chat_template_kwargs": {"k": [1]}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {f"k{i}": 1 for i in range(33)}}, "chat_template_kwargs"),
])
def test_bad_prompt_fields_of_a_chat_are_400(fields: dict[str, Any], param: str) -> None:
    err = _error(chat(**fields), ChatCompletionBody)
    assert (err.status, err.param) == (400, param)


def test_max_tokens_resolution() -> None:
    assert (
        to_request(
            _check(chat(max_tokens=3, max_completion_tokens=5), ChatCompletionBody)
        ).sampling.max_tokens
        == 5
    )
    assert to_request(_check(chat(max_tokens=3), ChatCompletionBody)).sampling.max_tokens == 3
    assert to_request(_check(completion())).sampling.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    # A default leaves room for min_tokens.
    assert to_request(_check(completion(min_tokens=40))).sampling.max_tokens == 40
    # Defaults never exceed a short context.
    short = to_request(_check(chat(), ChatCompletionBody), max_model_len=100)
    assert short.sampling.max_tokens == 100
    # What the client left unset is marked so (the scorer fills it from the model and lowers a
    # max_tokens to what the prompt leaves); a value the client gave is not.
    assert short.defaulted == ["max_tokens", "temperature", "top_p", "top_k"]
    given = to_request(_check(chat(max_completion_tokens=5, temperature=0.0, top_k=0), ChatCompletionBody))
    assert given.defaulted == ["top_p"]
    assert to_request(_check(completion(max_tokens=16, top_p=0.5))).defaulted == ["temperature", "top_k"]


def test_include_usage() -> None:
    assert include_usage(_check(completion(stream=True, stream_options={"include_usage": True})))
    assert not include_usage(_check(completion(stream=True)))


@pytest.mark.parametrize(
    ("body_ms", "header", "expected"),
    [
        (None, None, None),
        (500, None, 500),
        (None, "300", 300),
        (500, "300", 300),
        (200, " 300 ", 200),
    ],
)
def test_deadline_resolution(body_ms: int | None, header: str | None, expected: int | None) -> None:
    assert resolve_deadline_ms(body_ms, header) == expected


@pytest.mark.parametrize("header", ["", "abc", "0", "-5", "1.5", "٣", str(10**12)])
def test_bad_deadline_header_is_400(header: str) -> None:
    with pytest.raises(ApiError) as info:
        resolve_deadline_ms(None, header)
    assert info.value.status == 400


# ---- structured outputs --------------------------------------------------------------

_PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _structured(fields: dict[str, Any], model_cls: type = CompletionBody):
    body = _check(completion(**fields) if model_cls is CompletionBody else chat(**fields), model_cls)
    request = to_request(body)
    assert decode(encode(request)) == request  # travels as it is
    return request.sampling.structured


@pytest.mark.parametrize("model_cls", [CompletionBody, ChatCompletionBody])
@pytest.mark.parametrize(("fields", "expected"), [
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "person", "schema": _PERSON, "strict": True}}},
     StructuredOutput("json_schema", json.dumps(_PERSON))),
    ({"structured_outputs": {"json": _PERSON}}, StructuredOutput("json_schema", json.dumps(_PERSON))),
    ({"structured_outputs": {"json": json.dumps(_PERSON), "disable_any_whitespace": True}},
     StructuredOutput("json_schema", json.dumps(_PERSON), any_whitespace=False)),
    ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutput("regex", "[0-9]+")),
    ({"structured_outputs": {"choice": ["yes", "no"], "disable_fallback": True}},
     StructuredOutput("choice", choices=["yes", "no"])),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutput("grammar", 'root ::= "a"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object")),
    ({"guided_json": _PERSON, "guided_decoding_backend": "xgrammar"},
     StructuredOutput("json_schema", json.dumps(_PERSON))),
    ({"guided_regex": r"\d+"}, StructuredOutput("regex", r"\d+")),
    ({"guided_choice": ["a", "b"]}, StructuredOutput("choice", choices=["a", "b"])),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"')),
    ({"response_format": {"type": "text"}}, None),
    ({}, None),
])
def test_every_way_of_asking_for_structure_maps_to_one_constraint(fields, expected, model_cls):
    assert _structured(fields, model_cls) == expected


def _structured_error(fields: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        _structured(fields)
    return info.value


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"guided_json": _PERSON, "guided_regex": "a"}, "guided_regex", "Only one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "Only one"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format",
     "json_schema.schema"),
    ({"response_format": "json"}, "response_format", "an object with a string type"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": ["regex"]}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", "boolean"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": 1}},
     "structured_outputs.disable_any_whitespace", "boolean"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": [1]}, "guided_json", "JSON schema"),
    ({"guided_choice": []}, "guided_choice", "non-empty strings"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty strings"),
    ({"guided_choice": ["a"] * 1025}, "guided_choice", "at most 1024"),
    ({"guided_regex": ""}, "guided_regex", "non-empty string"),
    ({"guided_grammar": 5}, "guided_grammar", "non-empty string"),
    ({"guided_regex": "a" * 70000}, "guided_regex", "at most 65536"),
])
def test_a_malformed_constraint_is_refused_naming_its_field(fields, param, words):
    err = _structured_error(fields)
    assert (err.status, err.param) == (400, param)
    assert words in err.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
])
def test_structure_fairway_cannot_hold_an_answer_to_is_refused(fields, param):
    err = _structured_error(fields)
    assert (err.status, err.code, err.param) == (400, "unsupported", param)


# ---- tools ---------------------------------------------------------------------------

_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                             "parameters": _PERSON}}
_TIME = {"type": "function", "function": {"name": "get_time"}}


def _chat_request(**fields: Any) -> CompletionRequest:
    request = to_request(_check(chat(**fields), ChatCompletionBody))
    assert decode(encode(request)) == request
    return request


def test_a_named_tool_choice_holds_the_answer_to_that_functions_arguments() -> None:
    request = _chat_request(tools=[_WEATHER, _TIME],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert request.sampling.structured == StructuredOutput("json_schema", json.dumps(_PERSON))
    assert request.tools == [Tool("get_weather", "Weather now", json.dumps(_PERSON)), Tool("get_time")]
    untyped = _chat_request(tools=[_TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(untyped.sampling.structured.spec) == {"type": "object"}


@pytest.mark.parametrize("parallel", [None, True, False])
def test_a_required_tool_choice_holds_the_answer_to_a_list_of_calls(parallel: bool | None) -> None:
    request = _chat_request(tools=[_WEATHER, _TIME], tool_choice="required",
                            **({} if parallel is None else {"parallel_tool_calls": parallel}))
    schema = json.loads(request.sampling.structured.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert ("maxItems" in schema) == (parallel is False)
    shapes = schema["items"]["anyOf"]
    assert [s["properties"]["name"] for s in shapes] == [{"type": "string", "enum": ["get_weather"]},
                                                         {"type": "string", "enum": ["get_time"]}]
    assert [s["properties"]["parameters"] for s in shapes] == [_PERSON, {"type": "object"}]


def test_tools_with_tool_choice_none_reach_the_template_and_leave_the_answer_free() -> None:
    request = _chat_request(tools=[_TIME], tool_choice="none")
    assert request.tools == [Tool("get_time")] and request.sampling.structured is None


def test_a_conversation_with_tool_calls_and_their_answers_travels() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "utc"}'}}
    request = _chat_request(tools=[_TIME], tool_choice="none", messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}])
    assert request.messages[1] == ChatMessage("assistant", "", [ToolCall("call_1", "get_time", '{"tz": "utc"}')])
    assert request.messages[2] == ChatMessage("tool", "12:00", tool_call_id="call_1")


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"tools": [_TIME]}, "unsupported", 'tool_choice "auto"'),
    ({"tools": [_TIME], "tool_choice": "auto"}, "unsupported", 'tool_choice "auto"'),
    ({"tool_choice": "required"}, None, "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, None, "needs tools"),
    ({"tools": [_TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None,
     "not among the tools"),
    ({"tools": [_TIME], "tool_choice": "required", "response_format": {"type": "json_object"}}, None,
     "cannot also"),
    ({"tools": [_TIME, _TIME], "tool_choice": "required"}, None, "name of its own"),
])
def test_tool_choices_that_cannot_be_served_are_refused(fields: dict[str, Any], code: str | None,
                                                        words: str) -> None:
    err = _error(chat(**fields), ChatCompletionBody)
    assert (err.status, err.code) == (400, code)
    assert err.param in ("tool_choice", "tools") and words in err.message


def test_tool_choice_auto_is_served_with_a_tool_call_parser() -> None:
    settings = SETTINGS.model_copy(update={"tool_call_parser": "hermes"})
    for fields in ({"tools": [_TIME]}, {"tools": [_TIME], "tool_choice": "auto"}):
        body = parse_body(json.dumps(chat(**fields)).encode(), ChatCompletionBody)
        check_body(body, settings)
        assert tool_calling(body, "hermes") == ToolCalling(None, "hermes")
        assert to_request(body).sampling.structured is None  # the model's own answer


def test_a_chats_answer_structured_or_not_thinks_first_with_a_reasoning_parser() -> None:
    """A structured answer or a forced call is held to its language from the end of its
    thinking, which the reasoning parser splits off as for any chat."""
    assert reasoning_parser_for(to_request(_check(chat(), ChatCompletionBody)), "qwen3") == "qwen3"
    assert reasoning_parser_for(to_request(_check(completion())), "qwen3") == ""
    for fields in ({"response_format": {"type": "json_object"}},
                   {"tools": [_TIME], "tool_choice": "required"}):
        body = _check(chat(**fields), ChatCompletionBody)
        request = to_request(body, reasoning_parser="deepseek_r1")
        assert reasoning_parser_for(request, "deepseek_r1") == "deepseek_r1"
        assert request.sampling.structured.after_reasoning == "deepseek_r1"
        assert to_request(body).sampling.structured.after_reasoning == ""
    structured = completion(response_format={"type": "json_object"})
    assert to_request(_check(structured), reasoning_parser="qwen3").sampling.structured.after_reasoning == ""


def test_a_chats_reasoning_effort_reaches_the_chat_template() -> None:
    """As vLLM hands it to the template (gpt-oss's reads it), unless the request's own
    chat_template_kwargs set it."""
    effort = to_request(_check(chat(reasoning_effort="high"), ChatCompletionBody))
    assert [(a.name, a.value) for a in effort.chat_template_kwargs] == [("reasoning_effort", "high")]
    own = to_request(_check(chat(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "low"}),
                            ChatCompletionBody))
    assert [(a.name, a.value) for a in own.chat_template_kwargs] == [("reasoning_effort", "low")]


@pytest.mark.parametrize(("tier", "background", "served"), [
    (None, False, None), ("auto", False, "default"), ("default", False, "default"),
    ("priority", False, "default"), ("flex", True, "flex"),
])
def test_service_tier_flex_runs_in_the_background(tier, background, served) -> None:
    """OpenAI's flex tier is Fairway's background class (spare capacity only); the
    others are served as default, which the answer says."""
    for raw, model_cls in ((completion(service_tier=tier), CompletionBody),
                           (chat(service_tier=tier), ChatCompletionBody)):
        body = _check({k: v for k, v in raw.items() if v is not None}, model_cls)
        assert to_request(body).background is background
        assert served_tier(body) == served


def test_an_unknown_service_tier_is_400() -> None:
    with pytest.raises(ApiError) as bad:
        _check(chat(service_tier="turbo"), ChatCompletionBody)
    assert bad.value.status == 400 and bad.value.param == "service_tier"
