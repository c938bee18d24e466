"""Wire messages: every type that crosses AMQP, typed and versioned in one place.

Each message is a frozen-ish dataclass encoded as a msgpack map with two envelope
fields: ``v`` (schema version) and ``t`` (type tag). Decoding is size-capped and
strict: unknown types, wrong versions, missing or ill-typed fields raise
:class:`MessageError`, which consumers turn into a dead-letter plus an error reply.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import msgpack

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Hard cap on an encoded message; larger payloads are rejected before unpacking."""

_MAX_CONTAINER_LEN = 1_000_000


class MessageError(ValueError):
    """A payload that is not a valid Fairway message (malformed, oversized, unknown)."""


FinishReason = Literal["stop", "length", "cancelled", "error"]
RequestKind = Literal["completion", "chat"]


@dataclass(slots=True)
class TokenBias:
    """One entry of OpenAI's ``logit_bias``: added to the token's logit before sampling."""

    token_id: int
    bias: float


@dataclass(slots=True)
class TemplateArg:
    """One entry of vLLM's ``chat_template_kwargs``: a variable the model's chat template
    reads (Qwen3's ``enable_thinking``, for one)."""

    name: str
    value: str | int | float | bool | None


MAX_TOOLS = 128
"""Most functions one chat may offer the model (OpenAI's limit)."""

MAX_TEMPLATE_ARGS = 32
"""Most ``chat_template_kwargs`` entries one request may carry."""

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
ReasoningFormat = Literal["", "deepseek_r1", "qwen3"]
"""How a thinking model sets its thinking apart (vLLM's reasoning parsers); "" for none.
``qwen3``: the model may open ``<think>`` itself; ``deepseek_r1``: the chat template
opened it, so the answer starts thinking. Both end it with ``</think>``."""


MAX_STRUCTURED_CHARS = 65536
"""Longest schema, expression or grammar (and all choices together) a request may carry."""
MAX_STRUCTURED_CHOICES = 1024

STRUCTURED_KIND_NAMES: dict[str, str] = {
    "json_object": "JSON",
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "choice": "choice",
    "grammar": "EBNF grammar",
}
"""What each kind of constraint is called in an error message."""


@dataclass(slots=True)
class StructuredOutput:
    """A formal language the answer must belong to (OpenAI's ``response_format``, vLLM's
    structured outputs): any JSON object, JSON matching a schema, a regular expression,
    one of given strings, or an EBNF grammar. The worker masks every token that would
    leave it, and the answer ends where the language allows nothing but its end."""

    kind: StructuredKind
    spec: str = ""
    """The JSON schema (as JSON text), the regular expression or the EBNF grammar."""
    choices: list[str] = field(default_factory=list)
    """The strings a ``choice`` answer is one of."""
    any_whitespace: bool = True
    """JSON may have whitespace wherever JSON allows it; False: none, JSON's compact
    form (vLLM's ``disable_any_whitespace``, for models that would not stop spacing)."""
    after_reasoning: ReasoningFormat = ""
    """The answer may think first, free, in this format; the language holds from the end
    of its thinking (as vLLM's structured outputs with a reasoning parser). "" holds it
    from the first token."""

    def problem(self) -> str | None:
        """Why the constraint is malformed (the wrong fields for its kind, too long), or
        None; whether it parses is the engine's question."""
        what = STRUCTURED_KIND_NAMES[self.kind]
        if self.kind == "choice":
            if self.spec or not self.choices:
                return "a choice constraint lists its strings in choices"
            if len(self.choices) > MAX_STRUCTURED_CHOICES:
                return f"a choice constraint may list at most {MAX_STRUCTURED_CHOICES} strings"
            if sum(map(len, self.choices)) > MAX_STRUCTURED_CHARS:
                return f"the choices may hold at most {MAX_STRUCTURED_CHARS} characters together"
            return None
        if self.choices:
            return f"a {what} constraint has no choices"
        if self.kind == "json_object":
            return "a json_object constraint has no spec" if self.spec else None
        if not self.spec:
            return f"the {what} is empty"
        if len(self.spec) > MAX_STRUCTURED_CHARS:
            return f"the {what} may be at most {MAX_STRUCTURED_CHARS} characters"
        return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""A signed 64-bit integer's bounds: a ``seed``'s and a ``priority``'s, as vLLM's."""

MAX_ALLOWED_TOKEN_IDS = 65536
"""Most ``allowed_token_ids`` one request may name."""

MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 128, 256
"""Most ``bad_words`` one request may name, and the longest."""

MAX_LOGIT_BIAS = 1024
"""Most ``logit_bias`` entries one request may carry."""
MAX_LOGIT_BIAS_VALUE = 100.0
"""OpenAI's bound on a ``logit_bias`` value (either sign)."""
MAX_PENALTY = 2.0
"""OpenAI's bound on ``presence_penalty`` and ``frequency_penalty`` (either sign)."""


MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask log-probabilities of (vLLM's default
``max_logprobs``; OpenAI's chat ``top_logprobs`` limit)."""
MIN_LOGPROB = -9999.0
"""A log-probability below this (or -inf) is sent as this, as vLLM does: JSON has no -inf."""


@dataclass(slots=True)
class TopLogprob:
    """One of the most likely tokens at a position, with its log-probability."""

    token_id: int
    token: str
    logprob: float
    raw: bytes = b""
    """The token's own bytes where its text does not spell them (part of a character)."""

    @property
    def token_bytes(self) -> bytes:
        return self.raw or self.token.encode()


@dataclass(slots=True)
class TokenLogprob:
    """An output token's log-probability under the model's own distribution (before
    temperature, penalties and bias, as vLLM's default ``raw_logprobs``), with the most
    likely tokens at that position, most likely first."""

    token: str
    """The token's own text (special tokens spelled out)."""
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    raw: bytes = b""
    """The token's own bytes where its text does not spell them: a token that holds part
    of a character decodes to U+FFFD, but its bytes joined with the next token's do."""
    token_id: int = -1
    """The token's id in the model's vocabulary (-1 from a worker that predates it)."""
    rank: int = 0
    """Its rank among the position's tokens, 1 the most likely, for a prompt token (what
    vLLM's ``prompt_logprobs`` show); 0: not known (an output token's, and the prompt's
    first, which nothing predicts)."""

    @property
    def token_bytes(self) -> bytes:
        return self.raw or self.token.encode()


@dataclass(slots=True)
class SamplingParams:
    """How to decode one request; mirrors the OpenAI fields plus vLLM's extensions.

    The fields after ``ignore_eos`` are optional in schema v1: a message without them
    decodes to the neutral values (no penalty, no bias, no minimum).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token the output already holds (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output already holds it (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens seen in the prompt or the
    output (vLLM's and transformers' ``repetition_penalty``; 1 is off)."""
    min_p: float = 0.0
    """Drops tokens less likely than ``min_p`` times the most likely one (vLLM)."""
    min_tokens: int = 0
    """Output tokens before EOS, ``stop_token_ids`` or a stop string may end it (vLLM)."""
    logit_bias: list[TokenBias] = field(default_factory=list)
    logprobs: int | None = None
    """Send each output token's log-probability and those of the ``logprobs`` most likely
    tokens at its position (0: the token's own only); None sends none."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (vLLM's ``prompt_logprobs``; OpenAI's ``echo``
    with ``logprobs``), sent once, with the first output."""
    structured: StructuredOutput | None = None
    """The language the answer must belong to; None: free text."""
    include_stop_str_in_output: bool = False
    """An answer that a stop string ends keeps that string (vLLM's field of that name)."""
    allowed_token_ids: list[int] = field(default_factory=list)
    """Only these tokens may be sampled (vLLM's ``allowed_token_ids``); empty: any. Not
    with a structured answer, whose language has its own mask."""
    bad_words: list[str] = field(default_factory=list)
    """Words the answer must not hold (vLLM's ``bad_words``): the engine bans the last
    token of each (as the tokenizer spells the word, with and without a leading space)
    wherever the answer's tokens so far end with the ones before it."""
    skip_special_tokens: bool = True
    """Special tokens the model generates are left out of the text (vLLM's; false spells
    them out, as the tokenizer names them). A stop token never is: it ends the answer."""
    spaces_between_special_tokens: bool = True
    """Spelled-out special tokens are set apart by spaces where the tokenizer's own decode
    does that (vLLM's; a slow tokenizer of transformers 4 does, a fast one never)."""


DEFAULTABLE = ("max_tokens", "temperature", "top_p", "top_k")
"""Sampling fields a request may leave to the server (``CompletionRequest.defaulted``)."""


@dataclass(slots=True)
class ToolCall:
    """A function call an assistant message made (an entry of OpenAI's ``tool_calls``)."""

    id: str
    name: str
    arguments: str
    """The arguments as the JSON text the model wrote."""


@dataclass(slots=True)
class Tool:
    """A function the model may call (an entry of OpenAI's ``tools``), for the chat
    template to show the model."""

    name: str
    description: str = ""
    parameters: str = ""
    """Its arguments' JSON schema as JSON text; empty: none given."""


@dataclass(slots=True)
class ChatMessage:
    """One chat turn. The fields after ``content`` are optional in schema v1: an
    assistant's tool calls, and a ``tool`` message's answer to one of them."""

    role: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""


@dataclass(slots=True)
class LengthScore:
    """The scorer's view of a request: uncertainty and a predicted output-length distribution."""

    uncertainty: float
    p10: float
    p50: float
    p90: float
    predictor: str = "heuristic"
    features: list[float] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class Message:
    """Base class: subclasses set ``TYPE`` and are registered for decoding."""

    TYPE: ClassVar[str] = ""
    request_id: str


@dataclass(slots=True, kw_only=True)
class CompletionRequest(Message):
    """A request as submitted by the gateway or an AMQP producer.

    ``tenant`` is never trusted from a producer: the gateway sets it from the API key,
    and for direct AMQP producers the scorer overwrites it from the broker-validated
    ``user_id`` message property.
    """

    TYPE: ClassVar[str] = "completion_request"
    tenant: str = ""
    model: str
    kind: RequestKind = "completion"
    prompt: str = ""
    messages: list[ChatMessage] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    created: float = 0.0
    deadline: float | None = None
    """Absolute unix time by which the request should finish (extension)."""
    fail_if_late: bool = False
    """Answer with an error instead of running once the deadline cannot be met."""
    background: bool = False
    """Run only from capacity no other request waits for (a batch's request): the
    scheduler takes it after every request that is not background, of any tenant."""
    priority: int = 0
    """vLLM's ``priority``: lower runs first, among its tenant's own requests only (in
    ``[INT64_MIN, INT64_MAX]``)."""
    reply_to: str = ""
    prompt_token_ids: list[int] | None = None
    """A completion's prompt as the model's token ids (OpenAI's and vLLM's token-id
    prompts), used as they are; the scorer checks them and puts their text in ``prompt``."""
    add_special_tokens: bool | None = None
    """Add the tokenizer's special tokens (BOS) to the prompt, as vLLM's extension field
    of that name; None: the endpoint's default (a completion yes; a chat no, its template
    has them)."""
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last this many tokens (vLLM's extension; -1: the model's
    context length), so a long conversation still fits."""
    add_generation_prompt: bool = True
    """A chat's template opens the assistant's turn (vLLM's extension)."""
    continue_final_message: bool = False
    """A chat's last (assistant) message is continued rather than closed (vLLM's)."""
    chat_template_kwargs: list[TemplateArg] = field(default_factory=list)
    """Variables for the chat template (vLLM's ``chat_template_kwargs``)."""
    tools: list[Tool] = field(default_factory=list)
    """The functions a chat offers the model, which its chat template shows it."""
    echo: bool = False
    """The caller wants the prompt back as text (a completion's ``echo``): for a token-id
    prompt, which only the model's tokenizer can spell, the worker sends that text with
    the answer's first tokens (``echoed_prompt``)."""
    defaulted: list[str] = field(default_factory=list)
    """The :class:`SamplingParams` fields the client did not set (of ``DEFAULTABLE``), as
    vLLM treats them: the scorer takes ``temperature``, ``top_p`` and ``top_k`` from the
    model's ``generation_config.json``, and lowers a default ``max_tokens`` to what the
    context leaves after the prompt instead of refusing the request."""
    return_token_ids: bool = False
    """The caller wants the answer's token ids and its prompt's (vLLM's ``return_token_ids``):
    the worker sends the prompt's ids, as the model saw them, with the first tokens."""
    tokenize_only: bool = False
    """Generate nothing: the scorer answers with the prompt's token ids as the model sees
    them (a chat's as its template renders it) and their text (vLLM's ``/tokenize`` and
    ``/detokenize``), and the request goes no further."""

    def prompt_to_echo(self) -> str | None:
        """What a worker sends back as ``echoed_prompt``: a token-id prompt's text (the
        scorer's decoding), when the caller asked for it; a text prompt's caller has it."""
        return self.prompt if self.echo and self.prompt_token_ids is not None else None

    def prompt_text(self) -> str:
        """The text a length predictor sees: the prompt, or the chat's user turns."""
        if self.kind == "chat":
            return "\n".join(msg.content for msg in self.messages if msg.role == "user")
        return self.prompt


@dataclass(slots=True, kw_only=True)
class ScoredRequest(Message):
    """A request after the scorer: tokenized and with a length prediction."""

    TYPE: ClassVar[str] = "scored_request"
    request: CompletionRequest
    prompt_token_ids: list[int]
    score: LengthScore
    adapter: str | None = None
    """The tenant LoRA adapter ``request.model`` selects, checked by the scorer; None: base."""

    def prompt_ids_to_return(self) -> list[int] | None:
        """What a worker sends as ``prompt_token_ids`` with the answer's first tokens."""
        return self.prompt_token_ids if self.request.return_token_ids else None


@dataclass(slots=True, kw_only=True)
class WorkItem(Message):
    """A scheduled request, sent to a worker pool."""

    TYPE: ClassVar[str] = "work_item"
    scored: ScoredRequest
    pool: str
    dispatched_at: float
    attempt: int = 1


@dataclass(slots=True, kw_only=True)
class TokenChunk(Message):
    """Streamed output, placed by where it starts in the answer, so a receiver keeps
    exactly one copy of every token and character even when a second worker regenerates
    part of the answer and cuts it into other chunks, and sees a gap until it is filled."""

    TYPE: ClassVar[str] = "token_chunk"
    token_offset: int
    """Output tokens before this chunk's ``token_ids``."""
    text_offset: int
    """Characters of output text before this chunk's ``text``."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token of ``token_ids`` when the request asked for them, else empty."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per prompt token, on the answer's first chunk, when the request asked for
    them. Nothing predicts the first: its entry has only its text (logprob 0, no top)."""
    echoed_prompt: str | None = None
    """The text of a token-id prompt that asked to be echoed, on the answer's first chunk."""
    prompt_token_ids: list[int] | None = None
    """The prompt's token ids as the model saw them (its chat template applied), on the
    answer's first chunk, when the request asked (``return_token_ids``)."""
    prompt_tokens: int = 0
    """How many tokens the prompt is as the model saw it, on the answer's first chunk (0
    on the others): what a stream's running usage counts before the final answer."""


@dataclass(slots=True)
class ErrorInfo:
    """An OpenAI-style error body carried on AMQP."""

    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    status: int = 400


@dataclass(slots=True)
class Tokenized:
    """A prompt as the model sees it, for a tokenize-only request: its token ids, their
    names in the vocabulary, and (for a token-id prompt) the text they decode to."""

    token_ids: list[int]
    token_strs: list[str] = field(default_factory=list)
    text: str = ""


@dataclass(slots=True, kw_only=True)
class FinalAnswer(Message):
    """The one terminal answer of a request: done (stop/length), error or cancelled."""

    TYPE: ClassVar[str] = "final_answer"
    token_offset: int
    """Output tokens streamed before it: a done answer is delivered after all of them."""
    text_offset: int
    """Characters of output text streamed before it."""
    text: str = ""
    """The answer's last text, when it ends a done answer (one message fewer than a
    chunk of its own); delivered before the end, like a chunk at these offsets."""
    token_ids: list[int] = field(default_factory=list)
    """The answer's last tokens, as ``text``."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Those tokens' log-probabilities, when the request asked for them."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """As ``TokenChunk.prompt_logprobs``, when these are the answer's first tokens."""
    echoed_prompt: str | None = None
    """As ``TokenChunk.echoed_prompt``, when these are the answer's first tokens."""
    prompt_token_ids: list[int] | None = None
    """As ``TokenChunk.prompt_token_ids``, when these are the answer's first tokens."""
    finish_reason: FinishReason
    stop_reason: str | int | None = None
    """What ended a ``stop`` answer, as vLLM says it: the stop string matched or the
    stop token named in the request; None for the model's own end."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of the prompt tokens, those the worker found in its prefix cache."""
    tokenized: Tokenized | None = None
    """A tokenize-only request's answer: its prompt's tokens."""
    error: ErrorInfo | None = None


@dataclass(slots=True, kw_only=True)
class CancelRequest(Message):
    """Stop a request wherever it is (queued or running); only the owning tenant's counts."""

    TYPE: ClassVar[str] = "cancel_request"
    tenant: str
    reason: str = "client_disconnected"


@dataclass(slots=True, kw_only=True)
class PreemptRequest(Message):
    """Scheduler to every worker: hand a running background request back to the scheduler's
    queue (its caller keeps what it has), so that waiting foreground requests get its slot."""

    TYPE: ClassVar[str] = "preempt_request"


@dataclass(slots=True, kw_only=True)
class RequestProgress(Message):
    """Worker event: ``new_tokens`` generated since the last report (charged by VTC)."""

    TYPE: ClassVar[str] = "request_progress"
    tenant: str
    worker_id: str
    new_tokens: int
    total_tokens: int


@dataclass(slots=True, kw_only=True)
class RequestFinished(Message):
    """Worker event: a request reached its terminal answer; carries the real output length."""

    TYPE: ClassVar[str] = "request_finished"
    tenant: str
    worker_id: str
    model: str
    pool: str
    finish_reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    score: LengthScore
    prompt: str = ""
    """The prompt text (truncated), so the scorer can learn from the real length."""
    requeue: bool = False
    """True when the worker handed the request back to the scheduler's queue (a background
    request preempted for foreground work): not an answer. ``output_tokens`` is then what
    its run generated, charged once; the next run continues from its resume point."""
    cached_tokens: int = 0
    """Prompt tokens the run read from the worker's prefix cache: a completed request's
    are re-priced from ``w_in`` to ``w_cached`` by VTC."""


@dataclass(slots=True)
class SpeedReport:
    """Measured engine speed, for placement and for the simulator's latency model."""

    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_step_ms: float = 0.0


@dataclass(slots=True, kw_only=True)
class WorkerHeartbeat(Message):
    """Worker event: alive, with free capacity and measured speed. ``request_id`` is unused."""

    TYPE: ClassVar[str] = "worker_heartbeat"
    request_id: str = ""
    worker_id: str
    pool: str
    model: str
    max_running: int
    running: int
    waiting: int
    free_kv_tokens: int
    total_kv_tokens: int
    speed: SpeedReport = field(default_factory=SpeedReport)
    sent_at: float = 0.0
    running_ids: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    """LoRA adapters resident in the worker's device pool (scheduler affinity)."""
    draining: bool = False
    """Stopping (SIGTERM): it takes no new work and finishes or hands back what it runs."""
    prefix_cache_queries: int = 0
    """Prompt tokens its engine looked up in its prefix cache since it started."""
    prefix_cache_hits: int = 0
    """Of those, tokens it found cached."""

    @property
    def offered_slots(self) -> int:
        """Request slots it offers: a draining worker offers only those it still fills."""
        return self.running if self.draining else self.max_running

    @property
    def offered_kv_tokens(self) -> int:
        """KV tokens it offers: a draining worker offers only those it still holds."""
        return self.total_kv_tokens - self.free_kv_tokens if self.draining else self.total_kv_tokens


@dataclass(slots=True, kw_only=True)
class ResumePoint(Message):
    """Kept in Redis by a worker that hands a running request back (draining for a
    deploy, or every so often while it runs): what its caller already has, so the next
    worker continues the answer instead of regenerating it."""

    TYPE: ClassVar[str] = "resume_point"
    worker_id: str
    output_token_ids: list[int]
    """Every output token the caller was sent, in order."""
    streamed_chars: int
    """Characters of text the caller was sent."""
    streamed_text: str = ""
    """That text, which the next worker sends again with the tokens before it continues:
    a caller that missed some of it (dropped with its reply queue's content in a broker
    restart) gets it back, one that has it drops it. Empty in points written before it was
    kept, whose callers are not sent it again."""
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    """The log-probabilities sent with those tokens, when the request asked for them."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """The prompt's, sent with the first of them, when the request asked for them."""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        CompletionRequest,
        ScoredRequest,
        WorkItem,
        TokenChunk,
        FinalAnswer,
        CancelRequest,
        PreemptRequest,
        RequestProgress,
        RequestFinished,
        WorkerHeartbeat,
        ResumePoint,
    )
}

