"""Resuming a handed-back request: an engine given the output an earlier run produced (and
how much of its text the caller has) continues the same answer, token for token and
character for character, instead of regenerating it."""

from __future__ import annotations

import pytest

from services import messages as m
from services.engine import EngineConfig, EngineError, EngineRequest, LLMEngine, ResumedOutput
from services.engine.detokenizer import StopStringBuffer, text_state
from services.engine.echo import EchoEngine
from services.messages import SamplingParams
from tests.unit.test_echo_engine import CharTokenizer, Clock
from tests.unit.test_echo_engine import drain as drain_echo

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n"


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_a_resumed_stop_buffer_streams_what_the_earlier_run_held_back():
    first = StopStringBuffer(["abc"])
    assert first.append("xxab") == ("xx", False)  # "ab" could start the stop string
    goes_on = StopStringBuffer(["abc"])
    goes_on.resume("xxab", emitted=2)
    assert goes_on.append("d") == ("abd", False)
    stops = StopStringBuffer(["abc"])
    stops.resume("xxab", emitted=2)
    assert stops.append("c") == ("", True) and stops.text == "xx"


def test_text_state_replays_a_character_split_across_tokens(tiny_tokenizer):
    """An output cut in the middle of a multi-byte character: the caller has none of it,
    and the resumed run streams it whole once its last token comes."""
    ids = tiny_tokenizer.encode("ok 🦊 done", add_special_tokens=False)
    prompt = tiny_tokenizer.encode("say", add_special_tokens=False)
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    detok, _ = text_state(tiny_tokenizer, prompt, [])
    pieces = [detok.add(t) for t in ids]
    cut = next(k for k, piece in enumerate(pieces) if piece == "")  # a token mid-character
    streamed = "".join(pieces[:cut + 1])
    detok, buffer = text_state(tiny_tokenizer, prompt, [], ids[:cut + 1], len(streamed))
    rest = "".join(buffer.append(detok.add(t))[0] for t in ids[cut + 1:])
    assert streamed + rest == full


def sampled(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, top_p=0.95, seed=-7, ignore_eos=True)


@pytest.mark.parametrize("params", [greedy(24), sampled(24)], ids=["greedy", "seeded_sampling"])
@pytest.mark.parametrize("cut", [1, 9, 20])
def test_llm_engine_continues_a_resumed_request_exactly(tiny_model_path, cut, params):
    """Greedy or seeded sampling: the first run's tokens and text plus the resumed run's
    are the uninterrupted answer, and the resumed run counts every output token."""
    engine = LLMEngine.from_pretrained(tiny_model_path, "cpu", "float32", EngineConfig(kv_cache_tokens=1024))
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    engine.add_request(EngineRequest("whole", prompt, params))
    whole_tokens, whole_text = [], ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            whole_tokens += out.new_token_ids
            whole_text += out.new_text

    engine.add_request(EngineRequest("first", prompt, params))
    tokens, text = [], ""
    while len(tokens) < cut:
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.new_text
    engine.abort_request("first")
    engine.step()
    assert tokens == whole_tokens[:cut]

    engine.add_request(EngineRequest("second", prompt, params,
                                     resume=ResumedOutput(list(tokens), len(text))))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.new_text
            final = out
    assert tokens == whole_tokens and text == whole_text
    assert final.finish_reason == "length" and final.num_output_tokens == 24
    assert final.num_prompt_tokens == len(prompt)
    stats = engine.stats()
    assert stats.num_free_kv_tokens == stats.num_total_kv_tokens


