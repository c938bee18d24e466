"""End to end through real RabbitMQ, Redis, every service and the tiny model."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from typing import Annotated

import aio_pika
import httpx
import msgpack
import openai
import pydantic
import pytest
import redis.asyncio as aioredis

from services import keys, topology
from services import messages as m
from services.client import AmqpClient
from services.localinfra import rabbitmqctl
from services.models import load_tokenizer, resolve_model_path
from services.settings import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.integration

MODEL = DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def tokenizer(system):
    return load_tokenizer(resolve_model_path(None, system.cache_dir))


@pytest.fixture(scope="module")
def client(system, acme_key):
    return openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=acme_key, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


def test_completion_with_usage(client, tokenizer):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert isinstance(out.choices[0].text, str) and out.choices[0].text


def test_completion_stream_with_include_usage(client, tokenizer):
    prompt = "Streaming works"
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, stream=True, seed=7,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 10
    assert usage[0].prompt_tokens == len(tokenizer.encode(prompt))
    # The same seed reproduces the same text without streaming.
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, seed=7,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == text


def test_chat_counts_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                         extra_body={"ignore_eos": True})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 8
    assert out.choices[0].message.role == "assistant"


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to three"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 6


def test_penalties_bias_and_min_tokens_reach_the_engine(client, tokenizer):
    """The sampling controls an OpenAI client (or vLLM's extra fields) sends are honoured
    end to end: a token biased to certainty is all the answer holds, an EOS made certain
    is held off for min_tokens, and a penalty changes a greedy answer."""
    word = tokenizer.encode("fox", add_special_tokens=False)[0]
    forced = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=5,
                                       logit_bias={str(word): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([word] * 5)
    eos = tokenizer.eos_token_id
    held = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
        logit_bias={str(eos): 100}, extra_body={"min_tokens": 6})
    assert held.usage.completion_tokens == 7 and held.choices[0].finish_reason == "stop"
    plain = client.completions.create(model=MODEL, prompt="x", max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    looping = client.completions.create(model=MODEL, prompt="x", max_tokens=40, temperature=0,
                                        presence_penalty=-2.0, extra_body={"ignore_eos": True})
    assert looping.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as too_big:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  logit_bias={str(len(tokenizer) + 10): 1})
    assert "logit_bias token ids must be in" in too_big.value.message
    # vLLM's allowed_token_ids: the answer is sampled from them alone (with their ids back).
    allowed = tokenizer.encode(" yes no", add_special_tokens=False)
    only = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=1.5,
                                     extra_body={"ignore_eos": True, "allowed_token_ids": allowed,
                                                 "return_token_ids": True})
    assert set(only.choices[0].model_dump()["token_ids"]) <= set(allowed)
    with pytest.raises(openai.BadRequestError) as outside:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"allowed_token_ids": [len(tokenizer) + 10]})
    assert "allowed_token_ids must be in" in outside.value.message
    # vLLM's bad_words: a word the greedy answer holds never comes out once banned.
    ids = client.completions.create(model=MODEL, prompt="x", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True}
                                    ).choices[0].model_dump()["token_ids"]
    token = next(t for t in ids if tokenizer.encode(tokenizer.decode([t]), add_special_tokens=False) == [t])
    clean = client.completions.create(model=MODEL, prompt="x", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True,
                                                  "bad_words": [tokenizer.decode([token])]})
    assert token not in clean.choices[0].model_dump()["token_ids"]


def test_logprobs_in_both_apis_streamed_or_not(client, tokenizer):
    """Log-probabilities come back in OpenAI's shapes, one per output token, the same
    whether streamed or not."""
    args = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 6, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(logprobs=2, **args)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and token in top and logprob == max(top.values())  # greedy
    streamed = list(client.completions.create(logprobs=2, stream=True, **args))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens
    assert client.completions.create(**args).choices[0].logprobs is None

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(bytes(c.bytes).decode() == c.token for c in content if "\ufffd" not in c.token)
    joined = b"".join(bytes(c.bytes) for c in content).decode(errors="replace")
    assert joined == chat.choices[0].message.content  # split characters join again


def test_echo_with_logprobs_scores_the_prompt(client, tokenizer):
    """What lm-eval-harness's loglikelihood sends: echo, logprobs 1, max_tokens 1. The
    answer holds the prompt's tokens with their log-probabilities (the first null), then
    the new token's."""
    prompt = "The capital of France is Paris"
    ids = tokenizer.encode(prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                    logprobs=1, echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:])
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                              temperature=0, logprobs=1, echo=True, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_prompt_logprobs_score_the_prompt_in_vllms_shape(client, tokenizer):
    """vLLM's ``prompt_logprobs``: each prompt token (the first null) with its position's
    most likely tokens, by id, ranked; the same log-probabilities an echo gives, which
    lists only as many alternatives as it asked."""
    prompt = "The capital of France is Paris"
    ids = tokenizer.encode(prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=1, echo=True,
                                    extra_body={"prompt_logprobs": 3})
    scored = out.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    echoed = out.choices[0].logprobs
    for position, token in enumerate(ids[1:], start=1):
        entries = scored[position]
        own = entries[str(token)]
        assert own["decoded_token"] == tokenizer.decode([token]) and own["rank"] >= 1
        assert own["logprob"] == pytest.approx(echoed.token_logprobs[position])
        ranked = sorted((e["rank"], e["logprob"]) for e in entries.values())
        assert [rank for rank, _ in ranked if rank <= 3] == [1, 2, 3]  # the three likeliest, and the token
        assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
        assert len(echoed.top_logprobs[position]) <= 2  # its one alternative, and the token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    whole = chat.model_extra["prompt_logprobs"]
    assert len(whole) == chat.usage.prompt_tokens and whole[0] is None
    assert all(len(entries) == 1 for entries in whole[1:])  # the token alone
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})


