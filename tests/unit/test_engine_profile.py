"""profile_engine measures the real engine and fits a LatencyModel (tiny sizes here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.engine import EngineConfig
from services.engine.profile import add_arguments, profile_engine, run
from services.latency_model import LatencyModel
from services.models import DEFAULT_MODEL_NAME


def test_profile_engine_measures_and_fits(model_cache: Path):
    path = str(model_cache / DEFAULT_MODEL_NAME)
    result = profile_engine(
        path,
        "cpu",
        "float32",
        EngineConfig(max_num_seqs=4, kv_cache_tokens=1024),
        batch_sizes=(1, 2, 4, 8),
        context_lens=(16, 48),
        prefill_lens=(8, 32),
        decode_steps=3,
        repeats=1,
    )
    assert result["device"] == "cpu" and result["model"] == DEFAULT_MODEL_NAME
    kinds = [m["kind"] for m in result["measurements"]]
    assert kinds.count("prefill") == 2
    decode = [m for m in result["measurements"] if m["kind"] == "decode"]
    assert {(m["batch"], m["context_len"]) for m in decode} == {
        (b, c) for b in (1, 2, 4) for c in (16, 48)
    }
    assert all(m["seconds"] > 0 for m in result["measurements"])
    model = LatencyModel.from_dict(result["latency_model"])
    assert model.max_batch == 4 and model.kv_tokens == 1024
    assert model.prefill_ms_per_token > 0 and model.decode_step_s(4, 200) > 0


def test_cli_entry_writes_json(model_cache: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAIRWAY_CACHE_DIR", str(model_cache))
    from services.settings import get_settings

    get_settings.cache_clear()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "profile.json"
    args = parser.parse_args(
        [
            "--json",
            str(out),
            "--kv-tokens",
            "512",
            "--max-num-seqs",
            "2",
            "--batch-sizes",
            "1,2",
            "--context-lens",
            "8",
            "--prefill-lens",
            "8",
            "--decode-steps",
            "2",
            "--repeats",
            "1",
        ]
    )
    try:
        assert run(args) == 0
    finally:
        get_settings.cache_clear()
    data = json.loads(out.read_text())
    assert LatencyModel.load(out).max_batch == 2
    assert len(data["measurements"]) == 3
