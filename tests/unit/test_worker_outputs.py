"""A worker sends the steps that piled up while it was busy as one chunk per request."""

from __future__ import annotations

from services.engine import RequestOutput
from services.worker import merge_outputs


def out(rid: str, tokens: list[int], text: str, n: int, finished: bool = False,
        reason: str | None = None) -> RequestOutput:
    return RequestOutput(rid, tokens, text, finished, reason, 3, n)  # type: ignore[arg-type]


def test_steps_that_piled_up_go_out_as_one_output_per_request():
    steps = [out("a", [1], "He", 1), out("b", [7], "x", 1),
             out("a", [2], "llo", 2), out("b", [8], "", 2),  # b's text held back
             out("a", [3], "!", 3, finished=True, reason="length"), out("b", [9], "yz", 3)]
    a, b = merge_outputs(steps)
    assert (a.request_id, a.new_token_ids, a.new_text, a.num_output_tokens) == ("a", [1, 2, 3], "Hello!", 3)
    assert (a.finished, a.finish_reason, a.num_prompt_tokens) == (True, "length", 3)
    assert (b.request_id, b.new_token_ids, b.new_text, b.finished) == ("b", [7, 8, 9], "xyz", False)


def test_one_step_is_sent_as_it_came():
    step = [out("a", [1], "He", 1), out("b", [7], "x", 1)]
    assert merge_outputs(step) == step
    assert merge_outputs([]) == []
