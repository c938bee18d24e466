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
from dataclasses import dataclass, field

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
    plan: _Plan | None = field(default=None, repr=False)
    """The reference path's per-step derived tensors, made by the first layer."""
    slot_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer K/V ``[num_slots, kv_heads, max_len, head_dim]``: every running request's
    context, contiguous in its slot (see :func:`make_slot_plan`). Written every step
    when present, so it is never stale."""
    slot_plan: SlotPlan | None = None
    """Where this step's K/V go in ``slot_caches``; ``attend`` says whether attention reads
    them (the reference path) instead of gathering the paged blocks."""


_local = threading.local()
"""Per thread, so engines stepping in different threads never see each other's metadata."""

_scratch = threading.local()


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, slot: int) -> torch.Tensor:
    """``cache[block_ids]`` ([n, block_size, kv_heads, head_dim]) copied into a per-thread
    buffer that is reused from call to call: allocating megabytes every layer of every
    step costs page faults on CPU (the allocator hands large blocks back to the OS)."""
    num_blocks = cache.shape[0]
    row = cache[0].numel()
    n = block_ids.numel()
    # Inference-mode tensors cannot be written outside inference mode: one buffer per mode.
    key = (slot, cache.dtype, cache.device, torch.is_inference_mode_enabled())
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < n * row:
        buf = buffers[key] = torch.empty(n * row, dtype=cache.dtype, device=cache.device)
    out = buf[: n * row].view(n, row)
    torch.index_select(cache.view(num_blocks, row), 0, block_ids, out=out)
    return out.view(n, *cache.shape[1:])


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


DECODE_GROUP_MIN = 4
"""Fewest requests in a decode group (see ``_decode_groups``)."""
DECODE_GROUP_SPLIT = 0.6
"""A new decode group starts at a request needing at most this share of the group's longest."""
DECODE_GROUP_MAX = 4


@dataclass
class _DecodeGroup:
    """Decoding requests attended together, K/V gathered and padded to the longest one."""

    rows: torch.Tensor | None
    """Their query rows; None when they are every row of the step, in order."""
    blocks: torch.Tensor
    """[num * nb] int64 block ids, each request's table padded to ``nb`` blocks."""
    shape: tuple[int, int]
    """(num, nb * block_size)."""
    mask: torch.Tensor
    """[num, 1, 1, nb * block_size] additive mask: -inf past each context."""


@dataclass
class _Plan:
    """What every layer derives from one step's metadata alone; built once per step."""

    decode: list[_DecodeGroup]
    prefills: list[tuple[int, int, int, torch.Tensor, torch.Tensor | None]]
    """Multi-token requests: (first row, end row, context, block ids, mask or None = causal)."""


def _decode_groups(decode: list[int], blocks_of: list[int]) -> list[list[int]]:
    """Split decoding requests (longest first) where the length falls well below the
    group's longest, so short contexts are not gathered padded to the longest one: the
    gather is memory traffic, the dominant cost of decode attention on a CPU."""
    order = sorted(decode, key=lambda i: -blocks_of[i])
    groups: list[list[int]] = [[]]
    for pos, i in enumerate(order):
        group = groups[-1]
        if (
            len(group) >= DECODE_GROUP_MIN
            and len(order) - pos >= DECODE_GROUP_MIN
            and len(groups) < DECODE_GROUP_MAX
            and blocks_of[i] <= DECODE_GROUP_SPLIT * blocks_of[group[0]]
        ):
            groups.append([])
        groups[-1].append(i)
    return groups


