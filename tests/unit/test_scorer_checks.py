"""The scorer's checks of requests that come straight over AMQP (no gateway schema)."""

from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis

from services import messages as m
from services.models import DEFAULT_MODEL_NAME, load_tokenizer
from services.scorer.online import OnlinePredictor
from services.scorer.predictor import LengthPredictor
from services.scorer.service import RequestRejected, Scorer, check_fields


def request(kind: str = "completion", roles=("user",), **sampling) -> m.CompletionRequest:
    return m.CompletionRequest(
        request_id="r", model="tiny", kind=kind, prompt="hi" if kind == "completion" else "",
        messages=[m.ChatMessage(role=role, content="hi") for role in roles] if kind == "chat" else [],
        sampling=m.SamplingParams(**sampling))


@pytest.mark.parametrize("sampling", [
    {"max_tokens": 0}, {"max_tokens": -5}, {"temperature": -0.1}, {"temperature": 2.5},
    {"temperature": math.inf}, {"temperature": math.nan}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": -1}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]},
    {"stop_token_ids": list(range(257))},
])
def test_bad_sampling_parameters_are_refused(sampling):
    with pytest.raises(RequestRejected) as info:
        check_fields(request(**sampling))
    assert info.value.status == 400


def test_chat_roles_are_checked():
    with pytest.raises(RequestRejected):
        check_fields(request("chat", roles=("user", "robot")))
    check_fields(request("chat", roles=("system", "user", "assistant")))


def test_good_parameters_pass():
    check_fields(request(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=["a"] * 4,
                         stop_token_ids=list(range(256)), seed=-(2**63)))
    check_fields(request(temperature=2.0, top_p=1e-9))


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
                                   max_tokens_defaulted=defaulted)

    scored = scorer.score(completion(16, defaulted=True))
    assert scored.request.sampling.max_tokens == room
    assert scored.score.p90 <= room
    assert scorer.score(completion(2, defaulted=True)).request.sampling.max_tokens == 2
    with pytest.raises(RequestRejected) as given:
        scorer.score(completion(16, defaulted=False))
    assert given.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected) as full:  # no room left at all: refused all the same
        scorer.score(m.CompletionRequest(request_id="r", model="tiny", prompt="word " * 30,
                                         max_tokens_defaulted=True))
    assert full.value.code == "context_length_exceeded"
