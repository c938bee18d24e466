"""The built-in tiny model: offline, deterministic, built once, safe to build concurrently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.models import (
    DEFAULT_MODEL_NAME,
    ensure_default_model,
    generation_defaults,
    load_model,
    load_tokenizer,
    model_context_length,
    model_vocab_size,
    resolve_dtype,
    resolve_model_path,
    served_max_model_len,
)
from services.settings import Settings


def test_default_model_is_built_once(model_cache: Path):
    path = ensure_default_model(model_cache)
    assert path == model_cache / DEFAULT_MODEL_NAME
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(model_cache) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_path(None, model_cache) == str(path)
    assert resolve_model_path(str(path), model_cache) == str(path)


def test_concurrent_builds_are_identical_and_complete(tmp_path: Path, model_cache: Path):
    """Two processes racing on an empty cache both succeed and agree with a third build."""
    code = (
        "import sys; from pathlib import Path; from services.models import ensure_default_model; "
        "print(ensure_default_model(Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    built = tmp_path / DEFAULT_MODEL_NAME
    assert {out.strip().splitlines()[-1] for out, _ in results} == {str(built)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    reference = model_cache / DEFAULT_MODEL_NAME
    assert (built / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()
    a, b = load_file(built / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_specials_and_chat_template(model_cache: Path):
    tok = load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("Hello world, café 😀")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, café 😀"
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_model_shape_and_dtype(model_cache: Path):
    path = str(model_cache / DEFAULT_MODEL_NAME)
    model = load_model(path, "cpu", "auto")
    tok = load_tokenizer(path)
    assert model.dtype == torch.float32 and not model.training
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings == 2048
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 20_000_000
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_auto_dtype_on_cpu_is_bf16_for_big_llamas_on_bf16_cpus(monkeypatch, model_cache: Path):
    from services import models

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu", cpu_bf16=True) == torch.bfloat16
    assert resolve_dtype("float32", "cpu", cpu_bf16=True) == torch.float32  # explicit wins
    path = str(model_cache / DEFAULT_MODEL_NAME)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert not models.prefers_bf16_on_cpu(path)  # 3.7M parameters: fp32 is faster
    monkeypatch.setattr(models, "CPU_BF16_MIN_PARAMETERS", 1_000_000)
    assert models.prefers_bf16_on_cpu(path)
    assert load_model(path, "cpu", "auto").dtype == torch.bfloat16
    monkeypatch.setattr(models, "LEAN_FORWARD_ARCHITECTURES", frozenset({"GPT2LMHeadModel"}))
    assert not models.prefers_bf16_on_cpu(path)
    monkeypatch.setattr(models, "LEAN_FORWARD_ARCHITECTURES", frozenset({"LlamaForCausalLM"}))
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert not models.prefers_bf16_on_cpu(path)
    assert not models.prefers_bf16_on_cpu(str(model_cache / "no-such-model"))


def test_count_parameters_matches_the_loaded_model(model_cache: Path):
    from services.models import count_parameters

    path = str(model_cache / DEFAULT_MODEL_NAME)
    model = load_model(path, "cpu", "float32")
    assert count_parameters(path) == sum(p.numel() for p in model.parameters())


def test_model_context_length_reads_the_keys_models_use() -> None:
    assert model_context_length({"max_position_embeddings": 32768}) == 32768
    assert model_context_length({"n_positions": 1024, "n_ctx": 1024}) == 1024  # GPT-2
    assert model_context_length({"seq_length": 8192, "max_position_embeddings": 4096}) == 4096
    nested = {"text_config": {"max_position_embeddings": 8192}, "max_position_embeddings": 512}
    assert model_context_length(nested) == 8192  # the language model's, not the vision tower's
    assert model_context_length({"text_config": {}, "n_positions": 77}) == 77
    for silent in ({}, {"max_position_embeddings": None}, {"max_position_embeddings": True},
                   {"max_position_embeddings": 0}, {"n_positions": "2048"}):
        assert model_context_length(silent) is None


def test_served_max_model_len_is_capped_at_the_models_own(tmp_path: Path, model_cache: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    assert served_max_model_len(Settings(model_path=str(tmp_path), max_model_len=2048)) == 512
    assert served_max_model_len(Settings(model_path=str(tmp_path), max_model_len=256)) == 256
    # The built-in model (2048) when no path is set.
    assert served_max_model_len(Settings(cache_dir=model_cache, max_model_len=4096)) == 2048
    # Where the model's files are not here (a gateway of its own, a hub id): the setting.
    assert served_max_model_len(Settings(model_path="org/some-model", max_model_len=4096)) == 4096
    assert served_max_model_len(Settings(cache_dir=tmp_path / "none", max_model_len=4096)) == 4096
    (tmp_path / "config.json").write_text("{not json")
    assert served_max_model_len(Settings(model_path=str(tmp_path), max_model_len=2048)) == 2048


def test_model_vocab_size_is_read_from_the_models_config(tmp_path: Path, model_cache: Path) -> None:
    assert model_vocab_size(str(model_cache / DEFAULT_MODEL_NAME)) == len(
        load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME)))
    (tmp_path / "config.json").write_text('{"text_config": {"vocab_size": 262208}, "vocab_size": 9}')
    assert model_vocab_size(str(tmp_path)) == 262208  # the language model's
    (tmp_path / "config.json").write_text('{"vocab_size": "big"}')
    assert model_vocab_size(str(tmp_path)) is None
    assert model_vocab_size(str(tmp_path / "missing")) is None


def test_a_model_path_that_is_not_a_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for path in (str(missing), "./no-such-model", "~/no-such-model-here"):
        with pytest.raises(FileNotFoundError, match="FAIRWAY_MODEL_PATH"):
            resolve_model_path(path, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "file"), tmp_path)
    assert resolve_model_path(str(tmp_path), tmp_path) == str(tmp_path)
    assert resolve_model_path("org/some-model", tmp_path) == "org/some-model"  # a hub id


def test_generation_defaults_are_read_from_the_models_generation_config(tmp_path: Path,
                                                                        model_cache: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 50.0, "max_length": 4096}')
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot", "top_p": true}')
    assert generation_defaults(str(tmp_path)) == {}
    assert generation_defaults(str(tmp_path / "missing")) == {}
    # The built-in model sets none: its requests sample as they always did.
    assert generation_defaults(str(model_cache / DEFAULT_MODEL_NAME)) == {}