M = TypeVar("M", bound=Message)


def encodes_as_utf8(text: str) -> bool:
    """False for text with unpaired UTF-16 surrogates: they survive ``json.loads`` but
    not msgpack encoding or logs, so inputs are checked for them at the edge."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain_fields(type(obj))(obj)
    if isinstance(obj, list | tuple):
        return [_to_plain(x) for x in obj]
    return obj


_PLAIN: dict[type, Callable[[Any], dict[str, Any]]] = {}


def _holds_dataclass(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or any(_holds_dataclass(a) for a in typing.get_args(tp))


def _plain_fields(cls: type) -> Callable[[Any], dict[str, Any]]:
    """Per class, once: fields whose type can hold a dataclass are converted, the rest
    (strings, numbers, lists of them) go to msgpack as they are."""
    if cls not in _PLAIN:
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        nested = {n for n in names if _holds_dataclass(hints[n])}

        def plain(obj: Any) -> dict[str, Any]:
            out = {n: getattr(obj, n) for n in names}
            for n in nested:
                out[n] = _to_plain(out[n])
            return out

        _PLAIN[cls] = plain
    return _PLAIN[cls]


def to_dict(msg: Message) -> dict[str, Any]:
    """Plain dict with the envelope fields, as it goes on the wire."""
    body = _to_plain(msg)
    body["v"] = SCHEMA_VERSION
    body["t"] = msg.TYPE
    return body


def encode(msg: Message) -> bytes:
    data = msgpack.packb(to_dict(msg), use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_FAST_LISTS: dict[Any, Callable[[list], bool]] = {
    list[int]: lambda v: all(type(x) is int for x in v),
    list[str]: lambda v: all(type(x) is str for x in v),
    list[float]: lambda v: all(type(x) is float and not math.isnan(x) for x in v),
}
"""Whole-list checks for the long lists (token ids, features): one pass, no per-item
path string; a list that fails is checked item by item for the exact error."""


_EXACT: dict[Any, type] = {str: str, int: int, bool: bool, bytes: bytes}
_NO_TYPE = type("_NoType", (), {})
_SHAPES: dict[Any, tuple[Any, tuple[Any, ...]]] = {}


def _check(value: Any, tp: Any, where: str) -> Any:
    """Validate and convert a decoded value against a type annotation."""
    if type(value) is _EXACT.get(tp, _NO_TYPE):  # str, int, bool, bytes as they are
        return value
    fast = _FAST_LISTS.get(tp)
    if fast is not None and type(value) is list and len(value) <= _MAX_CONTAINER_LEN and fast(value):
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected a map")
        return _build(tp, value, where)
    if tp not in _SHAPES:
        _SHAPES[tp] = (typing.get_origin(tp), typing.get_args(tp))
    origin, args = _SHAPES[tp]
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            try:
                return _check(value, arm, where)
            except MessageError as exc:
                errors.append(str(exc))
        raise MessageError(f"{where}: {errors[-1] if errors else 'no matching type'}")
    if tp is type(None):
        if value is not None:
            raise MessageError(f"{where}: expected null")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise MessageError(f"{where}: {value!r} not one of {typing.get_args(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list) or len(value) > _MAX_CONTAINER_LEN:
            raise MessageError(f"{where}: expected a list")
        (item_tp,) = typing.get_args(tp)
        return [_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MessageError(f"{where}: expected a number")
        value = float(value)
        if math.isnan(value):
            raise MessageError(f"{where}: NaN is not allowed")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MessageError(f"{where}: expected a boolean")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MessageError(f"{where}: expected a string")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise MessageError(f"{where}: expected binary data")
        return value
    raise MessageError(f"{where}: unsupported type {tp!r}")


_FIELDS: dict[type, list[tuple[str, Any, bool]]] = {}


def _fields(cls: type) -> list[tuple[str, Any, bool]]:
    """(name, type, required) of a dataclass's fields, computed once per class."""
    if cls not in _FIELDS:
        hints = _hints(cls)
        _FIELDS[cls] = [
            (f.name, hints[f.name],
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        ]
    return _FIELDS[cls]


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    kwargs: dict[str, Any] = {}
    for name, tp, required in _fields(cls):
        if name in data:
            kwargs[name] = _check(data[name], tp, f"{where}.{name}")
        elif required:
            raise MessageError(f"{where}: missing field {name!r}")
    return cls(**kwargs)


def decode(data: bytes, expected: type[M] | None = None) -> M:
    """Decode and validate one message; raises :class:`MessageError` on anything wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE_BYTES,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=_MAX_CONTAINER_LEN,
            max_map_len=_MAX_CONTAINER_LEN,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise MessageError(f"not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError("message is not a map")
    if body.get("v") != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version {body.get('v')!r}")
    cls = MESSAGE_TYPES.get(body.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise MessageError(f"unknown message type {body.get('t')!r}")
    if expected is not None and not issubclass(cls, expected):
        raise MessageError(f"expected {expected.TYPE}, got {cls.TYPE}")
    try:
        return _build(cls, body, cls.TYPE)  # type: ignore[return-value]
    except TypeError as exc:
        raise MessageError(str(exc)) from None


def _peek(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data[:MAX_MESSAGE_BYTES], raw=False)
    except Exception:  # noqa: BLE001 - best effort: an undecodable payload peeks as None
        return None


def peek_reply_to(data: bytes) -> str | None:
    """Best-effort reply queue of a request inside a payload that failed to decode."""
    body = _peek(data)
    for path in (("reply_to",), ("request", "reply_to"), ("scored", "request", "reply_to")):
        value: Any = body
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value[:255]
    return None


def peek_request_id(data: bytes) -> str | None:
    """Best-effort request id from a payload that failed to decode, for error replies."""
    body = _peek(data)
    if isinstance(body, dict) and isinstance(body.get("request_id"), str):
        return body["request_id"][:200]
    return None