def test_n_choices_streamed_or_not(client, tokenizer):
    """n choices come back in one answer, each sampled on its own (seeded: the same again),
    the prompt counted once in the usage."""
    prompt = "Once upon a time"
    args = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "n": 3, "seed": 11,
            "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**args)
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(whole.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 24
    streamed = list(client.completions.create(stream=True, **args))
    again = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            again[choice.index] += choice.text
    assert again == texts
    finishes = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, n=2, temperature=0,
                                          extra_body={"ignore_eos": True})
    first, second = chat.choices
    assert first.message.content == second.message.content  # greedy: the same answer twice


def test_a_batch_of_prompts_answers_each_as_if_sent_alone(client, tokenizer):
    """A list of prompts (an eval harness's batch): choice i answers prompt i // n, each
    echoed with its own prompt, the same tokens as that prompt sent alone, every prompt
    counted once in the usage."""
    prompts = ["Once upon a time", "The capital of"]
    args = {"model": MODEL, "max_tokens": 4, "n": 2, "seed": 3, "temperature": 1.0,
            "extra_body": {"ignore_eos": True}}
    batch = client.completions.create(prompt=prompts, echo=True, **args)
    texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, **args)
        assert texts[2 * i: 2 * i + 2] == [prompt + c.text for c in sorted(alone.choices, key=lambda c: c.index)]
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert batch.usage.completion_tokens == 16


def test_a_token_id_prompt_is_answered_as_its_text_and_echoed_spelled(client, tokenizer):
    """lm-eval-harness's tokenized requests: the ids are the model's input as they are (the
    same answer and prompt log-probabilities as the text they encode), a batch of them
    too, and an echo spells them as the tokenizer does."""
    ids = tokenizer.encode("Once upon a time")  # with BOS, as the scorer encodes text
    args = {"model": MODEL, "max_tokens": 3, "seed": 5, "temperature": 1.0, "echo": True,
            "logprobs": 1, "extra_body": {"ignore_eos": True}}
    as_text = client.completions.create(prompt="Once upon a time", **args).choices[0]
    as_ids = client.completions.create(prompt=ids, **args).choices[0]
    assert as_ids.text == tokenizer.decode(ids) + as_text.text[len("Once upon a time"):]
    assert as_ids.logprobs.token_logprobs == pytest.approx(as_text.logprobs.token_logprobs, abs=1e-4)
    batch = client.completions.create(prompt=[ids, ids[:3]], **args)
    assert min(batch.choices, key=lambda c: c.index).text == as_ids.text
    with pytest.raises(openai.BadRequestError, match="prompt token ids must be in"):
        client.completions.create(model=MODEL, prompt=[len(tokenizer) + 5], max_tokens=2)


