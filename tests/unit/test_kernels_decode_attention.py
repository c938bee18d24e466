"""Paged decode attention (Flash-Decoding) Triton kernel against the torch reference.

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

from services.kernels.decode_attention import (
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    plan_partitions,
)

# (atol, rtol) in the range of vLLM's attention kernel tests.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
RAGGED_LENS = [1, 15, 33, 70, 129]


def make_batch(
    context_lens: list[int],
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> dict:
    """A paged cache whose pages are scattered in random order, plus padded block tables."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in context_lens]
    max_pages = max(pages_per_seq) + 1  # one padding column, as the engine pads its tables
    num_blocks = sum(pages_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max_pages, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = torch.tensor(order[used : used + n])
        used += n

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    return {
        "q": rand(len(context_lens), num_q_heads, head_dim),
        "k_cache": rand(num_blocks, page_size, num_kv_heads, head_dim),
        "v_cache": rand(num_blocks, page_size, num_kv_heads, head_dim),
        "block_tables": tables.to(DEVICE),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        "scale": head_dim**-0.5,
    }


def naive_attention(batch: dict) -> torch.Tensor:
    """Float64, one sequence and one head at a time, reading pages by hand."""
    q, k_cache, v_cache = batch["q"].double(), batch["k_cache"].double(), batch["v_cache"].double()
    num_seqs, num_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float64, device=q.device)
    for s, n in enumerate(batch["context_lens"].tolist()):
        slots = [(int(batch["block_tables"][s, p // page_size]), p % page_size) for p in range(n)]
        for h in range(num_heads):
            kv = h // (num_heads // kv_heads)
            k = torch.stack([k_cache[b, o, kv] for b, o in slots])
            v = torch.stack([v_cache[b, o, kv] for b, o in slots])
            out[s, h] = torch.softmax(k @ q[s, h] * batch["scale"], dim=0) @ v
    return out


def run_both(batch: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
            batch["context_lens"], batch["scale"])
    return paged_decode_attention_triton(*args, **kwargs), paged_decode_attention_reference(*args)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("split_k", [False, True])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("page_size", [16, 32])
def test_matches_reference_ragged_pages_gqa_split(
    page_size: int, num_q_heads: int, num_kv_heads: int, split_k: bool
) -> None:
    batch = make_batch(RAGGED_LENS, page_size, num_q_heads, num_kv_heads, 32, torch.float32, seed=page_size)
    actual, expected = run_both(batch, split_k=split_k, partition_size=32)
    assert actual.shape == batch["q"].shape and actual.dtype == torch.float32
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split_k", [False, True])
def test_matches_reference_in_half_precision(dtype: torch.dtype, split_k: bool) -> None:
    batch = make_batch([3, 47, 100], 16, 8, 2, 64, dtype, seed=7)
    actual, expected = run_both(batch, split_k=split_k, partition_size=32)
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)


def test_head_dim_that_is_not_a_power_of_two() -> None:
    batch = make_batch([20, 41], 16, 4, 4, 40, torch.float32, seed=9)
    actual, expected = run_both(batch, split_k=True, partition_size=16)
    assert_close(actual, expected, torch.float32)


def test_auto_split_with_partitions_beyond_the_shortest_context() -> None:
    """Auto mode splits this small batch; sequences shorter than the grid skip partitions."""
    batch = make_batch([5, 130], 16, 4, 1, 32, torch.float32, seed=11)
    assert plan_partitions(2, 1, batch["block_tables"].shape[1] * 16, 132, None, 64) == 64
    actual, expected = run_both(batch, partition_size=64)
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("split_k", [False, True])
def test_empty_context_gives_zeros(split_k: bool) -> None:
    batch = make_batch([0, 9], 16, 2, 1, 32, torch.float32, seed=13)
    actual, expected = run_both(batch, split_k=split_k, partition_size=16)
    assert torch.equal(actual[0], torch.zeros_like(actual[0]))
    assert torch.equal(expected[0], torch.zeros_like(expected[0]))
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads", [(16, 4, 4), (32, 8, 2)])
def test_reference_matches_naive_float64_loop(page_size: int, num_q_heads: int, num_kv_heads: int) -> None:
    batch = make_batch(RAGGED_LENS, page_size, num_q_heads, num_kv_heads, 16, torch.float32, seed=3)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
            batch["context_lens"], batch["scale"])
    torch.testing.assert_close(
        paged_decode_attention_reference(*args).double(), naive_attention(batch), atol=1e-5, rtol=1e-5
    )


def test_plan_partitions() -> None:
    # Many (sequence, KV head) programs already fill the GPU: no split.
    assert plan_partitions(128, 8, 4096, 132, None, 512) == 0
    # Few programs: split, halving the partition until two waves are filled (floor 128).
    assert plan_partitions(16, 8, 4096, 132, None, 512) == 512
    assert plan_partitions(3, 8, 4096, 132, None, 512) == 256
    assert plan_partitions(1, 8, 4096, 132, None, 512) == 128
    # Very long contexts: the partition grows to cap the partition count.
    assert plan_partitions(1, 8, 1 << 20, 132, None, 512) == (1 << 20) // 256
    # One partition covers a short context: no split unless forced; forcing off works too.
    assert plan_partitions(1, 8, 100, 132, None, 512) == 0
    assert plan_partitions(1, 8, 300, 132, True, 512) == 512
    assert plan_partitions(1, 8, 4096, 132, False, 512) == 0
    with pytest.raises(ValueError):
        plan_partitions(1, 8, 4096, 132, True, 100)


def test_rejects_mismatched_heads() -> None:
    batch = make_batch([4], 16, 6, 4, 16, torch.float32, seed=1)
    with pytest.raises(ValueError):
        run_both(batch)
