"""The engine on models other than Llama: transformers' own forward with the paged
attention hook (only plain Llama takes the lean forward), checked token for token
against ``model.generate`` for concurrent requests.

Each architecture differs where a paged-attention hook can go wrong: Qwen2 has biased
q/k/v and grouped KV heads, GPT-2 learned absolute positions and fused Conv1D
projections, OPT learned positions with an offset, Gemma 2 logit soft-capping and a
head size of its own. The models are tiny, with random weights, built from a config and
loaded through ``from_pretrained`` like a served model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from services.engine import EngineConfig, EngineRequest, LLMEngine
from services.messages import SamplingParams
from services.models import DEFAULT_MODEL_NAME, load_tokenizer
from tests.unit.test_engine import greedy_reference

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 512}
ARCHITECTURES = {
    "qwen2": lambda vocab: transformers.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **SMALL),
    "gpt2": lambda vocab: transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                                  n_positions=512),
    "opt": lambda vocab: transformers.OPTConfig(
        vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64),
    "gemma2": lambda vocab: transformers.Gemma2Config(vocab_size=vocab, num_key_value_heads=2,
                                                      head_dim=16, **SMALL),
}
PROMPTS = ["Hello world, what is the capital of France?", "Once upon a time", "x"]
OUTPUT_LENS = [12, 7, 10]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_engine_matches_generate_on_other_architectures(architecture, model_cache: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    torch.manual_seed(0)
    config = ARCHITECTURES[architecture](len(tokenizer))
    # The tokenizer's special ids: OPT's default pad id (1) is this tokenizer's BOS, which
    # generate would then mask out of the reference as padding.
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    built = transformers.AutoModelForCausalLM.from_config(config)
    built.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [greedy_reference(reference_model, ids, n) for ids, n in zip(prompt_ids, OUTPUT_LENS)]

    engine = LLMEngine.from_pretrained(str(tmp_path), "cpu", "float32", EngineConfig(kv_cache_tokens=2048))
    assert engine.max_model_len == 512  # the model's own, below the engine's default
    for i, (ids, n) in enumerate(zip(prompt_ids, OUTPUT_LENS)):
        engine.add_request(EngineRequest(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                                       ignore_eos=True)))
    # Log-probabilities of the prompt and the output come from the rows kept for them.
    engine.add_request(EngineRequest("scored", prompt_ids[0], SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1)))
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.prompt_logprobs + out.logprobs)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected
    sequence = prompt_ids[0] + tokens["scored"]
    with torch.inference_mode():
        logits = reference_model(torch.tensor([sequence])).logits[0, :-1]
    want = torch.log_softmax(logits.float(), dim=-1)
    got = [entry.logprob for entry in logprobs["scored"][1:]]  # the first prompt token: none
    assert got == pytest.approx([float(want[p, t]) for p, t in enumerate(sequence[1:])], abs=1e-4)
