"""LLMEngine end to end on the real tiny model (fp32, CPU): exactness against
``model.generate``, chunked prefill, preemption, abort, stops, seeds and errors."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from services.engine import EngineConfig, EngineError, EngineRequest, LLMEngine, RequestOutput
from services.engine import engine as engine_module
from services.engine.sampling import bad_word_ids
from services.messages import SamplingParams, TokenBias, TokenLogprob
from services.models import DEFAULT_MODEL_NAME, load_model, load_tokenizer

PROMPTS = [
    "Hello world, what is the capital of France?",
    "Once upon a time",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Translate to German: Good morning, how are you? " * 3,
    "x",
]
OUTPUT_LENS = [20, 7, 33, 12, 25]


@pytest.fixture(scope="module")
def model_path(model_cache: Path) -> str:
    return str(model_cache / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def tokenizer(model_path: str):
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def ref_model(model_path: str):
    return load_model(model_path, "cpu", "float32")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(ref_model, prompt_ids) -> list[list[int]]:
    """Greedy continuations from transformers' own generate, EOS disabled."""
    return [greedy_reference(ref_model, ids, n) for ids, n in zip(prompt_ids, OUTPUT_LENS)]


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.do_sample = False
    config.max_new_tokens = n
    out = model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids) :].tolist()


def make_engine(model_path: str, **overrides) -> LLMEngine:
    return LLMEngine.from_pretrained(model_path, "cpu", "float32", EngineConfig(**overrides))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    deltas: dict[str, list[str]] = field(default_factory=dict)
    final: dict[str, RequestOutput] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    steps: int = 0


def drain(engine: LLMEngine, run: Run | None = None, max_steps: int = 10_000) -> Run:
    """Step until idle; checks that each request finishes exactly once and then goes quiet."""
    run = run or Run()
    while engine.has_unfinished_requests():
        assert run.steps < max_steps, "engine did not finish"
        step_into(engine, run)
    return run


def step_into(engine: LLMEngine, run: Run) -> list[RequestOutput]:
    run.steps += 1
    outs = engine.step()
    for out in outs:
        assert out.request_id not in run.final, "output after the final one"
        run.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        run.text[out.request_id] = run.text.get(out.request_id, "") + out.new_text
        run.deltas.setdefault(out.request_id, []).append(out.new_text)
        run.logprobs.setdefault(out.request_id, []).extend(out.logprobs)
        if out.prompt_logprobs:
            assert out.request_id not in run.prompt_logprobs, "prompt logprobs sent twice"
            run.prompt_logprobs[out.request_id] = out.prompt_logprobs
        assert len(out.logprobs) in (0, len(out.new_token_ids))
        assert out.num_output_tokens == len(run.tokens[out.request_id])
        if out.finished:
            run.final[out.request_id] = out
    return outs


def add_all(engine: LLMEngine, prompt_ids, lens, **kw) -> None:
    for i, (ids, n) in enumerate(zip(prompt_ids, lens)):
        engine.add_request(EngineRequest(f"r{i}", ids, greedy(n, **kw)))


def test_greedy_matches_generate_for_concurrent_requests(
    model_path, prompt_ids, reference, tokenizer
):
    engine = make_engine(model_path, kv_cache_tokens=4096)
    add_all(engine, prompt_ids, OUTPUT_LENS)
    run = drain(engine)
    for i, expected in enumerate(reference):
        rid = f"r{i}"
        assert run.tokens[rid] == expected
        assert run.final[rid].finish_reason == "length"
        assert run.final[rid].num_prompt_tokens == len(prompt_ids[i])
        assert run.text[rid] == tokenizer.decode(expected, skip_special_tokens=True)
    stats = engine.stats()
    assert stats.num_free_kv_tokens == stats.num_total_kv_tokens
    assert stats.num_running == stats.num_waiting == 0
    assert stats.prefill_tokens_per_s > 0 and stats.decode_step_ms > 0


def test_requests_added_while_running_match_generate(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=4096)
    run = Run()
    pending = list(enumerate(zip(prompt_ids, OUTPUT_LENS)))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, (ids, n) = pending.pop(0)
            engine.add_request(EngineRequest(f"r{i}", ids, greedy(n)))
        for out in engine.step():
            run.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert [run.tokens[f"r{i}"] for i in range(len(reference))] == reference


