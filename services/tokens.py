"""How a request's text becomes the model's token ids (the scorer tokenizes every request)."""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from services import messages as m

TEMPLATE_ROLES = {"developer": "system"}
"""OpenAI's ``developer`` is its newer name for ``system``, which chat templates know."""


def tokenize(tokenizer: Any, request: m.CompletionRequest) -> list[int]:
    """The prompt a request gives the model: its chat rendered by the model's chat
    template (with the assistant's turn opened, unless it continues the last message),
    or its completion prompt with the model's special tokens (BOS), each as vLLM's
    ``add_special_tokens`` and chat-template fields ask."""
    if request.kind == "chat":
        conversation = [template_message(msg) for msg in request.messages]
        options = {"add_generation_prompt": request.add_generation_prompt,
                   "continue_final_message": request.continue_final_message,
                   **template_variables(tokenizer, request.chat_template_kwargs)}
        if request.tools:
            options["tools"] = [template_tool(tool) for tool in request.tools]
        if request.add_special_tokens:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, **options)
            return list(tokenizer.encode(text, add_special_tokens=True))
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, **options)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    add_special = True if request.add_special_tokens is None else request.add_special_tokens
    return list(tokenizer.encode(request.prompt, add_special_tokens=add_special))


def template_message(msg: m.ChatMessage) -> dict[str, Any]:
    """A chat turn as chat templates read it (Hugging Face's convention, as vLLM passes
    it): a tool call's arguments as a mapping where they are a JSON object."""
    out: dict[str, Any] = {"role": TEMPLATE_ROLES.get(msg.role, msg.role), "content": msg.content}
    if msg.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
                             for call in msg.tool_calls]
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    return out


def template_tool(tool: m.Tool) -> dict[str, Any]:
    """A tool as OpenAI's request gave it, which is what chat templates read."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters:
        function["parameters"] = json.loads(tool.parameters)
    return {"type": "function", "function": function}


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


_TEMPLATE_OWN = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                           "continue_final_message", "raise_exception", "strftime_now"})
"""Variables a chat template gets from the conversation and the renderer, not a client."""


def template_variables(tokenizer: Any, args: list[m.TemplateArg]) -> dict[str, Any]:
    """The ``chat_template_kwargs`` the model's chat template reads, as vLLM passes them:
    one it does not read cannot change the prompt and is left out (a client may send
    ``enable_thinking`` to every model); one the renderer or the conversation sets (or a
    special token) is refused with :class:`ValueError`."""
    if not args:
        return {}
    reserved = _TEMPLATE_OWN | set(inspect.signature(tokenizer.apply_chat_template).parameters)
    reserved |= set(getattr(tokenizer, "special_tokens_map", {}))
    taken = [arg.name for arg in args if arg.name in reserved]
    if taken:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(taken))}")
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates: the one a plain chat renders with
        template = template.get("default") or next(iter(template.values()), "")
    read = _template_reads(template)
    return {arg.name: arg.value for arg in args if arg.name in read}


@functools.lru_cache(maxsize=8)
def _template_reads(template: str) -> frozenset[str]:
    """The variables a Jinja chat template reads from outside."""
    import jinja2
    import jinja2.meta

    environment = jinja2.Environment()
    return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))
