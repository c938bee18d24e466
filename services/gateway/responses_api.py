"""OpenAI's Responses API (``POST /v1/responses``), served as the chat it means.

A request is read into a chat body (:func:`chat_body`): ``instructions`` become the
first message (a system one), ``input`` the conversation (its messages, the function
calls an earlier answer made and their outputs), ``text.format`` a structured output,
``max_output_tokens`` the chat's ``max_completion_tokens``, ``tools`` and
``tool_choice`` the chat's; from there it runs as a chat, through the same checks,
admission and pipeline. Its answer is written back as a ``response`` object whose
``output`` holds the items the chat's answer makes: a ``reasoning`` item (with a
reasoning parser), a ``message`` with its ``output_text``, a ``function_call`` per call
(:func:`response_object`). Streamed, as OpenAI's semantic events, ``response.created``
to ``response.completed`` (``response.incomplete`` when cut by ``max_output_tokens``,
``response.failed`` on an error), each numbered by ``sequence_number``
(:class:`ResponseEvents`).

An answer is stored (``store``, OpenAI's default) in Redis for the gateway's
``responses_ttl_s`` (:class:`ResponseStore`): its tenant, its conversation's items and
the response. A later request's ``previous_response_id`` continues that conversation (its
items, then the new input; the earlier ``instructions`` are not carried over, as with
OpenAI), and ``GET``/``DELETE /v1/responses/{id}`` read and forget it, each for its own
tenant only. A request may instead name a ``conversation`` the server keeps
(:mod:`services.gateway.conversations`), or be run in the background
(:mod:`services.gateway.background`). What needs more than that (stored prompts,
``item_reference`` inputs) is refused with a 400 that says to send the conversation in
``input``. Built-in tools (web search and the like), non-text inputs and ``truncation:
auto`` are refused too, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError
from redis.exceptions import RedisError

from services import keys
from services.gateway.errors import (
    ApiError,
    from_validation_error,
    invalid,
    redis_or_503,
    timed_out,
)
from services.gateway.replies import ChoiceStream
from services.gateway.responses import (
    ChatAnswerStream,
    ChoiceAnswer,
    Delta,
    ResponseMeta,
    answer_error,
    chat_logprobs,
    chat_message,
    replies_in_time,
    sse,
)
from services.gateway.schemas import (
    ChatCompletionBody,
    NonEmptyText,
    StrictBody,
    Text,
    unsupported,
)
from services.logs import get_logger
from services.messages import (
    INT64_MAX,
    INT64_MIN,
    MAX_LOGPROBS,
    MAX_TOOLS,
    FinalAnswer,
    TokenLogprob,
)
from services.replies import Reply

log = get_logger(__name__)

LOGPROBS_INCLUDE = "message.output_text.logprobs"
"""The ``include`` entry that asks for the answer's log-probabilities."""
MAX_METADATA_KEYS = 16
"""OpenAI's limits on ``metadata``: keys, and the characters of a key and of a value."""
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
PARAM_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
               "messages": "input"}
"""A chat body's fields under their Responses names, for the errors the chat's checks
give (a message's own words name only the first two: "messages" is also a word)."""
_PASSED_THROUGH = ("seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
                   "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                   "stop_token_ids", "deadline_ms", "fail_if_late", "chat_template_kwargs",
                   "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                   "guided_grammar", "service_tier", "priority", "include_stop_str_in_output",
                   "skip_special_tokens", "spaces_between_special_tokens",
                   "allowed_token_ids", "bad_words")
"""Fields a Responses body may carry as the chat's extensions (vLLM's extra sampling
fields and Fairway's deadlines), checked as the chat checks them."""
_KEPT_ELSEWHERE = {
    "prompt": "A stored prompt template",
}
_TEXT_PART_TYPES = ("input_text", "output_text", "text")