def test_chunked_prefill_gives_the_same_tokens(model_path, prompt_ids, reference):
    # A 10-token budget splits every prompt longer than that over several steps.
    engine = make_engine(model_path, kv_cache_tokens=4096, max_num_batched_tokens=10)
    add_all(engine, prompt_ids, OUTPUT_LENS)
    run = drain(engine)
    assert [run.tokens[f"r{i}"] for i in range(len(reference))] == reference


def test_preemption_recomputes_without_duplicates(model_path, prompt_ids, reference):
    # 7 blocks of 8 tokens cannot hold all five requests at once.
    engine = make_engine(model_path, kv_cache_tokens=56, block_size=8)
    add_all(engine, prompt_ids, OUTPUT_LENS)
    run = drain(engine)
    assert engine.stats().num_preemptions > 0
    for i, expected in enumerate(reference):
        assert run.tokens[f"r{i}"] == expected
    assert engine.stats().num_free_kv_tokens == 56


def test_low_priority_requests_are_preempted_first(model_path, prompt_ids):
    engine = make_engine(model_path, kv_cache_tokens=64, block_size=8)
    engine.add_request(EngineRequest("vip", prompt_ids[0], greedy(30), priority=0.0))
    engine.add_request(EngineRequest("bulk", prompt_ids[1], greedy(30), priority=5.0))
    preempted_first = None
    while engine.has_unfinished_requests():
        before = engine.stats().num_preemptions
        outs = engine.step()
        if engine.stats().num_preemptions > before and preempted_first is None:
            preempted_first = [s.request_id for s in engine.scheduler.waiting]
        assert all(o.finish_reason in (None, "length") for o in outs)
    assert preempted_first == ["bulk"]


def test_abort_frees_blocks_and_yields_one_cancelled_output(model_path, prompt_ids):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    engine.add_request(EngineRequest("keep", prompt_ids[0], greedy(10)))
    engine.add_request(EngineRequest("drop", prompt_ids[2], greedy(50)))
    engine.add_request(EngineRequest("queued", prompt_ids[1], greedy(5)))
    run = Run()
    for _ in range(3):
        step_into(engine, run)
    total = engine.stats().num_total_kv_tokens
    engine.abort_request("drop")
    engine.abort_request("queued")
    engine.abort_request("never-existed")  # ignored
    keep_blocks = len(engine._requests["keep"].seq.block_ids)
    assert engine.stats().num_free_kv_tokens == total - keep_blocks * 16
    drain(engine, run)
    assert run.final["drop"].finish_reason == "cancelled"
    assert run.final["drop"].new_token_ids == []
    assert run.final["queued"].finish_reason == "cancelled"
    assert run.final["keep"].finish_reason == "length"
    assert engine.stats().num_free_kv_tokens == total


def test_max_tokens_finishes_with_length(model_path, prompt_ids):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    engine.add_request(EngineRequest("a", prompt_ids[0], greedy(1)))
    run = drain(engine)
    assert len(run.tokens["a"]) == 1 and run.final["a"].finish_reason == "length"
    assert run.steps == 1


