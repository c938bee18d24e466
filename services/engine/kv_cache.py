"""Paged KV cache: a block allocator (pure) and the per-layer K/V block tensors."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


class BlockAllocator:
    """Hands out fixed-size KV blocks by id; a request's block table is a list of ids."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


@dataclass
class KVCacheSpec:
    """Shape of the attention state of one model, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model_config(cls, config) -> KVCacheSpec:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
        )

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * item


def allocate_layer_caches(
    spec: KVCacheSpec, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A zeroed (K, V) pair of ``shape`` for every layer."""
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]


def allocate_kv_cache(
    spec: KVCacheSpec,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V tensors of shape [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return allocate_layer_caches(spec, shape, dtype, device)
