"""The CPU engine's prepacked bf16 linear: same result as F.linear, bounded shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine.forward import can_pack_weights, packed_linear, padded_rows


def test_padded_rows_are_few_buckets_that_cover_every_row_count():
    buckets = {padded_rows(rows) for rows in range(1, 513)}
    assert buckets == {16, 32, 48, 64, *range(128, 513, 64)}
    for rows in range(1, 513):
        assert rows <= padded_rows(rows) < rows + 64
    assert padded_rows(16) == 16 and padded_rows(512) == 512  # a full batch is not padded


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 100, 512])
def test_packed_linear_equals_f_linear_for_any_row_count(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).to(torch.bfloat16)
    bias = torch.randn(96, generator=generator).to(torch.bfloat16)
    if not can_pack_weights(weight):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    out = packed_linear(weight, bias)(x)
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1.6e-2, atol=1e-2)


def test_fp32_weights_are_not_packed():
    assert not can_pack_weights(torch.zeros(4, 4))


def test_packed_linear_keeps_leading_dimensions():
    weight = torch.randn(32, 16).to(torch.bfloat16)
    if not can_pack_weights(weight):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    out = packed_linear(weight, None)(x)
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1.6e-2, atol=1e-2)