def test_stop_token_ids_finish_with_stop(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    expected = reference[2]
    stop_at = 5
    stop_token = expected[stop_at]
    assert stop_token not in expected[:stop_at]
    engine.add_request(EngineRequest("s", prompt_ids[2], greedy(33, stop_token_ids=[stop_token])))
    run = drain(engine)
    assert run.tokens["s"] == expected[: stop_at + 1]  # the stop token is reported, once
    assert run.final["s"].finish_reason == "stop"


def test_eos_stops_unless_ignored(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    expected = reference[0]
    engine.eos_token_ids = frozenset({expected[3]})  # pretend this token is EOS
    engine.add_request(
        EngineRequest("eos", prompt_ids[0], SamplingParams(max_tokens=20, temperature=0))
    )
    engine.add_request(EngineRequest("ign", prompt_ids[0], greedy(20)))
    run = drain(engine)
    assert run.tokens["eos"] == expected[:4] and run.final["eos"].finish_reason == "stop"
    assert run.tokens["ign"] == expected and run.final["ign"].finish_reason == "length"


def test_stop_string_split_across_tokens(model_path, prompt_ids, reference, tokenizer):
    full = tokenizer.decode(reference[2], skip_special_tokens=True)
    pieces = [tokenizer.decode(reference[2][: k + 1], skip_special_tokens=True) for k in range(33)]
    # A stop string made of the last 2 chars of one token's text and the first 2 of the next.
    stop = None
    for k in range(3, 32):
        a, b = pieces[k - 1], pieces[k]
        candidate = b[len(a) - 2 : len(a) + 2]
        if (
            len(b) - len(a) >= 2
            and len(a) >= 2
            and "\ufffd" not in b
            and full.find(candidate) == len(a) - 2
        ):
            stop = candidate
            break
    assert stop is not None, "no suitable token boundary in the reference output"
    engine = make_engine(model_path, kv_cache_tokens=1024)
    engine.add_request(EngineRequest("s", prompt_ids[2], greedy(33, stop=["never-appears", stop])))
    run = drain(engine)
    assert run.final["s"].finish_reason == "stop"
    assert run.text["s"] == full[: full.find(stop)]
    assert stop not in run.text["s"]
    assert run.tokens["s"] == reference[2][: k + 1]


def test_seeded_sampling_is_reproducible_across_batches(model_path, prompt_ids):
    params = SamplingParams(
        max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True
    )
    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("alone", prompt_ids[0], params))
    alone = drain(engine).tokens["alone"]
    engine.add_request(
        EngineRequest("other", prompt_ids[1], SamplingParams(max_tokens=9, temperature=0.7))
    )
    engine.add_request(EngineRequest("again", prompt_ids[0], params))
    engine.add_request(EngineRequest("seed2", prompt_ids[0], dataclasses.replace(params, seed=99)))
    run = drain(engine)
    assert run.tokens["again"] == alone
    assert run.tokens["seed2"] != alone


def test_top_k_one_is_greedy(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    hot = SamplingParams(max_tokens=20, temperature=5.0, ignore_eos=True)
    engine.add_request(EngineRequest("k1", prompt_ids[0], dataclasses.replace(hot, top_k=1)))
    engine.add_request(EngineRequest("p0", prompt_ids[0], dataclasses.replace(hot, top_p=1e-6)))
    run = drain(engine)
    assert run.tokens["k1"] == reference[0]
    assert run.tokens["p0"] == reference[0]


def test_logit_bias_and_min_tokens_shape_the_answer(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=2048)
    forced = reference[0][0] + 1
    eos = next(iter(engine.eos_token_ids))
    engine.add_request(EngineRequest(
        "forced", prompt_ids[0], greedy(6, logit_bias=[TokenBias(forced, 100.0)])))
    # EOS made certain, yet held off for min_tokens: 4 tokens of text, then EOS.
    eos_first = SamplingParams(max_tokens=20, temperature=0.0, min_tokens=4,
                               logit_bias=[TokenBias(eos, 100.0)])
    engine.add_request(EngineRequest("min4", prompt_ids[0], eos_first))
    engine.add_request(EngineRequest(
        "min0", prompt_ids[0], dataclasses.replace(eos_first, min_tokens=0)))
    run = drain(engine)
    assert run.tokens["forced"] == [forced] * 6
    assert len(run.tokens["min4"]) == 5 and run.tokens["min4"][-1] == eos
    assert eos not in run.tokens["min4"][:4] and run.final["min4"].finish_reason == "stop"
    assert run.tokens["min0"] == [eos] and run.final["min0"].finish_reason == "stop"


def test_allowed_token_ids_are_all_an_answer_is_sampled_from(model_path, prompt_ids, reference):
    """vLLM's ``allowed_token_ids``: greedy or hot, every token is one of them (the raw
    log-probabilities stay the model's). Allowing only the end leaves it to sample even
    before ``min_tokens`` (rather than nothing); it ends the answer once they allow."""
    engine = make_engine(model_path, kv_cache_tokens=2048)
    eos = next(iter(engine.eos_token_ids))
    allowed = [reference[0][0] + 1, reference[0][0] + 2]
    engine.add_request(EngineRequest("greedy", prompt_ids[0], greedy(8, allowed_token_ids=allowed)))
    engine.add_request(EngineRequest("hot", prompt_ids[0], SamplingParams(
        max_tokens=16, temperature=2.0, seed=3, ignore_eos=True, allowed_token_ids=allowed)))
    engine.add_request(EngineRequest("end", prompt_ids[0], SamplingParams(
        max_tokens=8, temperature=0.0, min_tokens=4, allowed_token_ids=[eos])))
    run = drain(engine)
    assert len(run.tokens["greedy"]) == 8 and set(run.tokens["greedy"]) <= set(allowed)
    assert len(run.tokens["hot"]) == 16 and set(run.tokens["hot"]) == set(allowed)
    assert run.tokens["end"] == [eos] * 5 and run.final["end"].finish_reason == "stop"


def test_a_bad_word_is_banned_as_spelled_alone_and_after_a_space(tokenizer):
    alone, spaced = (tokenizer.encode(w, add_special_tokens=False) for w in ("hello", " hello"))
    assert alone != spaced
    assert bad_word_ids(tokenizer, ["hello", " hello"]) == [alone, spaced]


def test_bad_words_never_come_out(model_path, prompt_ids, reference, tokenizer):
    """vLLM's ``bad_words``: a word the greedy answer would start with (one token, however
    the tokenizer spells it) is never generated; the answer takes another token."""
    word = next(tokenizer.decode([t]) for t in reference[0]
                if tokenizer.encode(tokenizer.decode([t]), add_special_tokens=False) == [t])
    banned = {ids[-1] for ids in bad_word_ids(tokenizer, [word])}
    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("clean", prompt_ids[0], greedy(12, bad_words=[word])))
    run = drain(engine)
    assert len(run.tokens["clean"]) == 12 and not banned & set(run.tokens["clean"])
    assert run.tokens["clean"] != reference[0][:12]


def test_a_stop_string_does_not_end_the_answer_before_min_tokens(model_path, prompt_ids, tokenizer):
    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("free", prompt_ids[3], greedy(12)))
    free = drain(engine)
    first = tokenizer.decode(free.tokens["free"][:1], skip_special_tokens=True).strip()
    assert first, "the first token should decode to text"
    engine.add_request(EngineRequest("cut", prompt_ids[3], greedy(12, stop=[first])))
    engine.add_request(EngineRequest("held", prompt_ids[3], greedy(12, stop=[first], min_tokens=12)))
    run = drain(engine)
    assert run.final["cut"].finish_reason == "stop" and len(run.tokens["cut"]) == 1
    assert run.final["held"].finish_reason == "length"
    assert run.tokens["held"] == free.tokens["free"] and run.text["held"] == free.text["free"]


