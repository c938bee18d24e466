"""Request bodies of the OpenAI-compatible API and their mapping to a CompletionRequest.

The pydantic models give the OpenAPI spec and strict type checks (no string-to-number
coercion, no NaN/Inf); the functions below add the checks that need settings and build
the wire message. Everything here is pure and raises :class:`ApiError` for the client.

Extensions accepted in the body (like vLLM's extra fields): ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``deadline_ms`` (relative deadline; also the ``X-Fairway-Deadline-Ms`` header, the
smaller wins), ``fail_if_late``, and vLLM's ``priority`` (lower runs first among the
tenant's own requests), ``prompt_logprobs``, ``return_token_ids``,
``return_tokens_as_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``spaces_between_special_tokens``, ``allowed_token_ids`` and ``bad_words``. Structured outputs come
as OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's
``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) or
its older ``guided_*`` fields; a chat's ``tools`` with ``tool_choice`` required or named
become the same kind of constraint (:func:`tool_call_constraint`). Unknown fields are ignored, as OpenAI
servers do; known OpenAI features (and vLLM extensions) that Fairway does not implement
are refused with a 400 when they would change the answer (``tool_choice`` auto,
``suffix``, beam search...) instead of being silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from services.gateway.errors import ApiError, from_validation_error, invalid, model_not_found
from services.messages import (
    INT64_MAX,
    INT64_MIN,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_TEMPLATE_ARGS,
    MAX_TOOLS,
    ChatMessage,
    CompletionRequest,
    ReasoningFormat,
    RequestKind,
    SamplingParams,
    StructuredOutput,
    TemplateArg,
    TokenBias,
    Tool,
    ToolCall,
    encodes_as_utf8,
)
from services.settings import Settings

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on ``stop`` strings."""
MAX_STOP_TOKEN_IDS = 256
MAX_CHOICES = 128
"""OpenAI's limit on ``n``."""
MAX_PROMPTS = 128
"""Prompts in one completion request (a batch): each is a request of the tenant's."""
MAX_TOKEN_ID = 2**31 - 1
MAX_DEADLINE_MS = 24 * 3600 * 1000
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions."""
DEFAULT_CHAT_MAX_TOKENS = 256
"""Chat default (capped at the context length). Not vLLM's "rest of the context": that
would charge every admission the whole context. The gateway cannot count prompt tokens,
so the scorer lowers a default to what the context leaves after the prompt."""
DEADLINE_HEADER = "x-fairway-deadline-ms"


def _no_surrogates(value: str) -> str:
    if not encodes_as_utf8(value):
        raise ValueError("string contains unpaired UTF-16 surrogates")
    return value


Text = Annotated[str, AfterValidator(_no_surrogates)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_no_surrogates)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
"""OpenAI's tiers; ``flex`` is served in the background, every other as ``default``."""


def _one_or_many(value: Any) -> Any:
    # "x" and ["x"] mean the same; normalising before validation keeps error paths plain
    # ("stop.0") instead of pydantic's per-union-branch paths. ValueError, not
    # TypeError: only the former becomes a validation error (400) in pydantic.
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")  # noqa: TRY004 - for pydantic
    return value


_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _prompts(value: Any) -> Any:
    # OpenAI's four prompt shapes, normalised to a list of prompts (text or token ids)
    # and checked here, so that an error names the prompt rather than pydantic's branches.
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(type(x) is int for x in value)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(x, str | list) for x in value):
        raise ValueError(f"must be {_PROMPT_SHAPES}")
    if len({type(x) for x in value}) > 1:
        raise ValueError("must not mix text and token-id prompts")
    for i, prompt in enumerate(value):
        where = f"prompt {i}" if len(value) > 1 else "the prompt"
        if isinstance(prompt, str):
            if not encodes_as_utf8(prompt):
                raise ValueError(f"{where} contains unpaired UTF-16 surrogates")
        elif not prompt:
            raise ValueError(f"{where} has no token ids")
        elif not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in prompt):
            raise ValueError(f"{where}: token ids must be integers in [0, {MAX_TOKEN_ID}]")
    return value


def _content_parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of text parts")  # noqa: TRY004 - for pydantic
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"only text content parts are supported, not {kind!r}")
    return value