class ResponsesBody(StrictBody):
    """POST /v1/responses."""

    model: Text
    input: NonEmptyText | list[Any]
    """The prompt as a string (a user message), or the conversation's items."""
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    include: list[Text] | None = None
    stream: bool | None = False
    tools: list[Any] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: Any = None
    reasoning: Any = None
    metadata: dict[Text, Text] | None = None
    user: Text | None = None
    store: bool | None = None
    """Accepted; this server keeps no responses (answered ``store: false``)."""
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1, le=INT64_MAX)
    """Bounds calls to built-in tools, of which this server has none."""
    service_tier: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    # The chat's extensions (see _PASSED_THROUGH), checked by the chat body.
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    min_tokens: Any = None
    ignore_eos: Any = None
    stop_token_ids: Any = None
    deadline_ms: Any = None
    fail_if_late: Any = None
    chat_template_kwargs: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    priority: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None


def _not_stored(param: str, what: str) -> ApiError:
    return invalid(f"{what} ({param}) is not supported: this server keeps no such thing; "
                   "send the whole conversation in input.", param=param, code="unsupported")


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id {response_id!r} not found.", reason="not_found",
                    param="response_id", code="not_found")


# --- reading a request -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A Responses request, read: the chat it runs as, and what its response repeats."""

    chat: ChatCompletionBody
    echo: dict[str, Any]
    """The request's own settings, as every response object of it repeats them."""
    items: list[dict[str, Any]]
    """The conversation's items up to this request's input: what its answer is stored with."""
    inputs: int = 0
    """How many of ``items`` are this request's own input (the rest came before it)."""


def read_request(body: ResponsesBody, earlier: list[dict[str, Any]] | None = None,
                 store: bool = False, conversation: str | None = None,
                 background: bool = False) -> ResponsesRequest:
    """The chat a Responses body means (400 for what this server does not serve);
    ``earlier``: the items of the conversation it continues (its ``previous_response_id``'s
    or its ``conversation``'s); ``store``: its answer will be stored; ``background``: it
    may be run in the background (not a batch's request)."""
    _check_unserved(body)
    if body.background:
        _check_background(body, store, background)
    if body.previous_response_id is not None and earlier is None:
        raise _not_stored("previous_response_id", "Continuing a stored response")
    own = input_items(body.input)
    items = [*(earlier or []), *own]
    wants_logprobs = LOGPROBS_INCLUDE in (body.include or [])
    data: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body.instructions, items, len(earlier or [])),
        "stream": body.stream,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "logprobs": wants_logprobs,
        "top_logprobs": body.top_logprobs if wants_logprobs else None,
        "user": body.user,
        **{name: getattr(body, name) for name in _PASSED_THROUGH if getattr(body, name) is not None},
    }
    if body.tools:
        data["tools"] = [_chat_tool(tool, f"tools.{i}") for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        data["tool_choice"] = _chat_tool_choice(body.tool_choice)
    if body.parallel_tool_calls is not None:
        data["parallel_tool_calls"] = body.parallel_tool_calls
    response_format = _response_format(body.text)
    if response_format is not None:
        data["response_format"] = response_format
    effort = _reasoning_effort(body.reasoning)
    if effort is not None:
        data["reasoning_effort"] = effort
    try:
        chat = ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        raise responses_error(from_validation_error(exc)) from None
    echo = _echo(body, store)
    if conversation is not None:
        echo["conversation"] = {"id": conversation}
    return ResponsesRequest(chat, echo, items, len(own))


def input_tokens_chat(body: ResponsesBody, earlier: list[dict[str, Any]] | None = None) -> ChatCompletionBody:
    """The chat whose prompt a response of this body would read, to count its tokens
    (OpenAI's ``/v1/responses/input_tokens``): the same chat as :func:`read_request`
    gives, less what only generating reads (how long, streamed, in the background)."""
    counted = body.model_copy(update={"background": None, "stream": None, "store": False,
                                      "max_output_tokens": None})
    chat = read_request(counted, earlier).chat
    return chat.model_copy(update={"max_completion_tokens": None, "max_tokens": 1})


def responses_error(err: ApiError) -> ApiError:
    """An error of the chat's checks, naming the Responses fields it comes from."""
    given = err.param or ""
    head, _, rest = given.partition(".")
    if head in PARAM_NAMES:
        name = PARAM_NAMES[head]
        err.param = name if head == "messages" else ".".join(filter(None, (name, rest)))
        if err.message.startswith(f"{given}:"):  # a field's validation error
            err.message = err.param + err.message.removeprefix(given)
    for chat_name in ("max_completion_tokens", "response_format"):
        err.message = err.message.replace(chat_name, PARAM_NAMES[chat_name])
    return err


def _check_unserved(body: ResponsesBody) -> None:
    for param, what in _KEPT_ELSEWHERE.items():
        if getattr(body, param) is not None:
            raise _not_stored(param, what)
    if body.truncation == "auto":
        raise unsupported("truncation", 'truncation "auto" (dropping the conversation\'s first '
                           "items to fit the context)")
    check_metadata(body.metadata)


def _check_background(body: ResponsesBody, store: bool, allowed: bool) -> None:
    if not allowed:
        raise unsupported("background", "A background response in a batch (a batch's requests are "
                                        "answered in its output file)")
    if body.store is False:
        raise invalid("A background response is stored to be read later: background needs store "
                      "(true, the default).", param="background")
    if not store:
        raise invalid("This server stores no responses (its responses_ttl_s is 0), so it runs none "
                      "in the background.", param="background", code="unsupported")


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds on ``metadata``: 16 keys of 64 characters, values of 512."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise invalid(f"metadata may hold at most {MAX_METADATA_KEYS} keys.", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise invalid(f"metadata keys may have at most {MAX_METADATA_KEY_CHARS} characters "
                          f"and values {MAX_METADATA_VALUE_CHARS}.", param="metadata")


