"""Paged KV cache: a block allocator with prefix caching (pure) and the per-layer K/V
block tensors."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch


def block_hash(parent: bytes, token_ids: list[int], salt: bytes = b"") -> bytes:
    """The name of a full block's contents: its tokens, every token before them (through
    the parent block's name) and a salt (what else the K/V depend on: the adapter, and
    the tenant when the cache is kept per tenant). SHA-256, so that no prompt can be
    made to collide with another's and read its cache."""
    digest = hashlib.sha256(parent)
    digest.update(salt)
    digest.update(b"\0")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockAllocator:
    """Hands out fixed-size KV blocks by id; a request's block table is a list of ids.

    With prefix caching (``enable_caching``), a full block's contents are named by
    :func:`block_hash` once computed (:meth:`register`), and a later request whose tokens
    start the same way takes those blocks (:meth:`cached_prefix`, :meth:`take`) instead of
    computing them again, as vLLM's automatic prefix caching does. Blocks are shared by
    reference count; one that no request holds any more stays cached, and is handed out
    again (its name forgotten) only when no block that names nothing is free: least
    recently freed first, and a request's later blocks before its earlier ones.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """Blocks no request holds, the next to hand out first."""
        self._refs = [0] * num_blocks
        self._name_of: dict[int, bytes] = {}
        self._block_named: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, cached ones no request holds included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._name_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            name = self._name_of.pop(block, None)
            if name is not None:  # evicted: its contents are about to change
                del self._block_named[name]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Drop a request's hold on its blocks (given in its order)."""
        for block in reversed(block_ids):  # its last blocks are the first to go
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._name_of:  # nothing cached in it: hand it out first
                    self._free.move_to_end(block, last=False)

    def cached_prefix(self, names: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``names`` from the first."""
        blocks = []
        if self.enable_caching:
            for name in names:
                block = self._block_named.get(name)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def num_held_by_none(self, block_ids: list[int]) -> int:
        """How many of these blocks are free (cached, held by no request): taking them
        uses up that many free blocks."""
        return sum(1 for block in block_ids if self._refs[block] == 0)

    def take(self, block_ids: list[int]) -> None:
        """Hold cached blocks (from :meth:`cached_prefix`) for one more request."""
        for block in block_ids:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def register(self, block: int, name: bytes) -> None:
        """Name a held block whose contents are complete. A block already named so
        (another request computed the same tokens alongside) stays the cached one."""
        if self.enable_caching and name not in self._block_named and block not in self._name_of:
            self._block_named[name] = block
            self._name_of[block] = name


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
