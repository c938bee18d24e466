"""Token sampling for a batch of requests, each with its own parameters and seed."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from services.messages import SamplingParams

GREEDY_EPSILON = 1e-5


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
    return None


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


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    positions: list[int],
) -> list[int]:
    """One token per row of ``logits`` [N, V]: argmax for temperature 0, else a draw from
    the temperature-scaled, top-k/top-p filtered distribution; a seeded row draws with its
    generator seeded for its output position (``positions``: output tokens before it)."""
    logits = logits.float()
    result = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > GREEDY_EPSILON]
    if rows:
        dev = logits.device
        sub = (
            logits[rows] / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
        )
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
            sub = apply_top_k_top_p(
                sub,
                torch.tensor([params[i].top_k for i in rows], device=dev),
                torch.tensor([params[i].top_p for i in rows], device=dev, dtype=sub.dtype),
            )
        probs = torch.softmax(sub, dim=-1)
        for j, i in enumerate(rows):
            gen = generators[i]
            if gen is not None:
                gen.manual_seed(position_seed(params[i].seed or 0, positions[i]))
            result[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return result.tolist()
