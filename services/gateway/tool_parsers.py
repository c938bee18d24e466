"""Tool calls in a model's own format, read out of its answer when a chat lets the model
choose between answering and calling (``tool_choice`` auto), as vLLM's tool-call parsers
do; chosen by ``FAIRWAY_TOOL_CALL_PARSER`` (vLLM's ``--tool-call-parser``).

``hermes``: a call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the
format of Hermes, Qwen 2.5 and 3, and the many models trained on it. What comes before
the first call is the message's content. Pure text processing: the gateway has no
tokenizer, and needs none for this.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from services.streaming_text import held_back

TOOL_CALL_PARSERS = ("hermes",)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str
    """JSON text, as OpenAI's ``function.arguments``."""


def _call(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(value["name"], arguments)


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]] | None:
    """The content before the first call and the calls of a whole answer; None when it
    makes no call, or a call does not read (the answer is then plain content, as vLLM
    gives it). A last call the answer did not close (``max_tokens``) counts if whole."""
    start = text.find(OPEN)
    if start < 0:
        return None
    calls = [_call(match.group(1).strip()) for match in _CALL.finditer(text, start)]
    if not calls or any(call is None for call in calls):
        return None
    return text[:start], [call for call in calls if call is not None]


@dataclass(slots=True)
class ToolCallReader:
    """Reads an answer as it streams: content goes out as it comes, except what could
    begin a call tag, held until it is clear; a call goes out whole once closed."""

    pending: str = ""
    in_call: bool = False
    calls: int = 0
    _out: list[tuple[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """``("content", str)`` and ``("call", ParsedCall)`` events for more text."""
        self.pending += text
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    break
                self._emit_call(self.pending[:end], closed=True)
                self.pending = self.pending[end + len(CLOSE):]
                self.in_call = False
                continue
            start = self.pending.find(OPEN)
            if start < 0:
                keep = held_back(self.pending, (OPEN,))
                self._content(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            self._content(self.pending[:start])
            self.pending = self.pending[start + len(OPEN):]
            self.in_call = True
        return self._take()

    def finish(self) -> list[tuple[str, Any]]:
        """What is held at the end: an unclosed last call if it reads, else the text."""
        if self.in_call:
            self._emit_call(self.pending, closed=False)
        else:
            self._content(self.pending)
        self.pending, self.in_call = "", False
        return self._take()

    def _emit_call(self, body: str, *, closed: bool) -> None:
        call = _call(body.strip())
        if call is None:  # not a call after all: its text is content
            self._content(OPEN + body + (CLOSE if closed else ""))
        else:
            self.calls += 1
            self._out.append(("call", call))

    def _content(self, text: str) -> None:
        if text:
            self._out.append(("content", text))

    def _take(self) -> list[tuple[str, Any]]:
        out, self._out = self._out, []
        return out
