"""The scorer's checks of requests that come straight over AMQP (no gateway schema)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import redis.asyncio as aioredis

from services import messages as m
from services.models import DEFAULT_MODEL_NAME, load_tokenizer
from services.scorer.online import OnlinePredictor
from services.scorer.predictor import LengthPredictor
from services.scorer.service import (
    RequestRejected,
    Scorer,
    check_fields,
    usable_generation_defaults,
)
from services.tokens import tokenize


def request(kind: str = "completion", roles=("user",), **sampling) -> m.CompletionRequest:
    return m.CompletionRequest(
        request_id="r", model="tiny", kind=kind, prompt="hi" if kind == "completion" else "",
        messages=[m.ChatMessage(role=role, content="hi") for role in roles] if kind == "chat" else [],
        sampling=m.SamplingParams(**sampling))


@pytest.mark.parametrize("sampling", [
    {"max_tokens": 0}, {"max_tokens": -5}, {"temperature": -0.1}, {"temperature": 2.5},
    {"temperature": math.inf}, {"temperature": math.nan}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": -1}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]},
    {"stop_token_ids": list(range(257))}, {"allowed_token_ids": [-3]},
    {"allowed_token_ids": [1], "structured": m.StructuredOutput(kind="regex", spec="[ab]+")},
])
def test_bad_sampling_parameters_are_refused(sampling):
    with pytest.raises(RequestRejected) as info:
        check_fields(request(**sampling))
    assert info.value.status == 400


def test_priority_beyond_a_64_bit_integer_is_refused():
    check_fields(m.CompletionRequest(request_id="r", model="tiny", prompt="hi", priority=-(2**63)))
    with pytest.raises(RequestRejected, match="priority must be in"):
        check_fields(m.CompletionRequest(request_id="r", model="tiny", prompt="hi", priority=2**63))


def test_chat_roles_are_checked():
    with pytest.raises(RequestRejected):
        check_fields(request("chat", roles=("user", "robot")))
    check_fields(request("chat", roles=("system", "developer", "user", "assistant")))


def test_good_parameters_pass():
    check_fields(request(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=["a"] * 4,
                         stop_token_ids=list(range(256)), seed=-(2**63)))
    check_fields(request(temperature=2.0, top_p=1e-9))


def test_defaulted_may_only_name_sampling_fields_a_server_fills():
    check_fields(m.CompletionRequest(request_id="r", model="tiny", prompt="hi",
                                     defaulted=list(m.DEFAULTABLE)))
    with pytest.raises(RequestRejected, match="defaulted may only name"):
        check_fields(m.CompletionRequest(request_id="r", model="tiny", prompt="hi",
                                         defaulted=["seed"]))


def test_the_models_sampling_defaults_fill_only_what_the_client_left_unset(model_cache):
    """As vLLM's ``--generation-config auto``: a model shipping temperature 0.6 and top_p
    0.9 samples with them unless the request says otherwise."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    predictor = OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny")
    scorer = Scorer(tokenizer, predictor, 1024, {"temperature": 0.6, "top_p": 0.9})

    def sampling(defaulted: list[str], **given) -> m.SamplingParams:
        request = m.CompletionRequest(request_id="r", model="tiny", prompt="hi",
                                      sampling=m.SamplingParams(**given), defaulted=defaulted)
        return scorer.score(request).request.sampling

    unset = sampling(["max_tokens", "temperature", "top_p", "top_k"])
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_tokens) == (0.6, 0.9, 0, 16)
    mine = sampling(["top_p"], temperature=0.0)
    assert (mine.temperature, mine.top_p) == (0.0, 0.9)
    assert sampling([], temperature=1.0).temperature == 1.0  # an AMQP producer's own value
    assert usable_generation_defaults({"temperature": 0.7, "top_k": 20}) == {"temperature": 0.7, "top_k": 20}
    assert usable_generation_defaults({"temperature": 5.0, "top_p": 0.9}) == {}
    assert usable_generation_defaults({"top_p": 0.0}) == {}