def _token_biases(value: dict[str, float]) -> dict[str, float]:
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"may hold at most {MAX_LOGIT_BIAS} tokens")
    for key in value:
        if not (key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
            raise ValueError(f"keys must be token ids (integers as strings), not {key!r}")
    return value


def _template_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    for name, arg in value.items():
        if not (arg is None or isinstance(arg, bool | int)
                or (isinstance(arg, float) and math.isfinite(arg))
                or (isinstance(arg, str) and encodes_as_utf8(arg))):
            raise ValueError(f"{name!r} must be a string, finite number, boolean or null")
    return value


TemplateKwargs = Annotated[
    dict[Text, Any], Field(max_length=MAX_TEMPLATE_ARGS), AfterValidator(_template_kwargs)
]
"""vLLM's ``chat_template_kwargs``: variables the chat template reads."""


LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS_VALUE, le=MAX_LOGIT_BIAS_VALUE)]],
    AfterValidator(_token_biases),
]
"""OpenAI's ``logit_bias``: token id (as a JSON key) -> bias in [-100, 100]."""


TextOrList = Annotated[
    list[NonEmptyText],
    BeforeValidator(_one_or_many, json_schema_input_type=NonEmptyText | list[NonEmptyText]),
]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptOrList = Annotated[
    list[str | list[int]],
    BeforeValidator(_prompts, json_schema_input_type=Text | list[Text] | TokenIds | list[TokenIds]),
    Field(min_length=1, max_length=MAX_PROMPTS),
]
"""One prompt or a batch, each text or the model's token ids (used as they are). A text
prompt may be empty, as with OpenAI: the model starts from its BOS token."""


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(StrictBody):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    """vLLM's: with ``include_usage``, each chunk's ``usage`` is its choice's so far."""


class _SamplingFields(StrictBody):
    """Fields shared by both endpoints."""

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    """Choices to generate for the prompt (each one a request of the tenant's)."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: TextOrList | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: LogitBias | None = None
    user: Text | None = None
    """Accepted for compatibility and ignored: the tenant comes from the API key."""
    # Extensions (vLLM-style extra fields)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOKEN_ID)
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    deadline_ms: int | None = Field(default=None, ge=1, le=MAX_DEADLINE_MS)
    fail_if_late: bool | None = False
    service_tier: ServiceTier | None = None
    """OpenAI's: ``flex`` runs the request in the background (only from capacity no other
    request waits for, as a batch's); the others are served as ``default``."""
    include_stop_str_in_output: bool | None = None
    """vLLM's: an answer that a stop string ends keeps that string at its end."""
    allowed_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_ALLOWED_TOKEN_IDS)
    """vLLM's: only these tokens may be sampled (null or empty: any)."""
    bad_words: list[Text] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    """vLLM's: words the answer must not hold."""
    skip_special_tokens: bool | None = None
    """vLLM's: false spells the special tokens the model generates out in the text."""
    spaces_between_special_tokens: bool | None = None
    """vLLM's: false keeps spelled-out special tokens from being set apart by spaces where
    the tokenizer's decode would (a slow tokenizer's; a fast one never does)."""
    return_token_ids: bool | None = None
    """vLLM's: the answer's token ids beside its text (``token_ids`` in each choice, and in
    each streamed chunk its new ones) and the prompt's as the model saw them
    (``prompt_token_ids``: a completion's choice's; a chat's, at the top, on the first chunk)."""
    return_tokens_as_token_ids: bool | None = None
    """vLLM's: log-probabilities name each token ``token_id:N`` rather than by its text,
    which does not always tell tokens apart (parts of one character, say)."""
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """vLLM's: the log-probability and rank of each prompt token and of its position's
    ``prompt_logprobs`` most likely tokens, in the answer's ``prompt_logprobs`` (not
    streamed)."""
    priority: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    """vLLM's: among the tenant's own queued requests, a lower value runs first (default
    0); it never moves the request ahead of another tenant's."""
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(default=None, ge=0)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=MAX_TOKEN_ID)
    # Structured outputs (see structured_output): OpenAI's, vLLM's and vLLM's older fields.
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    """Which library constrains the answer in vLLM: accepted and ignored (one here)."""
    # vLLM's extensions that Fairway does not implement: read only to refuse them when they
    # would change the answer, rather than drop them as unknown fields.
    guided_whitespace_pattern: Any = None
    use_beam_search: bool | None = None
    logits_processors: Any = None


