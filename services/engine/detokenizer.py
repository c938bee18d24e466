"""Incremental detokenization and stop-string handling for streamed output."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.streaming_text import held_back

REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 6


def _backend_decode(tokenizer: Any) -> Any:
    """The Rust tokenizer's ``decode`` when the tokenizer's own ``decode`` comes to exactly
    that call (a transformers fast tokenizer that overrides neither method, decoding
    without clean-up), else None. It skips the wrapper's per-call Python work, which on
    a small model is a noticeable share of a step (two decodes per token)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
        and callable(getattr(backend, "decode", None))
    ):
        return backend.decode
    return None


class IncrementalDetokenizer:
    """Turns output tokens into text deltas with the prefix-offset method (vLLM, TGI).

    Decoding a short window that starts a few tokens back gives the tokenizer its
    context (leading spaces, merges), and text ending in U+FFFD is held back because
    the token so far ends in the middle of a UTF-8 character.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # The Rust decoder puts nothing between special tokens, so it never needs the flag.
        self._fast_decode = _backend_decode(tokenizer)
        self.ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - (_PROMPT_CONTEXT_TOKENS - 1), 0)

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)
        # The flag is passed only when it asks for other than the tokenizer's default.
        unspaced = {} if self.spaces_between_special_tokens else {
            "spaces_between_special_tokens": False}
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False,
            **unspaced,
        )

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if self.prefix_offset > 64:  # keep the window short
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return delta

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), at finish."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringBuffer:
    """Accumulates output text, cuts it at the first stop string (after it, with
    ``keep_stop``), and holds back a tail that could still become a stop string so that
    none of it is ever streamed past the cut."""

    def __init__(self, stop: list[str], keep_stop: bool = False):
        self.stop = [s for s in stop if s]
        self.keep_stop = keep_stop
        self.matched: str | None = None
        """The stop string that ended the text, once one did."""
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def append(self, delta: str, check: bool = True) -> tuple[str, bool]:
        """Add decoded text; return (text safe to stream now, whether a stop string matched).
        With ``check`` false (before ``min_tokens``) no stop string may end the output yet:
        the text streams as it comes, and a later match starts after what was streamed."""
        if self.stopped:
            return "", True
        previous = len(self.text)
        self.text += delta
        if not self.stop or not check:
            return self._emit(len(self.text)), False
        start = max(previous - self.max_stop_len + 1, self.emitted)
        hits = [(i, -len(s)) for s, i in ((s, self.text.find(s, start)) for s in self.stop) if i >= 0]
        if hits:
            at, minus_len = min(hits)  # the earliest; of those there, the longest
            self.matched = self.text[at : at - minus_len]
            self.text = self.text[: at - minus_len if self.keep_stop else at]
            self.stopped = True
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def resume(self, text: str, emitted: int) -> None:
        """Take up where an earlier run of the request stopped: it produced ``text``
        (no stop string in it, or it would have finished) and streamed ``emitted``
        characters of it; the held-back rest goes out with the next append."""
        self.text = text
        self.emitted = min(max(emitted, 0), len(text))

    def flush(self) -> str:
        """Everything not yet streamed (at a finish that is not a stop string)."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return held_back(self.text, self.stop)

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


def append_token(
    token: int, stop_token_ids: frozenset[int], detokenizer: IncrementalDetokenizer,
    text: StopStringBuffer, *, may_stop: bool = True,
) -> tuple[str, bool]:
    """One output token in: (text safe to stream now, whether it ends the request). A stop
    token ends it without being detokenized, a stop string ends it cut before the
    match; before ``min_tokens`` (``may_stop`` false) neither does."""
    if may_stop and token in stop_token_ids:
        return "", True
    return text.append(detokenizer.add(token), check=may_stop)


def stop_reason(token: int, text: StopStringBuffer, named_stop_ids: Sequence[int]) -> str | int | None:
    """What ended an answer that stopped at ``token``, as vLLM's ``stop_reason`` says it:
    the stop string it matched, else the stop token the request named; None for the
    model's own end (EOS, or a structured answer complete)."""
    if text.matched is not None:
        return text.matched
    return token if token in named_stop_ids else None


def text_state(
    tokenizer: Any, prompt_token_ids: list[int], stop: list[str],
    resumed_token_ids: Sequence[int] = (), streamed_chars: int = 0, keep_stop: bool = False,
    skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
) -> tuple[IncrementalDetokenizer, StopStringBuffer]:
    """A request's detokenizer and stop-string buffer (``keep_stop``: the answer keeps the
    stop string that ends it; ``skip_special_tokens``: special tokens are not spelled in
    its text; ``spaces_between_special_tokens``: as the tokenizer's decode reads it); for a
    resumed request, in the state the earlier run left them: its output tokens decoded,
    its streamed text sent."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens,
                                         spaces_between_special_tokens)
    buffer = StopStringBuffer(stop, keep_stop)
    if resumed_token_ids:
        buffer.resume("".join(detokenizer.add(t) for t in resumed_token_ids), streamed_chars)
    return detokenizer, buffer


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for
    each byte in a byte-level token's spelling -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """A token's own bytes, which its decoded text cannot give when it holds part of a
    UTF-8 character (OpenAI's ``bytes`` in chat log-probabilities): read from its spelling
    in a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen), or a SentencePiece byte
    fallback piece (``<0xE2>``); else the piece's text, ``▁`` as a space."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in str(decoder)
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self.special:
            return piece.encode()
        if self.byte_level and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
