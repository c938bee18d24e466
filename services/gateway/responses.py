"""OpenAI response shapes and Server-Sent Events, built from reply messages.

Completions answer ``text_completion`` objects (streamed as ``text_completion`` chunks);
chat answers ``chat.completion`` (streamed as ``chat.completion.chunk``, the first chunk
carrying ``delta.role``). A stream ends with ``data: [DONE]``; with
``stream_options.include_usage`` every chunk has ``"usage": null`` (with vLLM's
``continuous_usage_stats`` too, its choice's usage so far) and one last chunk with empty
``choices`` carries the usage. An error after the headers went out is sent as
an ``{"error": {...}}`` event before ``[DONE]``, as vLLM does.

Log-probabilities, when asked for, come in each API's own shape: completions the legacy
``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists (the top
alternatives as a map that also holds the chosen token, as vLLM gives them), chat a
``content`` list of ``{token, logprob, bytes, top_logprobs}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from services.gateway.errors import ApiError, timed_out
from services.gateway.reasoning import ReasoningReader, split_reasoning
from services.gateway.replies import ChoiceStream
from services.gateway.schemas import ToolCalling
from services.gateway.tool_parsers import ToolCallReader, parse_tool_calls
from services.messages import FinalAnswer, RequestKind, TokenLogprob, TopLogprob
from services.replies import Reply

SSE_DONE = b"data: [DONE]\n\n"
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def cursor_page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list page: the ``limit`` items after the one whose id is ``after``."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    shown = items[:limit]
    return {"object": "list", "data": shown, "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None, "has_more": len(items) > limit}

@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response object of one request repeats."""

    request_id: str
    kind: RequestKind
    model: str
    created: int
    logprobs: bool = False
    """The client asked for log-probabilities."""
    tokens_as_ids: bool = False
    """Their tokens are named ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``)."""
    top_logprobs: int = 0
    """How many of each position's most likely tokens they list."""
    prompt_logprobs: int | None = None
    """The client asked for the prompt's (vLLM's ``prompt_logprobs``), with this many of
    each position's most likely tokens."""
    echo: tuple[str | None, ...] | None = None
    """Each prompt, when a completion asked for it back (``echo``): each of its choices'
    text starts with it, and their log-probabilities with the prompt's. None for a
    token-id prompt: its text comes with the first reply (``echoed_prompt``)."""
    n: int = 1
    """Choices per prompt: choice ``i`` answers prompt ``i // n``."""
    tool_calling: ToolCalling | None = None
    """The chat's answer may be tool calls: sent as ``tool_calls``, not content."""
    reasoning_parser: str = ""
    """A chat's thinking is split from its answer (``reasoning_content``) this way."""
    service_tier: str | None = None
    """The tier that served it (``flex`` or ``default``), said in every object when the
    request named one (``service_tier``)."""
    token_ids: bool = False
    """The client asked for token ids (``return_token_ids``): each choice's and each
    chunk's output ``token_ids``, and the prompt's ``prompt_token_ids``."""

    def head(self, obj: str) -> dict[str, Any]:
        """The fields every response object of the request starts with."""
        fields: dict[str, Any] = {"id": self.request_id, "object": obj, "created": self.created,
                                  "model": self.model}
        if self.service_tier is not None:
            fields["service_tier"] = self.service_tier
        return fields

    def echoed(self, index: int, reply: Reply | ChoiceAnswer) -> str:
        """The text choice ``index`` starts with (``reply``: its first): its prompt when
        echoed, else nothing."""
        if self.echo is None:
            return ""
        prompt = self.echo[index // self.n]
        return prompt if prompt is not None else reply.echoed_prompt or ""


def answer_error(final: FinalAnswer) -> ApiError | None:
    """The client-facing error of a FinalAnswer, or None when it finished normally."""
    if final.error is None and final.finish_reason in _FINISH_REASONS:
        return None
    if final.error is not None:
        status = final.error.status if 400 <= final.error.status <= 599 else 500
        return ApiError(
            status,
            final.error.message,
            reason="upstream_error",
            type=final.error.type,
            code=final.error.code,
        )
    return ApiError(
        503, "The request was cancelled before it finished.", reason="cancelled", code="cancelled"
    )


@dataclass(slots=True)
class ChoiceAnswer:
    """One choice of a non-streamed answer, as read."""

    final: FinalAnswer
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    echoed_prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None


def usage(finals: list[FinalAnswer], n: int = 1) -> dict[str, int]:
    """Each prompt once, the completion tokens of every choice (as OpenAI counts ``n``);
    ``finals``: every choice's, ``n`` per prompt. ``cached_tokens``: of the prompt tokens,
    those found in the worker's prefix cache (each prompt's first choice's)."""
    prompt = sum(final.prompt_tokens for final in finals[::n])
    completion = sum(final.completion_tokens for final in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(final.cached_tokens for final in finals[::n])},
    }