UNIMPLEMENTED_FIELDS: dict[str, tuple[Any, str]] = {
    "use_beam_search": (False, "Beam search"),
    "guided_whitespace_pattern": (None, "A whitespace pattern of the request's own"),
    "logits_processors": ([], "Logits processors"),
    "prompt_embeds": ([], "Prompt embeddings"),
}
"""vLLM's fields that Fairway does not implement (beam search, ...), with the value it
always acts as: any other (null aside) would change the answer, so it is refused by name."""


class CompletionBody(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptOrList
    add_special_tokens: bool | None = None
    prompt_embeds: Any = None
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Log-probabilities of each output token and of the ``logprobs`` most likely ones."""
    suffix: Text | None = None


class TextPart(StrictBody):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
"""OpenAI's rule for a function's name."""


class FunctionCallBody(StrictBody):
    name: Text
    arguments: Text
    """The arguments as JSON text."""


class ToolCallBody(StrictBody):
    """A call an earlier assistant message made, sent back with the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessageBody(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """``developer`` is OpenAI's newer name for ``system`` (the scorer renders it so);
    ``tool`` answers an assistant's tool call (``tool_call_id``)."""
    tool_calls: list[ToolCallBody] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: Text | None = Field(default=None, validate_default=True)
    content: Annotated[
        list[TextPart],
        BeforeValidator(_content_parts, json_schema_input_type=Text | list[TextPart]),
    ] | None = Field(default=None, validate_default=True)
    """Only an assistant message that makes tool calls may go without."""
    name: Text | None = None

    @field_validator("tool_calls")
    @classmethod
    def _only_an_assistant_calls(cls, value: list[ToolCallBody] | None, info: ValidationInfo) -> Any:
        if value and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only an assistant message makes tool calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _a_tool_message_names_its_call(cls, value: str | None, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and value is None:
            raise ValueError("a tool message names the call it answers")
        if role not in (None, "tool") and value is not None:
            raise ValueError("only a tool message answers a call")
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_calling(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and "role" in info.data and not info.data.get("tool_calls"):
            raise ValueError("content is required, but for an assistant message with tool_calls")
        return value


class FunctionBody(StrictBody):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema."""
    strict: bool | None = None


class ToolBody(StrictBody):
    """A function the model may call (OpenAI's ``tools`` entry)."""

    type: Literal["function"]
    function: FunctionBody


class NamedFunction(StrictBody):
    name: Text


class NamedToolChoice(StrictBody):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionBody(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolBody] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    """With ``tool_choice`` required: whether the answer may make several calls."""
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: Annotated[str, Field(max_length=64), AfterValidator(_no_surrogates)] | None = None
    """OpenAI's reasoning effort; handed to the chat template as ``reasoning_effort``
    (as vLLM does: gpt-oss's and other templates read it), unless
    ``chat_template_kwargs`` sets it."""
    chat_template: Any = None


AnyBody = CompletionBody | ChatCompletionBody
B = TypeVar("B", bound=StrictBody)


def parse_body(raw: bytes, model_cls: type[B]) -> B:
    """JSON bytes -> validated body; malformed JSON and wrong types are 400s."""
    return validated(json_object(raw), model_cls)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body's JSON object; 400 for anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "cannot be decoded"
        raise invalid(
            f"The request body is not valid JSON: {detail}.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return data


def validated(data: dict[str, Any], model_cls: type[B]) -> B:
    """A body's JSON object as ``model_cls``; wrong types are 400s naming the field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def unsupported(param: str, what: str) -> ApiError:
    """A 400 for what this server does not implement, naming the field (``unsupported``)."""
    return invalid(f"{what} is not supported by this server.", param=param, code="unsupported")


def check_body(body: AnyBody, settings: Settings, *, model_checked: bool = False) -> None:
    """Checks that need settings or span fields: model, limits, unsupported features.

    ``model_checked``: the caller already resolved ``body.model`` (base model or an
    adapter the tenant may use, :func:`services.gateway.adapters.resolve_adapter`).
    """
    if not model_checked and body.model != settings.model_name:
        raise model_not_found(body.model)
    max_tokens = requested_max_tokens(body)
    if max_tokens is not None and max_tokens > settings.max_model_len:
        param = "max_completion_tokens" if body.max_tokens is None else "max_tokens"
        raise invalid(
            f"{param} ({max_tokens}) exceeds the model's context length ({settings.max_model_len}).",
            param=param,
        )
    children = choices(body)
    if children > settings.max_queued_per_tenant:
        # Each choice is a request of the tenant's: more than it may hold could never run.
        what = f"n ({body.n})" if children == body.n else f"{children} choices (prompts times n)"
        raise invalid(f"{what} exceeds this API key's limit of "
                      f"{settings.max_queued_per_tenant} unfinished requests.",
                      param="n" if children == body.n else "prompt")
    if body.stop is not None and len(body.stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", param="stop")
    if body.prompt_logprobs is not None and body.stream:
        raise invalid("prompt_logprobs is not available when streaming.", param="prompt_logprobs")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true.", param="stream_options")
    if body.min_tokens and max_tokens is not None and body.min_tokens > max_tokens:
        raise invalid(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens}).",
                      param="min_tokens")
    if body.truncate_prompt_tokens == 0:
        raise invalid("truncate_prompt_tokens must be -1 (the context length) or at least 1.",
                      param="truncate_prompt_tokens")
    for name, (acts_as, what) in UNIMPLEMENTED_FIELDS.items():
        value = getattr(body, name, None)
        if value is not None and value != acts_as:
            raise unsupported(name, what)
    if isinstance(body, CompletionBody):
        if body.best_of not in (None, 1):
            raise unsupported("best_of", "best_of other than 1")
        if body.suffix:
            raise unsupported("suffix", "suffix")
    else:
        if body.top_logprobs and not body.logprobs:
            raise invalid("top_logprobs needs logprobs to be true.", param="top_logprobs")
        _check_tools(body, settings.tool_call_parser)
        if body.functions or body.function_call not in (None, "none", "auto"):
            raise unsupported("functions" if body.functions else "function_call", "Function calling")
        if body.chat_template is not None:
            raise unsupported("chat_template", "A chat template of the request's own")
        if body.continue_final_message and body.add_generation_prompt:
            raise invalid("continue_final_message and add_generation_prompt cannot both be true.",
                          param="continue_final_message")
        if body.continue_final_message and body.messages[-1].role != "assistant":
            raise invalid("continue_final_message needs the last message to be the assistant's.",
                          param="continue_final_message")
        if body.modalities not in (None, ["text"]) or body.audio is not None:
            raise unsupported("modalities" if body.audio is None else "audio", "Audio output")


_STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                      "guided_choice", "guided_grammar")
_STRUCTURED_OPTIONS = ("json", "regex", "choice", "grammar", "json_object")


def structured_output(body: AnyBody) -> StructuredOutput | None:
    """The language the answer must belong to, from whichever one of OpenAI's
    ``response_format``, vLLM's ``structured_outputs`` or vLLM's older ``guided_*``
    fields the body uses; None for free text. The shapes are checked here; the syntax of
    a schema, expression or grammar by the scorer, which has the parser."""
    given = [name for name in _STRUCTURED_FIELDS if getattr(body, name) is not None
             and not (name == "response_format" and _response_type(body.response_format) == "text")]
    if len(given) > 1:
        raise invalid(f"Only one structured output constraint may be given, not {' and '.join(given)}.",
                      param=given[1])
    if not given:
        return None
    name = given[0]
    value = getattr(body, name)
    if name == "response_format":
        spec = _response_format(value)
    elif name == "structured_outputs":
        spec = _structured_outputs(value)
    else:
        spec = _constraint(name.removeprefix("guided_"), value, name)
    return _checked(spec, name)


def _response_type(value: Any) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format must be an object with a string type.", param="response_format")
    return value["type"]


def _response_format(value: dict[str, Any]) -> StructuredOutput:
    kind = _response_type(value)
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise unsupported("response_format", f"response_format {kind!r}")
    inner = value.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
        raise invalid("response_format json_schema needs json_schema.schema, a JSON schema object.",
                      param="response_format")
    return _constraint("json", inner["schema"], "response_format")


def _structured_outputs(value: Any) -> StructuredOutput:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise invalid("structured_outputs must be an object.", param=param)
    for option, what in (("structural_tag", "A structural tag"),
                         ("whitespace_pattern", "A whitespace pattern of the request's own")):
        if value.get(option) is not None:
            raise unsupported(f"{param}.{option}", what)
    given = [key for key in _STRUCTURED_OPTIONS if value.get(key) not in (None, False)]
    if len(given) != 1:
        raise invalid(f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_OPTIONS)}.",
                      param=param)
    compact = value.get("disable_any_whitespace", False)
    if not isinstance(compact, bool):
        raise invalid("structured_outputs.disable_any_whitespace must be a boolean.",
                      param=f"{param}.disable_any_whitespace")
    key = given[0]
    if key == "json_object":
        if value[key] is not True:
            raise invalid("structured_outputs.json_object must be a boolean.", param=f"{param}.{key}")
        spec = StructuredOutput("json_object")
    else:
        spec = _constraint(key, value[key], f"{param}.{key}")
    spec.any_whitespace = not compact
    return spec


def _constraint(key: str, value: Any, param: str) -> StructuredOutput:
    """One constraint of vLLM's names: ``json`` (a schema, or its JSON text), ``regex``,
    ``choice`` (strings) or ``grammar`` (EBNF)."""
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise invalid(f"{param} is not valid JSON.", param=param) from None
        if not isinstance(value, dict | bool):
            raise invalid(f"{param} must be a JSON schema (an object).", param=param)
        return StructuredOutput("json_schema", json.dumps(value, ensure_ascii=False))
    if key == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) and c and encodes_as_utf8(c) for c in value)):
            raise invalid(f"{param} must be a list of non-empty strings.", param=param)
        return StructuredOutput("choice", choices=list(value))
    if not isinstance(value, str) or not value or not encodes_as_utf8(value):
        raise invalid(f"{param} must be a non-empty string.", param=param)
    return StructuredOutput("regex" if key == "regex" else "grammar", value)


def _checked(spec: StructuredOutput, param: str) -> StructuredOutput:
    problem = spec.problem()  # the limits every service checks (too long, too many choices)
    if problem is not None:
        raise invalid(f"{param}: {problem}.", param=param)
    return spec


def _check_tools(body: ChatCompletionBody, parser: str) -> None:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice needs tools to choose from.", param="tool_choice")
        return
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise invalid("Each tool needs a name of its own.", param="tools")
    if (choice is None or choice == "auto") and not parser:
        raise unsupported("tool_choice", 'tool_choice "auto" (the model choosing between an '
                           'answer and a call, in its own format, which this server does not '
                           'parse unless it is started with a tool call parser); ask for '
                           '"required" or a named function')
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise invalid(f"tool_choice names {choice.function.name!r}, which is not among the tools.",
                      param="tool_choice")
    if tool_calling(body) is not None and structured_output(body) is not None:
        raise invalid("A forced tool call already fixes the answer's structure; it cannot also "
                      "have a structured output constraint.", param="tool_choice")


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCalling:
    """A chat whose answer may be tool calls: a forced call's arguments for ``function``;
    with ``function`` None, ``tool_choice`` required (a JSON list of ``{"name",
    "parameters"}`` calls of any of the tools, as vLLM has the model write them), or with
    a ``parser``, auto (the model's own answer, its calls in its own format)."""

    function: str | None
    parser: str = ""


def tool_calling(body: AnyBody, parser: str = "") -> ToolCalling | None:
    """How the answer of a checked body may be tool calls (``parser``: the server's
    tool call parser, for auto); None: it is not."""
    if not isinstance(body, ChatCompletionBody) or not body.tools:
        return None
    if isinstance(body.tool_choice, NamedToolChoice):
        return ToolCalling(body.tool_choice.function.name)
    if body.tool_choice == "required":
        return ToolCalling(None)
    return ToolCalling(None, parser) if parser and body.tool_choice in (None, "auto") else None


_ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


def tool_call_constraint(body: AnyBody) -> StructuredOutput | None:
    """The language a forced tool call's answer is held to: the named function's
    arguments, or a list of calls (at least one; one unless ``parallel_tool_calls``)."""
    calling = tool_calling(body)
    if calling is None or calling.parser:
        return None
    assert isinstance(body, ChatCompletionBody) and body.tools
    schemas = {tool.function.name: tool.function.parameters or _ANY_ARGUMENTS for tool in body.tools}
    if calling.function is not None:
        schema = schemas[calling.function]
    else:
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                              "parameters": parameters},
             "required": ["name", "parameters"]}
            for name, parameters in schemas.items()]}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
    return _checked(StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False)), "tools")


def reasoning_parser_for(request: CompletionRequest, parser: str) -> str:
    """The reasoning parser a request's answer goes through (``parser``, the server's):
    a chat's, none for a completion. A structured chat answer (or forced call) thinks
    first too: its grammar holds from the end of its thinking (:func:`to_completion_request`)."""
    return parser if request.kind == "chat" else ""


def choices(body: AnyBody) -> int:
    """How many choices a request asks for: ``n`` for each of its prompts."""
    prompts = len(body.prompt) if isinstance(body, CompletionBody) else 1
    return prompts * (body.n or 1)


def choice_requests(
    request: CompletionRequest, n: int, prompts: list[Prompt] | None = None
) -> list[CompletionRequest]:
    """The child requests of a request's choices, ``n`` for each of its ``prompts`` (a
    batched completion; default: its own prompt): the request itself for one; else ids
    ``<id>-<index>``, choice ``index`` answering prompt ``index // n`` (as OpenAI numbers
    them), and for a seeded request seeds ``seed + index % n``, so choices differ unless
    decoding is greedy, and a prompt gets the same choices as when sent alone."""
    if prompts is None:
        prompts = [request.prompt if request.prompt_token_ids is None else request.prompt_token_ids]
    seed = request.sampling.seed
    children = []
    for index in range(n * len(prompts)):
        child = dataclasses.replace(request)
        _set_prompt(child, prompts[index // n])
        if n * len(prompts) > 1:
            child.request_id = f"{request.request_id}-{index}"
            if seed is not None:
                child.sampling = dataclasses.replace(
                    request.sampling, seed=(seed + index % n - INT64_MIN) % 2**64 + INT64_MIN)
        children.append(child)
    return children


def requested_logprobs(body: AnyBody) -> int | None:
    """How many alternatives per token the client wants log-probabilities of; None: none."""
    if isinstance(body, ChatCompletionBody):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def requested_prompt_logprobs(body: AnyBody) -> int | None:
    """How many alternatives per prompt token the answer needs log-probabilities of (vLLM's
    ``prompt_logprobs``, or an echoed completion's ``logprobs``: the more); None: none."""
    echoed = body.logprobs if isinstance(body, CompletionBody) and body.echo else None
    asked = [k for k in (body.prompt_logprobs, echoed) if k is not None]
    return max(asked) if asked else None


def requested_max_tokens(body: AnyBody) -> int | None:
    if isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def resolve_max_tokens(body: AnyBody, max_model_len: int) -> int:
    """The client's value, else the endpoint's default (raised to ``min_tokens``)."""
    requested = requested_max_tokens(body)
    if requested is not None:
        return requested
    default = (DEFAULT_COMPLETION_MAX_TOKENS if isinstance(body, CompletionBody)
               else DEFAULT_CHAT_MAX_TOKENS)
    return min(max(default, body.min_tokens or 0), max_model_len)


def resolve_deadline_ms(body_value: int | None, header_value: str | None) -> int | None:
    """Relative deadline from the body and/or ``X-Fairway-Deadline-Ms``; the smaller wins."""
    values = [] if body_value is None else [body_value]
    if header_value is not None:
        text = header_value.strip()
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_DEADLINE_MS:
            raise invalid(
                f"X-Fairway-Deadline-Ms must be an integer between 1 and {MAX_DEADLINE_MS}.",
                param="X-Fairway-Deadline-Ms",
            )
        values.append(int(text))
    return min(values) if values else None


def chat_message(message: ChatMessageBody) -> ChatMessage:
    return ChatMessage(
        role=message.role,
        content="".join(part.text for part in message.content or []),
        tool_calls=[ToolCall(call.id, call.function.name, call.function.arguments)
                    for call in message.tool_calls or []],
        tool_call_id=message.tool_call_id or "",
    )


def request_kind(body: AnyBody) -> RequestKind:
    return "chat" if isinstance(body, ChatCompletionBody) else "completion"


def served_tier(body: AnyBody) -> str | None:
    """The tier a request that named one is served in (None: it named none)."""
    if body.service_tier is None:
        return None
    return "flex" if body.service_tier == "flex" else "default"


def to_completion_request(
    body: AnyBody,
    *,
    request_id: str,
    tenant: str,
    now: float,
    reply_to: str,
    max_model_len: int,
    deadline_ms: int | None,
    reasoning_parser: ReasoningFormat = "",
) -> CompletionRequest:
    """The wire message for a checked body. ``tenant`` comes from the API key only.
    ``reasoning_parser``: the server's; a chat's structured answer may think first in
    its format, and is held to its language from the end of its thinking.

    A request without a seed gets one from its id at the worker, so a re-run after a
    worker crash samples the same tokens.
    """
    sampling = SamplingParams(
        max_tokens=resolve_max_tokens(body, max_model_len),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=bool(body.ignore_eos),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_p=body.min_p or 0.0,
        min_tokens=body.min_tokens or 0,
        logit_bias=[TokenBias(int(k), v) for k, v in (body.logit_bias or {}).items()],
        logprobs=requested_logprobs(body),
        prompt_logprobs=requested_prompt_logprobs(body),
        structured=tool_call_constraint(body) or structured_output(body),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        skip_special_tokens=body.skip_special_tokens is not False,
        spaces_between_special_tokens=body.spaces_between_special_tokens is not False,
        allowed_token_ids=list(body.allowed_token_ids or []),
        bad_words=list(body.bad_words or []),
    )
    request = CompletionRequest(
        request_id=request_id,
        tenant=tenant,
        model=body.model,
        kind=request_kind(body),
        sampling=sampling,
        created=now,
        deadline=None if deadline_ms is None else now + deadline_ms / 1000.0,
        fail_if_late=bool(body.fail_if_late),
        background=body.service_tier == "flex",
        priority=body.priority or 0,
        return_token_ids=bool(body.return_token_ids),
        reply_to=reply_to,
        defaulted=[name for name, given in (
            ("max_tokens", requested_max_tokens(body)), ("temperature", body.temperature),
            ("top_p", body.top_p), ("top_k", body.top_k)) if given is None],
    )
    request.add_special_tokens = body.add_special_tokens
    request.truncate_prompt_tokens = body.truncate_prompt_tokens
    if isinstance(body, ChatCompletionBody):
        if sampling.structured is not None:
            sampling.structured.after_reasoning = reasoning_parser
        request.messages = [chat_message(message) for message in body.messages]
        request.tools = [Tool(tool.function.name, tool.function.description or "",
                              "" if tool.function.parameters is None
                              else json.dumps(tool.function.parameters, ensure_ascii=False))
                         for tool in body.tools or []]
        request.continue_final_message = bool(body.continue_final_message)
        # vLLM's default: the assistant's turn is opened unless the last one is continued.
        request.add_generation_prompt = (not request.continue_final_message
                                         if body.add_generation_prompt is None
                                         else body.add_generation_prompt)
        template_args = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort is not None:
            template_args.setdefault("reasoning_effort", body.reasoning_effort)
        request.chat_template_kwargs = [TemplateArg(name, value) for name, value in template_args.items()]
    else:
        request.echo = bool(body.echo)
        _set_prompt(request, body.prompt[0])  # a batch's others: choice_requests
    return request


Prompt = str | list[int]
"""One completion prompt: text, or the model's token ids."""


def _set_prompt(request: CompletionRequest, prompt: Prompt) -> None:
    if isinstance(prompt, str):
        request.prompt, request.prompt_token_ids = prompt, None
    else:
        request.prompt, request.prompt_token_ids = "", list(prompt)


def include_usage(body: AnyBody) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def continuous_usage(body: AnyBody) -> bool:
    """vLLM's ``continuous_usage_stats``: usage in every chunk (only with ``include_usage``)."""
    return include_usage(body) and bool(body.stream_options.continuous_usage_stats)
