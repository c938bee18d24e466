"""The sampler: seeds and positions, top-k/top-p/min-p, logit bias, min_tokens, penalties."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from services.engine.sampling import (
    adjust_logits,
    allowed_ids,
    apply_min_p,
    apply_top_k_top_p,
    make_generator,
    position_seed,
    sample_tokens,
    validate_sampling,
    with_seed,
)
from services.messages import MAX_LOGIT_BIAS, SamplingParams, StructuredOutput, TokenBias


@dataclass
class Row:
    """A request as the sampler sees it (the engine's request state in production)."""

    sampling: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=lambda: [0])
    num_prompt_tokens: int = 1
    stop_token_ids: frozenset[int] = frozenset()
    grammar: None = None
    bad_word_ids: list[list[int]] = field(default_factory=list)
    allowed_ids: torch.Tensor | None = None


def at(position: int, params: SamplingParams, generator: torch.Generator | None = None) -> Row:
    """A row about to sample its output token number ``position`` (counted from 0)."""
    return Row(params, generator, token_ids=[0] * (1 + position))


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_seed():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.0, seed=7)
    first = sample_tokens(
        logits,
        [at(0, greedy), at(3, seeded, make_generator(7, "cpu")), at(3, seeded, make_generator(7, "cpu"))],
    )
    assert first[0] == int(logits[0].argmax())
    again = sample_tokens(logits[1:2], [at(3, seeded, make_generator(7, "cpu"))])
    assert again[0] == first[1]


def test_a_seeded_draw_depends_on_its_position_not_on_the_draws_before_it():
    """What lets a request continued on another worker (or recomputed after a preemption)
    sample what the uninterrupted run did."""
    logits = torch.zeros(1, 1000)  # uniform: any reuse of a draw would show
    params = SamplingParams(temperature=1.0, seed=11)
    gen = make_generator(11, "cpu")
    run = [sample_tokens(logits, [at(k, params, gen)])[0] for k in range(40)]
    fresh = [sample_tokens(logits, [at(k, params, make_generator(11, "cpu"))])[0] for k in (39, 17)]
    assert fresh == [run[39], run[17]]
    assert len(set(run)) > 30  # positions draw differently
    other_seed = SamplingParams(temperature=1.0, seed=12)
    assert [sample_tokens(logits, [at(k, other_seed, gen)])[0] for k in range(40)] != run
    assert position_seed(-1, 0) != position_seed(0, 0) and 0 <= position_seed(-1, 5) < 2**64


def test_a_sampled_request_without_a_seed_gets_one_of_its_request_id():
    plain = SamplingParams(temperature=0.8)
    seeded = with_seed(plain, "cmpl-1")
    assert seeded.seed is not None and seeded.seed == with_seed(plain, "cmpl-1").seed
    assert with_seed(plain, "cmpl-2").seed != seeded.seed and plain.seed is None
    assert with_seed(SamplingParams(temperature=0.8, seed=3), "cmpl-1").seed == 3
    assert with_seed(SamplingParams(temperature=0.0), "cmpl-1").seed is None  # greedy needs none


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.75]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # top-2
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.75
    tiny = apply_top_k_top_p(logits[:1], torch.tensor([0]), torch.tensor([1e-9]))
    assert torch.isfinite(tiny[0]).tolist() == [True, False, False, False]  # never empty


def test_min_p_drops_tokens_below_its_share_of_the_most_likely_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = apply_min_p(logits, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(out[0]).all()  # 0 keeps everything
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]  # >= 0.25
    assert torch.isfinite(out[2]).tolist() == [True, False, False, False]  # only the top


def test_sampling_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = make_generator(3, "cpu")
    params = SamplingParams(temperature=1.0, seed=3)
    counts = [0, 0, 0]
    for k in range(2000):
        counts[sample_tokens(logits, [at(k, params, gen)])[0]] += 1
    assert counts[0] > counts[1] > counts[2] > 0
    assert abs(counts[0] / 2000 - 0.7) < 0.05


def test_min_p_changes_what_a_sampled_request_draws():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    params = SamplingParams(temperature=1.0, seed=5, min_p=0.8)  # keeps 0.4 and 0.35 only
    gen = make_generator(5, "cpu")
    drawn = {sample_tokens(logits, [at(k, params, gen)])[0] for k in range(300)}
    assert drawn == {0, 1}


def test_a_bad_words_last_token_is_banned_where_the_output_ends_with_the_rest():
    """Single-token words are banned everywhere; a longer one's last token only after
    the output (not the prompt) ends with its first tokens."""
    logits = torch.zeros(20)
    row = Row(SamplingParams(bad_words=["w"]), token_ids=[3, 5, 3], num_prompt_tokens=2,
              bad_word_ids=[[7], [3, 9], [5, 3, 11], [4, 12]])
    adjust_logits(logits, row)
    assert sorted(torch.nonzero(logits == float("-inf")).flatten().tolist()) == [7, 9]


@pytest.mark.parametrize(("params", "words"), [
    (SamplingParams(bad_words=[" "]), "1 to 256 characters"),
    (SamplingParams(bad_words=["x" * 257]), "1 to 256 characters"),
    (SamplingParams(bad_words=["x"] * 129), "at most 128"),
    (SamplingParams(bad_words=["x"], allowed_token_ids=[1]), "cannot be combined"),
    (SamplingParams(bad_words=["x"], structured=StructuredOutput(kind="regex", spec="a+")), "cannot be combined"),
])
def test_bad_words_that_cannot_be_served_are_refused(params, words):
    assert words in (validate_sampling(params) or "")