def finish_reason(final: FinalAnswer) -> str:
    return _FINISH_REASONS[final.finish_reason]


def _call_object(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def forced_calls(calling: ToolCalling, text: str) -> list[tuple[str, str]] | None:
    """The calls (name, arguments) of a forced call's finished answer, which its grammar
    held to the call's language; None when it does not read as one (a stop string cut it)."""
    if calling.function is not None:
        return [(calling.function, text)]
    try:
        return [(call["name"], json.dumps(call["parameters"], ensure_ascii=False))
                for call in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return None


def called_finish_reason(calling: ToolCalling, final: FinalAnswer) -> str:
    """The finish reason of an answer that made tool calls, as vLLM's: a named function's
    ``stop``, a required or chosen (auto) call's ``tool_calls``; ``length`` when cut."""
    if final.finish_reason != "stop":
        return finish_reason(final)
    return "stop" if calling.function is not None else "tool_calls"


def tool_call_message(calling: ToolCalling, text: str,
                      final: FinalAnswer) -> tuple[dict[str, Any], str] | None:
    """The message and finish reason of an answer that made tool calls; None when it is
    content. A call the model chose to make (auto) has as content what it wrote before
    the first call; a forced answer cut short is no call."""
    if calling.parser:
        parsed = parse_tool_calls(text)
        if parsed is None:
            return None
        content, calls = parsed
        found = [(call.name, call.arguments) for call in calls]
    else:
        content = ""
        found = forced_calls(calling, text) if final.finish_reason == "stop" else None
        if found is None:
            return None
    return ({"role": "assistant", "content": content or None,
             "tool_calls": [_call_object(name, arguments) for name, arguments in found]},
            called_finish_reason(calling, final))


def _named(entry: TokenLogprob | TopLogprob, as_ids: bool) -> tuple[str, bytes]:
    """A log-probability's token as the client reads it, and its bytes: its own text, or
    ``token_id:N`` when the client asked for ids (vLLM's ``return_tokens_as_token_ids``:
    tokens whose text does not tell them apart, such as parts of one character, stay
    distinct)."""
    if as_ids:
        name = f"token_id:{entry.token_id}"
        return name, name.encode()
    return entry.token, entry.token_bytes


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0,
                        unscored_first: bool = False, as_ids: bool = False) -> dict[str, Any]:
    """A completion choice's ``logprobs`` for these tokens; ``text_offset`` is where the
    first one starts in the answer's text. ``unscored_first``: the first is the prompt's
    first token, which nothing predicts (null, as OpenAI and vLLM give it). ``as_ids``:
    tokens named by id (offsets still count the text)."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    top: list[dict[str, float] | None] = []
    for entry in entries:
        alternatives = {_named(alt, as_ids)[0]: alt.logprob for alt in entry.top}
        alternatives.setdefault(_named(entry, as_ids)[0], entry.logprob)
        top.append(alternatives)
    token_logprobs: list[float | None] = [entry.logprob for entry in entries]
    if unscored_first and entries:
        token_logprobs[0] = top[0] = None
    return {
        "tokens": [_named(entry, as_ids)[0] for entry in entries],
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    """A chat choice's ``logprobs`` for these tokens; ``bytes`` are each token's own, so
    the tokens of a character split between them join into it (``as_ids``: the bytes of
    its ``token_id:N`` name, as vLLM gives them)."""
    content = []
    for entry in entries:
        name, raw = _named(entry, as_ids)
        top = []
        for alt in entry.top:
            alt_name, alt_raw = _named(alt, as_ids)
            top.append({"token": alt_name, "logprob": alt.logprob, "bytes": list(alt_raw)})
        content.append({"token": name, "logprob": entry.logprob, "bytes": list(raw),
                        "top_logprobs": top})
    return {"content": content}


def choice_logprobs(meta: ResponseMeta, entries: list[TokenLogprob], text_offset: int = 0,
                    prompt: list[TokenLogprob] | None = None) -> dict[str, Any] | None:
    """The ``logprobs`` of a choice (or streamed delta): None unless the client asked.
    ``prompt``: the prompt's, which an echoed completion's come after."""
    if not meta.logprobs:
        return None
    if meta.kind == "chat":
        return chat_logprobs(entries, meta.tokens_as_ids)
    if prompt:
        if meta.prompt_logprobs is not None:  # they may list more, for a larger prompt_logprobs
            prompt = [replace(entry, top=entry.top[: meta.top_logprobs]) for entry in prompt]
        return completion_logprobs(prompt + entries, text_offset, unscored_first=True,
                                   as_ids=meta.tokens_as_ids)
    return completion_logprobs(entries, text_offset, as_ids=meta.tokens_as_ids)


def prompt_logprobs(meta: ResponseMeta, entries: list[TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: for each prompt token, null for the first (nothing
    predicts it), else the token and its position's most likely ones, keyed by id, each
    with its log-probability, rank (1: the most likely) and text."""
    positions: list[dict[str, Any] | None] = [None] if entries else []
    for entry in entries[1:]:
        position = {str(entry.token_id): {"logprob": entry.logprob, "rank": entry.rank or None,
                                          "decoded_token": entry.token}}
        for rank, alt in enumerate(entry.top[: meta.prompt_logprobs], start=1):
            position.setdefault(str(alt.token_id), {"logprob": alt.logprob, "rank": rank,
                                                    "decoded_token": alt.token})
        positions.append(position)
    return positions


def chat_message(meta: ResponseMeta, answer: ChoiceAnswer) -> tuple[dict[str, Any], str]:
    """A chat choice's ``message`` and finish reason, through the server's parsers: its
    thinking apart (``reasoning_content``, with a reasoning parser), its calls as
    ``tool_calls``."""
    text, thinking = answer.text, None
    if meta.reasoning_parser:
        thinking, text = split_reasoning(meta.reasoning_parser, text)
    message: dict[str, Any] = {"role": "assistant",
                               "content": None if thinking is not None and not text else text}
    reason = finish_reason(answer.final)
    called = (tool_call_message(meta.tool_calling, text, answer.final)
              if meta.tool_calling is not None else None)
    if called is not None:
        message, reason = called
    if meta.reasoning_parser:
        message["reasoning_content"] = thinking
    return message, reason


def completion_response(meta: ResponseMeta, answers: list[ChoiceAnswer]) -> dict[str, Any]:
    """The non-streaming body for successful answers, one per choice."""
    choices = []
    for index, answer in enumerate(answers):
        prompt = answer.prompt_logprobs if meta.echo is not None else None
        choice: dict[str, Any] = {"index": index,
                                  "logprobs": choice_logprobs(meta, answer.logprobs, prompt=prompt),
                                  "finish_reason": finish_reason(answer.final),
                                  "stop_reason": answer.final.stop_reason}
        if meta.kind == "chat":
            choice["message"], choice["finish_reason"] = chat_message(meta, answer)
        else:
            choice["text"] = meta.echoed(index, answer) + answer.text
        if meta.token_ids:
            choice["token_ids"] = answer.token_ids
            if meta.kind != "chat":
                choice["prompt_token_ids"] = answer.prompt_token_ids
        if meta.prompt_logprobs is not None and meta.kind != "chat":
            choice["prompt_logprobs"] = prompt_logprobs(meta, answer.prompt_logprobs)
        choices.append(choice)
    body = {
        **meta.head("chat.completion" if meta.kind == "chat" else "text_completion"),
        "choices": choices,
        "usage": usage([answer.final for answer in answers], meta.n),
    }
    if meta.token_ids and meta.kind == "chat":
        body["prompt_token_ids"] = answers[0].prompt_token_ids if answers else None
    if meta.prompt_logprobs is not None and meta.kind == "chat":
        body["prompt_logprobs"] = prompt_logprobs(meta, answers[0].prompt_logprobs) if answers else None
    return body


class RunningUsage:
    """What each streamed chunk says of usage: nothing without ``include_usage``; with it,
    null (OpenAI's), or with vLLM's ``continuous_usage_stats`` too, the chunk's choice's
    tokens so far (its prompt's, and those it generated)."""

    def __init__(self, n: int, included: bool, continuous: bool = False) -> None:
        self.included = included
        self.continuous = continuous
        self.prompt = [0] * n
        self.completion = [0] * n

    def read(self, index: int, reply: Reply) -> None:
        """Count what a reply of choice ``index`` tells."""
        if isinstance(reply, FinalAnswer):
            prompt, completion = reply.prompt_tokens, reply.completion_tokens
        else:
            prompt, completion = reply.prompt_tokens, reply.token_offset + len(reply.token_ids)
        if prompt:
            self.prompt[index] = prompt
        self.completion[index] = max(self.completion[index], completion)

    def of(self, index: int) -> dict[str, int] | None:
        if not self.continuous:
            return None
        prompt, completion = self.prompt[index], self.completion[index]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_chunk(
    meta: ResponseMeta,
    *,
    index: int = 0,
    text: str = "",
    role: bool = False,
    finish: str | None = None,
    usage: RunningUsage | None = None,
    logprobs: dict[str, Any] | None = None,
    calls: list[dict[str, Any]] | None = None,
    reasoning: str = "",
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    """One streamed chunk: text, tool calls (a chat's ``delta.tool_calls``) and/or a finish
    reason (chat: ``delta``; the first has the role). ``token_ids``: the output tokens it
    adds, ``prompt_token_ids`` the prompt's (a chat's at the top, a completion's in the
    choice), when the client asked for them."""
    choice: dict[str, Any] = {"index": index}
    if meta.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            forced = meta.tool_calling is not None and not meta.tool_calling.parser
            delta["content"] = None if forced else ""
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        choice["delta"] = delta
        obj = "chat.completion.chunk"
    else:
        choice["text"] = text
        obj = "text_completion"
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish
    if finish is not None:
        choice["stop_reason"] = stop_reason
    if meta.token_ids:
        choice["token_ids"] = token_ids or []
    if prompt_token_ids is not None and meta.kind != "chat":
        choice["prompt_token_ids"] = prompt_token_ids
    chunk: dict[str, Any] = {**meta.head(obj), "choices": [choice]}
    if prompt_token_ids is not None and meta.kind == "chat":
        chunk["prompt_token_ids"] = prompt_token_ids
    if usage is not None and usage.included:
        chunk["usage"] = usage.of(index)
    return chunk


def usage_chunk(meta: ResponseMeta, finals: list[FinalAnswer]) -> dict[str, Any]:
    return {
        **meta.head("chat.completion.chunk" if meta.kind == "chat" else "text_completion"),
        "choices": [],
        "usage": usage(finals, meta.n),
    }


_LINE_BREAKS_JSON_KEEPS_RAW = str.maketrans(
    {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
"""Characters that JSON allows raw inside strings but that ``str.splitlines`` treats as
line breaks: clients that split an SSE stream that way (httpx's ``aiter_lines``, for
one) would cut an event in two when a model generates one, so they are escaped."""


KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment: every client skips it, and the connection is not idle (a proxy with an
idle timeout does not cut a stream that waits)."""


def sse(payload: dict[str, Any], event: str = "") -> bytes:
    """One ``data:`` event (named by an ``event:`` line when ``event`` is given). Text is
    valid UTF-8 here: it was decoded from msgpack."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + body.translate(_LINE_BREAKS_JSON_KEEPS_RAW).encode() + b"\n\n"


async def collect_answer(stream: ChoiceStream) -> list[ChoiceAnswer]:
    """Read every choice's replies up to its FinalAnswer: each choice's joined text and
    log-probabilities (empty unless asked for). An error ends the reading at once (the
    answers returned then hold it)."""
    parts: list[list[str]] = [[] for _ in stream.streams]
    logprobs: list[list[TokenLogprob]] = [[] for _ in stream.streams]
    prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in stream.streams]
    echoed: list[str | None] = [None] * len(stream.streams)
    token_ids: list[list[int]] = [[] for _ in stream.streams]
    prompt_ids: list[list[int] | None] = [None] * len(stream.streams)
    finals: dict[int, FinalAnswer] = {}
    while len(finals) < len(stream.streams):
        index, reply = await stream.next()
        if prompt_ids[index] is None:
            prompt_ids[index] = reply.prompt_token_ids
        if isinstance(reply, FinalAnswer):
            finals[index] = reply
            if answer_error(reply) is not None:
                break
        else:
            parts[index].append(reply.text)
            logprobs[index].extend(reply.logprobs)
            prompt_logprobs[index].extend(reply.prompt_logprobs)
            echoed[index] = echoed[index] or reply.echoed_prompt
            token_ids[index].extend(reply.token_ids)
    return [ChoiceAnswer(final, "".join(parts[i]), logprobs[i], prompt_logprobs[i], echoed[i],
                         token_ids[i], prompt_ids[i])
            for i, final in sorted(finals.items())]


@dataclass(slots=True)
class Delta:
    """What one streamed chunk of a chat choice carries, past the role and finish."""

    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reasoning: str = ""
    token_ids: list[int] | None = None
    """The output tokens it adds, when the client asked for them: sent even while the
    parsers hold their text back, so a choice's chunks hold every token once."""

    def __bool__(self) -> bool:
        return bool(self.text or self.calls or self.logprobs or self.reasoning or self.token_ids)

    def __add__(self, other: Delta) -> Delta:
        ids = None if self.token_ids is None and other.token_ids is None else [
            *(self.token_ids or []), *(other.token_ids or [])]
        return Delta(self.text + other.text, self.calls + other.calls,
                     self.logprobs + other.logprobs, self.reasoning + other.reasoning, ids)

    def chunk(self, meta: ResponseMeta, index: int, usage: RunningUsage) -> dict[str, Any]:
        return stream_chunk(meta, index=index, usage=usage, text=self.text,
                            calls=self.calls or None, reasoning=self.reasoning,
                            logprobs=choice_logprobs(meta, self.logprobs), token_ids=self.token_ids)


class ToolCallStream:
    """One choice's tool calls, streamed as OpenAI streams them: a named function's
    arguments as they come (the first delta with the call's id and name); a required
    call's list, whose calls are known only once it is complete, in one delta at the
    end; a call the model chose to make (auto) whole once closed, its content around it
    as it comes. A forced answer that is no call (cut by ``max_tokens``) ends as content."""

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.named_started = False
        self.reader = ToolCallReader() if calling.parser else None
        self.held: list[str] = []
        self.held_logprobs: list[TokenLogprob] = []

    def add(self, text: str, logprobs: list[TokenLogprob]) -> Delta:
        """What to send for more of the answer (empty: nothing yet)."""
        self.held_logprobs.extend(logprobs)
        if self.reader is not None:
            return self._read(self.reader.feed(text))
        if self.calling.function is None or not (text or self.held_logprobs):
            self.held.append(text)
            return Delta()
        if self.named_started:
            call = {"index": 0, "function": {"arguments": text}}
        else:
            self.named_started = True
            call = _call_object(self.calling.function, text, index=0)
        return Delta(calls=[call], logprobs=self._logprobs())

    def finish(self, final: FinalAnswer) -> tuple[str, Delta]:
        """The finish reason, and what to send before it (held text or calls)."""
        if self.reader is not None:
            delta = self._read(self.reader.finish())
            return (called_finish_reason(self.calling, final) if self.reader.calls
                    else finish_reason(final)), delta
        text = "".join(self.held)
        found = forced_calls(self.calling, text) if final.finish_reason == "stop" else None
        if found is None:
            return finish_reason(final), self._read([("content", text)])
        if self.calling.function is not None:  # its arguments went out as they came
            return called_finish_reason(self.calling, final), self._read([])
        calls = [_call_object(name, arguments, i) for i, (name, arguments) in enumerate(found)]
        return called_finish_reason(self.calling, final), Delta(calls=calls, logprobs=self._logprobs())

    def _read(self, events: list[tuple[str, Any]]) -> Delta:
        text = "".join(value for kind, value in events if kind == "content")
        new_calls = [value for kind, value in events if kind == "call"]
        first = self.reader.calls - len(new_calls) if self.reader else 0
        calls = [_call_object(call.name, call.arguments, first + i) for i, call in enumerate(new_calls)]
        return Delta(text, calls, self._logprobs())

    def _logprobs(self) -> list[TokenLogprob]:
        out, self.held_logprobs = self.held_logprobs, []
        return out


class ChatAnswerStream:
    """A chat choice's answer through the server's parsers as it streams: its thinking
    split off (``reasoning_content``), then its calls read out (:class:`ToolCallStream`)."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.thinking = ReasoningReader(meta.reasoning_parser) if meta.reasoning_parser else None
        self.calls = ToolCallStream(meta.tool_calling) if meta.tool_calling else None

    def add(self, text: str, logprobs: list[TokenLogprob]) -> Delta:
        """What to send for more of the answer (empty: nothing yet)."""
        thinking = ""
        if self.thinking is not None:
            thinking, text = self.thinking.feed(text)
        return Delta(reasoning=thinking) + self._content(text, logprobs)

    def finish(self, final: FinalAnswer) -> tuple[str, Delta]:
        """The finish reason, and what to send before it."""
        delta, reason = Delta(), finish_reason(final)
        if self.thinking is not None:
            thinking, text = self.thinking.finish()
            delta = Delta(reasoning=thinking) + (self._content(text, []) if text else Delta())
        if self.calls is not None:
            reason, last = self.calls.finish(final)
            delta += last
        return reason, delta

    def _content(self, text: str, logprobs: list[TokenLogprob]) -> Delta:
        if self.calls is not None:
            return self.calls.add(text, logprobs)
        return Delta(text, logprobs=logprobs)


async def replies_in_time(stream: ChoiceStream, first: tuple[int, Reply],
                          deadline: float) -> AsyncIterator[tuple[int, Reply] | None]:
    """``first`` (a choice's index and reply, already read), then each reply as it
    arrives; None once ``deadline`` (event-loop time) passes, and nothing after it."""
    read = first
    while True:
        yield read
        try:
            async with asyncio.timeout_at(deadline):
                read = await stream.next()
        except TimeoutError:
            yield None
            return


async def sse_events(
    meta: ResponseMeta,
    stream: ChoiceStream,
    first: tuple[int, Reply],
    *,
    include_usage: bool,
    deadline: float,
    timeout_s: float,
    continuous_usage: bool = False,
) -> AsyncIterator[bytes]:
    """SSE bytes for a request whose first reply (``first``: choice index and reply)
    was already read. Each choice ends with its own finish chunk; an error in any ends
    the stream. ``continuous_usage``: each chunk's ``usage`` is its choice's so far
    (vLLM's ``continuous_usage_stats``, with ``include_usage``).

    ``deadline`` is in event-loop time; when it passes, an error event ends the stream
    (the caller sees no final answer and cancels downstream).

    Events whose replies were already waiting go out in one write, each still its own
    event: a busy gateway makes fewer writes, and none waits for a reply to come.
    """
    events: list[bytes] = []
    n = len(stream.streams)
    usage = RunningUsage(n, include_usage, continuous_usage)
    if meta.kind == "chat":
        # A chat's prompt ids go once, at the top of the first chunk: every choice's prompt is the same.
        prompt_ids = first[1].prompt_token_ids if meta.token_ids else None
        usage.prompt = [first[1].prompt_tokens] * n
        events.extend(sse(stream_chunk(meta, index=i, role=True, usage=usage,
                                       prompt_token_ids=None if i else prompt_ids))
                      for i in range(n))
    text_offsets = [0] * n  # where each choice's next token's text starts (text_offset)
    echoed = [meta.echo is None] * n  # an echoed choice starts with the prompt
    # A completion's choice's prompt ids go with its first chunk.
    prompt_sent = [meta.kind == "chat" or not meta.token_ids] * n
    parsed = meta.kind == "chat" and (meta.tool_calling is not None or bool(meta.reasoning_parser))
    answers = [ChatAnswerStream(meta) if parsed else None for _ in range(n)]
    finals: dict[int, FinalAnswer] = {}
    async with contextlib.aclosing(replies_in_time(stream, first, deadline)) as replies:
        async for read in replies:
            if read is None:
                events.append(sse(timed_out(timeout_s).body()))
                break
            index, reply = read
            answer = answers[index]
            usage.read(index, reply)
            if isinstance(reply, FinalAnswer):
                error = answer_error(reply)
                if error is not None:
                    events.append(sse(error.body()))
                    break
                finals[index] = reply
                finish = finish_reason(reply)
                if answer is not None:
                    finish, delta = answer.finish(reply)
                    if delta:
                        events.append(sse(delta.chunk(meta, index, usage)))
                events.append(sse(stream_chunk(
                    meta, index=index, finish=finish, usage=usage,
                    prompt_token_ids=None if prompt_sent[index] else reply.prompt_token_ids,
                    stop_reason=reply.stop_reason)))
                if len(finals) == n:
                    if include_usage:
                        events.append(sse(usage_chunk(meta, [finals[i] for i in range(n)])))
                    break
            elif answer is not None:
                delta = answer.add(reply.text, reply.logprobs)
                if meta.token_ids:
                    delta.token_ids = list(reply.token_ids)
                if delta:
                    events.append(sse(delta.chunk(meta, index, usage)))
            elif (reply.text or (meta.logprobs and reply.logprobs) or not echoed[index]
                  or (meta.token_ids and reply.token_ids)):
                text, prompt = reply.text, None
                if not echoed[index]:
                    echoed[index] = True
                    text, prompt = meta.echoed(index, reply) + text, reply.prompt_logprobs
                events.append(sse(stream_chunk(
                    meta, index=index, text=text, usage=usage,
                    logprobs=choice_logprobs(meta, reply.logprobs, text_offsets[index], prompt),
                    token_ids=reply.token_ids,
                    prompt_token_ids=None if prompt_sent[index] else reply.prompt_token_ids)))
                prompt_sent[index] = True
                text_offsets[index] += sum(len(entry.token) for entry in (prompt or []) + reply.logprobs)
            if events and not stream.waiting:
                yield b"".join(events)
                events.clear()
    events.append(SSE_DONE)
    yield b"".join(events)
