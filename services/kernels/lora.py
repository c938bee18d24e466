"""Batched multi-LoRA: every token of a batch may use a different adapter (Punica, S-LoRA).

Adapters are stacked so one kernel launch serves the whole batch:

* ``lora_a``: [num_adapters, rank, hidden_in], ``lora_b``: [num_adapters, hidden_out, rank]
  (PEFT's ``lora_A.weight`` / ``lora_B.weight`` per adapter; adapters of smaller rank are
  zero-padded to the pool's rank, which changes nothing mathematically);
* ``scale``: [num_adapters] fp32, PEFT's ``lora_alpha / r`` per adapter;
* ``indices``: [num_tokens] int, the adapter of each token, -1 for "no adapter".

``add_lora`` computes ``y[i] += scale[a] * (x[i] @ A[a].T) @ B[a].T`` with ``a = indices[i]``,
in two steps: :func:`lora_shrink` (to the rank, fp32) and :func:`lora_expand` (back to the
hidden size, added in place). Without ``segments`` the Triton path runs BGMV (one token per
program, for decode rows); with :class:`LoraSegments` it runs SGMV (tiles of tokens that
share an adapter, for prefill segments or decode rows grouped by adapter). The public
functions pick Triton on CUDA tensors and the torch reference otherwise; the ``*_reference``
and ``*_triton`` functions are exported so tests and benchmarks can call each directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LoraSegments:
    """SGMV metadata: runs of tokens that share one adapter.

    Segment ``s`` covers tokens ``token_ids[starts[s] : starts[s] + lens[s]]``, all using
    adapter ``adapters[s]``. Tokens without an adapter are left out. Built once per step
    on the host (the engine knows every request's adapter and token count) and shared by
    every LoRA layer of the forward.
    """

    token_ids: torch.Tensor
    """[num_grouped_tokens] int32 token rows in segment order."""
    starts: torch.Tensor
    """[num_segments] int32 offset of each segment in ``token_ids``."""
    lens: torch.Tensor
    """[num_segments] int32 tokens per segment."""
    adapters: torch.Tensor
    """[num_segments] int32 adapter index of each segment."""
    max_len: int
    """Longest segment; sizes the launch grid without a device sync."""

    @property
    def num_segments(self) -> int:
        return int(self.lens.numel())

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], adapters: Sequence[int], device: torch.device | str = "cpu"
    ) -> LoraSegments:
        """Contiguous segments, e.g. each request's prefill tokens back to back.

        Neighbouring segments with the same adapter are merged; segments with adapter -1
        are dropped.
        """
        if len(lengths) != len(adapters):
            raise ValueError("lengths and adapters differ in length")
        starts: list[int] = []
        lens: list[int] = []
        seg_adapters: list[int] = []
        offset = 0
        for length, adapter in zip(lengths, adapters):
            if length < 0:
                raise ValueError("segment lengths must be >= 0")
            if adapter >= 0 and length > 0:
                if seg_adapters and seg_adapters[-1] == adapter and starts[-1] + lens[-1] == offset:
                    lens[-1] += length
                else:
                    starts.append(offset)
                    lens.append(length)
                    seg_adapters.append(adapter)
            offset += length
        return cls._build(list(range(offset)), starts, lens, seg_adapters, device)

    @classmethod
    def group_tokens(
        cls, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> LoraSegments:
        """Group tokens by adapter (stable), e.g. decode rows, one segment per adapter in use."""
        values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        order = sorted((a, i) for i, a in enumerate(values) if a >= 0)
        token_ids = [i for _, i in order]
        starts: list[int] = []
        lens: list[int] = []
        seg_adapters: list[int] = []
        for pos, (adapter, _) in enumerate(order):
            if seg_adapters and seg_adapters[-1] == adapter:
                lens[-1] += 1
            else:
                starts.append(pos)
                lens.append(1)
                seg_adapters.append(adapter)
        return cls._build(token_ids, starts, lens, seg_adapters, device)

    @classmethod
    def _build(
        cls,
        token_ids: list[int],
        starts: list[int],
        lens: list[int],
        adapters: list[int],
        device: torch.device | str,
    ) -> LoraSegments:
        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            token_ids=as_tensor(token_ids),
            starts=as_tensor(starts),
            lens=as_tensor(lens),
            adapters=as_tensor(adapters),
            max_len=max(lens, default=0),
        )


def _check_shapes(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, in_dim: int, name: str
) -> None:
    if x.dim() != 2 or weights.dim() != 3:
        raise ValueError(f"expected 2-D activations and 3-D stacked {name}")
    if x.shape[1] != weights.shape[in_dim]:
        raise ValueError(f"{name} has shape {tuple(weights.shape)}, activations {tuple(x.shape)}")
    if indices.shape != (x.shape[0],):
        raise ValueError(f"indices must have shape [{x.shape[0]}], got {tuple(indices.shape)}")


# --- torch reference -------------------------------------------------------------------


def lora_shrink_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    indices: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """t[i] = x[i] @ A[indices[i]].T in fp32; zero rows where indices[i] == -1.

    x: [T, hidden_in]; returns [T, rank] float32. ``segments`` is accepted for signature
    parity and ignored: ``indices`` alone defines the mapping.
    """
    _check_shapes(x, lora_a, indices, 2, "lora_a")
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for adapter in torch.unique(indices).tolist():
        if adapter < 0:
            continue
        rows = (indices == adapter).nonzero(as_tuple=True)[0]
        out[rows] = x[rows].float() @ lora_a[adapter].float().T
    return out


def lora_expand_reference(
    y: torch.Tensor,
    t: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """y[i] += scale[a] * t[i] @ B[a].T (a = indices[i] >= 0) in fp32, cast back; in place.

    y: [T, hidden_out] (may be a column slice of a wider output); t: [T, rank].
    Returns ``y``.
    """
    _check_shapes(t, lora_b, indices, 2, "lora_b")
    if y.shape != (t.shape[0], lora_b.shape[1]):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected {(t.shape[0], lora_b.shape[1])}")
    for adapter in torch.unique(indices).tolist():
        if adapter < 0:
            continue
        rows = (indices == adapter).nonzero(as_tuple=True)[0]
        delta = (t[rows].float() @ lora_b[adapter].float().T) * scale[adapter].float()
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """y += scale[a] * (x @ A[a].T) @ B[a].T per token, in place; returns ``y``."""
    t = lora_shrink_reference(x, lora_a, indices)
    return lora_expand_reference(y, t, lora_b, indices, scale)


# --- Triton ----------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    # The interpreter computes bf16 dots on raw bits; plain tf32 would lose fp32 accuracy.
    return {"UPCAST": interpreting() and dtype == torch.bfloat16, "FP32_PRECISE": dtype == torch.float32}


def lora_shrink_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    indices: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """Triton version of :func:`lora_shrink_reference` (BGMV, or SGMV with ``segments``)."""
    _check_shapes(x, lora_a, indices, 2, "lora_a")
    check_kernel_device(x)
    k = kernel_module("lora_kernels")
    num_tokens, hidden_in = x.shape
    rank = lora_a.shape[1]
    if segments is None:
        out = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)
        if num_tokens == 0:
            return out
        block_r = min(next_power_of_2(rank), 32)
        block_k = max(16, min(next_power_of_2(hidden_in), 4096 // block_r))
        grid = (num_tokens, cdiv(rank, block_r))
        args = (
            x, lora_a, indices, out,
            hidden_in, rank,
            x.stride(0), x.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            out.stride(0), out.stride(1),
        )
        launch(k.bgmv_shrink_kernel, grid, args, {"BLOCK_R": block_r, "BLOCK_K": block_k, "num_warps": 4})
        return out
    out = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    if segments.num_segments == 0 or segments.max_len == 0:
        return out
    block_m = 16 if segments.max_len <= 16 else (32 if segments.max_len <= 32 else 64)
    block_r = min(max(16, next_power_of_2(rank)), 64)
    block_k = (64 if block_r <= 32 else 32) if x.dtype == torch.float32 else (128 if block_r <= 32 else 64)
    grid = (cdiv(segments.max_len, block_m) * cdiv(rank, block_r), segments.num_segments)
    args = (
        x, lora_a, segments.token_ids, segments.starts, segments.lens, segments.adapters, out,
        hidden_in, rank,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        out.stride(0), out.stride(1),
    )
    meta = {"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": block_k, **_dot_flags(x.dtype),
            "num_warps": 4, "num_stages": 3}
    launch(k.sgmv_shrink_kernel, grid, args, meta)
    return out


def lora_expand_triton(
    y: torch.Tensor,
    t: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """Triton version of :func:`lora_expand_reference` (BGMV, or SGMV with ``segments``)."""
    _check_shapes(t, lora_b, indices, 2, "lora_b")
    if y.shape != (t.shape[0], lora_b.shape[1]):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected {(t.shape[0], lora_b.shape[1])}")
    check_kernel_device(y)
    k = kernel_module("lora_kernels")
    num_tokens, rank = t.shape
    hidden_out = lora_b.shape[1]
    if num_tokens == 0:
        return y
    scale = scale.to(device=y.device, dtype=torch.float32)
    if segments is None:
        block_r = next_power_of_2(rank)
        block_n = max(16, min(next_power_of_2(hidden_out), 8192 // block_r, 256))
        grid = (num_tokens, cdiv(hidden_out, block_n))
        args = (
            t, lora_b, indices, scale, y,
            hidden_out, rank,
            t.stride(0), t.stride(1),
            lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
            y.stride(0), y.stride(1),
        )
        launch(k.bgmv_expand_kernel, grid, args, {"BLOCK_N": block_n, "BLOCK_R": block_r, "num_warps": 4})
        return y
    if segments.num_segments == 0 or segments.max_len == 0:
        return y
    block_m = 16 if segments.max_len <= 16 else (32 if segments.max_len <= 32 else 64)
    fp32 = lora_b.dtype == torch.float32  # fp32 tiles are halved to stay clear of spills
    block_n = 64 if fp32 else 128
    # The widest tile (64 x 128) takes rank in steps of 32: at 64, ptxas spills on sm_80.
    block_k = min(max(16, next_power_of_2(rank)), 32 if fp32 or block_m == 64 else 64)
    grid = (cdiv(segments.max_len, block_m) * cdiv(hidden_out, block_n), segments.num_segments)
    args = (
        t, lora_b, segments.token_ids, segments.starts, segments.lens, segments.adapters, scale, y,
        hidden_out, rank,
        t.stride(0), t.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
    )
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **_dot_flags(lora_b.dtype),
            "num_warps": 8 if block_m == 64 else 4, "num_stages": 2}
    launch(k.sgmv_expand_kernel, grid, args, meta)
    return y


def add_lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """Triton version of :func:`add_lora_reference`."""
    t = lora_shrink_triton(x, lora_a, indices, segments=segments)
    return lora_expand_triton(y, t, lora_b, indices, scale, segments=segments)


# --- dispatch --------------------------------------------------------------------------


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    indices: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """x [T, hidden_in] -> fp32 [T, rank], per-token adapter; Triton on CUDA, torch otherwise."""
    fn = lora_shrink_triton if use_triton(x) else lora_shrink_reference
    return fn(x, lora_a, indices, segments=segments)


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """y [T, hidden_out] += scale[a] * t @ B[a].T in place; Triton on CUDA, torch otherwise."""
    fn = lora_expand_triton if use_triton(y) else lora_expand_reference
    return fn(y, t, lora_b, indices, scale, segments=segments)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor,
    *,
    segments: LoraSegments | None = None,
) -> torch.Tensor:
    """y += scale[a] * (x @ A[a].T) @ B[a].T per token, in place; Triton on CUDA, torch otherwise."""
    fn = add_lora_triton if use_triton(y) else add_lora_reference
    return fn(y, x, lora_a, lora_b, indices, scale, segments=segments)
