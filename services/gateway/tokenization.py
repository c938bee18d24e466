"""vLLM's ``/tokenize`` and ``/detokenize``: the model's token ids of a prompt or a chat,
and the text of token ids, without generating; and OpenAI's count of a response's input
tokens (``/v1/responses/input_tokens``).

The gateway has no tokenizer: a tokenize request is a completion or chat request marked
``tokenize_only``, admitted and published like any other (so it is a request of its
tenant's, and lost to no crash), which the scorer answers itself with the token ids as
the model would see them (a chat's as its template renders it, tools and
``chat_template_kwargs`` included) instead of passing it on. So a count is exactly the
``prompt_tokens`` the same request would be charged.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from services.gateway.errors import ApiError
from services.gateway.schemas import (
    ChatCompletionBody,
    ChatMessageBody,
    CompletionBody,
    StrictBody,
    TemplateKwargs,
    Text,
    TokenId,
    ToolBody,
    json_object,
    validated,
)
from services.messages import MAX_TOOLS, FinalAnswer, Tokenized


class TokenizeCompletionBody(StrictBody):
    """POST /tokenize with a prompt."""

    model: Text
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False
    """Also give each token as the vocabulary names it (``token_strs``)."""


class TokenizeChatBody(StrictBody):
    """POST /tokenize with a chat: its tokens as the chat template renders it."""

    model: Text
    messages: list[ChatMessageBody] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    tools: list[ToolBody] | None = Field(default=None, max_length=MAX_TOOLS)
    return_token_strs: bool = False


class DetokenizeBody(StrictBody):
    """POST /detokenize."""

    model: Text
    tokens: list[TokenId] = Field(min_length=1)


def read_tokenize(raw: bytes) -> tuple[CompletionBody | ChatCompletionBody, bool]:
    """The completion or chat a /tokenize body means (generating one token, which it
    never will), and whether the token names are wanted."""
    data = json_object(raw)
    if "messages" in data:
        chat = validated(data, TokenizeChatBody)
        fields = chat.model_dump(exclude={"return_token_strs"}, exclude_none=True)
        # The tools reach the template; none is to be called.
        body: CompletionBody | ChatCompletionBody = validated(
            {**fields, "max_tokens": 1, **({"tool_choice": "none"} if chat.tools else {})},
            ChatCompletionBody)
        return body, chat.return_token_strs
    prompt = validated(data, TokenizeCompletionBody)
    return validated({"model": prompt.model, "prompt": prompt.prompt, "max_tokens": 1,
                      "add_special_tokens": prompt.add_special_tokens}, CompletionBody), \
        prompt.return_token_strs


def read_detokenize(raw: bytes) -> CompletionBody:
    """The completion of token ids a /detokenize body means."""
    body = validated(json_object(raw), DetokenizeBody)
    return validated({"model": body.model, "prompt": body.tokens, "max_tokens": 1}, CompletionBody)


def _tokenized(final: FinalAnswer) -> Tokenized:
    if final.tokenized is None:  # a scorer of an older version passed it on
        raise ApiError(502, "The request was not answered with its tokens.", reason="upstream_error")
    return final.tokenized


def tokenize_response(final: FinalAnswer, max_model_len: int, token_strs: bool) -> dict[str, Any]:
    """vLLM's /tokenize answer."""
    tokens = _tokenized(final)
    return {"count": len(tokens.token_ids), "max_model_len": max_model_len,
            "tokens": tokens.token_ids, "token_strs": tokens.token_strs if token_strs else None}


def input_tokens_response(final: FinalAnswer) -> dict[str, Any]:
    """OpenAI's answer to /v1/responses/input_tokens."""
    return {"object": "response.input_tokens", "input_tokens": len(_tokenized(final).token_ids)}


def detokenize_response(final: FinalAnswer) -> dict[str, Any]:
    """vLLM's /detokenize answer."""
    return {"prompt": _tokenized(final).text}
