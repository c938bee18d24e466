"""How a request's text becomes the model's token ids: one function for the scorer (which
tokenizes every request) and the gateway's ``/tokenize``, so both count the same."""

from __future__ import annotations

from typing import Any

from services import messages as m

TEMPLATE_ROLES = {"developer": "system"}
"""OpenAI's ``developer`` is its newer name for ``system``, which chat templates know."""


def chat_token_ids(tokenizer: Any, messages: list[m.ChatMessage],
                   add_generation_prompt: bool = True) -> list[int]:
    """A chat rendered by the model's chat template, as token ids."""
    ids = tokenizer.apply_chat_template(
        [{"role": TEMPLATE_ROLES.get(msg.role, msg.role), "content": msg.content}
         for msg in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
    )
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize(tokenizer: Any, request: m.CompletionRequest) -> list[int]:
    """The prompt a request gives the model: its chat with the assistant's turn opened, or
    its completion prompt with the model's special tokens (BOS)."""
    if request.kind == "chat":
        return chat_token_ids(tokenizer, request.messages)
    return list(tokenizer.encode(request.prompt, add_special_tokens=True))
