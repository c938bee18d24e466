"""Multi-LoRA Triton kernels (BGMV, SGMV) against the torch reference.

Without a GPU the kernels run in Triton's interpreter (enabled before Triton is imported);
on a CUDA machine they compile.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from services.kernels._triton import enable_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    enable_interpreter()
pytest.importorskip("triton")

from services.kernels.lora import (
    LoraSegments,
    add_lora_reference,
    add_lora_triton,
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink_reference,
    lora_shrink_triton,
)

# (atol, rtol) in the range of vLLM's and Punica's LoRA kernel tests.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}
NUM_ADAPTERS = 6


def adapter_mix(kind: str, num_tokens: int, gen: torch.Generator) -> list[int]:
    """Per-token adapter indices for the mixes of Punica's evaluation, plus -1 rows."""
    if kind == "distinct":
        return torch.randperm(NUM_ADAPTERS, generator=gen)[:num_tokens].tolist()
    if kind == "uniform":
        return torch.randint(0, NUM_ADAPTERS, (num_tokens,), generator=gen).tolist()
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, NUM_ADAPTERS + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, num_tokens, replacement=True, generator=gen).tolist()
    if kind == "identical":
        return [3] * num_tokens
    if kind == "some_without":
        mix = torch.randint(-1, NUM_ADAPTERS, (num_tokens,), generator=gen).tolist()
        return [-1, *mix[1:-1], -1]
    if kind == "none":
        return [-1] * num_tokens
    raise ValueError(kind)


def make_problem(
    num_tokens: int, hidden_in: int, hidden_out: int, rank: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=DEVICE)

    return {
        "x": rand(num_tokens, hidden_in),
        "lora_a": rand(NUM_ADAPTERS, rank, hidden_in, std=hidden_in**-0.5),
        "lora_b": rand(NUM_ADAPTERS, hidden_out, rank, std=rank**-0.5),
        "y": rand(num_tokens, hidden_out),
        "scale": (torch.rand(NUM_ADAPTERS, generator=gen) + 0.5).to(DEVICE),
    }