def test_penalties_steer_greedy_decoding_away_from_repeats(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=4096)
    n = 40
    engine.add_request(EngineRequest("plain", prompt_ids[4], greedy(n)))
    engine.add_request(EngineRequest("presence", prompt_ids[4], greedy(n, presence_penalty=-2.0)))
    engine.add_request(EngineRequest("frequency", prompt_ids[4], greedy(n, frequency_penalty=-1.0)))
    engine.add_request(EngineRequest("repetition", prompt_ids[4],
                                     greedy(n, repetition_penalty=100.0)))
    engine.add_request(EngineRequest("neutral", prompt_ids[4], greedy(
        n, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, min_p=0.5)))
    run = drain(engine)
    plain = run.tokens["plain"]
    assert len(set(plain)) == n  # this model does not repeat itself in 40 tokens
    # Negative penalties reward what the output already holds: it loops.
    assert len(set(run.tokens["presence"])) < 0.8 * n
    assert len(set(run.tokens["frequency"])) < 0.8 * n
    seen = set(prompt_ids[4])  # the prompt's tokens too: the plain answer starts with BOS
    assert seen & set(plain)
    for token in run.tokens["repetition"]:
        assert token not in seen
        seen.add(token)
    assert run.tokens["neutral"] == plain  # neutral values change nothing for greedy


