"""How the engine wires its GPU kernels, checked on CPU: the kernel-path attention
function and the fused-norm decoder layers compute what the torch path computes (the
kernels themselves are tested against their references in test_kernels_*), and without
CUDA or Triton the engine keeps its torch path."""

from __future__ import annotations

import copy

import pytest
import torch

from services.engine import EngineConfig, EngineRequest, LLMEngine
from services.engine import kernels as engine_kernels
from services.engine.attention import paged_attention_reference, write_kv_cache
from services.engine.kernels import install_kernels, paged_attention_kernel, use_fused_norms
from services.messages import SamplingParams


@pytest.fixture(scope="module")
def base_model(tiny_model):
    return tiny_model


def test_fused_norm_layers_compute_the_same_logits(base_model) -> None:
    fused = copy.deepcopy(base_model)
    assert use_fused_norms(fused) == base_model.config.num_hidden_layers
    ids = torch.randint(0, base_model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base_model(input_ids=ids).logits
        actual = fused(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_decode_steps_go_to_the_decode_kernel_path() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks, page, kv_heads, heads, dim = 32, 16, 2, 4, 8
    k_cache = torch.randn(blocks, page, kv_heads, dim, generator=gen)
    v_cache = torch.randn(blocks, page, kv_heads, dim, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[:12].view(3, 4).to(torch.int32)
    lens = torch.tensor([5, 64, 33], dtype=torch.int32)
    query = torch.randn(3, heads, dim, generator=gen)
    starts = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    expected = paged_attention_reference(query, k_cache, v_cache, tables, lens, starts, dim**-0.5)
    actual = paged_attention_kernel(query, k_cache, v_cache, tables, lens, starts, dim**-0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # A step with prefill work keeps the reference.
    slots = tables[0].long()[:1] * page + torch.arange(2)
    write_kv_cache(torch.randn(2, kv_heads, dim), torch.randn(2, kv_heads, dim), k_cache, v_cache, slots)
    mixed = torch.tensor([0, 2, 3, 4], dtype=torch.int32)
    query = torch.randn(4, heads, dim, generator=gen)
    expected = paged_attention_reference(query, k_cache, v_cache, tables, lens, mixed, dim**-0.5)
    actual = paged_attention_kernel(query, k_cache, v_cache, tables, lens, mixed, dim**-0.5)
    torch.testing.assert_close(actual, expected)


def test_engine_on_the_kernel_path_matches_the_torch_path(base_model, tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer
    ids = [tokenizer(p)["input_ids"] for p in ("Hello world", "def f(x):", "The sea is wide")]

    def generate(fused: bool) -> dict[str, list[int]]:
        model = copy.deepcopy(base_model)
        attention = None
        if fused:
            use_fused_norms(model)
            attention = paged_attention_kernel
        engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=1024), "cpu", attention)
        for i, prompt in enumerate(ids):
            engine.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(
                max_tokens=6, temperature=0.0, ignore_eos=True)))  # fmt: skip
        out: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    assert generate(fused=True) == generate(fused=False)


def test_kernels_only_on_cuda_with_triton(base_model, monkeypatch) -> None:
    model = copy.deepcopy(base_model)
    layer = model.model.layers[0]
    assert install_kernels(model, torch.device("cpu")) is paged_attention_reference
    monkeypatch.setattr(engine_kernels, "triton_available", lambda: False)
    assert install_kernels(model, torch.device("cuda")) is paged_attention_reference
    assert "forward" not in vars(layer)  # the model's own layers, untouched
    monkeypatch.setattr(engine_kernels, "triton_available", lambda: True)
    assert install_kernels(model, torch.device("cuda")) is paged_attention_kernel
    assert "forward" in vars(layer)


@pytest.mark.parametrize("all_decode", [False, True])
def test_lora_steps_fit_the_triton_kernels(base_model, tmp_path, all_decode) -> None:
    """The per-step slots and SGMV segments the engine builds drive the Triton kernels
    (interpreted here) to the reference's result: SGMV with prefill work, BGMV without."""
    from services.kernels._triton import enable_interpreter

    if torch.cuda.is_available():
        pytest.skip("CPU tensors through the interpreter; on CUDA the engine LoRA test runs them")
    enable_interpreter()
    pytest.importorskip("triton")
    from services.engine.interface import LoraRequest
    from services.engine.lora import LoraConfig, LoraManager, lora_step, random_lora_adapter
    from services.kernels.lora import add_lora_triton

    manager = LoraManager(copy.deepcopy(base_model), LoraConfig(3, 16, 8), torch.device("cpu"),
                          torch.float32)  # fmt: skip
    manager.sgmv = True
    keys = [manager.acquire(LoraRequest(f"a{r}", str(random_lora_adapter(
        tmp_path / f"a{r}", base_model, rank=r, seed=r))), set()) for r in (8, 16)]  # fmt: skip
    lengths = [1, 1, 1, 1] if all_decode else [5, 3, 1, 2]
    step = manager.step(list(zip([keys[0], None, keys[1], keys[0]], lengths)), set(), all_decode)
    assert (step.segments is None) == all_decode
    layer = manager.layers["model.layers.1.self_attn.v_proj"]
    x = torch.randn(sum(lengths), layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lora_step(step):
        expected = layer(x)  # CPU: the torch reference
        actual = layer.base(x)
        add_lora_triton(actual, x, layer.lora_a, layer.lora_b, step.indices, layer.lora_scale,
                        segments=step.segments)  # fmt: skip
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected, layer.base(x))  # the adapters did something