def _field(item: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise invalid(f"{where}.{key} must be a string.", param=f"{where}.{key}")
    return value


def _text_of(content: Any, where: str) -> str:
    """The text of a message's or output's content: a string, or text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts.", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            texts.append(_field(part, "refusal", f"{where}.{i}"))
        elif kind in _TEXT_PART_TYPES:
            texts.append(_field(part, "text", f"{where}.{i}"))
        elif isinstance(kind, str):
            raise unsupported(f"{where}.{i}.type", f"Content of type {kind!r} (only text is)")
        else:
            raise invalid(f"{where}.{i} must be a content part with a type.", param=f"{where}.{i}")
    return "".join(texts)


def check_items(items: list[Any], name: str) -> None:
    """400 for a list that is not input items this server can run (errors name ``name``)."""
    _messages(None, items, name=name)


def input_items(value: str | list[Any]) -> list[Any]:
    """The input as items (a string is one user message)."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


def _messages(instructions: str | None, items: list[Any], first: int = 0,
              name: str = "input") -> list[dict[str, Any]]:
    """The chat messages of the instructions and the conversation's items (the input's
    from index ``first``, which errors name as ``name``)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        where = f"{name}.{i - first}"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object (an input item).", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"{where}.role must be one of user, assistant, system, developer.",
                              param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where),
                                 "arguments": _field(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # its calls, after its text
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                             "content": _text_of(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier thinking: chat templates leave it out of later turns
        elif kind == "item_reference":
            raise _not_stored(f"{where}.type", "An item reference")
        elif isinstance(kind, str):
            raise unsupported(f"{where}.type", f"An input item of type {kind!r}")
        else:
            raise invalid(f"{where}.type must be a string.", param=f"{where}.type")
    return messages


def _chat_tool(tool: Any, where: str) -> dict[str, Any]:
    """A Responses function tool (flat) as the chat's (``function`` nested)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        if isinstance(kind, str):
            raise unsupported(f"{where}.type", f"The built-in tool {kind!r} (only function "
                               "tools are)")
        raise invalid(f"{where} must be a tool object with a type.", param=where)
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(kind, str):
        raise unsupported("tool_choice", f"tool_choice of type {kind!r}")
    raise invalid("tool_choice must be none, auto, required or a function to call.",
                  param="tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as the chat's ``response_format``; None for plain text."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text must be an object.", param="text")
    if text.get("verbosity") not in (None, "medium"):
        raise unsupported("text.verbosity", "A verbosity other than medium")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format json_schema needs schema, a JSON schema object.",
                          param="text.format.schema")
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    if kind == "json_object":
        return {"type": "json_object"}
    if isinstance(kind, str):
        raise unsupported("text.format.type", f"text.format {kind!r}")
    raise invalid("text.format must be an object with a type.", param="text.format")


def _reasoning_effort(reasoning: Any) -> str | None:
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise invalid("reasoning must be an object.", param="reasoning")
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise invalid("reasoning.effort must be a string.", param="reasoning.effort")
    return effort


def _echo(body: ResponsesBody, store: bool) -> dict[str, Any]:
    """The request's settings as a response object repeats them (OpenAI's defaults where
    the request gave none)."""
    text = body.text if isinstance(body.text, dict) and body.text.get("format") else {
        "format": {"type": "text"}}
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": _reasoning_effort(body.reasoning), "summary": None},
        "service_tier": "flex" if body.service_tier == "flex" else "default",
        "store": store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": text,
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "user": body.user,
        "background": bool(body.background),
    }


