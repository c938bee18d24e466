"""EchoEngine's pure logic on a manual clock: echo, pacing, limits, stops, aborts, stats."""

from __future__ import annotations

import pytest

from services.engine import EngineConfig, EngineError, EngineRequest
from services.engine.echo import EchoEngine
from services.messages import SamplingParams


class CharTokenizer:
    """Token id ``i`` is the character ``chr(97 + i)``; id 0 ('a') is EOS."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 26

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(97 + i) for i in ids)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(rate: float = 1000.0, clock: Clock | None = None, **config) -> EchoEngine:
    return EchoEngine(CharTokenizer(), EngineConfig(**config), tokens_per_s=rate,
                      eos_token_ids={0}, clock=clock or Clock())


def req(rid: str, prompt: list[int], **sampling) -> EngineRequest:
    sampling.setdefault("max_tokens", 5)
    return EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=SamplingParams(**sampling))


def drain(engine: EchoEngine, clock: Clock, step_s: float = 0.0005) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(100_000):
        if not engine.has_unfinished_requests():
            return outs
        clock.now += max(engine.wait_s(), step_s)
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def test_echoes_the_prompt_cycling_until_max_tokens():
    clock = Clock()
    engine = make(clock=clock)
    engine.add_request(req("r", [1, 2, 3], max_tokens=7))
    outs = drain(engine, clock)["r"]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == [1, 2, 3, 1, 2, 3, 1]
    assert "".join(o.new_text for o in outs) == "bcdbcdb"
    final = outs[-1]
    assert final.finished and final.finish_reason == "length"
    assert (final.num_prompt_tokens, final.num_output_tokens) == (3, 7)
    assert not any(o.finished for o in outs[:-1])


def test_paces_tokens_per_request_and_catches_up_when_late():
    clock = Clock()
    engine = make(rate=100.0, clock=clock)  # one token every 10 ms
    engine.add_request(req("r", [1, 2], max_tokens=4))
    assert engine.wait_s() == pytest.approx(0.010)
    assert engine.step() == []  # nothing due yet
    clock.now += 0.010
    assert [o.new_token_ids for o in engine.step()] == [[1]]
    assert engine.wait_s() == pytest.approx(0.010)
    clock.now += 0.025  # late: two more tokens are due, both come at once
    (out,) = engine.step()
    assert out.new_token_ids == [2, 1] and not out.finished
    clock.now += 0.010
    (out,) = engine.step()
    assert out.new_token_ids == [2] and out.finish_reason == "length"
    assert not engine.has_unfinished_requests()


def test_zero_rate_answers_at_once():
    engine = make(rate=0.0)
    engine.add_request(req("r", [3], max_tokens=4, ignore_eos=True))
    assert engine.wait_s() == 0.0
    (out,) = engine.step()
    assert out.new_token_ids == [3, 3, 3, 3] and out.finish_reason == "length"


def test_stop_token_ids_and_eos_unless_ignored():
    clock = Clock()
    engine = make(clock=clock)
    engine.add_request(req("stop", [1, 2, 3], max_tokens=10, stop_token_ids=[3]))
    engine.add_request(req("eos", [1, 0, 2], max_tokens=10))
    engine.add_request(req("ignored", [1, 0], max_tokens=3, ignore_eos=True))
    outs = drain(engine, clock)
    stop = outs["stop"][-1]
    assert stop.finish_reason == "stop" and stop.num_output_tokens == 3
    assert "".join(o.new_text for o in outs["stop"]) == "bc"  # the stop token is not text
    assert outs["eos"][-1].finish_reason == "stop" and outs["eos"][-1].num_output_tokens == 2
    assert outs["ignored"][-1].finish_reason == "length"
    assert [t for o in outs["ignored"] for t in o.new_token_ids] == [1, 0, 1]


def test_stop_strings_cut_the_text():
    clock = Clock()
    engine = make(clock=clock)
    engine.add_request(req("r", [1, 2, 3, 4], max_tokens=20, stop=["cd"]))
    outs = drain(engine, clock)["r"]
    assert "".join(o.new_text for o in outs) == "b"
    assert outs[-1].finish_reason == "stop"


def test_min_tokens_holds_off_stop_tokens_and_stop_strings():
    clock = Clock()
    engine = make(clock=clock)
    engine.add_request(req("eos", [1, 0, 2], max_tokens=10, min_tokens=2))
    engine.add_request(req("stop", [1, 2, 3, 4], max_tokens=10, stop=["bc"], min_tokens=3))
    outs = drain(engine, clock)
    # EOS as the 2nd token is held off; the next time it comes (5th) it ends the answer.
    assert [t for o in outs["eos"] for t in o.new_token_ids] == [1, 0, 2, 1, 0]
    assert outs["eos"][-1].finish_reason == "stop"
    # "bc" within the first 3 tokens streams; after them, "bc" ends it (cut before it).
    assert "".join(o.new_text for o in outs["stop"]) == "bcde"
    assert outs["stop"][-1].finish_reason == "stop"


def test_echoed_tokens_are_certain_where_logprobs_are_asked_for():
    clock = Clock()
    engine = make(clock=clock)
    engine.add_request(req("lp", [1, 2], max_tokens=3, logprobs=2))
    engine.add_request(req("plain", [1, 2], max_tokens=3))
    outs = drain(engine, clock)
    logprobs = [lp for o in outs["lp"] for lp in o.logprobs]
    assert [(lp.token, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in logprobs] == [
        ("b", 0.0, [(1, 0.0)]), ("c", 0.0, [(2, 0.0)]), ("b", 0.0, [(1, 0.0)])]
    assert all(o.logprobs == [] for o in outs["plain"])
    engine.add_request(req("echo", [1, 2, 3], max_tokens=2, prompt_logprobs=1))
    outs = drain(engine, clock)["echo"]
    assert [(lp.token, lp.logprob, len(lp.top)) for lp in outs[0].prompt_logprobs] == [
        ("b", 0.0, 0), ("c", 0.0, 1), ("d", 0.0, 1)]
    assert all(o.prompt_logprobs == [] for o in outs[1:])


def test_abort_running_and_waiting():
    clock = Clock()
    engine = make(clock=clock, max_num_seqs=1)
    engine.add_request(req("a", [1], max_tokens=50))
    engine.add_request(req("b", [2], max_tokens=50))
    assert engine.stats().num_running == 1 and engine.stats().num_waiting == 1
    engine.abort_request("b")
    engine.abort_request("a")
    engine.abort_request("unknown")
    outs = engine.step()
    assert {(o.request_id, o.finish_reason) for o in outs} == {("a", "cancelled"), ("b", "cancelled")}
    assert not engine.has_unfinished_requests()


def test_capacity_slots_and_kv_budget():
    clock = Clock()
    engine = make(clock=clock, max_num_seqs=2, kv_cache_tokens=64, block_size=16)
    for i in range(3):
        engine.add_request(req(f"r{i}", [1] * 10, max_tokens=6))  # 16 tokens = 1 block each
    st = engine.stats()
    assert (st.num_running, st.num_waiting, st.max_num_seqs) == (2, 1, 2)
    assert (st.num_free_kv_tokens, st.num_total_kv_tokens) == (32, 64)
    assert st.decode_step_ms == pytest.approx(1.0) and st.num_preemptions == 0
    outs = drain(engine, clock)
    assert all(o[-1].finish_reason == "length" for o in outs.values()) and len(outs) == 3
    assert engine.stats().num_free_kv_tokens == 64
    # A request that needs more KV than free waits rather than running.
    engine.add_request(req("big", [1] * 40, max_tokens=8))   # 3 blocks
    engine.add_request(req("next", [1] * 20, max_tokens=8))  # 2 blocks: does not fit yet
    assert engine.stats().num_running == 1 and engine.stats().num_waiting == 1


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], {}, "empty"),
        ([1, 99], {}, "token ids"),
        ([1], {"max_tokens": 0}, "max_tokens"),
        ([1], {"top_p": 0.0}, "top_p"),
        ([1], {"max_tokens": 3, "min_tokens": 4}, "min_tokens"),
        ([1] * 60, {"max_tokens": 10}, "maximum context length"),
    ],
)
def test_rejects_what_llm_engine_rejects(prompt, sampling, message):
    engine = make(max_model_len=64)
    with pytest.raises(EngineError, match=message):
        engine.add_request(req("r", prompt, **sampling))


def test_rejects_duplicates_and_requests_bigger_than_the_kv_cache():
    engine = make(kv_cache_tokens=32, block_size=16)
    engine.add_request(req("r", [1], max_tokens=4))
    with pytest.raises(EngineError, match="already"):
        engine.add_request(req("r", [1], max_tokens=4))
    with pytest.raises(EngineError, match="KV cache"):
        engine.add_request(req("big", [1] * 30, max_tokens=4))
