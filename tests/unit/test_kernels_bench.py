"""``fairway bench kernels``'s code paths, on tiny shapes through the Triton interpreter.

The benchmark itself needs a GPU; this checks that every case builds its inputs, runs
every method and reports the fields the summary reads, so a GPU session only runs it.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from services.kernels._triton import enable_interpreter

if not torch.cuda.is_available():
    enable_interpreter()
pytest.importorskip("triton")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    from services.benchmark import kernels as module

    if not torch.cuda.is_available():
        monkeypatch.setattr(module, "DEVICE", "cpu")
        monkeypatch.setattr(module, "copies_to_defeat_l2", lambda *a, **k: 2)

        def run_each_once(fns, warmup, iters):
            for fn in fns:
                fn()
            return 1.0

        monkeypatch.setattr(module, "time_ms", run_each_once)
    return module


def test_lora_cases_report_speedups_and_small_errors(bench) -> None:
    decode = {"phase": "decode", "hidden": 32, "batch": 6, "adapters": 3, "rank": 8, "distribution": "zipf"}
    prefill = {"phase": "prefill", "hidden": 32, "batch": 2, "prompt_len": 5, "adapters": 2, "rank": 16,
               "distribution": "distinct"}
    for case in (decode, prefill):
        result = bench.bench_lora(case, torch.float16, 1, 2)
        assert set(result["times_ms"]) == {"bgmv", "sgmv", "loop", "reference"}
        assert max(result["max_abs_err"].values()) < 5e-2
        assert result["speedup_vs_loop"] > 0


def test_attention_and_norm_cases(bench) -> None:
    case = {"batch": 2, "context": 96, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "page_size": 16}
    result = bench.bench_attention(case, torch.float16, 1, 2)
    assert set(result["times_ms"]) == {"kernel_auto", "kernel_split", "kernel_nosplit", "gather_sdpa",
                                       "reference"}
    assert max(result["max_abs_err"].values()) < 1e-2
    norm = bench.bench_norm({"tokens": 3, "hidden": 64}, torch.float16, 1, 2)
    assert norm["max_abs_err"] < 1e-2
    summary = bench.summarize([result | {"context": 4096}])
    assert summary["attention_goal_2x_met"] == (result["speedup_vs_gather_sdpa"] >= 2.0)


def test_run_refuses_without_cuda(bench, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick"])) == 1
    assert "CUDA" in capsys.readouterr().err
