"""The hermes tool call parser: whole answers, and the same answers read as they stream."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.tool_parsers import ParsedCall, ToolCallReader, parse_tool_calls

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
CALL_B = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"utc\\"}"}</tool_call>'


@pytest.mark.parametrize(("text", "expected"), [
    ("Just an answer.", None),
    ("Let me look. " + CALL_A, ("Let me look. ", [ParsedCall("get_weather", '{"city": "Oslo"}')])),
    (CALL_A + "\n" + CALL_B, ("", [ParsedCall("get_weather", '{"city": "Oslo"}'),
                                   ParsedCall("get_time", '{"tz": "utc"}')])),
    ('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', ("", [ParsedCall("f", '{"x": 1}')])),
    ('<tool_call>{"name": "f"}</tool_call>', ("", [ParsedCall("f", "{}")])),
    ('<tool_call>{"name": "f", "arguments": {}}', ("", [ParsedCall("f", "{}")])),  # cut before the tag
    ('<tool_call>{"name": "f", "argu', None),  # cut inside: no call
    ("<tool_call>not json</tool_call>", None),
    ('<tool_call>["f"]</tool_call>', None),
])
def test_a_whole_answer_reads_as_content_and_calls(text, expected):
    assert parse_tool_calls(text) == expected


def read_streamed(pieces: list[str]) -> tuple[str, list[ParsedCall]]:
    reader = ToolCallReader()
    events = [event for piece in pieces for event in reader.feed(piece)] + reader.finish()
    return ("".join(v for k, v in events if k == "content"), [v for k, v in events if k == "call"])


ANSWERS = ["Plain text < with tags <tool and <tool_cal in it.", "Sure. " + CALL_A + " Done.",
           CALL_A + CALL_B, "x <tool_call>broken</tool_call> y", CALL_A[:-5]]


@pytest.mark.parametrize("answer", ANSWERS)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_a_streamed_answer_reads_as_the_whole_one_wherever_it_is_cut(answer, cuts):
    points = sorted({min(c, len(answer)) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)], strict=True)]
    content, calls = read_streamed(pieces)
    whole = parse_tool_calls(answer)
    if whole is not None:
        assert calls == whole[1]
        assert content.startswith(whole[0])
    elif "broken" in answer or OPEN_TAG not in answer:
        assert (content, calls) == (answer, [])


OPEN_TAG = "<tool_call>"


def test_content_goes_out_as_it_comes_but_a_possible_tag_waits():
    reader = ToolCallReader()
    assert reader.feed("Hello <to") == [("content", "Hello ")]
    assert reader.feed("ol_call>{") == []
    assert reader.feed('"name": "f", "arguments": {"a": 1}}</tool_call> bye') == [
        ("call", ParsedCall("f", json.dumps({"a": 1}))), ("content", " bye")]
    assert reader.feed("<tools!") == [("content", "<tools!")]
    assert reader.finish() == []
    assert reader.calls == 1
