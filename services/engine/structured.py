"""Structured outputs: an answer held to a formal language with xgrammar.

A request's :class:`~services.messages.StructuredOutput` (OpenAI's ``response_format``,
vLLM's structured outputs) is compiled once per tokenizer into a token-level automaton;
each request then keeps a :class:`GrammarState`, which says before every draw which
tokens may come next (the sampler masks the rest) and follows every token drawn. The
state is rebuilt from the output so far, so a request resumed on another worker or
recomputed after a preemption goes on where it was. A thinking model's answer
(``after_reasoning``) thinks first, free, and is held to the language from the end of
its thinking (``</think>``), as vLLM does with a reasoning parser.

xgrammar (the backend vLLM and SGLang default to) is imported on first use: a server
without it serves everything else and refuses structured requests with a clear error.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from services.engine.interface import EngineError
from services.messages import STRUCTURED_KIND_NAMES, StructuredOutput

XGRAMMAR_MISSING = "structured outputs need the xgrammar package, which this server lacks"
COMPILED_CACHE_SIZE = 64
"""Distinct languages an engine keeps compiled (a tenant's schema is usually reused)."""

_ANY_OBJECT = '{"type": "object"}'
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise EngineError(XGRAMMAR_MISSING) from None
    return xgrammar


def bounded_strings_as_patterns(schema: Any) -> Any:
    """``schema`` with each string's ``minLength``/``maxLength`` (and no ``pattern`` or
    ``format``) written as the pattern of that many characters, which means the same.

    xgrammar (through 0.2.9 at least, its issue #800) lowers a length-bounded string to a
    character class that admits raw control characters and no escapes, so a model could
    answer with JSON that no strict parser reads; its pattern path is JSON-aware."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded_strings_as_patterns(value) for key, value in schema.items()}
    low, high = out.get("minLength", 0), out.get("maxLength")
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and "pattern" not in out and "format" not in out
            and type(low) is int and low >= 0 and (high is None or (type(high) is int and high >= low))):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^[\\s\\S]{{{low},{'' if high is None else high}}}$"
    return out


def _grammar(xgr: Any, spec: StructuredOutput) -> Any:
    """The tokenizer-independent grammar of ``spec``; raises on a syntax error."""
    if spec.kind == "json_object":  # OpenAI's JSON mode: an object, any members
        return xgr.Grammar.from_json_schema(_ANY_OBJECT, strict_mode=False,
                                            any_whitespace=spec.any_whitespace)
    if spec.kind == "json_schema":
        schema = bounded_strings_as_patterns(json.loads(spec.spec))
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=spec.any_whitespace)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.spec)
    if spec.kind == "choice":
        # EBNF string literals take JSON's escapes.
        return xgr.Grammar.from_ebnf(
            "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices))
    return xgr.Grammar.from_ebnf(spec.spec)


def _key(spec: StructuredOutput) -> tuple[str, str, tuple[str, ...], bool]:
    """What makes two constraints the same language (for the caches)."""
    return spec.kind, spec.spec, tuple(spec.choices), spec.any_whitespace


def _parsed(xgr: Any, spec: StructuredOutput) -> Any:
    """The grammar of a well-shaped ``spec``; EngineError in words for the client when it
    does not parse."""
    try:
        return _grammar(xgr, spec)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError for any syntax error
        first = _LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise EngineError(f"the {STRUCTURED_KIND_NAMES[spec.kind]} is not valid: {first or type(exc).__name__}") from None


def grammar_problem(spec: StructuredOutput) -> str | None:
    """Why ``spec`` cannot be served (malformed, a syntax error, no xgrammar), in words
    for the client, or None. Needs no tokenizer: the scorer checks before any work, and
    remembers the last languages it checked (an application sends its schema again and
    again; parsing one costs about a millisecond)."""
    return spec.problem() or _syntax_problem(_key(spec))


@functools.lru_cache(maxsize=128)
def _syntax_problem(key: tuple[str, str, tuple[str, ...], bool]) -> str | None:
    kind, text, choices, any_whitespace = key
    try:
        _parsed(_xgrammar(), StructuredOutput(kind, text, list(choices), any_whitespace))  # type: ignore[arg-type]
    except EngineError as exc:
        return str(exc)
    return None


THINK_START, THINK_END = "<think>", "</think>"


class GrammarState:
    """One request's place in its language: which tokens may come next, and whether the
    answer has reached its end.

    With ``thinking`` (the ids of ``<think>`` and ``</think>``) and a ``phase``, the
    answer may think before the language holds: ``"may_think"`` (its first token may
    open the thinking, or start the answer), ``"thinking"`` (free until the end of
    thinking), ``"answer"`` (held)."""

    def __init__(self, matcher: Any, bitmask: torch.Tensor, vocab_size: int, xgr: Any,
                 thinking: tuple[int, int] | None = None, phase: str = "answer") -> None:
        self._matcher = matcher
        self._bitmask = bitmask
        self._vocab_size = vocab_size
        self._xgr = xgr
        self._filled = False
        self._stuck = False
        self._thinking = thinking
        self.phase = phase if thinking is not None else "answer"

    def _next(self) -> torch.Tensor:
        if not self._filled:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            self._filled = True
        return self._bitmask

    def allowed(self) -> torch.Tensor:
        """Bool [vocab]: the tokens that may come next."""
        words = self._next()[0]
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.flatten()[: self._vocab_size].bool()

    def only_end_allowed(self) -> bool:
        """Whether the language is complete and allows nothing but its end (a stop
        token): then the end wins over ``min_tokens``, which would forbid every token."""
        if self.phase != "answer":
            return False
        allowed = self.allowed()
        stops = [t for t in self._matcher.stop_token_ids if t < self._vocab_size]
        allowed[stops] = False
        return not bool(allowed.any())

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of the tokens that may not come next to -inf, in place."""
        if self.phase == "thinking":
            return
        opener = None
        if self.phase == "may_think" and self._thinking is not None:
            start = self._thinking[0]
            opener = logits[start].clone()
        bitmask = self._next()
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask,
                                              vocab_size=logits.shape[-1])
        if opener is not None:
            logits[start] = opener  # the answer may open its thinking instead
        if not torch.isfinite(logits).any():  # no token of the vocabulary fits
            self._stuck = True
            logits.zero_()  # a draw must still happen; accept() then fails the request

    def accept(self, token: int) -> bool:
        """Follow a drawn token; True when it ended the answer (a stop token where the
        language is complete). Raises EngineError for a token the language forbids."""
        if self._thinking is not None and self.phase != "answer":
            start, end = self._thinking
            if self.phase == "may_think" and token == start:
                self.phase = "thinking"
                return False
            if self.phase == "thinking":
                if token == end:
                    self.phase = "answer"
                return False
            self.phase = "answer"  # it answered at once
        if self._stuck:
            raise EngineError("no token of this model continues the answer's structure")
        if not self._matcher.accept_token(token):
            raise EngineError(f"token {token} does not continue the answer's structure")
        self._filled = False
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """Compiles languages for one tokenizer and vocabulary (the model's logits width),
    keeping the last :data:`COMPILED_CACHE_SIZE` compiled. Safe to use from several
    threads: a worker compiles off the engine's thread, which then finds it compiled."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self._xgr = xgr = _xgrammar()
        try:
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None)
        except Exception as exc:  # noqa: BLE001 - a tokenizer xgrammar cannot read
            raise EngineError(f"structured outputs are not available for this tokenizer: {exc}") from None
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1))
        self._vocab_size = vocab_size
        ids = [tokenizer.convert_tokens_to_ids(mark) for mark in (THINK_START, THINK_END)]
        self._thinking: tuple[int, int] | None = (
            (ids[0], ids[1]) if all(isinstance(i, int) and 0 <= i < vocab_size
                                    and i != tokenizer.unk_token_id for i in ids) else None)
        """The ids of the thinking marks, where the tokenizer has them as tokens of their own."""
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str, tuple[str, ...], bool], Any] = OrderedDict()

    def compile(self, spec: StructuredOutput) -> Any:
        """``spec`` compiled (from the cache when it was lately); raises EngineError."""
        key = _key(spec)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        problem = spec.problem()
        if problem is not None:
            raise EngineError(problem)
        compiled = self._compiler.compile_grammar(_parsed(self._xgr, spec))
        with self._lock:
            self._compiled[key] = compiled
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def state(self, spec: StructuredOutput, output: Sequence[int] = ()) -> GrammarState:
        """A request's state, past the output it already has (a resumed request's). A
        thinking answer (``after_reasoning``) of a tokenizer without the thinking marks as
        tokens of their own is held from its first token."""
        xgr = self._xgr
        matcher = xgr.GrammarMatcher(self.compile(spec))
        phase = {"qwen3": "may_think", "deepseek_r1": "thinking"}.get(spec.after_reasoning, "answer")
        state = GrammarState(matcher, xgr.allocate_token_bitmask(1, self._vocab_size),
                             self._vocab_size, xgr, self._thinking, phase)
        for token in output:
            try:
                state.accept(token)
            except EngineError:
                raise EngineError("the resumed output does not follow the answer's structure") from None
        return state
