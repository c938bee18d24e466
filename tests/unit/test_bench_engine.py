"""`fairway bench engine` on the tiny model with tiny sizes: JSON keys and arithmetic,
memory mode, and the random-Llama shapes it can build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.benchmark import engine as bench
from services.models import RANDOM_LLAMA_SHAPES, ensure_random_llama, load_model


def parse(model_cache: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--cache-dir", str(model_cache), "--threads", "1", *extra])


TINY = (
    "--concurrency", "2,3", "--num-requests", "5", "--prompt-len", "3:9",
    "--min-output", "2", "--max-output", "7", "--max-sequential-requests", "2",
)  # fmt: skip


def test_workload_is_seeded_and_within_ranges():
    ids = list(range(10, 50))
    a = bench.make_workload(20, (3, 9), (2, 7), ids, seed=1)
    assert a == bench.make_workload(20, (3, 9), (2, 7), ids, seed=1)
    assert a != bench.make_workload(20, (3, 9), (2, 7), ids, seed=2)
    assert all(3 <= len(p) <= 9 and set(p) <= set(ids) for p in a.prompts)
    assert all(2 <= n <= 7 for n in a.output_lens)
    assert a.summary()["total_output_tokens"] == sum(a.output_lens)


def test_representative_subset_spans_the_sizes():
    w = bench.Workload([[1] * n for n in (5, 1, 3, 2, 4)], [50, 10, 30, 20, 40])
    assert bench.representative_subset(w, 3) == [0, 1, 2]  # sizes 50, 10, 30
    assert bench.representative_subset(w, 9) == [0, 1, 2, 3, 4]
    assert bench.representative_subset(w, 1) == [2]


def test_latency_arithmetic():
    timings = [
        bench.RequestTiming(1.0, [1.5, 2.0, 2.5]),  # ttft 0.5, tpot 0.5
        bench.RequestTiming(1.0, [3.0]),  # ttft 2.0, no tpot
    ]
    result = bench.summarize_method("m", timings, seconds=4.0)
    assert result["output_tokens"] == 4
    assert result["output_tokens_per_s"] == 1.0
    assert result["ttft_mean_ms"] == pytest.approx(1250.0)
    assert result["ttft_p50_ms"] == pytest.approx(1250.0)
    assert result["tpot_mean_ms"] == pytest.approx(500.0)
    assert bench.linear_slope([0, 1, 2], [5, 7, 9]) == pytest.approx(2.0)
    samples = [(0.0, 100.0), (30.0, 110.0), (60.0, 110.5), (90.0, 111.0)]
    assert bench.rss_slope_per_min(samples, since=30.0) == pytest.approx(1.0)
    runs = [{"output_tokens_per_s": v} for v in (3.0, 1.0, 2.0)]
    assert bench.median_run(runs)["output_tokens_per_s"] == 2.0
    assert bench.median_run(runs)["runs_output_tokens_per_s"] == [3.0, 1.0, 2.0]


def test_comparison_counts_exactly_the_requested_tokens(model_cache: Path, tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    args = parse(model_cache, *TINY, "--json", str(out))
    assert bench.run(args) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out  # unconfigured structlog may print there too
    assert json.loads(printed[printed.index('{\n  "benchmark"') :]) == result

    total = result["workload"]["total_output_tokens"]
    lens = bench.make_workload(
        5, (3, 9), (2, 7), bench.ordinary_token_ids(*_tokenizer_and_vocab(result)), 0
    ).output_lens
    assert total == sum(lens)
    seq = result["sequential"]
    timed = seq["timed_request_indices"]
    assert seq["requests_timed"] == len(timed) == 2 and seq["scaled"] is True
    # the shortest and the longest request (by output, then prompt length)
    assert lens[timed[0]] == min(lens) or lens[timed[1]] == min(lens)
    assert max(lens[i] for i in timed) == max(lens)
    timed_tokens = sum(lens[i] for i in timed)
    assert seq["output_tokens"] == timed_tokens
    assert seq["estimated_seconds"] == pytest.approx(seq["seconds"] * total / timed_tokens)

    assert [level["concurrency"] for level in result["levels"]] == [2, 3]
    for level in result["levels"]:
        c = level["concurrency"]
        engine, static = level["engine"], level["static"]
        assert engine["output_tokens"] == static["output_tokens"] == total
        assert engine["num_requests"] == static["num_requests"] == 5
        assert engine["config"]["max_num_seqs"] == c and engine["preemptions"] == 0
        assert static["generated_tokens_with_overrun"] == sum(
            len(lens[i : i + c]) * max(lens[i : i + c]) for i in range(0, 5, c)
        )
        for method in (engine, static, seq):
            assert method["output_tokens_per_s"] == pytest.approx(
                method["output_tokens"] / method["seconds"]
            )
            for key in ("ttft", "tpot"):
                assert {f"{key}_mean_ms", f"{key}_p50_ms", f"{key}_p99_ms"} <= method.keys()
            assert 0 < method["ttft_p50_ms"] <= method["ttft_p99_ms"]
        assert level["engine_vs_sequential"] == pytest.approx(
            engine["output_tokens_per_s"] / seq["output_tokens_per_s"]
        )
        assert level["engine_vs_static"] == pytest.approx(
            engine["output_tokens_per_s"] / static["output_tokens_per_s"]
        )


def test_engine_requests_may_ask_for_logprobs(model_cache: Path, tmp_path: Path, capsys):
    """``--logprobs K`` measures what log-probabilities cost the engine: the same tokens."""
    out = tmp_path / "bench.json"
    assert bench.run(parse(model_cache, *TINY, "--logprobs", "5", "--json", str(out))) == 0
    result = json.loads(out.read_text())
    assert result["workload"]["engine_logprobs"] == 5
    assert all(level["engine"]["output_tokens"] == result["workload"]["total_output_tokens"]
               for level in result["levels"])
    with pytest.raises(SystemExit, match="--logprobs"):
        bench.run(parse(model_cache, *TINY, "--logprobs", "21"))
    workload = bench.Workload([[1, 2]], [3], logprobs=2)
    [request] = bench._engine_requests(workload.subset([0]), "r")
    assert request.sampling.logprobs == 2


def _tokenizer_and_vocab(result: dict):
    from services.models import load_tokenizer

    tokenizer = load_tokenizer(result["model_path"])
    return tokenizer, len(tokenizer)


def test_memory_mode_samples_rss(model_cache: Path):
    args = parse(
        model_cache, *TINY, "--duration", "1.5", "--sample-interval", "0.25", "--concurrency", "3"
    )
    result = bench.measure_memory(args)
    assert result["mode"] == "memory" and result["concurrency"] == 3
    assert result["requests_completed"] > 0 and result["output_tokens"] > 0
    assert len(result["rss_samples"]) >= 3
    assert 0 < result["rss_start_mb"] <= result["rss_max_mb"]
    assert result["rss_max_mb"] >= result["rss_end_mb"] > 0
    assert isinstance(result["rss_slope_mb_per_min"], float)


def test_random_llama_is_built_through_save_and_from_pretrained(tmp_path: Path):
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    path = ensure_random_llama(tmp_path, "toy", shape)
    assert path == tmp_path / "fairway-toy"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_random_llama(tmp_path, "toy", shape) == path  # built once
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = load_model(str(path), "cpu", "float32")
    assert {k: getattr(model.config, k) for k in shape} == shape
    with pytest.raises(ValueError, match="unknown"):
        ensure_random_llama(tmp_path, "no-such-shape")


@pytest.mark.parametrize(("name", "low", "high"), [("llama-100m", 90e6, 120e6), ("llama-1b", 0.9e9, 1.1e9)])
def test_random_llama_shapes_have_the_parameters_their_names_say(name, low, high):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1498, **RANDOM_LLAMA_SHAPES[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert low < sum(p.numel() for p in model.parameters()) < high