def test_a_chat_can_continue_the_assistants_message(client, tokenizer):
    """vLLM's prompt fields reach the model: a prefilled assistant message continued (no
    turn closed, none opened) is the prompt the template renders so, token for token."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2,
        extra_body={"continue_final_message": True, "ignore_eos": True})
    expected = tokenizer.apply_chat_template(messages, continue_final_message=True,
                                             add_generation_prompt=False, tokenize=False)
    assert answer.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    opened = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert opened.usage.prompt_tokens > answer.usage.prompt_tokens


class Person(pydantic.BaseModel):
    name: Annotated[str, pydantic.Field(max_length=6)]
    age: Annotated[int, pydantic.Field(ge=0, le=120)]


def test_structured_outputs_hold_answers_to_their_language(client):
    """The openai client's own parse() with a pydantic model, vLLM's choice on streamed
    choices and a regex reach the worker, whose grammar holds a random model to them."""
    parsed = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=300,
        seed=2, response_format=Person)
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Person)
    colours = ["red", "green", "blue"]
    chunks = list(client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=20, n=3,
                                            seed=5, stream=True, extra_body={"guided_choice": colours}))
    for index in range(3):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) in colours
        assert mine[-1].finish_reason == "stop"
    dated = client.completions.create(model=MODEL, prompt="Today is", max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", dated.choices[0].text)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_forced_tool_call_comes_back_as_tool_calls_and_its_answer_goes_on(client):
    """A named function's call (streamed), a required one, and the conversation that
    sends the call and its result back: the flow of an agent loop."""
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    required = client.chat.completions.create(
        model=MODEL, messages=question, tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=300, seed=4)
    assert required.choices[0].finish_reason == "tool_calls"
    [call] = required.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    streamed = client.chat.completions.create(
        model=MODEL, messages=question, tools=[WEATHER_TOOL], max_tokens=300, seed=4, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [chunk.choices[0] for chunk in streamed if chunk.choices]
    pieces = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments for p in pieces))["unit"] in ("c", "f")
    assert deltas[-1].finish_reason == "stop"
    follow = question + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "7 degrees, rain"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER_TOOL],
                                            tool_choice="none", max_tokens=4)
    assert answer.choices[0].message.content is not None and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > required.usage.prompt_tokens  # the call and its result


def test_a_chat_the_model_may_answer_or_call_is_served_with_the_parser(client):
    """The system runs with FAIRWAY_TOOL_CALL_PARSER=hermes: tools without a tool_choice
    (OpenAI's auto) are served, and a random model's answer, which calls nothing, comes
    back as content, streamed or not."""
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    answer = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER_TOOL],
                                            max_tokens=6, seed=1, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    streamed = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER_TOOL],
                                              max_tokens=6, seed=1, stream=True,
                                              extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        answer.choices[0].message.content)


def test_the_responses_api_answers_streams_calls_and_parses(client):
    """OpenAI's Responses API through its client: an answer cut by max_output_tokens, the
    same streamed as events, a forced call sent back with its output (an agent's turn),
    and a structured answer the client parses."""
    ask = {"model": MODEL, "input": "Hello", "instructions": "Be brief", "max_output_tokens": 6,
           "extra_body": {"seed": 3, "ignore_eos": True}}
    answer = client.responses.create(**ask)
    assert answer.id.startswith("resp_") and answer.status == "incomplete"
    assert answer.incomplete_details.reason == "max_output_tokens" and answer.usage.output_tokens == 6
    events = list(client.responses.create(**ask, stream=True))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer.output_text
    weather = {"type": "function", **WEATHER_TOOL["function"]}
    question = {"role": "user", "content": "Weather in Oslo?"}
    called = client.responses.create(model=MODEL, input=[question], tools=[weather],
                                     tool_choice="required", parallel_tool_calls=False,
                                     max_output_tokens=300, extra_body={"seed": 4})
    [call] = called.output
    assert (call.type, call.name, called.status) == ("function_call", "get_weather", "completed")
    assert set(json.loads(call.arguments)) == {"city", "unit"}
    turn = client.responses.create(
        model=MODEL, tools=[weather], tool_choice="none", max_output_tokens=4,
        input=[question, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "7 degrees"}])
    assert turn.output[0].type == "message"
    assert turn.usage.input_tokens > called.usage.input_tokens  # the call and its output
    # OpenAI's input-token count: what the same input is charged, tools and instructions in.
    for asked, charged in (({"input": "Hello", "instructions": "Be brief"}, answer),
                           ({"input": [question], "tools": [weather], "tool_choice": "required"}, called)):
        assert client.responses.input_tokens.count(model=MODEL, **asked).input_tokens == (
            charged.usage.input_tokens)
    parsed = client.responses.parse(model=MODEL, input="Who are you?", text_format=Person,
                                    max_output_tokens=300, extra_body={"seed": 2})
    assert isinstance(parsed.output_parsed, Person)


def test_a_stored_response_is_continued_read_and_forgotten_by_its_tenant_only(client, system, globex_key):
    """Responses are stored (OpenAI's default): previous_response_id goes on from one
    (its conversation before the new input), GET reads it (and its input_items), DELETE
    forgets it; another
    tenant finds none of it, and store=false keeps nothing."""
    first = client.responses.create(model=MODEL, input="Hello", max_output_tokens=4, instructions="Be brief")
    assert first.store is True
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=MODEL, input="And then?", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    alone = client.responses.create(model=MODEL, input="And then?", max_output_tokens=4)
    assert second.usage.input_tokens > alone.usage.input_tokens  # the first turn came with it
    counted = client.responses.input_tokens.count(model=MODEL, input="And then?", previous_response_id=first.id)
    assert (counted.object, counted.input_tokens) == ("response.input_tokens", second.usage.input_tokens)
    streamed = list(client.responses.create(model=MODEL, input="More", max_output_tokens=3, stream=True,
                                            previous_response_id=second.id))
    final = streamed[-1].response
    assert client.responses.retrieve(final.id).output_text == final.output_text
    # A response's own input, not the conversation it went on from.
    [item] = client.responses.input_items.list(second.id).data
    assert (item.type, item.role, item.content[0].type, item.content[0].text) == (
        "message", "user", "input_text", "And then?")
    assert item.id.startswith("msg_") and client.responses.input_items.list(second.id).data[0].id == item.id
    other = openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=globex_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="x", max_output_tokens=2, previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_tokens.count(model=MODEL, input="x", previous_response_id=first.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unkept = client.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_a_conversation_carries_its_turns_and_is_its_tenants_only(client, system, globex_key):
    """A conversation (/v1/conversations) holds the items a response that names it ran
    with: each answer adds its input and output, in order, and the next runs after them;
    items can be added, read and deleted; another tenant finds none of it."""
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}], metadata={"app": "test"})
    assert conversation.metadata == {"app": "test"}
    first = client.responses.create(model=MODEL, input="Hello", max_output_tokens=4,
                                    conversation=conversation.id)
    assert first.conversation.id == conversation.id
    streamed = list(client.responses.create(model=MODEL, input="And then?", max_output_tokens=3, stream=True,
                                            conversation={"id": conversation.id}))
    second = streamed[-1].response
    alone = client.responses.create(model=MODEL, input="And then?", max_output_tokens=3)
    assert second.usage.input_tokens > alone.usage.input_tokens  # the earlier turns came with it
    items = client.conversations.items.list(conversation.id, order="asc").data
    texts = [(item.role, item.content[0].text) for item in items]
    assert texts == [("user", "My name is Ada."), ("user", "Hello"), ("assistant", first.output_text),
                     ("user", "And then?"), ("assistant", second.output_text)]
    assert items[2].id == first.output[0].id  # an answer's items keep their ids
    assert [i.id for i in client.conversations.items.list(conversation.id).data] == [i.id for i in items[::-1]]
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "user", "content": "Bye."}]).data
    assert client.conversations.items.retrieve(added[0].id, conversation_id=conversation.id).id == added[0].id
    client.conversations.items.delete(items[0].id, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 5
    assert client.conversations.update(conversation.id, metadata={"app": "x"}).metadata == {"app": "x"}
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(model=MODEL, input="x", max_output_tokens=2, conversation=conversation.id,
                                previous_response_id=first.id)
    assert both.value.body["param"] == "conversation"
    other = openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=globex_key, max_retries=0)
    for call in (lambda: other.conversations.retrieve(conversation.id),
                 lambda: other.conversations.items.list(conversation.id),
                 lambda: other.responses.create(model=MODEL, input="x", max_output_tokens=2,
                                                conversation=conversation.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


@pytest.mark.parametrize(("constraint", "words"), [
    ({"guided_regex": "(unclosed"}, "the regular expression is not valid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
     "the JSON schema is not valid"),
])
def test_a_constraint_no_parser_reads_is_a_400_from_the_scorer(system, acme_key, constraint, words):
    r = httpx.post(f"{system.gateway_url}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {acme_key}"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **constraint})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_a_tenants_repeated_prefix_is_served_from_the_cache_and_only_its_own(system, acme_key, globex_key):
    """A conversation's earlier turns sent again are read from the worker's prefix cache
    (usage.prompt_tokens_details.cached_tokens), and another tenant's same prompt is not
    (FAIRWAY_PREFIX_CACHE_SCOPE is per tenant by default)."""
    system_prompt = {"role": "system", "content": "You answer questions about the weather. " * 6}
    first = [system_prompt, {"role": "user", "content": "Is it raining in Oslo?"}]

    def ask(key: str, messages: list[dict]):
        tenant = openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=key, max_retries=0)
        return tenant.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, seed=1)

    ask(acme_key, first)
    again = ask(acme_key, first + [{"role": "assistant", "content": "Yes."},
                                   {"role": "user", "content": "And in Rome?"}])
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens and cached % 16 == 0
    assert ask(globex_key, first).usage.prompt_tokens_details.cached_tokens == 0


async def test_a_prompt_read_from_the_prefix_cache_is_charged_at_the_cached_rate(system, rabbit_server):
    """VTC charges a prompt w_in per token at dispatch; the tokens its worker read from its
    prefix cache are re-priced at w_cached in the tenant's counter when it completes
    (defaults 1, 2 and 0.1), once. The served-tokens counter counts every token."""
    url = amqp_tenant(system, rabbit_server, "cache-tenant")
    prompt = "Tell me about the weather in the mountains, in a few words. " * 4
    async with AmqpClient(url) as client:
        finals = []
        for _ in range(2):
            request = client.completion(MODEL, prompt, max_tokens=3, ignore_eos=True)
            finals.append([r async for r in client.submit(request)][-1])
    first, second = finals
    assert first.cached_tokens == 0 and 16 <= second.cached_tokens < second.prompt_tokens
    served = sum(1.0 * f.prompt_tokens + 2.0 * f.completion_tokens for f in finals)
    charged = served - (1.0 - 0.1) * second.cached_tokens
    redis = aioredis.from_url(system.redis_url)

    async def counts() -> tuple[float, float]:
        return (float(await redis.hget(keys.SCHED_SERVED, "cache-tenant") or 0),
                float(await redis.hget(keys.SCHED_COUNTERS, "cache-tenant") or 0))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # completion events reach the scheduler after the answer
            if await counts() == (pytest.approx(served), pytest.approx(charged)):
                break
            await asyncio.sleep(0.1)
        assert await counts() == (pytest.approx(served), pytest.approx(charged))
        await asyncio.sleep(0.5)  # a redelivered or late report would re-price it again
        assert await counts() == (pytest.approx(served), pytest.approx(charged))
    finally:
        await redis.aclose()


def test_tokenize_counts_what_a_request_is_charged_and_detokenize_spells_it(system, acme_key, tokenizer):
    """vLLM's /tokenize and /detokenize, answered by the scorer: a chat's count is the
    prompt_tokens the same chat is charged, a prompt's tokens are the tokenizer's, and
    token ids come back as their text."""
    post = lambda path, body: httpx.post(f"{system.gateway_url}{path}", json={"model": MODEL, **body},
                                         headers={"Authorization": f"Bearer {acme_key}"}, timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    counted = post("/tokenize", {"messages": messages, "tools": [WEATHER_TOOL]})
    assert counted.status_code == 200, counted.text
    client = openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key=acme_key, max_retries=0)
    charged = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                             tool_choice="none", max_tokens=1)
    assert counted.json()["count"] == charged.usage.prompt_tokens
    assert counted.json()["max_model_len"] == 1024 and counted.json()["token_strs"] is None
    prompt = post("/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert prompt["tokens"] == tokenizer.encode("Hello world")
    assert prompt["token_strs"] == tokenizer.convert_ids_to_tokens(prompt["tokens"])
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert post("/detokenize", {"tokens": ids}).json() == {"prompt": "Hello world"}
    refused = post("/detokenize", {"tokens": [len(tokenizer) + 5]})
    assert refused.status_code == 400 and "token ids must be in" in refused.json()["error"]["message"]


def test_two_tenants_and_bad_key(system, acme_key, globex_key):
    for key in (acme_key, globex_key):
        r = httpx.post(f"{system.gateway_url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    bad = openai.OpenAI(base_url=f"{system.gateway_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'{"model": "fairway-tiny-llama", "prompt": "hi", "max_tokens": 0}', "application/json", 400),
        (b'{"model": "fairway-tiny-llama", "prompt": "hi", "max_tokens": 100000}', "application/json", 400),
        (b'{"model": "fairway-tiny-llama", "prompt": "hi", "temperature": NaN}', "application/json", 400),
        (b'{"model": "fairway-tiny-llama", "prompt": "hi", ', "application/json", 400),
        (b'{"model": "no-such-model", "prompt": "hi"}', "application/json", 404),
        (b'model=fairway-tiny-llama&prompt=hi', "application/x-www-form-urlencoded", None),
    ],
)
def test_bad_input_gets_openai_error(system, acme_key, body, content_type, status):
    r = httpx.post(f"{system.gateway_url}/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {acme_key}", "Content-Type": content_type})
    assert 400 <= r.status_code < 500
    if status is not None:
        assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]


def test_prompt_longer_than_context_is_rejected_by_the_scorer(system, acme_key):
    # The gateway cannot count tokens; the scorer does and answers with a 400.
    r = httpx.post(f"{system.gateway_url}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {acme_key}"},
                   json={"model": MODEL, "prompt": "word " * 2000, "max_tokens": 16})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_a_long_chat_without_max_tokens_gets_what_the_context_leaves(client, tokenizer):
    """The chat default (256) does not fit after this history; the scorer lowers it to the
    room left instead of refusing a limit the client never set."""
    messages = [{"role": "user", "content": "word " * 300}]
    prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
    room = 1024 - prompt_tokens  # the system's FAIRWAY_MAX_MODEL_LEN
    assert 0 < room < 256
    out = client.chat.completions.create(model=MODEL, messages=messages,
                                         extra_body={"ignore_eos": True})
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, room)
    assert out.choices[0].finish_reason == "length"


def test_system_keeps_serving_after_bad_input(client):
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=3)
    assert out.usage.completion_tokens >= 1


async def _worker_running(redis_url: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        beats = [m.decode(b, m.WorkerHeartbeat) for b in (await client.hgetall(keys.WORKERS)).values()]
        return sum(b.running for b in beats)
    finally:
        await client.aclose()


@pytest.mark.parametrize("n", [1, 3])
async def test_client_disconnect_frees_the_worker_slot(system, acme_key, n):
    """Every choice's slot: a client that leaves an n-choice stream cancels them all."""
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{system.gateway_url}/v1/completions",
                               headers={"Authorization": f"Bearer {acme_key}"},
                               json={"model": MODEL, "prompt": "a long story", "max_tokens": 900,
                                     "stream": True, "ignore_eos": True, "n": n}) as response:
            assert response.status_code == 200
            # Keep reading until a heartbeat shows the choices running, then walk away.
            seen_running = False
            async for line in response.aiter_lines():
                if line.startswith("data:") and await _worker_running(system.redis_url) >= n:
                    seen_running = True
                    break
        assert seen_running, "the request finished before a heartbeat showed it running"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if await _worker_running(system.redis_url) == 0:
            return
        await asyncio.sleep(0.2)
    pytest.fail("the worker still runs the request of a client that left")


def amqp_tenant(system, rabbit_server, user: str) -> str:
    """A RabbitMQ user of its own (the tenant of what it sends): its AMQP URL."""
    rabbitmqctl(rabbit_server, "add_user", user, "secret")
    own_replies = f"^fairway\\.replies\\.{user}\\..*"
    vhost = system.amqp_url.rsplit("/", 1)[1]
    rabbitmqctl(rabbit_server, "set_permissions", "-p", vhost, user, own_replies,
                "^fairway\\.requests$", own_replies)
    return f"amqp://{user}:secret@127.0.0.1:{rabbit_server.port}/{vhost}"


async def test_amqp_producer_round_trip_without_gateway(system, rabbit_server, tokenizer):
    url = amqp_tenant(system, rabbit_server, "amqp-tenant")
    async with AmqpClient(url) as client:
        request = client.completion(MODEL, "over the wire", max_tokens=5, ignore_eos=True)
        replies = [r async for r in client.submit(request)]
    chunks, final = replies[:-1], replies[-1]
    # In order, each chunk placed right after the one before it.
    assert [c.token_offset for c in chunks] == list(
        itertools.accumulate((len(c.token_ids) for c in chunks[:-1]), initial=0))
    assert [c.text_offset for c in chunks] == list(
        itertools.accumulate((len(c.text) for c in chunks[:-1]), initial=0))
    assert isinstance(final, m.FinalAnswer) and final.finish_reason == "length"
    assert final.completion_tokens == 5 == sum(len(c.token_ids) for c in chunks)
    assert final.prompt_tokens == len(tokenizer.encode("over the wire"))
    # The tenant is the authenticated AMQP user, so VTC charged that user.
    redis = aioredis.from_url(system.redis_url)
    try:
        assert float(await redis.hget(keys.SCHED_SERVED, "amqp-tenant") or 0) > 0
    finally:
        await redis.aclose()


@pytest.mark.parametrize("payload", [
    b"\xc1 not msgpack",
    msgpack.packb({"v": 1, "t": "completion_request", "request_id": "x-1"}),  # missing fields
    msgpack.packb({"v": 99, "t": "completion_request"}),
    b"\x00" * (m.MAX_MESSAGE_BYTES + 1),
], ids=["not-msgpack", "missing-fields", "unknown-version", "oversized"])
async def test_malformed_message_is_dead_lettered_with_an_error_reply(system, payload):
    message_id = f"poison-{uuid.uuid4().hex}"
    connection = await aio_pika.connect_robust(system.amqp_url)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE)
        await exchange.publish(aio_pika.Message(payload, reply_to=replies.name, message_id=message_id),
                               routing_key=topology.SUBMIT_ROUTING_KEY)
        message = await _get_one(replies, timeout=15)
        answer = m.decode(message.body, m.FinalAnswer)
        assert answer.finish_reason == "error" and answer.error.status == 400
        # The poison message itself sits in the dead-letter queue, untouched.
        dead = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            letter = await dead.get(no_ack=True, fail=False)
            if letter is None:
                await asyncio.sleep(0.1)
            elif letter.message_id == message_id:
                assert letter.body == payload
                return
        pytest.fail("the poison message never reached the dead-letter queue")
    finally:
        await connection.close()


async def _get_one(queue, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    raise TimeoutError("no reply")
