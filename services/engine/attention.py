"""Paged attention over a flattened ragged batch, plugged into transformers.

The engine runs the model on ``input_ids`` of shape [1, total_tokens]: the new tokens of
every scheduled request, back to back. Each attention layer of the model calls
:func:`paged_attention_forward` (registered with transformers' ``AttentionInterface``)
which writes the new K/V into the paged cache and attends each request's queries to its
own cached context. Per-step metadata travels in a forward context, as in vLLM.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "fairway_paged"

PagedAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
    torch.Tensor,
]


@dataclass
class PagedAttentionMetadata:
    """What every layer needs for one step; built once per step by the engine."""

    slot_mapping: torch.Tensor
    """[total_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32 block ids per request (padded with 0)."""
    seq_lens: torch.Tensor
    """[num_seqs] int32 context length of each request including this step's tokens."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32 offsets of each request's new tokens in the flat batch."""
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    attention_fn: PagedAttentionFn


_local = threading.local()
"""Per thread, so engines stepping in different threads never see each other's metadata."""


@contextlib.contextmanager
def forward_context(meta: PagedAttentionMetadata) -> Iterator[None]:
    """Make ``meta`` visible to the attention layers for the duration of one forward."""
    previous = getattr(_local, "meta", None)
    _local.meta = meta
    try:
        yield
    finally:
        _local.meta = previous


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [T, kv_heads, head_dim] at flat slots of the paged caches."""
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    key_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(
        0, slot_mapping, value
    )


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of ragged queries against paged K/V (pure torch reference).

    query: [T, num_heads, head_dim], the new tokens of all requests back to back; request
    ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``, which are the last
    ``q_len`` positions of its ``seq_lens[i]`` context. key_cache/value_cache:
    [num_blocks, block_size, kv_heads, head_dim], already holding this step's K/V.
    block_tables: [num_seqs, max_blocks]. Returns [T, num_heads, head_dim].
    Grouped-query attention: num_heads must be a multiple of kv_heads.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = num_heads // kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]

    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        # Single-token queries: one padded batch. The G query heads that share a KV head
        # are laid out as G query rows of that head, so K/V are never repeated.
        num = len(decode)
        all_decode = num == len(lens)
        idx = None if all_decode else torch.tensor(decode, device=query.device)
        dec_lens = seq_lens if all_decode else seq_lens[idx]
        nb = -(-max(lens[i] for i in decode) // block_size)
        tables = (block_tables if all_decode else block_tables[idx])[:, :nb].long()
        k = key_cache[tables].view(num, nb * block_size, kv_heads, head_dim).transpose(1, 2)
        v = value_cache[tables].view(num, nb * block_size, kv_heads, head_dim).transpose(1, 2)
        rows = query_start_loc[:-1].long() if all_decode else query_start_loc[idx].long()
        q = query[rows].view(num, kv_heads, group, head_dim)
        valid = torch.arange(nb * block_size, device=query.device)[None, :] < dec_lens[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale)
        out[rows] = o.reshape(num, num_heads, head_dim)

    for i, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        ctx = lens[i]
        nb = -(-ctx // block_size)
        table = block_tables[i, :nb].long()
        k = key_cache[table].reshape(nb * block_size, kv_heads, head_dim)[:ctx]
        v = value_cache[table].reshape(nb * block_size, kv_heads, head_dim)[:ctx]
        q = query[starts[i] : starts[i + 1]]
        # Query row r sits at position ctx - q_len + r and sees keys at positions <= it.
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
        mask = torch.arange(ctx, device=query.device)[None, :] <= q_pos[:, None]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask[None, None],
            scale=scale,
        )
        out[starts[i] : starts[i + 1]] = o[0].transpose(0, 1)
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: query [1, H, T, D], key/value [1, KVH, T, D] -> [1, T, H, D]."""
    meta = getattr(_local, "meta", None)
    if meta is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention called outside an engine step")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; cannot map it to a KV cache")
    key_cache, value_cache = meta.kv_caches[layer_idx]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).to(key_cache.dtype)
    v = value[0].transpose(0, 1).to(value_cache.dtype)
    write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = meta.attention_fn(
        q, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scaling
    )
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Register the hook with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION


def use_paged_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the paged attention hook."""
    name = register_paged_attention()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, KeyError, TypeError):
            setter = None
    if setter is None or model.config._attn_implementation != name:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch {type(model).__name__} to {name} attention")