def test_echo_engine_continues_a_resumed_request_where_it_stopped():
    clock = Clock()
    engine = EchoEngine(CharTokenizer(), EngineConfig(), tokens_per_s=100.0, eos_token_ids={0},
                        clock=clock)
    engine.add_request(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=7),
                                     resume=ResumedOutput([1, 2, 3, 1], streamed_chars=4)))
    assert engine.wait_s() == pytest.approx(0.01)  # the next token, not five, is due
    outs = drain_echo(engine, clock)["r"]
    assert [t for o in outs for t in o.new_token_ids] == [2, 3, 1]
    assert "".join(o.new_text for o in outs) == "cdb"
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 7


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        (ResumedOutput([1, 2, 3, 1, 2], 5), "max_tokens"),
        (ResumedOutput([1, 99], 2), "resumed output token ids"),
    ],
)
def test_a_resume_point_that_cannot_be_continued_is_an_engine_error(resume, message):
    engine = EchoEngine(CharTokenizer(), EngineConfig(), eos_token_ids={0}, clock=Clock())
    with pytest.raises(EngineError, match=message):
        engine.add_request(EngineRequest("r", [1, 2], SamplingParams(max_tokens=5), resume=resume))


def _active(request_id: str = "r"):
    from services import messages as m
    from services.worker import Active

    item = m.WorkItem(request_id=request_id, pool="cpu", dispatched_at=0.0, scored=m.ScoredRequest(
        request_id=request_id, prompt_token_ids=[1],
        score=m.LengthScore(uncertainty=0, p10=1, p50=1, p90=1),
        request=m.CompletionRequest(request_id=request_id, tenant="acme", model="tiny", prompt="p")))
    return Active(item=item, message=None)


def _published(ok: bool = True):
    import asyncio

    future = asyncio.get_running_loop().create_future()
    if ok:
        future.set_result(None)
    return future


async def test_resume_points_of_a_long_answer_cost_writes_linear_in_its_length():
    """Points are rewritten whole, so one per interval would write O(n^2) tokens over an
    answer of n; one per ``RESUME_POINT_GROWTH`` of growth writes O(n), and the part a
    dead worker's successor regenerates stays within that fraction (or one interval)."""
    from services.worker import RESUME_POINT_GROWTH

    active = _active()
    written, worst_loss = 0, 0
    for _ in range(400):  # 400 intervals of 10 tokens: a 4000-token answer
        active.sent(_published(), [7] * 10, "x" * 10)
        n = len(active.output_token_ids)
        worst_loss = max(worst_loss, n - active.checkpointed)
        if active.resume_point_due():
            written += n
            active.checkpointed = len(active.resume_point("w").output_token_ids)
    n = len(active.output_token_ids)
    assert written <= (1 + 1 / RESUME_POINT_GROWTH) * n, written
    assert worst_loss <= RESUME_POINT_GROWTH * n + 10


async def test_a_resume_point_counts_only_chunks_the_broker_confirmed_in_order():
    """A busy stream always has a chunk in flight: the point covers the confirmed prefix
    (not nothing, and not the chunk still unconfirmed), and none is written once a
    chunk was refused, since the caller misses it."""
    active = _active()
    first, second, third = _published(), _published(ok=False), _published()
    active.sent(first, [5, 6], "ab")
    active.sent(second, [7], "c")
    active.sent(third, [8], "d")  # confirmed, but behind one that is not
    point = active.resume_point("w")
    assert (point.output_token_ids, point.streamed_chars) == ([5, 6], 2)
    second.set_exception(ConnectionError("channel closed"))
    assert active.resume_point("w") is None and not active.resume_point_due()


async def test_a_resume_point_keeps_the_text_its_caller_was_sent():
    """The next worker sends that text again with its tokens, so the point must hold
    exactly the confirmed prefix's characters."""
    active = _active()
    active.sent(_published(), [5, 6], "ab")
    active.sent(_published(), [7], "cd")
    active.sent(_published(ok=False), [8], "e")  # not confirmed yet: not in the point
    point = active.resume_point("w")
    assert (point.output_token_ids, point.streamed_chars, point.streamed_text) == ([5, 6, 7], 4, "abcd")


async def test_a_resume_point_keeps_the_logprobs_its_caller_was_sent():
    active = _active()
    lps = [m.TokenLogprob(token=t, logprob=-1.0) for t in "abc"]
    active.sent(_published(), [5, 6], "ab", lps[:2])
    active.sent(_published(ok=False), [7], "c", lps[2:])  # not confirmed yet: not in the point
    point = active.resume_point("w")
    assert point.output_logprobs == lps[:2]
    assert m.decode(m.encode(point), m.ResumePoint) == point
