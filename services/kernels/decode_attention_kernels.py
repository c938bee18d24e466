"""Triton kernels for paged-KV decode attention with split-K (Flash-Decoding).

Imported lazily by :mod:`services.kernels.decode_attention`.

``decode_partition_kernel`` runs one program per (sequence, KV head, context partition).
It loads the query heads that share the KV head (grouped-query attention, padded to 16
rows for ``tl.dot``), walks the partition in tiles of ``TILE_N`` tokens (looking up each
token's page in the block table, so the tile size is independent of the page size) and
keeps an online softmax in fp32 (base 2). Without split-K there is one partition per
sequence and the program writes the final output; with split-K it writes each partition's
normalised output, max logit and exp-sum, and ``decode_reduce_kernel`` combines the
partitions with a log-sum-exp rescale.
"""

from __future__ import annotations

import triton
import triton.language as tl

from services.kernels._triton import interpreting

INTERPRETED = interpreting()


@triton.jit
def _mma(a, b, acc, FP32_PRECISE: tl.constexpr):
    if FP32_PRECISE:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    qk_scale_log2,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts,
    stride_os, stride_oh,
    stride_ps, stride_ph, stride_pp,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    if SPLIT:
        start = part * PARTITION_SIZE
        end = tl.minimum(start + PARTITION_SIZE, context_len)
    else:
        start = 0
        end = context_len

    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_gd = mask_g[:, None] & mask_d[None, :]

    if start >= end:
        if not SPLIT:
            # Empty context (e.g. a padding row): define the output as zeros.
            tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mask_gd)
        return

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_gd, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    for tile_start in range(start, end, TILE_N):
        offs_n = tile_start + tl.arange(0, TILE_N)
        mask_n = offs_n < end
        blocks = tl.load(table + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slots = offs_n % PAGE_SIZE
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + blocks[:, None] * stride_kb + slots[:, None] * stride_kt + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        v = tl.load(v_head + blocks[:, None] * stride_vb + slots[:, None] * stride_vt + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = _mma(q, tl.trans(k), tl.zeros([BLOCK_G, TILE_N], dtype=tl.float32), FP32_PRECISE)
        scores = scores * qk_scale_log2
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], FP32_PRECISE)
        m_i = m_new

    out = acc / l_i[:, None]
    if SPLIT:
        base = seq * stride_ps + heads * stride_ph + part * stride_pp
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_gd)
        tl.store(part_max_ptr + base, m_i, mask=mask_g)
        tl.store(part_sum_ptr + base, l_i, mask=mask_g)
    else:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_gd)


@triton.jit
def decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, context_lens_ptr,
    stride_os, stride_oh,
    stride_ps, stride_ph, stride_pp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = tl.cdiv(context_len, PARTITION_SIZE)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_parts
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = seq * stride_ps + head * stride_ph + offs_p * stride_pp
    part_max = tl.load(part_max_ptr + base, mask=mask_p, other=float("-inf"))
    # Floor keeps an empty context (no partitions) at weight 0 instead of NaN.
    global_max = tl.maximum(tl.max(part_max, axis=0), -1e30)
    weights = tl.load(part_sum_ptr + base, mask=mask_p, other=0.0) * tl.exp2(part_max - global_max)
    parts = tl.load(part_out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)
