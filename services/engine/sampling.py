"""Token sampling for a batch of requests, each with its own parameters and seed."""

from __future__ import annotations

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


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A private RNG for a seeded request, so its samples do not depend on the batch."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


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
) -> list[int]:
    """One token per row of ``logits`` [N, V]: argmax for temperature 0, else a draw from
    the temperature-scaled, top-k/top-p filtered distribution with the row's generator."""
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
            result[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return result.tolist()
