"""``fairway bench lora``'s code path on the tiny model (CPU), so a GPU session only runs it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.benchmark import lora as bench


def test_bench_lora_reports_every_adapter_count(model_cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAIRWAY_CACHE_DIR", str(model_cache))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "lora.json"
    args = parser.parse_args(["--adapters", "1,3", "--max-loras", "2", "--rank", "8",
                              "--num-requests", "6", "--prompt-len", "8", "--output-len", "3",
                              "--distribution", "zipf", "--json", str(out)])  # fmt: skip
    assert bench.run(args) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert set(runs) == {"base", "1", "3"}
    assert all(r["output_tokens"] == 18 for r in runs.values())
    assert runs["base"]["adapter_loads"] == 0 and runs["1"]["adapter_loads"] == 1
    assert set(result["summary"]["slowdown_vs_one_adapter"]) == {"1", "3"}
