"""How a request's text becomes the model's token ids (the scorer tokenizes every request)."""

from __future__ import annotations

from typing import Any

from services import messages as m

TEMPLATE_ROLES = {"developer": "system"}
"""OpenAI's ``developer`` is its newer name for ``system``, which chat templates know."""


def tokenize(tokenizer: Any, request: m.CompletionRequest) -> list[int]:
    """The prompt a request gives the model: its chat rendered by the model's chat
    template with the assistant's turn opened, or its completion prompt with the model's
    special tokens (BOS)."""
    if request.kind == "chat":
        ids = tokenizer.apply_chat_template(
            [{"role": TEMPLATE_ROLES.get(msg.role, msg.role), "content": msg.content}
             for msg in request.messages],
            add_generation_prompt=True,
            tokenize=True,
        )
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(request.prompt, add_special_tokens=True))