def test_logprobs_are_the_models_own_for_the_chosen_and_the_top_tokens(
    model_path, ref_model, prompt_ids, reference, tokenizer
):
    engine = make_engine(model_path, kv_cache_tokens=2048)
    n = 7
    engine.add_request(EngineRequest("top3", prompt_ids[1], greedy(n, logprobs=3)))
    engine.add_request(EngineRequest("none", prompt_ids[1], greedy(n)))
    # A bias changes what is chosen, not the distribution reported (vLLM's raw logprobs).
    forced = reference[1][0] + 1
    engine.add_request(EngineRequest("biased", prompt_ids[1],
                                     greedy(n, logprobs=0, logit_bias=[TokenBias(forced, 100.0)])))
    run = drain(engine)
    assert run.tokens["top3"] == reference[1][:n] and run.logprobs["none"] == []

    def model_logprobs(output: list[int]) -> torch.Tensor:
        ids = prompt_ids[1] + output
        with torch.inference_mode():
            logits = ref_model(torch.tensor([ids])).logits[0, len(prompt_ids[1]) - 1 : -1]
        return torch.log_softmax(logits.float(), dim=-1)

    expected = model_logprobs(run.tokens["top3"])
    for k, entry in enumerate(run.logprobs["top3"]):
        token = run.tokens["top3"][k]
        assert (entry.token, entry.token_id) == (tokenizer.decode([token]), token)
        assert entry.logprob == pytest.approx(float(expected[k, token]), abs=1e-4)
        assert [alt.token_id for alt in entry.top] == expected[k].topk(3).indices.tolist()
        assert entry.top[0].token_id == token  # greedy: the most likely one
        assert [alt.logprob for alt in entry.top] == pytest.approx(
            expected[k].topk(3).values.tolist(), abs=1e-4)
    assert run.tokens["biased"] == [forced] * n
    raw = model_logprobs(run.tokens["biased"])
    assert [e.logprob for e in run.logprobs["biased"]] == pytest.approx(
        [float(raw[k, forced]) for k in range(n)], abs=1e-4)
    assert all(e.top == [] and e.logprob < -1.0 for e in run.logprobs["biased"])


@pytest.mark.parametrize("config", [
    {"kv_cache_tokens": 4096},
    {"kv_cache_tokens": 4096, "max_num_batched_tokens": 10},  # prompts prefilled in chunks
    {"kv_cache_tokens": 96, "block_size": 8},  # preempted and recomputed
], ids=["whole", "chunked", "preempted"])
def test_prompt_logprobs_are_the_models_own_and_sent_once(
    model_path, ref_model, prompt_ids, tokenizer, config, monkeypatch
):
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_ROWS", 3)  # several slices per step
    engine = make_engine(model_path, **config)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(EngineRequest(f"r{i}", ids, greedy(12, prompt_logprobs=2)))
    engine.add_request(EngineRequest("plain", prompt_ids[0], greedy(3)))
    run = drain(engine)
    if config["kv_cache_tokens"] < 100:
        assert engine.stats().num_preemptions > 0
    assert "plain" not in run.prompt_logprobs
    for i, ids in enumerate(prompt_ids):
        entries = run.prompt_logprobs[f"r{i}"]
        assert [e.token for e in entries] == [tokenizer.decode([t]) for t in ids]
        assert [e.token_id for e in entries] == ids
        assert entries[0].logprob == 0.0 and entries[0].top == []  # nothing predicts it
        with torch.inference_mode():
            logits = ref_model(torch.tensor([ids])).logits[0, :-1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for p, entry in enumerate(entries[1:]):
            assert entry.logprob == pytest.approx(float(expected[p, ids[p + 1]]), abs=1e-4)
            assert [a.token_id for a in entry.top] == expected[p].topk(2).indices.tolist()
            # vLLM's rank: 1 + how many tokens the model found likelier (up to near-ties
            # between the engine's arithmetic and the reference's).
            own = float(expected[p, ids[p + 1]])
            assert int((expected[p] > own + 1e-4).sum()) + 1 <= entry.rank <= int(
                (expected[p] > own - 1e-4).sum()) + 1


def test_a_penalised_request_recomputed_after_preemption_gives_the_same_tokens(
    model_path, prompt_ids
):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True,
                            frequency_penalty=0.7, repetition_penalty=1.2)
    roomy = make_engine(model_path, kv_cache_tokens=4096)
    for i, ids in enumerate(prompt_ids):
        roomy.add_request(EngineRequest(f"r{i}", ids, params))
    expected = drain(roomy).tokens
    tight = make_engine(model_path, kv_cache_tokens=96, block_size=8)
    for i, ids in enumerate(prompt_ids):
        tight.add_request(EngineRequest(f"r{i}", ids, params))
    run = drain(tight)
    assert tight.stats().num_preemptions > 0
    assert run.tokens == expected


