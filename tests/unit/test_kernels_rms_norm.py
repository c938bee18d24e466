"""RMSNorm and fused residual-add + RMSNorm Triton kernels against the torch reference.

Without a GPU the kernels run in Triton's interpreter (enabled before Triton is imported);
on a CUDA machine they compile.
"""

from __future__ import annotations

import pytest
import torch

from services.kernels._triton import enable_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    enable_interpreter()
pytest.importorskip("triton")

from services.kernels.norm import (
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
)

TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
EPS = 1e-6


def rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def naive_rms_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float64 RMSNorm, written out independently of the reference."""
    h = h.double()
    return h / torch.sqrt((h * h).sum(-1, keepdim=True) / h.shape[-1] + EPS) * weight.double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 100), (2, 3, 64), (1, 4096)])
def test_fused_add_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = rand(*shape, dtype=dtype, seed=1)
    residual = rand(*shape, dtype=dtype, seed=2)
    weight = rand(shape[-1], dtype=dtype, seed=3)
    normed, new_residual = fused_add_rms_norm_triton(x, residual, weight, EPS)
    ref_normed, ref_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert normed.shape == shape and normed.dtype == dtype and new_residual.dtype == dtype
    assert_close(new_residual, ref_residual, dtype)
    assert_close(normed, ref_normed, dtype)
    # Inputs are left untouched.
    assert torch.equal(x, rand(*shape, dtype=dtype, seed=1))
    assert torch.equal(residual, rand(*shape, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    x = rand(5, 72, dtype=dtype, seed=4)
    weight = rand(72, dtype=dtype, seed=5)
    assert_close(rms_norm_triton(x, weight, EPS), rms_norm_reference(x, weight, EPS), dtype)


def test_rms_norm_reads_strided_rows() -> None:
    wide = rand(4, 96, dtype=torch.float32, seed=6)
    x = wide[:, 16:80]
    weight = rand(64, dtype=torch.float32, seed=7)
    assert_close(rms_norm_triton(x, weight, EPS), rms_norm_reference(x, weight, EPS), torch.float32)


def test_references_match_naive_float64() -> None:
    x = rand(6, 48, dtype=torch.float32, seed=8)
    residual = rand(6, 48, dtype=torch.float32, seed=9)
    weight = rand(48, dtype=torch.float32, seed=10)
    assert_close(rms_norm_reference(x, weight, EPS), naive_rms_norm(x, weight), torch.float32)
    normed, new_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert_close(new_residual, x.double() + residual.double(), torch.float32)
    assert_close(normed, naive_rms_norm(x.double() + residual.double(), weight), torch.float32)


def test_rejects_wrong_weight_shape() -> None:
    x = rand(2, 32, dtype=torch.float32, seed=11)
    with pytest.raises(ValueError):
        rms_norm_triton(x, rand(16, dtype=torch.float32, seed=12), EPS)