def _padding_mask(
    width: int, lens: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [len(lens), 1, 1, width]: 0 at key positions below each row's length,
    -inf from it on."""
    invalid = torch.arange(width, device=device)[None, :] >= lens[:, None]
    mask = torch.zeros(invalid.shape, dtype=dtype, device=device)
    return mask.masked_fill_(invalid, float("-inf"))[:, None, None, :]


def _chunk_causal_mask(q_len: int, ctx: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [1, 1, q_len, ctx] of a prefill chunk, the last ``q_len`` of ``ctx``
    positions; None for a whole prompt (plain causal attention)."""
    if q_len == ctx:
        return None
    # Query row r sits at position ctx - q_len + r and sees keys at positions <= it.
    q_pos = torch.arange(ctx - q_len, ctx, device=device)
    return (torch.arange(ctx, device=device)[None, :] <= q_pos[:, None])[None, None]


def _make_plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
) -> _Plan:
    device = block_tables.device
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    blocks_of = [-(-n // block_size) for n in lens]
    groups = []
    for members in _decode_groups(decode, blocks_of) if decode else []:
        nb = blocks_of[members[0]]
        in_order = len(members) == len(lens) and members == sorted(members)
        idx = None if in_order else torch.tensor(members, device=device)
        tables = block_tables if idx is None else block_tables[idx]
        group_lens = seq_lens if idx is None else seq_lens[idx]
        shape = (len(members), nb * block_size)
        groups.append(
            _DecodeGroup(
                rows=None if idx is None else query_start_loc[idx].long(),
                blocks=tables[:, :nb].reshape(-1).long(),
                shape=shape,
                mask=_padding_mask(shape[1], group_lens, dtype, device),
            )
        )
    prefills = []
    for i, ctx in enumerate(lens):
        q_len = starts[i + 1] - starts[i]
        if q_len <= 1:
            continue
        table = block_tables[i, : blocks_of[i]].long()
        causal = _chunk_causal_mask(q_len, ctx, device)
        prefills.append((starts[i], starts[i + 1], ctx, table, causal))
    return _Plan(groups, prefills)


def _run_plan(
    plan: _Plan,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    _, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = num_heads // kv_heads
    out = None
    for g in plan.decode:
        num, length = g.shape
        k = _gather_blocks(key_cache, g.blocks, 0).view(num, length, kv_heads, head_dim)
        v = _gather_blocks(value_cache, g.blocks, 1).view(num, length, kv_heads, head_dim)
        # The G query heads that share a KV head are G query rows of it: K/V never repeat.
        rows = query if g.rows is None else query[g.rows]
        o = F.scaled_dot_product_attention(
            rows.reshape(num, kv_heads, group, head_dim),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=g.mask,
            scale=scale,
        ).reshape(num, num_heads, head_dim)
        if g.rows is None:
            return o
        if out is None:
            out = query.new_empty(query.shape)
        out.index_copy_(0, g.rows, o)
    if out is None:
        out = query.new_empty(query.shape)
    for first, end, ctx, table, causal in plan.prefills:
        nb = table.numel()
        k = _gather_blocks(key_cache, table, 0).view(nb * block_size, kv_heads, head_dim)[:ctx]
        v = _gather_blocks(value_cache, table, 1).view(nb * block_size, kv_heads, head_dim)[:ctx]
        _prefill_attention(
            out, query, first, end, k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal, scale
        )
    return out


def _prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    first: int,
    end: int,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: torch.Tensor | None,
    scale: float,
) -> None:
    """``out[first:end]`` = attention of query rows ``first:end`` ([n, H, D]) to one
    request's key/value [1, KVH, ctx, D], under ``causal`` (None: plain causal)."""
    o = F.scaled_dot_product_attention(
        query[first:end].transpose(0, 1)[None],
        key,
        value,
        attn_mask=causal,
        is_causal=causal is None,  # a whole prompt: plain causal attention
        scale=scale,
        enable_gqa=True,
    )
    out[first:end] = o[0].transpose(0, 1)


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
    plan = _make_plan(block_tables, seq_lens, query_start_loc, key_cache.shape[1], query.dtype)
    return _run_plan(plan, query, key_cache, value_cache, scale)


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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    return layer_attention(meta, layer_idx, q, k, v, scaling).unsqueeze(0), None


def layer_attention(
    meta: PagedAttentionMetadata,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """One layer's step: store k/v [T, KVH, D] in the caches, attend q [T, H, D] -> [T, H, D]."""
    key_cache, value_cache = meta.kv_caches[layer_idx]
    if k.dtype != key_cache.dtype:
        k, v = k.to(key_cache.dtype), v.to(value_cache.dtype)
    write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    plan = meta.slot_plan
    if meta.slot_caches is not None and plan is not None:
        key_slots, value_slots = meta.slot_caches[layer_idx]
        write_slot_cache(k, v, key_slots, value_slots, plan.write_index)
        if plan.attend:
            return slot_attention(plan, q, key_slots, value_slots, scaling)
    if meta.attention_fn is paged_attention_reference:
        # The reference derives the same index tensors and masks in every layer: once a step.
        if meta.plan is None:
            meta.plan = _make_plan(
                meta.block_tables, meta.seq_lens, meta.query_start_loc, key_cache.shape[1], q.dtype
            )
        out = _run_plan(meta.plan, q, key_cache, value_cache, scaling)
    else:
        out = meta.attention_fn(
            q,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scaling,
        )
    return out


SLOT_CALL_COST = 300
"""What one decode attention call costs on top of its rows, in key rows (CPU: ~15 us of
dispatch against ~50 ns per padded key row); see :func:`decode_pieces`."""
SLOT_PIECE_WINDOW = 32
"""Most slots in one decode piece, which bounds the partition search per step."""


@dataclass
class SlotPlan:
    """One step over the slot caches, made once by the engine from its bookkeeping.

    A slot holds one running request's K/V at positions ``0..len-1``, so attention reads
    views of the slots instead of gathering blocks (the gather is a copy of every
    context, the dominant cost of decode attention on a CPU)."""

    write_index: torch.Tensor
    """[T * kv_heads] int64 rows of the ``[num_slots * kv_heads * max_len, head_dim]`` view
    taking each new token's K/V (token-major, then head)."""
    attend: bool
    """Whether the attention reads the slot caches (False: the paged path; the slot caches
    are still written)."""
    pieces: list[tuple[int, int, int, torch.Tensor | None]] = field(default_factory=list)
    """Decode calls: slots ``[lo, hi)`` attended over the first ``length`` positions, with
    an additive mask [hi - lo, 1, 1, length] (-inf past each context) or None."""
    decode_query: torch.Tensor | None = None
    """Query row of every slot of the pieces, back to back (any decode row for a slot
    that does not decode)."""
    decode_pick: torch.Tensor | None = None
    """Row of the pieces' joint output of each decode request, in query order."""
    decode_rows: torch.Tensor | None = None
    """Query rows of the decode requests; None when they are all the rows, in order."""
    prefills: list[tuple[int, int, int, int, torch.Tensor | None]] = field(default_factory=list)
    """Multi-token requests: (first row, end row, slot, context, mask or None = causal)."""


def decode_pieces(lens: list[int]) -> list[tuple[int, int]]:
    """Split slots ``0..len(lens)-1`` (context length per slot, 0 for a slot that does not
    decode) into runs ``[lo, hi)`` of decoding slots attended in one call each, each
    padded to its longest context: the cheapest cover under ``SLOT_CALL_COST`` per call
    plus one per padded key row (an exact search; short contexts next to long ones get
    their own call, a run of similar ones shares one)."""
    n = len(lens)
    inf = float("inf")
    best = [0.0] + [inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        if lens[end - 1] == 0:  # an idle slot ends no piece: skip it for free
            best[end], cut[end] = best[end - 1], -1
            continue
        longest = 0
        for start in range(end - 1, max(end - SLOT_PIECE_WINDOW, 0) - 1, -1):
            longest = max(longest, lens[start])
            if lens[start] == 0:
                continue  # a piece starts at a decoding slot
            cost = best[start] + SLOT_CALL_COST + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    pieces = []
    end = n
    while end > 0:
        if cut[end] < 0:
            end -= 1
            continue
        pieces.append((cut[end], end))
        end = cut[end]
    return pieces[::-1]


def make_slot_plan(
    query_lens: list[int],
    context_lens: list[int],
    slots: list[int],
    kv_heads: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    attend: bool = True,
) -> SlotPlan:
    """The slot-cache plan of a step whose request ``i`` computes its last ``query_lens[i]``
    of ``context_lens[i]`` positions in slot ``slots[i]`` (rows back to back, in order)."""
    starts = [0]
    rows: list[int] = []  # slot row (slot * kv_heads * max_len + position) of each new token
    for n, ctx, slot in zip(query_lens, context_lens, slots, strict=True):
        starts.append(starts[-1] + n)
        base = slot * kv_heads * max_len
        rows.extend(range(base + ctx - n, base + ctx))
    heads = torch.arange(0, kv_heads * max_len, max_len, device=device)
    write_index = (torch.tensor(rows, device=device)[:, None] + heads[None, :]).reshape(-1)
    plan = SlotPlan(write_index, attend)
    if not attend:
        return plan
    decode = [i for i, n in enumerate(query_lens) if n == 1]
    if decode:
        lo = min(slots[i] for i in decode)
        lens = [0] * (max(slots[i] for i in decode) + 1 - lo)
        query_of = [starts[decode[0]]] * len(lens)
        for i in decode:
            lens[slots[i] - lo] = context_lens[i]
            query_of[slots[i] - lo] = starts[i]
        query_index: list[int] = []
        row_lens: list[int] = []  # context of each row of the pieces (idle slots: 1)
        offset_of = [0] * len(lens)  # row of each slot in the pieces' joint output
        pieces = []
        for first, end in decode_pieces(lens):
            for k in range(first, end):
                offset_of[k] = len(query_index) + k - first
            query_index.extend(query_of[first:end])
            row_lens.extend(max(n, 1) for n in lens[first:end])
            pieces.append((first, end, max(lens[first:end]), min(row_lens[-(end - first) :])))
        # One mask for every piece (each takes its rows and its length), built in one go.
        width = max(p[2] for p in pieces)
        masks = _padding_mask(width, torch.tensor(row_lens, device=device), dtype, device)
        done = 0
        for first, end, longest, shortest in pieces:
            mask = masks[done : done + end - first, ..., :longest] if shortest < longest else None
            plan.pieces.append((lo + first, lo + end, longest, mask))
            done += end - first
        plan.decode_query = torch.tensor(query_index, device=device)
        plan.decode_pick = torch.tensor([offset_of[slots[i] - lo] for i in decode], device=device)
        if len(decode) != len(slots):
            plan.decode_rows = torch.tensor([starts[i] for i in decode], device=device)
    for i, (n, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        if n <= 1:
            continue
        causal = _chunk_causal_mask(n, ctx, device)
        plan.prefills.append((starts[i], starts[i + 1], slots[i], ctx, causal))
    return plan


def write_slot_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    write_index: torch.Tensor,
) -> None:
    """Store key/value [T, kv_heads, head_dim] at the plan's rows of the slot caches."""
    head_dim = key_cache.shape[-1]
    key_cache.view(-1, head_dim).index_copy_(0, write_index, key.reshape(-1, head_dim))
    value_cache.view(-1, head_dim).index_copy_(0, write_index, value.reshape(-1, head_dim))


def slot_attention(
    plan: SlotPlan,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the step's queries [T, num_heads, head_dim] against their slots
    of ``key_cache``/``value_cache`` [num_slots, kv_heads, max_len, head_dim], already
    holding this step's K/V."""
    _, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[1]
    group = num_heads // kv_heads
    out = None
    if plan.pieces:
        assert plan.decode_query is not None and plan.decode_pick is not None
        rows = query.index_select(0, plan.decode_query)
        outs = []
        done = 0
        for lo, hi, length, mask in plan.pieces:
            # The G query heads that share a KV head are G query rows of it: K/V never repeat.
            outs.append(
                F.scaled_dot_product_attention(
                    rows[done : done + hi - lo].view(hi - lo, kv_heads, group, head_dim),
                    key_cache[lo:hi, :, :length],
                    value_cache[lo:hi, :, :length],
                    attn_mask=mask,
                    scale=scale,
                )
            )
            done += hi - lo
        o = (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(done, num_heads, head_dim)
        o = o.index_select(0, plan.decode_pick)
        if plan.decode_rows is None:
            return o
        out = query.new_empty(query.shape)
        out.index_copy_(0, plan.decode_rows, o)
    if out is None:
        out = query.new_empty(query.shape)
    for first, end, slot, ctx, causal in plan.prefills:
        key, value = key_cache[slot : slot + 1, :, :ctx], value_cache[slot : slot + 1, :, :ctx]
        _prefill_attention(out, query, first, end, key, value, causal, scale)
    return out


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