@pytest.mark.parametrize(
    ("ids", "params", "message"),
    [
        ([], greedy(4), "empty"),
        ([1, 2], greedy(4, logit_bias=[TokenBias(10**6, 1.0)]), "logit_bias token ids"),
        ([1, 2], greedy(4, allowed_token_ids=[3, 10**6]), "allowed_token_ids"),
        ([1, 2], greedy(4, allowed_token_ids=[-1]), "allowed_token_ids"),
        ([1, 2], greedy(4, min_tokens=5), "min_tokens"),
        ([1] * 2000, greedy(100), "maximum context length"),
        ([1] * 300, greedy(10), "KV cache"),
        ([1, 10**9], greedy(4), "token ids"),
        ([1, 2], greedy(0), "max_tokens"),
        ([1, 2], SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
    ],
)
def test_bad_requests_raise_and_engine_keeps_working(
    model_path, prompt_ids, reference, ids, params, message
):
    engine = make_engine(model_path, kv_cache_tokens=256)
    with pytest.raises(EngineError, match=message):
        engine.add_request(EngineRequest("bad", ids, params))
    engine.add_request(EngineRequest("good", prompt_ids[1], greedy(7)))
    with pytest.raises(EngineError, match="already"):
        engine.add_request(EngineRequest("good", prompt_ids[1], greedy(7)))
    assert drain(engine).tokens["good"] == reference[1]


def test_failed_forward_errors_its_requests_and_engine_recovers(model_path, prompt_ids, reference):
    engine = make_engine(model_path, kv_cache_tokens=1024)
    good_fn = engine.attention_fn

    def broken(*args):
        raise RuntimeError("kernel exploded")

    engine.attention_fn = broken
    engine.add_request(EngineRequest("a", prompt_ids[0], greedy(5)))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
    assert "kernel exploded" in outs[0].error
    assert engine.stats().num_free_kv_tokens == engine.stats().num_total_kv_tokens
    engine.attention_fn = good_fn
    engine.add_request(EngineRequest("b", prompt_ids[1], greedy(7)))
    assert drain(engine).tokens["b"] == reference[1]


def test_cpu_fast_paths_give_the_same_tokens_as_the_paged_forward(
    model_path, prompt_ids, reference
):
    # Lean forward + slot caches (the CPU default), transformers' forward + slot caches,
    # and transformers' forward over the paged cache alone agree token for token.
    fast = make_engine(model_path, kv_cache_tokens=65536, max_model_len=512)
    assert fast._lean is not None and fast.slot_caches is not None
    plain = make_engine(model_path, kv_cache_tokens=65536, max_model_len=512)
    plain._lean = None
    paged = make_engine(model_path, kv_cache_tokens=4096, max_model_len=512)
    assert paged.slot_caches is None  # the slots would outgrow the paged pool
    paged._lean = None
    for engine in (fast, plain, paged):
        add_all(engine, prompt_ids, OUTPUT_LENS)
        run = drain(engine)
        assert [run.tokens[f"r{i}"] for i in range(len(reference))] == reference


def test_bf16_engine_with_prepacked_weights_matches_unpacked(model_path, prompt_ids):
    # On a CPU with bf16 matrix kernels the lean forward prepacks bf16 weights for oneDNN;
    # the tokens must be those of the same bf16 engine calling F.linear on the raw weights.
    from services.engine.forward import LlamaStepForward, can_pack_weights

    config = EngineConfig(kv_cache_tokens=65536, max_model_len=512)
    packed = LLMEngine.from_pretrained(model_path, "cpu", "bfloat16", config)
    weight = packed.model.model.layers[0].mlp.up_proj.weight
    if not can_pack_weights(weight):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    assert packed._lean is not None
    plain = LLMEngine.from_pretrained(model_path, "cpu", "bfloat16", config)
    plain._lean = LlamaStepForward(plain.model, pack_weights=False)
    runs = []
    for engine in (packed, plain):
        add_all(engine, prompt_ids, OUTPUT_LENS)
        runs.append(drain(engine).tokens)
    assert runs[0] == runs[1]
    assert [len(runs[0][f"r{i}"]) for i in range(len(OUTPUT_LENS))] == OUTPUT_LENS


SYSTEM = "You are a careful assistant who answers in one short sentence. " * 3


@pytest.mark.parametrize("slots", [True, False], ids=["slot-caches", "paged"])
def test_a_shared_prefix_is_computed_once_and_gives_the_same_tokens(
    model_path, tokenizer, ref_model, slots
):
    """Requests that start as an earlier one did take its cached blocks (a whole number
    of blocks, never the last prompt token) and answer exactly as computed afresh: over
    the CPU slot caches, which the cached context is copied into, and the paged cache."""
    first, second = (tokenizer(SYSTEM + question)["input_ids"]
                     for question in ("What is rain?", "Why is the sky blue?"))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    engine = make_engine(model_path, kv_cache_tokens=4096 if not slots else 65536, max_model_len=512)
    assert (engine.slot_caches is not None) is slots
    engine.add_request(EngineRequest("first", first, greedy(8)))
    run = drain(engine)
    assert run.final["first"].num_cached_tokens == 0
    engine.add_request(EngineRequest("second", second, greedy(8)))
    engine.add_request(EngineRequest("again", first, greedy(8)))
    run = drain(engine, run)
    assert run.tokens["second"] == greedy_reference(ref_model, second, 8)
    assert run.tokens["again"] == run.tokens["first"] == greedy_reference(ref_model, first, 8)
    assert run.final["second"].num_cached_tokens == shared // 16 * 16 > 0
    # Its prompt and the first answer's blocks: all but the block of its last token.
    assert run.final["again"].num_cached_tokens == (len(first) - 1) // 16 * 16
    stats = engine.stats()
    assert stats.prefix_cache_queries == 2 * len(first) + len(second)
    assert stats.prefix_cache_hits == shared // 16 * 16 + (len(first) - 1) // 16 * 16
    assert stats.num_free_kv_tokens == stats.num_total_kv_tokens  # cached blocks are free ones


def test_prefix_caching_is_kept_apart_by_salt_and_skipped_for_prompt_logprobs(model_path, tokenizer):
    prompt = tokenizer(SYSTEM + "Hello")["input_ids"]
    engine = make_engine(model_path, kv_cache_tokens=4096, max_model_len=512)
    engine.add_request(EngineRequest("acme", prompt, greedy(2), cache_salt="acme"))
    drain(engine)
    engine.add_request(EngineRequest("globex", prompt, greedy(2), cache_salt="globex"))
    engine.add_request(EngineRequest("scored", prompt, greedy(2, prompt_logprobs=1), cache_salt="acme"))
    run = drain(engine)
    assert run.final["globex"].num_cached_tokens == 0  # another tenant's prompt is not read
    assert run.final["scored"].num_cached_tokens == 0  # its prompt's logprobs are computed
    assert len(run.prompt_logprobs["scored"]) == len(prompt)
    engine.add_request(EngineRequest("acme-again", prompt, greedy(2), cache_salt="acme"))
    assert drain(engine).final["acme-again"].num_cached_tokens > 0
    off = make_engine(model_path, kv_cache_tokens=4096, max_model_len=512, enable_prefix_caching=False)
    for name in ("a", "b"):
        off.add_request(EngineRequest(name, prompt, greedy(2)))
        assert drain(off).final[name].num_cached_tokens == 0
    assert off.stats().prefix_cache_queries == 0


def test_a_small_pool_evicts_cached_blocks_and_stays_exact(model_path, prompt_ids, reference):
    # 7 blocks of 8 tokens: the cached blocks are reused for new requests (and preempted
    # ones find their own again) without a token changing.
    engine = make_engine(model_path, kv_cache_tokens=56, block_size=8)
    for _ in range(2):
        add_all(engine, prompt_ids, OUTPUT_LENS)
        run = drain(engine)
        assert [run.tokens[f"r{i}"] for i in range(len(reference))] == reference
    assert engine.stats().num_free_kv_tokens == 56


def test_requests_sent_together_with_one_prompt_compute_it_once(model_path, tokenizer, ref_model):
    prompt = tokenizer(SYSTEM + "Hello")["input_ids"]
    engine = make_engine(model_path, kv_cache_tokens=4096, max_model_len=512)
    for i in range(4):
        engine.add_request(EngineRequest(f"r{i}", prompt, greedy(4)))
    run = drain(engine)
    expected = greedy_reference(ref_model, prompt, 4)
    assert all(run.tokens[f"r{i}"] == expected for i in range(4))
    shared = (len(prompt) - 1) // 16 * 16
    assert [run.final[f"r{i}"].num_cached_tokens for i in range(4)] == [0, shared, shared, shared]
