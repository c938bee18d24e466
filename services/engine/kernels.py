"""The engine's GPU kernels: paged decode attention and fused residual-add + RMSNorm.

Used on CUDA devices only, and only where Triton imports; everywhere else the engine keeps
its torch path (:func:`services.engine.attention.paged_attention_reference`, the model's
own norms). The kernels themselves live in :mod:`services.kernels`, each with a torch
reference of the same signature.

* Attention: a step whose every request decodes one token (the steady state of
  continuous batching) runs :func:`services.kernels.paged_decode_attention` (split-K
  Flash-Decoding over the block tables); steps with prefill work keep the reference.
* Norms: Llama-family decoder layers (Llama, Mistral, Qwen2: pre-norm, plain RMSNorm)
  get a forward that normalises the input with the RMSNorm kernel and fuses the
  attention residual add into the post-attention norm (one pass instead of three); the
  final norm uses the RMSNorm kernel. Other architectures are left as they are.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from services.engine.attention import PagedAttentionFn, paged_attention_reference
from services.kernels import fused_add_rms_norm, paged_decode_attention, rms_norm, triton_available
from services.logs import get_logger

log = get_logger(__name__)

FUSABLE_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
"""Decoder layers whose forward is exactly: x + attn(norm1(x)), then h + mlp(norm2(h))."""
PLAIN_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
"""RMSNorms computing ``weight * (x * rsqrt(mean(x^2) + eps))`` (not Gemma's 1 + weight)."""


def kernels_enabled(device: torch.device) -> bool:
    """The engine's rule: custom kernels on CUDA when Triton imports, torch otherwise."""
    return device.type == "cuda" and triton_available()


def paged_attention_kernel(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:data:`PagedAttentionFn` that sends all-decode steps to the decode kernel."""
    if query.shape[0] == seq_lens.shape[0]:  # one query token per request
        return paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale)
    return paged_attention_reference(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale
    )


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _fused_layer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The Llama decoder layer with its norms on the kernels (same maths). The cache goes
    on under the name the caller gave it: newer transformers call it ``cache``."""
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    residual = hidden_states
    hidden_states = rms_norm(hidden_states, self.input_layernorm.weight, _eps(self.input_layernorm))
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    hidden_states, residual = fused_add_rms_norm(hidden_states, residual, norm.weight, _eps(norm))
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, _eps(self))


def use_fused_norms(model: nn.Module) -> int:
    """Put the norms of ``model``'s Llama-family layers on the kernels; returns how many
    decoder layers were changed (0 for other architectures)."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE_LAYERS and all(
            type(getattr(module, name, None)).__name__ in PLAIN_RMS_NORMS
            for name in ("input_layernorm", "post_attention_layernorm")
        ):
            module.forward = types.MethodType(_fused_layer_forward, module)
            changed += 1
    if changed:
        inner = getattr(model, "model", None)
        final = getattr(inner, "norm", None)
        if type(final).__name__ in PLAIN_RMS_NORMS:
            final.forward = types.MethodType(_norm_forward, final)
    return changed


def install_kernels(model: nn.Module, device: torch.device) -> PagedAttentionFn:
    """The attention function for ``device``, after fusing ``model``'s norms on CUDA."""
    if not kernels_enabled(device):
        if device.type == "cuda":
            log.warning("triton_unavailable", detail="CUDA without Triton: torch attention and norms")
        return paged_attention_reference
    layers = use_fused_norms(model)
    log.info("gpu_kernels", decode_attention=True, fused_norm_layers=layers)
    return paged_attention_kernel
