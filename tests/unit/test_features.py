"""RT-LM uncertainty features: named, bounded, robust to any text, and pointing the right way."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from services.scorer.features import (
    FEATURE_NAMES,
    feature_vector,
    uncertainty_features,
    uncertainty_score,
)

ODD_PROMPTS = [
    "",
    "   \n\n\t ",
    "a",
    "?" * 50,
    "Écris un poème sur la mer, s'il te plaît.",
    "请用三段话介绍一下长城的历史。",
    "Расскажи мне длинную историю о драконе.",
    "😀🔥🚀" * 40,
    "\x00\x01\x02 control \u200b chars \ud800 lone surrogate",
    "word " * 50_000,
    "好" * 100_000,
]


def test_every_feature_is_named_finite_and_in_order():
    for prompt in ODD_PROMPTS:
        feats = uncertainty_features(prompt)
        assert tuple(feats) == FEATURE_NAMES
        vector = feature_vector(feats)
        assert len(vector) == len(FEATURE_NAMES)
        assert all(isinstance(v, float) and math.isfinite(v) for v in vector), prompt[:30]
        assert 0.0 <= uncertainty_score(prompt) <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=600))
def test_arbitrary_text_gives_finite_features_and_a_bounded_score(prompt: str):
    vector = feature_vector(uncertainty_features(prompt))
    assert all(math.isfinite(v) for v in vector)
    assert 0.0 <= uncertainty_score(prompt) <= 1.0


def test_open_ended_requests_score_above_closed_ones():
    open_ended = [
        "Write a detailed essay about the history of jazz and its cultural influence.",
        "Write a story about a dragon who learns to code, with dialogue between the characters.",
        "Give me a list of 20 ideas for a birthday party and explain each one.",
        "Implement a web server in Python with routing and explain the code step by step.",
    ]
    closed = [
        "What is the capital of Australia?",
        "Classify the sentiment of this tweet as positive or negative.\n\nI love my new phone",
        "Answer in one word: what color is the sky?",
        "Is 17 a prime number? Answer yes or no.",
    ]
    lowest_open = min(uncertainty_score(p) for p in open_ended)
    highest_closed = max(uncertainty_score(p) for p in closed)
    assert lowest_open > highest_closed


def test_explicit_length_cues_are_read():
    assert math.isclose(
        uncertainty_features("Write about cats in 500 words.")["log_target_words"], math.log1p(500)
    )
    three_paragraphs = uncertainty_features("Describe Paris in three paragraphs.")[
        "log_target_words"
    ]
    assert math.isclose(three_paragraphs, math.log1p(3 * 90))
    ranged = uncertainty_features("Write a 1000-1250 word essay.")["log_target_words"]
    assert math.isclose(ranged, math.log1p(1125))
    assert uncertainty_features("Say hello.")["log_target_words"] == 0.0
    assert uncertainty_features("Answer in one word: is it raining?")["short_cue"] == 1.0
    assert uncertainty_features("Give me the top 10 movies of 2020.")[
        "log_requested_count"
    ] == math.log1p(10)
    assert uncertainty_score("Write a 2000 word essay on rivers.") > uncertainty_score(
        "Write an essay on rivers."
    )


def test_structure_features():
    feats = uncertainty_features(
        "Rewrite the sentence formally.\n\nhey whats up, u coming tonight?"
    )
    assert feats["has_input_block"] == 1.0
    assert feats["transform_task"] == 1.0
    assert feats["log_input_words"] > 0
    multi = uncertainty_features("What is DNA? How is it copied? Why does it mutate?")
    single = uncertainty_features("What is DNA?")
    assert multi["multi_part"] > single["multi_part"] == 0.0
    assert (
        uncertainty_features("Fix this:\n```python\ndef f(x):\n    return x\n```")["has_code"]
        == 1.0
    )
    assert uncertainty_features("Write a C++ function that sorts a vector.")["code_request"] == 1.0
    assert uncertainty_features("😀😀😀")["non_ascii"] == 1.0


def test_length_features_use_the_whole_prompt_even_when_only_the_head_is_scanned():
    short = uncertainty_features("word " * 100)
    long = uncertainty_features("word " * 100_000)
    assert long["log_chars"] > short["log_chars"] + 6
    assert long["log_words"] > short["log_words"] + 6
