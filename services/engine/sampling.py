"""Token sampling for a batch of requests, each with its own parameters and seed.

The order follows vLLM's sampler: logit bias, the ``min_tokens`` mask and the penalties
change the raw logits (so they hold for greedy requests too), and a structured request's
grammar masks every token that would leave its language; then temperature, ``min_p``,
top-k and top-p shape the distribution a sampled request draws from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from services.engine.structured import GrammarState
from services.messages import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_LOGPROBS,
    MAX_PENALTY,
    SamplingParams,
)

GREEDY_EPSILON = 1e-5


class SamplingRow(Protocol):
    """What the sampler needs to know of one request: its parameters and RNG, its tokens
    so far (prompt then output: the penalties' and ``min_tokens``' input) and the
    tokens that would end it, and a structured request's grammar state."""

    @property
    def sampling(self) -> SamplingParams: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def stop_token_ids(self) -> frozenset[int]: ...
    @property
    def grammar(self) -> GrammarState | None: ...
    @property
    def bad_word_ids(self) -> Sequence[Sequence[int]]: ...
    @property
    def allowed_ids(self) -> torch.Tensor | None: ...


def validate_sampling(params: SamplingParams) -> str | None:
    """Why ``params`` cannot be served, or None when they are fine."""
    if params.max_tokens < 1:
        return "max_tokens must be at least 1"
    if params.temperature < 0 or params.temperature != params.temperature:
        return "temperature must be >= 0"
    if not 0.0 < params.top_p <= 1.0:
        return "top_p must be in (0, 1]"
    if params.top_k < 0:
        return "top_k must be >= 0 (0 disables it)"
    if any(not s for s in params.stop):
        return "stop strings must not be empty"
    for name in ("presence_penalty", "frequency_penalty"):
        if not -MAX_PENALTY <= getattr(params, name) <= MAX_PENALTY:
            return f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"
    if not 0.0 < params.repetition_penalty < math.inf:
        return "repetition_penalty must be > 0 (1 disables it)"
    if not 0.0 <= params.min_p <= 1.0:
        return "min_p must be in [0, 1]"
    if not 0 <= params.min_tokens <= params.max_tokens:
        return f"min_tokens must be in [0, max_tokens] ({params.max_tokens})"
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            return f"{name} must be in [0, {MAX_LOGPROBS}]"
    if params.structured is not None:
        problem = params.structured.problem()
        if problem is not None:
            return problem
    if params.allowed_token_ids:
        if len(params.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
            return f"allowed_token_ids may hold at most {MAX_ALLOWED_TOKEN_IDS} tokens"
        if min(params.allowed_token_ids) < 0:
            return "allowed_token_ids must be >= 0"
        if params.structured is not None:
            return "allowed_token_ids cannot be combined with a structured answer (its language is the mask)"
    if params.bad_words:
        if len(params.bad_words) > MAX_BAD_WORDS:
            return f"bad_words may hold at most {MAX_BAD_WORDS} words"
        if any(not w.strip() or len(w) > MAX_BAD_WORD_CHARS for w in params.bad_words):
            return f"bad_words must be words of 1 to {MAX_BAD_WORD_CHARS} characters"
        if params.structured is not None or params.allowed_token_ids:
            # Either may leave nothing but a banned token to sample.
            return "bad_words cannot be combined with a structured answer or allowed_token_ids"
    return _logit_bias_problem(params)


def bad_word_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Each bad word's token ids as the tokenizer spells it alone and after a space (how
    it reads inside a text), without repeats."""
    found: list[list[int]] = []
    for word in words:
        for spelling in (word.lstrip(), " " + word.lstrip()):
            ids = list(tokenizer.encode(spelling, add_special_tokens=False))
            if ids and ids not in found:
                found.append(ids)
    return found


def _logit_bias_problem(params: SamplingParams) -> str | None:
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        return f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens"
    seen: set[int] = set()
    for entry in params.logit_bias:
        if entry.token_id < 0:
            return "logit_bias token ids must be >= 0"
        if entry.token_id in seen:
            return f"logit_bias names token {entry.token_id} twice"
        seen.add(entry.token_id)
        if not -MAX_LOGIT_BIAS_VALUE <= entry.bias <= MAX_LOGIT_BIAS_VALUE:
            return f"logit_bias values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]"
    return None


def allowed_ids(params: SamplingParams, device: torch.device | str) -> torch.Tensor | None:
    """A request's ``allowed_token_ids`` on ``device``, made once for all its steps (a list
    of thousands would cost milliseconds to turn into a tensor each step); None: any."""
    if not params.allowed_token_ids:
        return None
    return torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long, device=device)


def adjusts_logits(params: SamplingParams) -> bool:
    """Whether the request changes the raw logits (bias, minimum length, penalties)."""
    return bool(
        params.logit_bias
        or params.allowed_token_ids
        or params.bad_words
        or params.min_tokens
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
    )


def adjust_logits(logits: torch.Tensor, row: SamplingRow) -> None:
    """Apply one request's logit bias, ``min_tokens`` mask and penalties to its logits
    [V], in place. They depend only on the request's own tokens, so a request resumed
    on another worker or recomputed after a preemption gets the same adjustments."""
    params, vocab, dev = row.sampling, logits.shape[-1], logits.device
    tokens, prompt_len = row.token_ids, row.num_prompt_tokens
    allowed = row.allowed_ids
    if allowed is not None:
        kept = logits.index_select(-1, allowed)
        logits.fill_(-math.inf)
        logits.index_copy_(-1, allowed, kept)
    if row.bad_word_ids:
        output = tokens[prompt_len:]
        banned = [ids[-1] for ids in row.bad_word_ids if ids[-1] < vocab and (
            len(ids) == 1 or (len(output) >= len(ids) - 1 and list(output[len(output) - len(ids) + 1:]) == ids[:-1]))]
        if banned:
            logits[torch.tensor(banned, dtype=torch.long, device=dev)] = -math.inf
    if params.logit_bias:
        entries = [b for b in params.logit_bias if b.token_id < vocab]
        ids = torch.tensor([b.token_id for b in entries], dtype=torch.long, device=dev)
        logits[ids] += torch.tensor([b.bias for b in entries], dtype=logits.dtype, device=dev)
    if len(tokens) - prompt_len < params.min_tokens and not (
        row.grammar is not None and row.grammar.only_end_allowed()
    ):
        stops = [t for t in row.stop_token_ids if t < vocab]
        # Unless the only tokens allowed are stops: then one of them is all there is.
        if stops and not (allowed is not None and set(params.allowed_token_ids) <= set(stops)):
            logits[torch.tensor(stops, dtype=torch.long, device=dev)] = -math.inf
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(tokens, dtype=torch.long, device=dev).unique()
        values = logits[seen]
        p = params.repetition_penalty
        logits[seen] = torch.where(values > 0, values / p, values * p)
    if (params.presence_penalty or params.frequency_penalty) and len(tokens) > prompt_len:
        output = torch.tensor(tokens[prompt_len:], dtype=torch.long, device=dev)
        ids, counts = output.unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [N, V] of tokens less likely than ``min_p`` [N] times each row's most
    likely token with -inf (0 keeps every token)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


_MASK64 = (1 << 64) - 1


def with_seed(params: SamplingParams, request_id: str) -> SamplingParams:
    """``params`` with a seed: a sampled request sent without one gets a seed of its own
    id, so the worker that continues it after a death samples what the first one did."""
    if params.seed is not None or params.temperature <= GREEDY_EPSILON:
        return params
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return dataclasses.replace(params, seed=int.from_bytes(digest, "little", signed=True))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A private RNG for a seeded request, so its samples do not depend on the batch
    (reseeded for every draw, see :func:`position_seed`)."""
    if seed is None:
        return None
    return torch.Generator(device=device)


