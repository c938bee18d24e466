"""Paged-KV decode attention with grouped-query heads and split-K (Flash-Decoding).

One new token per sequence attends to its whole cached context, read through the
engine's block tables:

* ``q``: [num_seqs, num_q_heads, head_dim]
* ``k_cache``/``v_cache``: [num_blocks, page_size, num_kv_heads, head_dim] (engine layout)
* ``block_tables``: [num_seqs, max_blocks] int32; ``context_lens``: [num_seqs] int32
* returns [num_seqs, num_q_heads, head_dim] in ``q``'s dtype; a sequence with an empty
  context gets zeros.

With few sequences and long contexts one program per (sequence, KV head) leaves most of
the GPU idle, so the Triton path splits each context into partitions, attends to each in
parallel, and merges the partial softmaxes with a log-sum-exp reduce.
:func:`paged_decode_attention` picks Triton on CUDA tensors and the reference otherwise.
"""

from __future__ import annotations

import functools
import math

import torch

from services.kernels._triton import (
    cdiv,
    check_kernel_device,
    interpreting,
    kernel_module,
    launch,
    next_power_of_2,
    use_triton,
)

DEFAULT_PARTITION_SIZE = 512
MAX_PARTITIONS = 256
MIN_AUTO_PARTITION = 128


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("expected q [S, H, D] and k/v caches [blocks, page_size, kv_heads, D]")
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks]")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [{num_seqs}]")


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    split_k: bool | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """Gather every sequence's pages, then a masked softmax in fp32.

    ``split_k`` and ``partition_size`` only steer the Triton kernel; they are accepted
    here so both functions share one signature.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    if max_context_len is None:
        max_context_len = int(context_lens.max().item()) if num_seqs else 0
    if num_seqs == 0 or max_context_len == 0:
        return torch.zeros_like(q)
    num_pages = cdiv(max_context_len, page_size)
    tables = block_tables[:, :num_pages].long()
    k = k_cache[tables].reshape(num_seqs, num_pages * page_size, kv_heads, head_dim).float()
    v = v_cache[tables].reshape(num_seqs, num_pages * page_size, kv_heads, head_dim).float()
    qg = q.float().view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("skgd,snkd->skgn", qg, k) * scale
    positions = torch.arange(num_pages * page_size, device=q.device)
    valid = positions[None, :] < context_lens.to(q.device).long()[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty context -> zeros
    out = torch.einsum("skgn,snkd->skgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_partitions(
    num_seqs: int,
    num_kv_heads: int,
    max_context_len: int,
    num_multiprocessors: int,
    split_k: bool | None,
    partition_size: int,
) -> int:
    """Partition size for split-K, or 0 for none.

    Auto (``split_k=None``): when one program per (sequence, KV head) fills fewer than two
    waves of the GPU, halve the partition (down to ``MIN_AUTO_PARTITION``) until the
    partitions do; no split if one partition still covers the context. Either way the
    partition grows (by powers of two) until at most ``MAX_PARTITIONS`` remain.
    """
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError("partition_size must be a power of two >= 16")
    if split_k is None:
        target = 2 * num_multiprocessors
        if num_seqs * num_kv_heads >= target:
            return 0
        while (
            partition_size > MIN_AUTO_PARTITION
            and num_seqs * num_kv_heads * cdiv(max_context_len, partition_size) < target
        ):
            partition_size //= 2
        if cdiv(max_context_len, partition_size) <= 1:
            return 0
    elif not split_k:
        return 0
    while cdiv(max_context_len, partition_size) > MAX_PARTITIONS:
        partition_size *= 2
    return partition_size


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    split_k: bool | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """Triton Flash-Decoding over paged K/V; same semantics as the reference.

    ``max_context_len`` bounds the partition grid; without it the block table's width
    times the page size is used, which needs no device sync.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    check_kernel_device(q)
    kernels = kernel_module("decode_attention_kernels")
    num_seqs, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k/v caches must be contiguous in head_dim")
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page_size
    sms = _multiprocessors(q.device.index or 0) if q.is_cuda else 132
    part_size = plan_partitions(num_seqs, kv_heads, max_context_len, sms, split_k, partition_size)
    num_parts = cdiv(max_context_len, part_size) if part_size else 1

    group = num_heads // kv_heads
    upcast = interpreting() and k_cache.dtype == torch.bfloat16
    # Tokens per loop step: a 16 KB K tile (64 tokens of bf16 x 128) keeps fp32 from spilling.
    block_d = max(16, next_power_of_2(head_dim))
    tile_n = max(16, min(64, 16384 // (block_d * k_cache.element_size())))
    if part_size:
        tile_n = min(tile_n, part_size)
    common = {
        "GROUP": group, "BLOCK_G": max(16, next_power_of_2(group)),
        "HEAD_DIM": head_dim, "BLOCK_D": block_d,
        "PAGE_SIZE": page_size, "TILE_N": tile_n, "PARTITION_SIZE": max(part_size, 16),
        "SPLIT": part_size > 0, "UPCAST": upcast, "FP32_PRECISE": upcast or k_cache.dtype == torch.float32,
        "num_warps": 4, "num_stages": 2,
    }
    if part_size:
        part_max = torch.empty(num_seqs, num_heads, num_parts, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(num_seqs, num_heads, num_parts, head_dim, dtype=torch.float32,
                               device=q.device)
    else:
        part_max = part_sum = part_out = out  # unused without split-K
    part_strides = (num_heads * num_parts, num_parts, 1)
    args = (
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_max, part_sum,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *part_strides,
    )
    launch(kernels.decode_partition_kernel, (num_seqs, kv_heads, num_parts), args, common)
    if part_size:
        args = (
            out, part_out, part_max, part_sum, context_lens,
            out.stride(0), out.stride(1),
            *part_strides,
        )
        meta = {"HEAD_DIM": head_dim, "BLOCK_D": block_d,
                "PARTITION_SIZE": part_size, "BLOCK_P": max(2, next_power_of_2(num_parts)),
                "num_warps": 4}
        launch(kernels.decode_reduce_kernel, (num_seqs, num_heads), args, meta)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    split_k: bool | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """Decode attention over paged K/V; Triton on CUDA tensors, torch reference otherwise."""
    fn = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_reference
    return fn(
        q, k_cache, v_cache, block_tables, context_lens, scale,
        max_context_len=max_context_len, split_k=split_k, partition_size=partition_size,
    )
