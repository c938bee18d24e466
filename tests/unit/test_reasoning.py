"""Reasoning parsers: a thinking model's thinking split from its answer, whole or streamed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.reasoning import ReasoningReader, split_reasoning


@pytest.mark.parametrize(("parser", "text", "expected"), [
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", ("\nLet me see.\n", "\n\nParis.")),
    ("qwen3", "Paris.", (None, "Paris.")),  # thinking off: no tags
    ("qwen3", "<think>still thinking", ("still thinking", "")),  # cut short
    ("qwen3", "Let me see.</think>Paris.", (None, "Let me see.</think>Paris.")),  # no thinking
    ("deepseek_r1", "Let me see.</think>Paris.", ("Let me see.", "Paris.")),
    ("deepseek_r1", "<think>Let me see.</think>Paris.", ("Let me see.", "Paris.")),
    ("deepseek_r1", "Still thinking", ("Still thinking", "")),  # the template opened it
    ("deepseek_r1", "", ("", "")),
])
def test_a_whole_answer_splits_into_thinking_and_content(parser, text, expected):
    assert split_reasoning(parser, text) == expected


def read_streamed(parser: str, pieces: list[str]) -> tuple[str, str]:
    reader = ReasoningReader(parser)
    parts = [reader.feed(piece) for piece in pieces] + [reader.finish()]
    return "".join(t for t, _ in parts), "".join(c for _, c in parts)


ANSWERS = ["<think>\nhmm </th </think> <think> inside\n</think>\n\nAnswer <b>here</b>.",
           "No thinking at all, just < and <th.", "  <think>cut short </thi", "mid</think>end"]


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("answer", ANSWERS)
@given(cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_a_streamed_answer_splits_as_the_whole_one_wherever_it_is_cut(parser, answer, cuts):
    points = sorted({min(c, len(answer)) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)], strict=True)]
    thinking, content = split_reasoning(parser, answer)
    streamed = read_streamed(parser, pieces)
    assert streamed[0] == (thinking or "")
    assert streamed[1].strip() == content.strip()


def test_thinking_goes_out_as_it_comes_but_a_possible_tag_waits():
    reader = ReasoningReader("qwen3")
    assert reader.feed("<th") == ("", "")
    assert reader.feed("ink>Let me </th") == ("Let me ", "")
    assert reader.feed("ink.</think>Paris") == ("</think.", "Paris")
    assert reader.feed("!") == ("", "!")
