"""RMSNorm and fused residual-add + RMSNorm.

``fused_add_rms_norm(x, residual, weight, eps)`` returns ``(normed, new_residual)`` with
``new_residual = x + residual`` and ``normed = new_residual * rsqrt(mean(new_residual**2) + eps)
* weight``, all in fp32 and cast back to the input dtype: one read of ``x`` and ``residual``
and one write of each output, instead of the three passes of the unfused torch code.
Inputs are [..., hidden]; the public functions pick Triton on CUDA tensors and the torch
reference otherwise.
"""

from __future__ import annotations

import torch

from services.kernels._triton import (
    check_kernel_device,
    kernel_module,
    launch,
    next_power_of_2,
    use_triton,
)

MAX_HIDDEN = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x**2) + eps) * weight, in fp32, cast back to x's dtype."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * rstd * weight.float()).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), computed in fp32 and cast back."""
    h = x.float() + residual.float()
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * rstd * weight.float()).to(x.dtype), h.to(residual.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] as 2-D rows with a unit last stride (a view when possible)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    check_kernel_device(x)
    kernels = kernel_module("norm_kernels")
    xs = _rows(x)
    out = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
    rs = _rows(residual) if residual is not None else xs
    res_out = torch.empty(xs.shape, dtype=residual.dtype, device=x.device) if residual is not None else out
    if xs.shape[0]:
        block = max(16, next_power_of_2(hidden))
        args = (
            xs, rs, weight.contiguous(), out, res_out,
            hidden, eps,
            xs.stride(0), rs.stride(0), out.stride(0), res_out.stride(0),
        )
        meta = {"BLOCK": block, "ADD_RESIDUAL": residual is not None,
                "num_warps": min(16, max(1, block // 256))}
        launch(kernels.rms_norm_kernel, (xs.shape[0],), args, meta)
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of :func:`rms_norm_reference`."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`fused_add_rms_norm_reference`."""
    normed, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return normed, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; Triton on CUDA tensors, torch reference otherwise."""
    fn = rms_norm_triton if use_triton(x) else rms_norm_reference
    return fn(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); Triton on CUDA, torch otherwise."""
    fn = fused_add_rms_norm_triton if use_triton(x) else fused_add_rms_norm_reference
    return fn(x, residual, weight, eps)
