"""Multi-LoRA in the engine (fp32, CPU, greedy): every request of a mixed batch gets
exactly what the base model with its adapter merged into the weights generates alone;
rows without an adapter get the base model's; the device pool pages adapters in and out
(LRU) and never evicts one that a running request holds."""

from __future__ import annotations

import copy

import pytest
import torch

from services.engine import EngineConfig, EngineError, EngineRequest, LLMEngine, LoraRequest
from services.engine.kv_cache import BlockAllocator
from services.engine.lora import (
    LoraPool,
    LoraWeights,
    merge_lora_,
    random_lora_adapter,
    save_peft_adapter,
    wrap_lora_layers,
)
from services.engine.scheduler import LORA_MAX_SKIPS, Scheduler, Sequence
from services.messages import SamplingParams

PROMPTS = [
    "Hello world, what is the capital of France?",
    "def fibonacci(n):\n    if n < 2:",
    "Translate to German: Good morning, how are you?",
    "Once upon a time",
]
NEW_TOKENS = 8
# name -> (rank, target modules, seed): mixed ranks, attention-only and MLP adapters.
ADAPTERS = {
    "acme": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 1),
    "beta": (16, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), 2),
    "gamma": (64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3),
}


@pytest.fixture(scope="module")
def base_model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def adapters(base_model, tmp_path_factory) -> dict[str, LoraRequest]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: LoraRequest(name, str(random_lora_adapter(
            root / name, base_model, rank=rank, alpha=2.0 * rank, targets=targets, seed=seed,
            std=0.08)))
        for name, (rank, targets, seed) in ADAPTERS.items()
    }  # fmt: skip


def greedy_generate(model, ids: list[int], n: int) -> list[int]:
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.do_sample = False
    config.max_new_tokens = n
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids):].tolist()


class Expected(dict):
    """(adapter or None, prompt index) -> greedy tokens of the merged-weight model alone,
    computed on first use."""

    def __init__(self, base_model, adapters, prompt_ids) -> None:
        super().__init__()
        self.models = {None: base_model}
        self.models.update({name: merge_lora_(copy.deepcopy(base_model), request.path)
                            for name, request in adapters.items()})  # fmt: skip
        self.prompt_ids = prompt_ids

    def __missing__(self, key):
        name, i = key
        self[key] = greedy_generate(self.models[name], self.prompt_ids[i], NEW_TOKENS)
        return self[key]


