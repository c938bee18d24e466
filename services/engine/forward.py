"""A lean forward of Llama models over the engine's flattened batch.

transformers' forward costs a fixed amount of Python per call (module hooks, kwargs
plumbing, output dataclasses, mask helpers): on a small model on a CPU that is a large
share of a decode step. :class:`LlamaStepForward` runs the same modules' weights through
the same torch operations in the same order, so the logits are the same, on
``[tokens, ...]`` tensors with this step's attention metadata passed in directly.
Linear layers wrapped for LoRA are still called as modules, so adapters apply; the
parts are looked up once, so the engine builds this after wrapping them.

Only plain Llama (``LlamaForCausalLM``) qualifies; every other model keeps transformers'
forward with the paged attention hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import PagedAttentionMetadata, layer_attention
from services.engine.lora import LoraLinear
from services.models import LEAN_FORWARD_ARCHITECTURES

LEAN_PARTS = {
    "layer": "LlamaDecoderLayer",
    "attention": "LlamaAttention",
    "mlp": "LlamaMLP",
    "norm": "LlamaRMSNorm",
    "rotary": "LlamaRotaryEmbedding",
}


Fn = Callable[[torch.Tensor], torch.Tensor]


def _is(module: object, part: str) -> bool:
    return type(module).__name__ == LEAN_PARTS[part]


def _rms_norm(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, operation for operation (the casts are no-ops in fp32)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * (x if dtype == torch.float32 else x.to(dtype))


PACK_BATCH_HINT = 16
"""Rows oneDNN lays a packed weight out for: a decode batch. Measured on a 2-core AMX CPU,
bf16 768x3072: of the layouts for 1, 16 and 128 rows, 16's is the fastest from 1 to 64
rows and within 6% of 128's for a 512-row prefill chunk."""


