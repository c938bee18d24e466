"""The public kernel functions run the torch reference on CPU tensors (no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from services import kernels
from services.kernels import decode_attention, lora, norm


@pytest.fixture
def triton_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("Triton path taken for CPU tensors")

    for module, name in [
        (lora, "lora_shrink_triton"),
        (lora, "lora_expand_triton"),
        (lora, "add_lora_triton"),
        (decode_attention, "paged_decode_attention_triton"),
        (norm, "rms_norm_triton"),
        (norm, "fused_add_rms_norm_triton"),
    ]:
        monkeypatch.setattr(module, name, forbidden)


def test_cpu_tensors_use_the_references(triton_forbidden: None) -> None:
    assert not kernels.use_triton(torch.zeros(1))
    x = torch.randn(4, 16)
    lora_a, lora_b = torch.randn(2, 8, 16), torch.randn(2, 12, 8)
    indices = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    scale = torch.tensor([0.5, 2.0])
    y = torch.randn(4, 12)

    t = kernels.lora_shrink(x, lora_a, indices)
    assert torch.equal(t, kernels.lora_shrink_reference(x, lora_a, indices))
    expected = kernels.add_lora_reference(y.clone(), x, lora_a, lora_b, indices, scale)
    assert torch.equal(kernels.lora_expand(y.clone(), t, lora_b, indices, scale), expected)
    assert torch.equal(kernels.add_lora(y.clone(), x, lora_a, lora_b, indices, scale), expected)

    q = torch.randn(2, 4, 16)
    k_cache, v_cache = torch.randn(3, 16, 2, 16), torch.randn(3, 16, 2, 16)
    tables = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    assert torch.equal(
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25),
        kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.25),
    )

    weight = torch.randn(16)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), kernels.rms_norm_reference(x, weight, 1e-6))
    fused = kernels.fused_add_rms_norm(x, y[:, :4].repeat(1, 4), weight, 1e-6)
    ref = kernels.fused_add_rms_norm_reference(x, y[:, :4].repeat(1, 4), weight, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))


def test_triton_functions_refuse_cpu_tensors_without_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        norm.rms_norm_triton(torch.randn(2, 16), torch.randn(16), 1e-6)