@pytest.fixture(scope="module")
def expected(base_model, adapters, prompt_ids) -> Expected:
    return Expected(base_model, adapters, prompt_ids)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""On CUDA the engine runs the Triton kernels (LoRA, decode attention, fused norms)."""


def make_engine(base_model, tokenizer, device: str = "cpu", **config) -> LLMEngine:
    config = {"kv_cache_tokens": 2048, "max_loras": 3, "max_lora_rank": 64, **config}
    # The engine wraps the model's layers in place: give it its own copy.
    model = copy.deepcopy(base_model).to(device)
    return LLMEngine(model, tokenizer, EngineConfig(**config), device)


def run(engine: LLMEngine, jobs: list[tuple[str, str | None, int]], adapters) -> dict[str, list[int]]:
    """Add every (request id, adapter, prompt index) job, then step until all finished."""
    for rid, name, i in jobs:
        engine.add_request(EngineRequest(
            rid, PROMPT_IDS[i], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
            lora=adapters[name] if name else None))  # fmt: skip
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return tokens
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("engine did not finish")


PROMPT_IDS: list[list[int]] = []


@pytest.fixture(autouse=True, scope="module")
def _prompts(prompt_ids) -> None:
    PROMPT_IDS[:] = prompt_ids


def test_merged_weights_are_a_real_reference(expected) -> None:
    """The adapters change the greedy output, so the comparisons below mean something."""
    for name in ADAPTERS:
        assert expected[name, 0] != expected[None, 0], name


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_matches_merged_models(base_model, tokenizer, adapters, expected, device) -> None:
    # Two tenants' adapters, a third, and the base model, all in one batch; a small
    # token budget chunks the prefills so decode and prefill rows mix in one step.
    engine = make_engine(base_model, tokenizer, device, max_num_batched_tokens=24)
    jobs = [("a0", "acme", 0), ("b1", "beta", 1), ("n2", None, 2), ("a3", "acme", 3),
            ("g0", "gamma", 0), ("b2", "beta", 2), ("n0", None, 0)]  # fmt: skip
    tokens = run(engine, jobs, adapters)
    for rid, name, i in jobs:
        assert tokens[rid] == expected[name, i], (rid, name)
    assert engine.stats().adapters == ["acme", "beta", "gamma"]


def test_lru_eviction_with_more_adapters_than_slots(base_model, tokenizer, adapters, expected) -> None:
    engine = make_engine(base_model, tokenizer, max_loras=2)
    pool = engine.lora.pool
    for n, name in enumerate(["acme", "beta", "acme", "gamma"]):
        tokens = run(engine, [(f"r{n}", name, n)], adapters)
        assert tokens[f"r{n}"] == expected[name, n]
    # acme, beta load; acme is used again; gamma evicts beta, the least recently used.
    assert (pool.num_loads, pool.num_evictions) == (3, 1)
    assert engine.stats().adapters == ["acme", "gamma"]

    # Three adapters at once with two slots: the scheduler holds one back until a slot
    # frees, and every output is still exact.
    jobs = [(f"c{i}", name, i) for i, name in enumerate(["beta", "gamma", "acme"])]
    tokens = run(engine, jobs, adapters)
    for rid, name, i in jobs:
        assert tokens[rid] == expected[name, i]


def test_pool_never_evicts_a_pinned_adapter(base_model) -> None:
    model = copy.deepcopy(base_model)
    layers = wrap_lora_layers(model, ["q_proj"])
    pool = LoraPool(layers, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    q = layers["model.layers.0.self_attn.q_proj"]

    def weights(key) -> LoraWeights:
        a = torch.full((4, q.in_features), float(len(key[0])))
        return LoraWeights(key[0], key[1], 4, {"model.layers.0.self_attn.q_proj": (a, torch.ones(q.out_features, 4), 0.5)})

    keys = [("a", "/a"), ("bb", "/b"), ("ccc", "/c")]
    assert not pool.allocated and q.lora_a is None  # no memory until an adapter is used
    pool.activate(keys[:2], [], weights)
    assert pool.allocated and q.lora_a.shape == (2, 8, q.in_features)
    with pytest.raises(RuntimeError, match="running requests"):
        pool.activate([keys[2]], keys[:2], weights)  # both slots pinned
    slot = pool.activate([keys[2]], [keys[1]], weights)[keys[2]]  # evicts a, the unpinned one
    assert pool.resident == [keys[1], keys[2]] and pool.slot_of(keys[0]) is None
    assert torch.all(q.lora_a[slot, :4] == 3.0) and torch.all(q.lora_a[slot, 4:] == 0.0)  # padded
    assert q.lora_scale[slot] == 0.5 and slot in q.targeted
    other = layers["model.layers.1.self_attn.q_proj"]
    assert slot not in other.targeted and other.lora_scale[slot] == 0.0  # not trained there


def test_scheduler_admits_at_most_max_loras_adapters() -> None:
    sched = Scheduler(8, 64, BlockAllocator(64, 4), max_loras=2)
    seqs = [Sequence(f"s{i}", [1, 2], 2, 4, lora=name) for i, name in enumerate("aabcN")]
    seqs[4].lora = None
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    # s3 (adapter c) waits; s4 (base model) passes it.
    assert [item.seq.request_id for item in out.scheduled] == ["s0", "s1", "s2", "s4"]
    assert [s.request_id for s in sched.waiting] == ["s3"]
    # A request passed over too long stops admission behind it, so the slots drain.
    seqs[3].lora_skips = LORA_MAX_SKIPS
    sched.add(Sequence("s5", [1], 1, 4, lora="a"))
    sched.schedule()
    assert [s.request_id for s in sched.waiting] == ["s3", "s5"]
    sched.finish(seqs[0])
    sched.finish(seqs[1])
    assert "s3" in [item.seq.request_id for item in sched.schedule().scheduled]


def test_bad_adapters_are_refused(base_model, tokenizer, adapters, tmp_path) -> None:
    engine = make_engine(base_model, tokenizer, max_lora_rank=16)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(EngineError, match="max_lora_rank"):
        engine.add_request(EngineRequest("r", [1, 2], params, lora=adapters["gamma"]))
    with pytest.raises(EngineError, match="no adapter_config"):
        engine.add_request(EngineRequest("r", [1, 2], params, lora=LoraRequest("x", str(tmp_path))))
    head = base_model.lm_head
    save_peft_adapter(tmp_path / "head", {"lm_head": (torch.zeros(8, head.in_features),
                                                      torch.zeros(head.out_features, 8))},
                      rank=8, alpha=8)  # fmt: skip
    with pytest.raises(EngineError, match="cannot take an adapter"):
        engine.add_request(EngineRequest("r", [1, 2], params, lora=LoraRequest("h", str(tmp_path / "head"))))
    without = make_engine(base_model, tokenizer, max_loras=0)
    with pytest.raises(EngineError, match="no LoRA adapters"):
        without.add_request(EngineRequest("r", [1, 2], params, lora=adapters["acme"]))
    assert not engine.has_unfinished_requests()


def test_adapters_saved_by_peft_load_as_peft_merges_them(base_model, tmp_path) -> None:
    """Format check against PEFT itself where it is installed (not a dependency)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 8},
                             use_rslora=True)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    ours = merge_lora_(copy.deepcopy(base_model), tmp_path)
    for (name, expected), (_, actual) in zip(merged.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(actual, expected, msg=name)


def test_bf16_adapters_over_prepacked_base_weights(base_model, tokenizer, adapters) -> None:
    # On a CPU with bf16 matrix kernels the lean forward computes a LoRA layer's base
    # matmul on prepacked weights too: same tokens as the raw weights through F.linear.
    from services.engine.forward import LlamaStepForward, can_pack_weights
    from services.engine.lora import LoraLinear

    bf16 = copy.deepcopy(base_model).to(torch.bfloat16)
    if not can_pack_weights(bf16.lm_head.weight):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    packed, plain = make_engine(bf16, tokenizer), make_engine(bf16, tokenizer)
    wrapped = [m for m in packed.model.modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(m.base_fn is not None for m in wrapped)
    for module in plain.model.modules():
        if isinstance(module, LoraLinear):
            module.base_fn = None
    plain._lean = LlamaStepForward(plain.model, pack_weights=False)
    jobs = [("a0", "acme", 0), ("b1", "beta", 1), ("n2", None, 2), ("g3", "gamma", 3)]
    assert run(packed, jobs, adapters) == run(plain, jobs, adapters)