def indices_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", ["bgmv", "sgmv"])
@pytest.mark.parametrize("mix", ["distinct", "uniform", "zipf", "identical", "some_without", "none"])
def test_add_lora_matches_reference_for_adapter_mixes(mode: str, mix: str) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}-{mix}".encode()))
    values = adapter_mix(mix, 5 if mix == "distinct" else 12, gen)
    p = make_problem(len(values), 48, 40, 16, torch.float16, seed=1)
    indices = indices_tensor(values)
    segments = LoraSegments.group_tokens(values, device=DEVICE) if mode == "sgmv" else None
    expected = add_lora_reference(p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"])
    actual = add_lora_triton(
        p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"], segments=segments
    )
    assert_close(actual, expected, torch.float16)
    untouched = indices < 0
    assert torch.equal(actual[untouched], p["y"][untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_prefill_segments_match_reference(rank: int, dtype: torch.dtype) -> None:
    """SGMV over ragged contiguous segments (one per request), one without an adapter."""
    lengths = [5, 1, 19, 7, 3]
    adapters = [2, 0, 5, -1, 2]
    values = [a for n, a in zip(lengths, adapters) for _ in range(n)]
    p = make_problem(len(values), 72, 40, rank, dtype, seed=rank)
    indices = indices_tensor(values)
    segments = LoraSegments.from_lengths(lengths, adapters, device=DEVICE)
    expected = add_lora_reference(p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"])
    actual = add_lora_triton(
        p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"], segments=segments
    )
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_decode_rows_bgmv_match_reference(rank: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rank)
    values = adapter_mix("some_without", 9, gen)
    p = make_problem(len(values), 40, 72, rank, dtype, seed=rank + 1)
    indices = indices_tensor(values)
    expected = add_lora_reference(p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"])
    actual = add_lora_triton(p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], indices, p["scale"])
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("mode", ["bgmv", "sgmv"])
def test_shrink_writes_fp32_and_zero_rows_without_adapter(mode: str) -> None:
    values = [1, -1, 4, 4, -1, 0, 1]
    p = make_problem(len(values), 33, 16, 8, torch.float32, seed=3)
    indices = indices_tensor(values)
    segments = LoraSegments.group_tokens(values, device=DEVICE) if mode == "sgmv" else None
    expected = lora_shrink_reference(p["x"], p["lora_a"], indices)
    actual = lora_shrink_triton(p["x"], p["lora_a"], indices, segments=segments)
    assert actual.dtype == torch.float32 and actual.shape == (len(values), 8)
    assert_close(actual, expected, torch.float32)
    assert not actual[indices < 0].any()


@pytest.mark.parametrize("mode", ["bgmv", "sgmv"])
def test_expand_adds_into_a_column_slice_in_place(mode: str) -> None:
    """q/k/v projections share one output buffer: expand must honour the slice's strides."""
    values = [0, 2, -1, 2, 5]
    p = make_problem(len(values), 16, 24, 16, torch.float16, seed=4)
    indices = indices_tensor(values)
    segments = LoraSegments.group_tokens(values, device=DEVICE) if mode == "sgmv" else None
    t = torch.randn(len(values), 16, device=DEVICE)
    wide = torch.randn(len(values), 64, device=DEVICE).half()
    expected = wide.clone()
    lora_expand_reference(expected[:, 20:44], t, p["lora_b"], indices, p["scale"])
    actual = wide.clone()
    returned = lora_expand_triton(actual[:, 20:44], t, p["lora_b"], indices, p["scale"], segments=segments)
    assert returned.data_ptr() == actual[:, 20:44].data_ptr()
    assert_close(actual, expected, torch.float16)
    assert torch.equal(actual[:, :20], wide[:, :20]) and torch.equal(actual[:, 44:], wide[:, 44:])


def test_reference_matches_merged_weights() -> None:
    """The reference itself: one adapter per row equals running with W + s * B @ A merged."""
    values = [1, 3, -1, 1]
    p = make_problem(len(values), 24, 20, 8, torch.float32, seed=5)
    base = torch.randn(20, 24, device=DEVICE, dtype=torch.float64)
    x = p["x"].double()
    y = (x @ base.T).float()
    add_lora_reference(y, p["x"], p["lora_a"], p["lora_b"], indices_tensor(values), p["scale"])
    for row, adapter in enumerate(values):
        weight = base.clone()
        if adapter >= 0:
            delta = p["lora_b"][adapter].double() @ p["lora_a"][adapter].double()
            weight += p["scale"][adapter].double() * delta
        torch.testing.assert_close(y[row].double(), x[row] @ weight.T, atol=1e-5, rtol=1e-5)


def test_segments_from_lengths_merge_neighbours_and_drop_rows_without_adapter() -> None:
    segments = LoraSegments.from_lengths([2, 3, 0, 1, 4], [7, 7, 1, -1, 2])
    assert segments.starts.tolist() == [0, 6]
    assert segments.lens.tolist() == [5, 4]
    assert segments.adapters.tolist() == [7, 2]
    assert segments.token_ids.tolist() == list(range(10))
    assert segments.max_len == 5
    assert segments.token_ids.dtype == torch.int32


def test_segments_group_tokens_by_adapter_stably() -> None:
    segments = LoraSegments.group_tokens([3, -1, 0, 3, 0, 3])
    assert segments.token_ids.tolist() == [2, 4, 0, 3, 5]
    assert segments.starts.tolist() == [0, 2]
    assert segments.lens.tolist() == [2, 3]
    assert segments.adapters.tolist() == [0, 3]
    assert segments.max_len == 3
    empty = LoraSegments.group_tokens([-1, -1])
    assert empty.num_segments == 0 and empty.max_len == 0


def test_segment_lengths_must_match_adapters() -> None:
    with pytest.raises(ValueError):
        LoraSegments.from_lengths([1, 2], [0])