def padded_rows(rows: int) -> int:
    """The row count a packed matmul of ``rows`` rows runs at: a multiple of 16 up to 64,
    of 64 beyond. oneDNN builds and caches a kernel (about 1 MB on AMX) per input shape,
    so with every step's token count a shape of its own, memory grew by over a GB in a
    sweep of 1-512 rows; these buckets bound it at 11 shapes per weight. The padding rows
    are nearly free where a step reads weights (decode) and at most 63 rows otherwise."""
    step = 16 if rows <= 64 else 64
    return -(-rows // step) * step


def can_pack_weights(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked for oneDNN: bf16 on a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX)."""
    from services.models import cpu_has_fast_bf16

    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and cpu_has_fast_bf16()
        # Private ops (stable since torch 2.0, used by inductor's CPU freezing pass).
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Fn:
    """``F.linear(x, weight, bias)`` on a weight reordered once into oneDNN's
    blocked layout, which ``F.linear`` otherwise redoes on every call: a 16-row bf16
    decode matmul then runs at memory bandwidth, about 2.5x faster than fp32. Costs a
    second copy of the weight. Inputs are padded to ``padded_rows``."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
    bias = None if bias is None else bias.detach()
    op = torch.ops.mkldnn._linear_pointwise

    def linear(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded == rows:
            y = op(x, packed, bias, "none", [], "")
        else:
            y = op(F.pad(x, (0, 0, 0, padded - rows)), packed, bias, "none", [], "")[:rows]
        return y.view(*shape[:-1], y.shape[-1])

    return linear


def _linear(module: nn.Module, pack: bool = False) -> Fn:
    """``module`` as a function: a plain ``nn.Linear`` straight to ``F.linear`` on its own
    weight tensors (what its forward does), anything else (a LoRA wrapper) called; with
    ``pack``, a bf16 CPU weight through :func:`packed_linear` (a LoRA wrapper's base too)."""
    if type(module) is not nn.Linear:
        if pack and isinstance(module, LoraLinear) and can_pack_weights(module.base.weight):
            module.base_fn = packed_linear(module.base.weight, module.base.bias)
        return module
    weight, bias = module.weight, module.bias
    if pack and can_pack_weights(weight):
        return packed_linear(weight, bias)
    return lambda x: F.linear(x, weight, bias)


@dataclass
class _Layer:
    index: int
    head_dim: int
    scaling: float
    input_norm: tuple[torch.Tensor, float]
    post_norm: tuple[torch.Tensor, float]
    linears: tuple[Fn, Fn, Fn, Fn, Fn, Fn, Fn]
    """q, k, v, o, gate, up, down projections."""
    act: Fn


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on q and k side by side ([T, heads, D]; cos [T, 1, D]).

    ``rotate_half(x) * sin`` is ``x[..., swap] * signed_sin`` with the halves of x swapped
    and sin negated on the first half: the same products (negation is exact), in two
    operations instead of four."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (swapped * signed_sin)


class LlamaStepForward:
    """Logits of the rows to sample from one engine step, for a ``LlamaForCausalLM``."""

    def __init__(self, model: nn.Module, pack_weights: bool = True) -> None:
        """``pack_weights``: prepack bf16 CPU weights for oneDNN (see ``_linear``)."""
        inner = model.model
        # Bound forwards: the modules' own code without nn.Module's call machinery.
        self.embed = inner.embed_tokens.forward
        self.rotary = inner.rotary_emb.forward
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = _linear(model.lm_head, pack_weights)
        self.layers = []
        for layer in inner.layers[: model.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    index=attn.layer_idx,
                    head_dim=attn.head_dim,
                    scaling=attn.scaling,
                    input_norm=(
                        layer.input_layernorm.weight,
                        layer.input_layernorm.variance_epsilon,
                    ),
                    post_norm=(
                        layer.post_attention_layernorm.weight,
                        layer.post_attention_layernorm.variance_epsilon,
                    ),
                    linears=tuple(  # type: ignore[arg-type]
                        _linear(m, pack_weights)
                        for m in (
                            attn.q_proj,
                            attn.k_proj,
                            attn.v_proj,
                            attn.o_proj,
                            mlp.gate_proj,
                            mlp.up_proj,
                            mlp.down_proj,
                        )
                    ),
                    act=mlp.act_fn.forward,
                )
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        if type(model).__name__ not in LEAN_FORWARD_ARCHITECTURES or inner is None:
            return False
        layers = list(getattr(inner, "layers", []))
        act = getattr(
            getattr(model.config, "get_text_config", lambda: model.config)(), "hidden_act", None
        )
        return (
            bool(layers)
            and act == "silu"
            and _is(getattr(inner, "norm", None), "norm")
            and _is(getattr(inner, "rotary_emb", None), "rotary")
            and isinstance(getattr(model, "lm_head", None), nn.Linear)
            and all(
                _is(layer, "layer")
                and _is(layer.self_attn, "attention")
                and _is(layer.mlp, "mlp")
                and _is(layer.input_layernorm, "norm")
                and _is(layer.post_attention_layernorm, "norm")
                for layer in layers
            )
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        rows: torch.Tensor | None,
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor | None:
        """input_ids/position_ids [1, T]; ``rows``: the rows to take logits of (None: none).
        Returns logits [len(rows), vocab] or None."""
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        hidden = hidden[0]
        tokens = hidden.shape[0]
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, D] against [T, heads, D]
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        for layer in self.layers:
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = layer.linears
            residual = hidden
            x = _rms_norm(*layer.input_norm, hidden)
            q = q_proj(x).view(tokens, -1, layer.head_dim)
            k = k_proj(x).view(tokens, -1, layer.head_dim)
            v = v_proj(x).view(tokens, -1, layer.head_dim)
            heads = q.shape[1]
            qk = _rotate(torch.cat((q, k), dim=1), cos, signed_sin)
            q, k = qk[:, :heads], qk[:, heads:]
            out = layer_attention(meta, layer.index, q, k, v, layer.scaling)
            hidden = residual + o_proj(out.reshape(tokens, -1))
            residual = hidden
            x = _rms_norm(*layer.post_norm, hidden)
            hidden = residual + down_proj(layer.act(gate_proj(x)) * up_proj(x))
        if rows is None:
            return None
        # The final norm is per row: norming only the sampled rows gives the same values.
        return self.lm_head(_rms_norm(*self.norm, hidden.index_select(0, rows)))