def test_a_default_max_tokens_is_lowered_to_what_the_context_leaves(model_cache):
    """A chat near the context's end without max_tokens is served with the room left (as
    vLLM does), not refused for the endpoint's default of 256 that nobody asked for; a
    max_tokens the client gave is still refused when it does not fit."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    unused = aioredis.Redis()  # scoring reads the learned state in memory: no I/O
    scorer = Scorer(tokenizer, OnlinePredictor(LengthPredictor.default(), unused, "tiny"), 64)
    prompt = "word " * 20  # 61 tokens with BOS
    prompt_tokens = len(tokenizer.encode(prompt))
    room = 64 - prompt_tokens
    assert 0 < room < 16

    def completion(max_tokens: int, defaulted: bool) -> m.CompletionRequest:
        return m.CompletionRequest(request_id="r", model="tiny", prompt=prompt,
                                   sampling=m.SamplingParams(max_tokens=max_tokens),
                                   defaulted=["max_tokens"] if defaulted else [])

    scored = scorer.score(completion(16, defaulted=True))
    assert scored.request.sampling.max_tokens == room
    assert scored.score.p90 <= room
    assert scorer.score(completion(2, defaulted=True)).request.sampling.max_tokens == 2
    with pytest.raises(RequestRejected) as given:
        scorer.score(completion(16, defaulted=False))
    assert given.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected) as full:  # no room left at all: refused all the same
        scorer.score(m.CompletionRequest(request_id="r", model="tiny", prompt="word " * 30,
                                         defaulted=["max_tokens"]))
    assert full.value.code == "context_length_exceeded"


def test_min_tokens_and_logit_bias_are_checked_and_shape_the_prediction(model_cache):
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    predictor = OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny")
    scorer = Scorer(tokenizer, predictor, 64, vocab_size=len(tokenizer))

    def request(**sampling) -> m.CompletionRequest:
        return m.CompletionRequest(request_id="r", model="tiny", prompt="hi",
                                   sampling=m.SamplingParams(**sampling))

    score = scorer.score(request(max_tokens=40, min_tokens=30)).score
    assert 30 <= score.p10 <= score.p50 <= score.p90 <= 40  # no answer ends before 30
    with pytest.raises(RequestRejected, match="min_tokens"):
        scorer.score(request(max_tokens=4, min_tokens=5))
    with pytest.raises(RequestRejected, match="logit_bias token ids must be in"):
        scorer.score(request(logit_bias=[m.TokenBias(len(tokenizer), 1.0)]))
    with pytest.raises(RequestRejected, match="presence_penalty"):
        scorer.score(request(presence_penalty=3.0))
    biased = request(logit_bias=[m.TokenBias(len(tokenizer) - 1, -5.0)], repetition_penalty=1.2)
    assert scorer.score(biased).request.sampling == biased.sampling
    # A default max_tokens is lowered to the room the prompt leaves, but not below
    # min_tokens: such a request does not fit and is refused as too long.
    long_prompt = m.CompletionRequest(request_id="r", model="tiny", prompt="word " * 20,
                                      sampling=m.SamplingParams(max_tokens=16, min_tokens=10),
                                      defaulted=["max_tokens"])
    with pytest.raises(RequestRejected) as refused:
        scorer.score(long_prompt)
    assert refused.value.code == "context_length_exceeded"


def test_a_structured_request_is_checked_before_any_work(model_cache):
    """A producer straight on AMQP gets the gateway's words for a constraint no worker
    could compile, before it is charged or queued."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    scorer = Scorer(tokenizer, OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny"),
                    64, vocab_size=len(tokenizer))

    def request(spec: m.StructuredOutput) -> m.CompletionRequest:
        return m.CompletionRequest(request_id="r", model="tiny", prompt="hi",
                                   sampling=m.SamplingParams(structured=spec))

    good = request(m.StructuredOutput("regex", "[a-z]{2}"))
    assert scorer.score(good).request.sampling.structured == good.sampling.structured
    with pytest.raises(RequestRejected, match="^the regular expression is not valid"):
        scorer.score(request(m.StructuredOutput("regex", "(a")))
    with pytest.raises(RequestRejected, match="^the JSON schema is not valid"):
        scorer.score(request(m.StructuredOutput("json_schema", "{")))
    with pytest.raises(RequestRejected, match="lists its strings in choices"):
        check_fields(request(m.StructuredOutput("choice")))
    # A choice bounds the answer: the longest choice in tokens, and the stop token.
    choice = request(m.StructuredOutput("choice", choices=["yes", "no", "not at all, never"]))
    longest = 1 + len(tokenizer.encode("not at all, never", add_special_tokens=False))
    score = scorer.score(choice).score
    assert score.p10 <= score.p50 <= score.p90 <= longest
    free = scorer.score(request(None)).score
    assert free.p90 > longest  # the predictor's own guess for "hi", unbounded
    thinking = request(m.StructuredOutput("choice", choices=["yes", "no", "not at all, never"],
                                          after_reasoning="qwen3"))
    assert scorer.score(thinking).score.p90 == free.p90  # thinks first: no bound