# --- writing the answer ------------------------------------------------------------------


def listed_item(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as ``input_items`` lists it: a message's string content as one text
    part (``input_text``; ``output_text`` in an assistant's message)."""
    if item.get("type", "message") != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": kind, "text": content}]
    return {"id": item.get("id"), "type": "message", "role": item.get("role"), "content": content,
            **({"status": item["status"]} if "status" in item else {})}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(meta: ResponseMeta, echo: dict[str, Any], status: str, *,
                    output: list[dict[str, Any]] | None = None,
                    final: FinalAnswer | None = None,
                    error: ApiError | None = None) -> dict[str, Any]:
    """A ``response`` object: ``in_progress`` (no output yet), ``completed``,
    ``incomplete`` (cut by ``max_output_tokens``) or ``failed`` (with ``error``)."""
    usage = None
    if final is not None:
        usage = {"input_tokens": final.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": final.cached_tokens},
                 "output_tokens": final.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": final.prompt_tokens + final.completion_tokens}
    return {
        "id": meta.request_id,
        "object": "response",
        "created_at": meta.created,
        "model": meta.model,
        "status": status,
        "error": None if error is None else {"code": error.code or error.type,
                                             "message": error.message},
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "output": output or [],
        "usage": usage,
        **echo,
    }


def _status(final: FinalAnswer) -> str:
    return "incomplete" if final.finish_reason == "length" else "completed"


def _logprobs(meta: ResponseMeta, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return chat_logprobs(entries, meta.tokens_as_ids)["content"] if meta.logprobs else []


def _reasoning_item(text: str, status: str) -> dict[str, Any]:
    return {"id": _id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": None, "status": status}


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _message_item(content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": _id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": content}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": _id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def answered_response(meta: ResponseMeta, echo: dict[str, Any],
                      answer: ChoiceAnswer) -> dict[str, Any]:
    """The response object of a finished answer: its thinking, text and calls as output
    items, as the chat's parsers read them."""
    message, _ = chat_message(meta, answer)
    status = _status(answer.final)
    output = []
    thinking, content, calls = (message.get("reasoning_content"), message["content"],
                                message.get("tool_calls") or [])
    if thinking is not None:
        output.append(_reasoning_item(thinking, status if not content and not calls else "completed"))
    if content or (not calls and thinking is None):
        output.append(_message_item([_text_part(content or "", _logprobs(meta, answer.logprobs))],
                                    status))
    output += [_call_item(call["id"], call["function"]["name"], call["function"]["arguments"],
                          "completed") for call in calls]
    return response_object(meta, echo, status, output=output, final=answer.final)


@dataclass(slots=True)
class _OpenItem:
    """The output item being streamed."""

    index: int
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class ResponseEvents:
    """A response's stream of semantic events, written from the chat answer's deltas:
    an item opens when the answer turns to it (thinking, text, a call) and closes when
    it turns to another or ends. Each event is one SSE ``event:``/``data:`` pair."""

    def __init__(self, meta: ResponseMeta, echo: dict[str, Any], first_sequence: int | None = None) -> None:
        """``first_sequence``: a background response's run, whose ``response.created``
        went out when it was queued: its events begin at ``response.in_progress``,
        numbered from there on."""
        self.meta, self.echo = meta, echo
        self.created = first_sequence is None
        self.sequence = first_sequence or 0
        self.output: list[dict[str, Any]] = []
        self.open: _OpenItem | None = None
        self.response: dict[str, Any] = {}
        """The finished response, once :meth:`finish` wrote it."""
        self.held_logprobs: list[dict[str, Any]] = []
        """Log-probabilities of tokens whose text is not the message's (thinking, calls,
        a held-back stop string): they go with the next text, as the whole answer's do."""

    def event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, event=kind)

    def start(self) -> list[bytes]:
        created = response_object(self.meta, self.echo, "in_progress")
        return [*([self.event("response.created", response=created)] if self.created else []),
                self.event("response.in_progress", response=created)]

    def add(self, delta: Delta) -> list[bytes]:
        """The events of more of the answer."""
        events: list[bytes] = []
        self.held_logprobs += _logprobs(self.meta, delta.logprobs)
        if delta.reasoning:
            events += self._turn_to("reasoning")
            assert self.open is not None
            self.open.text.append(delta.reasoning)
            events.append(self.event("response.reasoning_text.delta", **self._where(),
                                     content_index=0, delta=delta.reasoning))
        if delta.text:
            events += self._turn_to("message")
            assert self.open is not None
            logprobs, self.held_logprobs = self.held_logprobs, []
            self.open.text.append(delta.text)
            self.open.logprobs += logprobs
            events.append(self.event("response.output_text.delta", **self._where(),
                                     content_index=0, delta=delta.text, logprobs=logprobs))
        for call in delta.calls:
            function = call.get("function", {})
            if "id" in call:  # a call's first piece
                events += self._close("completed")
                events += self._open(_call_item(call["id"], function["name"], "", "in_progress"))
            if function.get("arguments") and self.open is not None:
                self.open.text.append(function["arguments"])
                events.append(self.event("response.function_call_arguments.delta",
                                         **self._where(), delta=function["arguments"]))
        return events

    def finish(self, final: FinalAnswer) -> list[bytes]:
        """The events that end a finished answer: its last item closed, then the whole
        response (``response.completed``, or ``response.incomplete`` when cut)."""
        status = _status(final)
        if self.open is None and not self.output:
            events = self._turn_to("message")  # an empty answer is an empty message
        else:
            events = []
        if self.held_logprobs and self.open is not None and self.open.item["type"] == "message":
            self.open.logprobs += self.held_logprobs
        events += self._close(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        self.response = response_object(self.meta, self.echo, status, output=self.output, final=final)
        return [*events, self.event(kind, response=self.response)]

    def fail(self, error: ApiError) -> list[bytes]:
        """The event that ends a response an error stopped."""
        response = response_object(self.meta, self.echo, "failed", output=self.output, error=error)
        return [self.event("response.failed", response=response)]

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open.item["id"], "output_index": self.open.index}

    def _turn_to(self, kind: Literal["reasoning", "message"]) -> list[bytes]:
        if self.open is not None and self.open.item["type"] == kind:
            return []
        events = self._close("completed")
        if kind == "reasoning":
            item = _reasoning_item("", "in_progress")
            item["content"] = []
            events += self._open(item)
        else:
            events += self._open(_message_item([], "in_progress"))
            events.append(self.event("response.content_part.added", **self._where(),
                                     content_index=0, part=_text_part("", [])))
        return events

    def _open(self, item: dict[str, Any]) -> list[bytes]:
        self.open = _OpenItem(len(self.output), item)
        return [self.event("response.output_item.added", output_index=self.open.index, item=item)]

    def _close(self, status: str) -> list[bytes]:
        if self.open is None:
            return []
        opened, self.open = self.open, None
        text, where = "".join(opened.text), {"item_id": opened.item["id"],
                                             "output_index": opened.index}
        item = dict(opened.item, status=status)
        events = []
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
            events.append(self.event("response.reasoning_text.done", **where, content_index=0,
                                     text=text))
        elif item["type"] == "message":
            part = _text_part(text, opened.logprobs)
            item["content"] = [part]
            events.append(self.event("response.output_text.done", **where, content_index=0,
                                     text=text, logprobs=opened.logprobs))
            events.append(self.event("response.content_part.done", **where, content_index=0,
                                     part=part))
        else:
            item["arguments"] = text
            events.append(self.event("response.function_call_arguments.done", **where,
                                     name=item["name"], arguments=text))
        self.output.append(item)
        return [*events, self.event("response.output_item.done", output_index=opened.index,
                                    item=item)]


def queued_events(meta: ResponseMeta, echo: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """A background response as queued, and (streamed) its first events:
    ``response.created`` and ``response.queued``."""
    writer = ResponseEvents(meta, echo)
    queued = response_object(meta, echo, "queued")
    return queued, [writer.event("response.created", response=queued),
                    writer.event("response.queued", response=queued)]


async def response_events(meta: ResponseMeta, echo: dict[str, Any], stream: ChoiceStream,
                          first: tuple[int, Reply], *, deadline: float, timeout_s: float,
                          on_done: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                          first_sequence: int | None = None) -> AsyncIterator[bytes]:
    """SSE bytes of a response whose first reply was already read (as
    :func:`services.gateway.responses.sse_events`, whose pacing it shares): events whose
    replies were already waiting go out in one write. ``on_done`` gets the finished
    response before its last event goes out (to store it: a client that goes on from it
    at once finds it); ``first_sequence``: see :class:`ResponseEvents`."""
    writer = ResponseEvents(meta, echo, first_sequence)
    answer = ChatAnswerStream(meta)
    events = writer.start()
    async with contextlib.aclosing(replies_in_time(stream, first, deadline)) as replies:
        async for read in replies:
            if read is None:
                events += writer.fail(timed_out(timeout_s))
                break
            _, reply = read
            if isinstance(reply, FinalAnswer):
                error = answer_error(reply)
                if error is not None:
                    events += writer.fail(error)
                    break
                _, last = answer.finish(reply)
                events += writer.add(last) + writer.finish(reply)
                if on_done is not None:
                    await on_done(writer.response)
                break
            events += writer.add(answer.add(reply.text, reply.logprobs))
            if events and not stream.waiting:
                yield b"".join(events)
                events.clear()
    yield b"".join(events)


# --- keeping answers -----------------------------------------------------------------------


MAX_STORED_BYTES = 8 * 2**20
"""A stored response (its whole conversation) larger than this is not kept."""
STORE_TIMEOUT_S = 2.0
"""How long storing an answer may hold it back (a slow Redis): then it goes out unstored."""
READ_TIMEOUT_S = 5.0


class ResponseStore:
    """Answers kept in Redis for ``previous_response_id`` and ``GET``/``DELETE
    /v1/responses/{id}``, each readable by its own tenant only (another's reads as not
    found), expiring ``ttl_s`` after they were stored."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    async def stored(self, response_id: str, tenant: str) -> dict[str, Any]:
        """A stored response's record: its ``tenant``, its conversation's ``items`` (the
        last ``inputs`` of them its own input) and the ``response``; 404 for another
        tenant's."""
        if not isinstance(response_id, str) or not response_id:
            raise invalid("previous_response_id must be a response's id.", param="previous_response_id")
        async with redis_or_503("Stored responses cannot be read now; retry later.", READ_TIMEOUT_S):
            raw = await self.redis.get(keys.stored_response(response_id))
        record = json.loads(raw) if raw is not None else None
        if record is None or record.get("tenant") != tenant:
            raise not_found(response_id)
        return record

    async def conversation(self, response_id: str, tenant: str) -> list[dict[str, Any]]:
        """The items of a stored response's conversation, its output last; a background
        response that has not ended, or did not answer, cannot be gone on from (400)."""
        record = await self.stored(response_id, tenant)
        status = record["response"]["status"]
        if status not in ("completed", "incomplete"):
            raise invalid(f"Response {response_id!r} is {status}: only a response that answered "
                          "can be gone on from.", param="previous_response_id")
        return [*record["items"], *record["response"]["output"]]

    async def get(self, response_id: str, tenant: str) -> dict[str, Any]:
        return (await self.stored(response_id, tenant))["response"]

    async def delete(self, response_id: str, tenant: str) -> None:
        """Forget a stored response; one running in the background is stopped (its answer
        is never stored)."""
        await self.stored(response_id, tenant)
        async with redis_or_503("Stored responses cannot be changed now; retry later.", READ_TIMEOUT_S), self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.stored_response(response_id), keys.background_response(response_id),
                        keys.background_response_events(response_id))
            pipe.zrem(keys.BACKGROUND_RESPONSES_ACTIVE, response_id)
            pipe.zrem(keys.tenant_background_responses(tenant), response_id)
            pipe.hdel(keys.BACKGROUND_RESPONSES_TENANT, response_id)
            await pipe.execute()

    async def input_items(self, response_id: str, tenant: str) -> list[dict[str, Any]]:
        """A stored response's own input, as OpenAI lists it: items with ids, a message's
        text as content parts."""
        record = await self.stored(response_id, tenant)
        own = record["items"][len(record["items"]) - record.get("inputs", len(record["items"])):]
        return [listed_item(item) for item in own]

    def record(self, tenant: str, items: list[dict[str, Any]], response: dict[str, Any],
               inputs: int = 0) -> bytes | None:
        """A response's stored form, with its conversation's ``items``, the last ``inputs``
        of them its own input (named by ids of their own where they have none, as its
        output items are); None (logged) when it is too large to keep."""
        first = len(items) - inputs
        items = [*items[:first], *({"id": _id("msg") if item.get("type", "message") == "message"
                                    else _id("item"), **item} for item in items[first:])]
        data = json.dumps({"tenant": tenant, "items": items, "inputs": inputs, "response": response},
                          ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > MAX_STORED_BYTES:
            log.warning("response_not_stored", response_id=response["id"], bytes=len(data))
            return None
        return data

    async def keep(self, tenant: str, items: list[dict[str, Any]], response: dict[str, Any],
                   inputs: int = 0) -> None:
        """Store a finished response (one that failed is not: there is nothing to go on
        from); a Redis error is logged, the answer goes out all the same."""
        if not response.get("store") or response.get("status") == "failed":
            return
        data = self.record(tenant, items, response, inputs)
        if data is None:
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.redis.set(keys.stored_response(response["id"]), data, ex=self.ttl_s)
        except (RedisError, TimeoutError) as exc:
            log.warning("response_not_stored", response_id=response["id"], error=repr(exc))
