"""GPU kernels (Triton) with pure-torch references of the same signature.

Each public function runs its Triton kernel on CUDA tensors (when ``triton`` is installed)
and its torch reference otherwise, so CPU workers never import Triton. The ``*_reference``
and ``*_triton`` variants are exported for tests and benchmarks.
"""

from __future__ import annotations

from services.kernels._triton import triton_available, use_triton
from services.kernels.decode_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)
from services.kernels.lora import (
    LoraSegments,
    add_lora,
    add_lora_reference,
    add_lora_triton,
    lora_expand,
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink,
    lora_shrink_reference,
    lora_shrink_triton,
)
from services.kernels.norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)

__all__ = [
    "LoraSegments",
    "add_lora",
    "add_lora_reference",
    "add_lora_triton",
    "fused_add_rms_norm",
    "fused_add_rms_norm_reference",
    "fused_add_rms_norm_triton",
    "lora_expand",
    "lora_expand_reference",
    "lora_expand_triton",
    "lora_shrink",
    "lora_shrink_reference",
    "lora_shrink_triton",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "triton_available",
    "use_triton",
]