def test_logit_bias_moves_greedy_and_sampled_choices():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]] * 2)
    boosted = SamplingParams(temperature=0.0, logit_bias=[TokenBias(3, 100.0)])
    banned = SamplingParams(temperature=1.0, seed=1,
                            logit_bias=[TokenBias(0, -100.0), TokenBias(1, -100.0)])
    gen = make_generator(1, "cpu")
    assert sample_tokens(logits.clone(), [Row(boosted)])[0] == 3
    draws = {sample_tokens(logits.clone(), [at(k, banned, gen)])[0] for k in range(200)}
    assert draws <= {2, 3} and draws == {2, 3}


def test_min_tokens_masks_the_stop_tokens_until_enough_output():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]])  # token 2 (EOS here) is the greedy choice
    params = SamplingParams(temperature=0.0, min_tokens=3)
    row = Row(params, token_ids=[1, 1], num_prompt_tokens=1, stop_token_ids=frozenset({2, 99}))
    assert sample_tokens(logits.clone(), [row])[0] != 2  # 1 output token so far: masked
    row.token_ids = [1, 1, 3, 3]  # 3 output tokens: EOS may come now
    assert sample_tokens(logits.clone(), [row])[0] == 2


def test_only_allowed_tokens_keep_their_logits_and_min_tokens_spares_a_stop_that_is_all_there_is():
    logits = torch.arange(10, dtype=torch.float32)
    params = SamplingParams(allowed_token_ids=[7, 2, 2, 5])
    assert allowed_ids(params, "cpu").tolist() == [2, 5, 7] and allowed_ids(SamplingParams(), "cpu") is None
    adjust_logits(logits, Row(params, allowed_ids=allowed_ids(params, "cpu")))
    assert logits.tolist() == [-math.inf, -math.inf, 2.0, -math.inf, -math.inf, 5.0, -math.inf, 7.0,
                               -math.inf, -math.inf]
    # min_tokens would mask the stop tokens; when they are all that is allowed, one stays.
    only_stops = SamplingParams(allowed_token_ids=[2], min_tokens=5)
    logits = torch.zeros(4)
    adjust_logits(logits, Row(only_stops, stop_token_ids=frozenset({2}), allowed_ids=allowed_ids(only_stops, "cpu")))
    assert logits.tolist() == [-math.inf, -math.inf, 0.0, -math.inf]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(5)
    row = Row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              token_ids=[4, 4, 1, 1, 1, 2], num_prompt_tokens=2)  # prompt [4, 4]
    adjust_logits(logits, row)
    assert logits.tolist() == pytest.approx([0.0, -(1.5 + 0.25), -(0.5 + 0.25), 0.0, 0.0])


def test_negative_penalties_encourage_repeats():
    logits = torch.tensor([1.0, 1.2])
    row = Row(SamplingParams(temperature=0.0, presence_penalty=-1.0),
              token_ids=[9, 0], num_prompt_tokens=1)
    assert sample_tokens(logits[None].clone(), [row])[0] == 0


def test_repetition_penalty_shrinks_seen_logits_in_prompt_and_output():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    row = Row(SamplingParams(repetition_penalty=2.0), token_ids=[0, 1, 0], num_prompt_tokens=2)
    adjust_logits(logits, row)
    assert logits.tolist() == [1.0, -4.0, 2.0, -2.0]  # each seen token once, however often


def test_adjustments_ignore_token_ids_beyond_the_logits():
    """A stop token id past the vocabulary (an extension field) masks nothing, crashes nothing."""
    logits = torch.zeros(4)
    row = Row(SamplingParams(min_tokens=2), stop_token_ids=frozenset({3, 4096}))
    adjust_logits(logits, row)
    assert logits[3] == -math.inf and torch.isfinite(logits[:3]).all()


def test_a_penalised_draw_is_the_same_when_recomputed():
    """Penalties read only the request's own tokens: a resumed or recomputed request
    (same tokens, same position) draws the same token."""
    torch.manual_seed(2)
    logits = torch.randn(1, 64)
    params = SamplingParams(temperature=0.9, seed=4, frequency_penalty=1.0,
                            repetition_penalty=1.3, logit_bias=[TokenBias(5, 3.0)])
    tokens = [1, 2, 3, 5, 5, 7]
    first = sample_tokens(logits.clone(), [Row(params, make_generator(4, "cpu"), list(tokens), 3)])
    other_batch = sample_tokens(
        torch.cat([torch.randn(1, 64), logits]),
        [Row(SamplingParams(temperature=0.0)), Row(params, make_generator(4, "cpu"), list(tokens), 3)],
    )
    assert other_batch[1] == first[0]


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
        (SamplingParams(logit_bias=[TokenBias(1, 101.0)]), "logit_bias values"),
        (SamplingParams(logit_bias=[TokenBias(-1, 1.0)]), "logit_bias token ids"),
        (SamplingParams(logit_bias=[TokenBias(1, 1.0), TokenBias(1, 2.0)]), "twice"),
        (SamplingParams(logit_bias=[TokenBias(i, 1.0) for i in range(MAX_LOGIT_BIAS + 1)]),
         f"at most {MAX_LOGIT_BIAS}"),
        (SamplingParams(), None),
        (SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.5,
                        min_p=1.0, max_tokens=3, min_tokens=3,
                        logit_bias=[TokenBias(0, -100.0)]), None),
    ],
)
def test_validate_sampling(params, problem):
    result = validate_sampling(params)
    assert (result is None) if problem is None else (problem in result)