def test_a_developer_message_is_rendered_as_the_system_message(model_cache):
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))

    def ids(role: str) -> list[int]:
        return tokenize(tokenizer, m.CompletionRequest(
            request_id="r", model="tiny", kind="chat",
            messages=[m.ChatMessage(role=role, content="be brief"), m.ChatMessage(role="user", content="hi")]))

    assert ids("developer") == ids("system") != ids("user")


class NoBosTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_an_empty_prompt_starts_from_bos_and_is_refused_without_one(model_cache):
    predictor = OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny")
    empty = m.CompletionRequest(request_id="r", model="tiny", prompt="")
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    scored = Scorer(tokenizer, predictor, 64).score(empty)
    assert scored.prompt_token_ids == [tokenizer.bos_token_id]
    with pytest.raises(RequestRejected, match="prompt must not be empty"):
        Scorer(NoBosTokenizer(), predictor, 64).score(empty)


def test_a_token_id_prompt_is_used_as_sent_and_spelled_for_the_predictor(model_cache):
    """Ids go to the worker untouched (no BOS added, none re-tokenized); their text is
    what the predictor reads, the feedback carries and an echo gives back; an id the
    model does not have, or a chat with ids, is refused before any work."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    predictor = OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny")
    scorer = Scorer(tokenizer, predictor, 64, vocab_size=len(tokenizer))
    ids = tokenizer.encode("Once upon a time", add_special_tokens=False)
    sent = m.CompletionRequest(request_id="r", model="tiny", prompt_token_ids=ids, echo=True,
                               sampling=m.SamplingParams(max_tokens=8))
    scored = scorer.score(sent)
    assert scored.prompt_token_ids == ids
    assert scored.request.prompt == "Once upon a time" == scored.request.prompt_to_echo()
    as_text = scorer.score(m.CompletionRequest(request_id="t", model="tiny", prompt="Once upon a time",
                                               sampling=m.SamplingParams(max_tokens=8)))
    assert as_text.request.prompt_to_echo() is None  # its caller has the text
    assert as_text.prompt_token_ids == [tokenizer.bos_token_id, *ids]
    with pytest.raises(RequestRejected, match=r"prompt token ids must be in \[0, "):
        scorer.score(dataclasses.replace(sent, prompt_token_ids=[*ids, len(tokenizer)]))
    with pytest.raises(RequestRejected, match="context length"):
        scorer.score(dataclasses.replace(sent, prompt_token_ids=ids * 20))
    with pytest.raises(RequestRejected, match="prompt_token_ids is for completions"):
        scorer.score(dataclasses.replace(request("chat"), prompt_token_ids=ids))


def chat_request(**fields) -> m.CompletionRequest:
    return m.CompletionRequest(request_id="r", model="tiny", kind="chat", messages=[
        m.ChatMessage(role="user", content="hi"), m.ChatMessage(role="assistant", content="Sure,")],
        **fields)


def test_vllms_prompt_fields_shape_the_prompt_as_vllm_renders_it(model_cache):
    """add_special_tokens, add_generation_prompt, continue_final_message and the chat
    template's variables (those it reads; the renderer's own are refused)."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    text = lambda **fields: tokenizer.decode(tokenize(tokenizer, chat_request(**fields)))
    opened = text()
    assert opened.endswith("Sure,<|im_end|>\n<|im_start|>assistant\n")
    assert text(add_generation_prompt=False).endswith("Sure,<|im_end|>\n")
    assert text(add_generation_prompt=False, continue_final_message=True).rstrip().endswith("Sure,")
    assert text(add_special_tokens=True) == tokenizer.bos_token + opened
    completion = m.CompletionRequest(request_id="r", model="tiny", prompt="hi")
    assert tokenize(tokenizer, completion)[0] == tokenizer.bos_token_id
    assert tokenize(tokenizer, dataclasses.replace(completion, add_special_tokens=False)) == \
        tokenizer.encode("hi", add_special_tokens=False)

    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = tokenizer.chat_template + "{% if enable_thinking %}<think>{% endif %}"
    think = [m.TemplateArg("enable_thinking", True)]
    assert tokenizer.decode(tokenize(thinking, chat_request(chat_template_kwargs=think))).endswith("<think>")
    assert text(chat_template_kwargs=think) == opened  # a template that does not read it
    for name in ("tokenize", "messages", "bos_token"):
        with pytest.raises(ValueError, match=f"may not set {name}"):
            tokenize(tokenizer, chat_request(chat_template_kwargs=[m.TemplateArg(name, 1)]))
    with pytest.raises(RequestRejected, match="cannot both be true"):
        check_fields(chat_request(continue_final_message=True))


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(model_cache):
    """As vLLM's extension: the last k tokens (-1: the context length), for text and ids;
    what remains must still leave room for the answer."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    predictor = OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny")
    scorer = Scorer(tokenizer, predictor, 64, vocab_size=len(tokenizer))
    text = "word " * 100
    full = tokenize(tokenizer, m.CompletionRequest(request_id="r", model="tiny", prompt=text))
    kept = scorer.score(m.CompletionRequest(request_id="r", model="tiny", prompt=text,
                                            truncate_prompt_tokens=10,
                                            sampling=m.SamplingParams(max_tokens=8)))
    assert kept.prompt_token_ids == full[-10:]
    ids = scorer.score(m.CompletionRequest(request_id="r", model="tiny", prompt_token_ids=full,
                                           truncate_prompt_tokens=5, echo=True,
                                           sampling=m.SamplingParams(max_tokens=8)))
    assert ids.prompt_token_ids == full[-5:]
    assert ids.request.prompt == tokenizer.decode(full[-5:])  # what an echo spells
    whole_context = m.CompletionRequest(request_id="r", model="tiny", prompt=text, truncate_prompt_tokens=-1,
                                        sampling=m.SamplingParams(max_tokens=8))
    with pytest.raises(RequestRejected, match="maximum context length"):
        scorer.score(whole_context)  # 64 prompt tokens leave no room for 8 more
    with pytest.raises(RequestRejected, match="truncate_prompt_tokens must be"):
        check_fields(dataclasses.replace(whole_context, truncate_prompt_tokens=0))


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}({{ t.function.parameters.required"
    " | join(',') if t.function.parameters else '' }});{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} tz={{ c.function.arguments.tz }}{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}|{% endfor %}"
)


def test_tools_and_tool_calls_reach_the_chat_template_as_templates_read_them(model_cache):
    """Tools as OpenAI sent them, and an earlier call's arguments as a mapping (what
    templates index into), as vLLM renders them."""
    tokenizer = copy.copy(load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME)))
    tokenizer.chat_template = TOOL_TEMPLATE
    request = m.CompletionRequest(
        request_id="r", model="tiny", kind="chat",
        tools=[m.Tool("get_time", "", '{"type": "object", "required": ["tz"]}'), m.Tool("ping")],
        messages=[m.ChatMessage("user", "time?"),
                  m.ChatMessage("assistant", "", [m.ToolCall("call_1", "get_time", '{"tz": "utc"}')]),
                  m.ChatMessage("tool", "12:00", tool_call_id="call_1")])
    text = tokenizer.decode(tokenize(tokenizer, request))
    assert text == "TOOLS:get_time(tz);ping();|user:time?|assistant:CALL get_time tz=utc|tool:12:00[call_1]|"


def test_a_tokenize_only_request_is_answered_with_its_tokens(model_cache):
    """What /tokenize and /detokenize get: the ids as the model sees them (a chat's as
    its template renders it), however long; their names; a token-id prompt's text."""
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    scorer = Scorer(tokenizer, OnlinePredictor(LengthPredictor.default(), aioredis.Redis(), "tiny"),
                    8, vocab_size=len(tokenizer))
    long = m.CompletionRequest(request_id="t", model="tiny", prompt="word " * 20, tokenize_only=True)
    answer = scorer.tokenized(long)
    tokens = answer.tokenized
    assert tokens.token_ids == tokenizer.encode("word " * 20) and answer.prompt_tokens > 8
    assert tokens.token_strs == tokenizer.convert_ids_to_tokens(tokens.token_ids)
    assert (answer.finish_reason, answer.text, answer.token_ids, tokens.text) == ("stop", "", [], "")
    assert m.decode(m.encode(answer)) == answer  # as it crosses AMQP
    chat = m.CompletionRequest(request_id="t", model="tiny", kind="chat", tokenize_only=True,
                               messages=[m.ChatMessage(role="user", content="hi")])
    assert scorer.tokenized(chat).tokenized.token_ids == tokenize(tokenizer, chat)
    ids = tokenizer.encode("hello there", add_special_tokens=False)
    back = m.CompletionRequest(request_id="t", model="tiny", prompt_token_ids=ids, tokenize_only=True)
    assert scorer.tokenized(back).tokenized.text == tokenizer.decode(ids)
    with pytest.raises(RequestRejected, match="token ids must be in"):
        scorer.tokenized(m.CompletionRequest(request_id="t", model="tiny", tokenize_only=True,
                                             prompt_token_ids=[len(tokenizer)]))
    with pytest.raises(RequestRejected, match="messages must not be empty"):
        scorer.tokenized(m.CompletionRequest(request_id="t", model="tiny", kind="chat", tokenize_only=True))