def position_seed(seed: int, position: int) -> int:
    """The seed of a request's draw for output token ``position`` (splitmix64 of both).

    A draw depends on the request's seed and the token's place only, not on how many
    draws came before it in this process: an answer continued from a resume point on
    another worker, or recomputed after a preemption, samples exactly what the
    uninterrupted run would have, given the same logits.
    """
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits [N, V] outside each row's top-k (0 = off) and top-p nucleus with -inf."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    remove = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Drop a token when the mass before it already reaches top_p; the first always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """One token per row of ``logits`` [N, V]: argmax for temperature 0, else a draw from
    the temperature-scaled, min-p/top-k/top-p filtered distribution, after each request's
    logit adjustments (:func:`adjust_logits`) and its grammar's mask. A seeded row draws
    with its generator seeded for its output position, so its draw does not depend on the
    batch."""
    logits = logits.float()
    params = [row.sampling for row in rows]
    for i, row in enumerate(rows):
        if adjusts_logits(params[i]):
            adjust_logits(logits[i], row)
        if row.grammar is not None:
            row.grammar.mask(logits[i])
    result = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > GREEDY_EPSILON]
    if sampled:
        dev = logits.device
        sub = (
            logits[sampled]
            / torch.tensor([params[i].temperature for i in sampled], device=dev)[:, None]
        )
        if any(params[i].min_p > 0.0 for i in sampled):
            sub = apply_min_p(
                sub, torch.tensor([params[i].min_p for i in sampled], device=dev, dtype=sub.dtype)
            )
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in sampled):
            sub = apply_top_k_top_p(
                sub,
                torch.tensor([params[i].top_k for i in sampled], device=dev),
                torch.tensor([params[i].top_p for i in sampled], device=dev, dtype=sub.dtype),
            )
        probs = torch.softmax(sub, dim=-1)
        for j, i in enumerate(sampled):
            gen = rows[i].generator
            if gen is not None:
                position = len(rows[i].token_ids) - rows[i].num_prompt_tokens
                gen.manual_seed(position_seed(params[i].seed or 0, position))
            result[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return result.tolist()


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int], ranked: bool = False
) -> list[tuple[float, int, list[int], list[float]]]:
    """For rows of raw logits [N, V] and each row's chosen token: the token's
    log-probability and, when ``ranked``, its rank (1: the most likely, as vLLM's; else
    0, not known), and the ids and log-probabilities of the row's ``top[i]`` most likely
    tokens, most likely first. Only the prompt's ranks are shown, so only they are paid for."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)[:, None]
    chosen_values = logprobs.gather(1, index)
    ranks = ((logprobs > chosen_values).sum(dim=-1) + 1).tolist() if ranked else [0] * len(tokens)
    chosen = chosen_values[:, 0].tolist()
    k = min(max(top, default=0), logprobs.shape[-1])
    ids: list[list[int]] = [[] for _ in tokens]
    values: list[list[float]] = [[] for _ in tokens]
    if k:
        best, best_ids = logprobs.topk(k, dim=-1)
        ids, values = best_ids.tolist(), best.tolist()
    return [(chosen[i], ranks[i], ids[i][: top[i]], values[i][: top[i]]) for i in range(len(tokens))]
