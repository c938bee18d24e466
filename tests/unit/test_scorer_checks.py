"""The scorer's checks of requests that come straight over AMQP (no gateway schema)."""

from __future__ import annotations

import math

import pytest

from services import messages as m
from services.scorer.service import RequestRejected, check_fields


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
