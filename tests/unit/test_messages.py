"""Wire messages: round trips, strict validation, size caps, and a decoder fuzz."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import messages as m


def _request(**kw) -> m.CompletionRequest:
    base = {"request_id": "r1", "tenant": "acme", "model": "tiny", "kind": "chat",
            "messages": [m.ChatMessage(role="user", content="héllo 👋")],
            "sampling": m.SamplingParams(max_tokens=5, temperature=0.5, stop=["\n"], seed=3)}
    base.update(kw)
    return m.CompletionRequest(**base)


def test_round_trip_preserves_every_field():
    scored = m.ScoredRequest(request_id="r1", request=_request(), prompt_token_ids=[1, 2, 3],
                             score=m.LengthScore(uncertainty=0.3, p10=2, p50=5, p90=9, features=[0.1]))
    item = m.WorkItem(request_id="r1", scored=scored, pool="cpu", dispatched_at=12.5)
    assert m.decode(m.encode(item)) == item
    assert m.decode(m.encode(item), m.WorkItem) == item


def test_sampling_fields_added_in_v1_are_optional():
    """A v1 request from a producer that predates penalties, bias and minimums decodes with
    their neutral values; a present one round-trips and is type-checked."""
    body = m.to_dict(_request())
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
                 "min_tokens", "logit_bias"):
        body["sampling"].pop(name)
    assert m.decode(msgpack.packb(body)) == _request()
    biased = _request(sampling=m.SamplingParams(logit_bias=[m.TokenBias(7, -1.5)], min_tokens=2,
                                                frequency_penalty=0.5))
    assert m.decode(m.encode(biased)) == biased
    chunk = m.TokenChunk(request_id="r", token_offset=0, text_offset=0, text="", token_ids=[9],
                         logprobs=[m.TokenLogprob(token="\ufffd", logprob=-1.0, raw=b"\xe2")])
    assert m.decode(m.encode(chunk)) == chunk
    wrong = m.to_dict(chunk)
    wrong["logprobs"][0]["raw"] = "e2"
    with pytest.raises(m.MessageError, match="binary"):
        m.decode(msgpack.packb(wrong, use_bin_type=True))
    body = m.to_dict(biased)
    body["sampling"]["logit_bias"] = [{"token_id": "7", "bias": 1.0}]
    with pytest.raises(m.MessageError, match="logit_bias"):
        m.decode(msgpack.packb(body))


def test_envelope_carries_version_and_type():
    body = msgpack.unpackb(m.encode(_request()))
    assert body["v"] == m.SCHEMA_VERSION and body["t"] == "completion_request"


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b.update(v=2), "version"),
    (lambda b: b.update(t="nope"), "unknown message type"),
    (lambda b: b.pop("model"), "missing field"),
    (lambda b: b["sampling"].update(temperature=float("nan")), "NaN"),
    (lambda b: b["sampling"].update(max_tokens="5"), "integer"),
    (lambda b: b.update(kind="essay"), "not one of"),
    (lambda b: b["messages"][0].update(role=3), "string"),
])
def test_invalid_fields_raise_message_error(mutate, match):
    body = m.to_dict(_request())
    mutate(body)
    with pytest.raises(m.MessageError, match=match):
        m.decode(msgpack.packb(body))


def test_expected_type_is_enforced():
    with pytest.raises(m.MessageError, match="expected"):
        m.decode(m.encode(_request()), m.FinalAnswer)


def test_oversized_payload_is_rejected_before_unpacking():
    with pytest.raises(m.MessageError, match="exceeds"):
        m.decode(b"\x00" * (m.MAX_MESSAGE_BYTES + 1))
    huge = _request(prompt="x" * m.MAX_MESSAGE_BYTES, kind="completion", messages=[])
    with pytest.raises(m.MessageError, match="exceeds"):
        m.encode(huge)


def test_peek_request_id_of_an_invalid_message():
    assert m.peek_request_id(msgpack.packb({"request_id": "abc"})) == "abc"
    assert m.peek_request_id(b"\xc1garbage") is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_only_raises_message_error(data):
    try:
        m.decode(data)
    except m.MessageError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(m.MESSAGE_TYPES)), st.dictionaries(st.text(max_size=15), _json, max_size=8))
def test_decoding_arbitrary_maps_only_raises_message_error(type_tag, body):
    body.update(v=1, t=type_tag)
    try:
        m.decode(msgpack.packb(body))
    except m.MessageError:
        pass


def test_peek_reply_to_of_an_invalid_message():
    assert m.peek_reply_to(msgpack.packb({"reply_to": "q1"})) == "q1"
    assert m.peek_reply_to(msgpack.packb({"request": {"reply_to": "q2"}, "x": b"\xff"})) == "q2"
    assert m.peek_reply_to(msgpack.packb({"scored": {"request": {"reply_to": "q3"}}})) == "q3"
    assert m.peek_reply_to(msgpack.packb({"request": "not-a-map"})) is None
    assert m.peek_reply_to(msgpack.packb([1, 2])) is None
    assert m.peek_reply_to(b"\xc1garbage") is None


def test_amqp_client_leaves_the_sampling_fields_it_was_not_given_to_the_server():
    from services.client import AmqpClient

    request = AmqpClient("amqp://acme:secret@127.0.0.1:1/").completion(
        "m", "hi", max_tokens=4, temperature=0.0)
    assert request.defaulted == ["top_p", "top_k"]
    assert request.sampling.seed is not None  # its own seed, so a re-run samples the same
    longer = AmqpClient("amqp://acme:secret@127.0.0.1:1/").completion("m", "hi", min_tokens=40)
    assert longer.sampling.max_tokens == 40 and "max_tokens" in longer.defaulted
