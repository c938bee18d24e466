"""A reasoning model's thinking, split from its answer, as vLLM's reasoning parsers do
(``FAIRWAY_REASONING_PARSER``, vLLM's ``--reasoning-parser``): a chat's message gets the
thinking as ``reasoning_content`` and the rest as ``content``.

The thinking is what the model writes up to ``</think>``, after an optional ``<think>``:

- ``deepseek_r1``: the chat template opens ``<think>`` itself (DeepSeek-R1 and its
  distillations), so an answer without ``</think>`` is all thinking (cut short);
- ``qwen3``: the model opens it (Qwen3; its non-thinking answers have no tags), so an
  answer that does not start with it is all content. (A template that opens it itself,
  as Qwen3's later thinking-only models' do, takes ``deepseek_r1``.) Streamed, whether an
  answer thinks is known from its first characters, and both agree.

Pure text processing, on the gateway, which has no tokenizer and needs none for this.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.streaming_text import held_back

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def _opened_by_template(parser: str) -> bool:
    return parser == "deepseek_r1"


def split_reasoning(parser: str, text: str) -> tuple[str | None, str]:
    """(thinking, content) of a whole answer; thinking None when there is none."""
    body = text.lstrip()
    opened = body.startswith(START)
    if opened:
        body = body[len(START):]
    elif not _opened_by_template(parser):
        return None, text
    thinking, end, content = body.partition(END)
    return thinking, content if end else ""


@dataclass(slots=True)
class ReasoningReader:
    """Splits an answer as it streams: thinking and content go out as they come, except
    what could be part of a tag, held until it is clear."""

    parser: str
    pending: str = ""
    state: str = "start"
    """``start`` (not yet known whether the answer thinks), ``thinking``, ``content``."""

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, content) that can go out after more ``text``."""
        self.pending += text
        thinking = content = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(START):
                self.pending, self.state = head[len(START):], "thinking"
            elif START.startswith(head):
                return "", ""  # may still become the tag
            else:
                self.state = "thinking" if _opened_by_template(self.parser) else "content"
        if self.state == "thinking":
            end = self.pending.find(END)
            if end >= 0:
                thinking, self.pending = self.pending[:end], self.pending[end + len(END):]
                self.state = "content"
            else:
                keep = held_back(self.pending, (END,))
                thinking = self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
        if self.state == "content":
            content, self.pending = self.pending, ""
        return thinking, content

    def finish(self) -> tuple[str, str]:
        """What is held at the end of the answer: (thinking, content)."""
        rest, self.pending = self.pending, ""
        if self.state == "thinking" or (self.state == "start" and _opened_by_template(self.parser)):
            return rest, ""
        return "", rest
