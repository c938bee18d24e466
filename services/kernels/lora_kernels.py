"""Triton kernels for multi-LoRA shrink/expand (Punica's BGMV and SGMV).

Imported lazily by :mod:`services.kernels.lora`; see :func:`services.kernels._triton.kernel_module`.

* BGMV: one program per (token, output tile); each token reads its own adapter's rows.
  Matrix-vector work with no tensor cores, best for decode rows with many distinct adapters.
* SGMV: tokens grouped into segments that share an adapter; one program per
  (segment, row tile, output tile) multiplies a tile of tokens by the adapter with
  ``tl.dot``, so each weight tile is read once per row tile (prefill, or decode rows
  grouped by adapter).

Shrink writes fp32 ``t = x @ A[a].T``; expand adds ``scale[a] * t @ B[a].T`` to ``y`` in
fp32 and casts back. Adapter index -1 means "no adapter": shrink writes zeros, expand
leaves the row alone.
"""

from __future__ import annotations

import triton
import triton.language as tl

from services.kernels._triton import interpreting

INTERPRETED = interpreting()


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, FP32_PRECISE: tl.constexpr):
    """acc += a @ b. UPCAST: the interpreter computes bf16 dots on raw bits, so go via fp32.
    FP32_PRECISE: fp32 operands as three tf32 products (near-fp32 accuracy on tensor cores).
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_PRECISE:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def bgmv_shrink_kernel(
    x_ptr, a_ptr, idx_ptr, out_ptr,
    hidden_in, rank,
    stride_xt, stride_xk,
    stride_aa, stride_ar, stride_ak,
    stride_ot, stride_or,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    pid_r = tl.program_id(1)
    adapter = tl.load(idx_ptr + token)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    out_ptrs = out_ptr + token * stride_ot + offs_r * stride_or
    if adapter < 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_R], dtype=tl.float32), mask=mask_r)
        return
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    w_base = a_ptr + adapter.to(tl.int64) * stride_aa + offs_r[:, None] * stride_ar
    x_base = x_ptr + token.to(tl.int64) * stride_xt
    for k0 in range(0, hidden_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hidden_in
        x = tl.load(x_base + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_base + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(out_ptrs, tl.sum(acc, axis=1), mask=mask_r)


@triton.jit
def bgmv_expand_kernel(
    t_ptr, b_ptr, idx_ptr, scale_ptr, y_ptr,
    hidden_out, rank,
    stride_tt, stride_tr,
    stride_ba, stride_bn, stride_br,
    stride_yt, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(idx_ptr + token)
    if adapter < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden_out
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    t = tl.load(t_ptr + token * stride_tt + offs_r * stride_tr, mask=mask_r, other=0.0).to(tl.float32)
    w = tl.load(b_ptr + adapter.to(tl.int64) * stride_ba + offs_n[:, None] * stride_bn
                + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(w * t[None, :], axis=1) * tl.load(scale_ptr + adapter)
    y_ptrs = y_ptr + token.to(tl.int64) * stride_yt + offs_n * stride_yn
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def sgmv_shrink_kernel(
    x_ptr, a_ptr, token_ids_ptr, seg_start_ptr, seg_len_ptr, seg_adapter_ptr, out_ptr,
    hidden_in, rank,
    stride_xt, stride_xk,
    stride_aa, stride_ar, stride_ak,
    stride_ot, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISE: tl.constexpr,
):
    seg = tl.program_id(1)
    num_r_tiles = tl.cdiv(rank, BLOCK_R)
    pid_m = tl.program_id(0) // num_r_tiles
    pid_r = tl.program_id(0) % num_r_tiles
    seg_len = tl.load(seg_len_ptr + seg)
    adapter = tl.load(seg_adapter_ptr + seg)
    if pid_m * BLOCK_M >= seg_len or adapter < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < seg_len
    tokens = tl.load(token_ids_ptr + tl.load(seg_start_ptr + seg) + rows, mask=mask_m, other=0)
    tokens = tokens.to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    x_base = x_ptr + tokens[:, None] * stride_xt
    w_base = a_ptr + adapter.to(tl.int64) * stride_aa + offs_r[None, :] * stride_ar
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, hidden_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hidden_in
        x = tl.load(x_base + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _mma(x, w, acc, UPCAST, FP32_PRECISE)
    tl.store(out_ptr + tokens[:, None] * stride_ot + offs_r[None, :] * stride_or, acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def sgmv_expand_kernel(
    t_ptr, b_ptr, token_ids_ptr, seg_start_ptr, seg_len_ptr, seg_adapter_ptr, scale_ptr, y_ptr,
    hidden_out, rank,
    stride_tt, stride_tr,
    stride_ba, stride_bn, stride_br,
    stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISE: tl.constexpr,
):
    seg = tl.program_id(1)
    num_n_tiles = tl.cdiv(hidden_out, BLOCK_N)
    pid_m = tl.program_id(0) // num_n_tiles
    pid_n = tl.program_id(0) % num_n_tiles
    seg_len = tl.load(seg_len_ptr + seg)
    adapter = tl.load(seg_adapter_ptr + seg)
    if pid_m * BLOCK_M >= seg_len or adapter < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < seg_len
    tokens = tl.load(token_ids_ptr + tl.load(seg_start_ptr + seg) + rows, mask=mask_m, other=0)
    tokens = tokens.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hidden_out
    w_base = b_ptr + adapter.to(tl.int64) * stride_ba + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < rank
        t = tl.load(t_ptr + tokens[:, None] * stride_tt + offs_k[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * stride_br,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # The fp32 intermediate meets the weights in their dtype, as in Punica and vLLM.
        acc = _mma(t.to(w.dtype), w, acc, UPCAST, FP32_PRECISE)
    acc = acc * tl.load(scale_ptr + adapter)
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)
