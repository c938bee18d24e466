"""Arrival generation, tenant SPEC parsing, prompt synthesis and workload building."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from services.benchmark.arrivals import (
    apportion,
    gamma_arrivals,
    merged_tenant_arrivals,
    trace_arrivals,
)
from services.benchmark.workload import (
    WORDS,
    TenantSpec,
    WorkloadConfig,
    build_workload,
    parse_tenants,
    read_dataset_source,
    read_trace_source,
    synthesize_prompt,
)

# --- arrivals -------------------------------------------------------------------------


def test_poisson_arrivals_have_the_mean_rate_and_exponential_gaps():
    times = gamma_arrivals(20_000, rate=10.0, burstiness=1.0, rng=np.random.default_rng(1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.04)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_gap_variation(burstiness):
    gaps = np.diff(gamma_arrivals(20_000, 5.0, burstiness, np.random.default_rng(2)))
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.06)


def test_gamma_arrivals_are_seeded_and_infinite_rate_is_all_at_once():
    a = gamma_arrivals(50, 3.0, 1.0, np.random.default_rng(7))
    b = gamma_arrivals(50, 3.0, 1.0, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert np.array_equal(
        gamma_arrivals(5, float("inf"), 1.0, np.random.default_rng(0)), np.zeros(5)
    )
    with pytest.raises(ValueError):
        gamma_arrivals(5, 0.0, 1.0, np.random.default_rng(0))


def test_trace_arrivals_scaling():
    stamps = [5.0, 6.0, 8.0, 12.0]
    assert trace_arrivals(stamps).tolist() == [0.0, 1.0, 3.0, 7.0]
    assert trace_arrivals(stamps, time_scale=0.5).tolist() == [0.0, 0.5, 1.5, 3.5]
    by_rate = trace_arrivals(stamps, rate=1.0)  # 3 gaps over the span at 1 req/s: 3 s
    assert by_rate.tolist() == pytest.approx([0.0, 3 / 7, 9 / 7, 3.0])
    assert trace_arrivals(stamps, rate=float("inf")).tolist() == [0.0] * 4
    with pytest.raises(ValueError):
        trace_arrivals(stamps, time_scale=2.0, rate=1.0)
    with pytest.raises(ValueError):
        trace_arrivals([1.0, 0.5])


def test_apportion_and_merged_tenant_streams():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [2, 1]) == [5, 2]
    assert sum(apportion(1001, [0.3, 0.2, 0.5])) == 1001
    times, who = merged_tenant_arrivals(6000, [2.0, 1.0], 1.0, np.random.default_rng(3))
    assert np.all(np.diff(times) >= 0)
    assert (who == 0).sum() == 4000 and (who == 1).sum() == 2000
    for tenant, rate in ((0, 2.0), (1, 1.0)):
        own = times[who == tenant]
        assert (own.size - 1) / own[-1] == pytest.approx(rate, rel=0.05)


# --- tenants --------------------------------------------------------------------------


def test_parse_tenants():
    assert parse_tenants("acme:k1:3, globex:k2") == [
        TenantSpec("acme", "k1", 3.0),
        TenantSpec("globex", "k2", 1.0),
    ]
    assert parse_tenants("a:k:rate=2,b:k2:rate=0.5") == [
        TenantSpec("a", "k", 1.0, 2.0),
        TenantSpec("b", "k2", 1.0, 0.5),
    ]
    assert parse_tenants("a:sk:with:colons")[0].api_key == "sk:with:colons"
    assert parse_tenants("a:sk:x:share=2.5")[0] == TenantSpec("a", "sk:x", 2.5)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "a",
        "a:",
        "a:secret-key:0",
        "a:secret-key:rate=2,b:k2",
        "a:secret-key,a:k2",
        ":secret-key",
    ],
)
def test_parse_tenants_rejects_bad_specs_without_echoing_keys(spec):
    with pytest.raises(ValueError) as info:
        parse_tenants(spec)
    assert "secret-key" not in str(info.value)


def test_tenant_repr_hides_the_key():
    assert "hunter2" not in repr(TenantSpec("a", "hunter2"))


# --- prompts --------------------------------------------------------------------------


def test_synthesized_prompt_has_one_word_per_token_and_is_seeded():
    text = synthesize_prompt(300, np.random.default_rng(5))
    assert len(text.split()) == 300 and set(text.split()) <= set(WORDS)
    assert text == synthesize_prompt(300, np.random.default_rng(5))
    assert text != synthesize_prompt(300, np.random.default_rng(6))


def test_synthesized_prompt_length_with_the_tiny_model_tokenizer():
    from services.models import build_default_tokenizer

    tokenizer = build_default_tokenizer()
    for n in (1, 50, 700):
        ids = tokenizer(
            synthesize_prompt(n, np.random.default_rng(n)), add_special_tokens=False
        ).input_ids
        assert abs(len(ids) - n) <= max(2, n // 100)


# --- workloads ------------------------------------------------------------------------


@pytest.fixture
def azure_csv(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.0000000,100,10\n"
        "2023-11-16 18:15:46.5000000,3000,700\n"
        "2023-11-16 18:15:48.0000000,20,5\n"
        "2023-11-16 18:15:50.0000000,50,1\n",
        encoding="utf-8",
    )
    return path


def test_trace_workload_replays_timestamps_with_caps(azure_csv):
    source = read_trace_source(azure_csv)
    tenants = [TenantSpec("default", "k")]
    config = WorkloadConfig(
        num_requests=3, arrivals="trace", time_scale=2.0, max_input_tokens=512, max_output_tokens=64
    )
    items = build_workload(source, tenants, config)
    assert [i.arrival for i in items] == pytest.approx([0.0, 1.0, 4.0])
    assert [i.max_tokens for i in items] == [10, 64, 5]
    assert [i.input_tokens for i in items] == [100, 512, 20]
    assert [len(i.prompt.split()) for i in items] == [100, 512, 20]
    assert {i.tenant for i in items} == {"default"}
    assert build_workload(source, tenants, config) == items


def test_trace_rate_rescales_and_generated_arrivals_keep_trace_lengths(azure_csv):
    source = read_trace_source(azure_csv)
    tenants = [TenantSpec("default", "k")]
    items = build_workload(
        source, tenants, WorkloadConfig(num_requests=4, arrivals="trace", rate=3.0)
    )
    assert items[-1].arrival == pytest.approx(1.0)  # 3 gaps at 3 req/s
    gen = build_workload(
        source, tenants, WorkloadConfig(num_requests=4, arrivals="gamma", rate=2.0)
    )
    assert [i.max_tokens for i in gen] == [10, 700, 5, 1]
    assert gen[0].arrival == 0.0 and gen[-1].arrival > 0.0


def test_share_assignment_and_per_tenant_rates(azure_csv):
    source = read_trace_source(azure_csv)
    shared = [TenantSpec("a", "ka", 3.0), TenantSpec("b", "kb", 1.0)]
    big = type(source)(source.records * 1000, timed=True, sample=False)
    items = build_workload(
        big, shared, WorkloadConfig(num_requests=4000, arrivals="gamma", rate=100.0)
    )
    share_a = sum(i.tenant == "a" for i in items) / len(items)
    assert share_a == pytest.approx(0.75, abs=0.03)
    rated = [TenantSpec("a", "ka", rate=2.0), TenantSpec("b", "kb", rate=1.0)]
    items = build_workload(big, rated, WorkloadConfig(num_requests=300, arrivals="gamma"))
    assert sum(i.tenant == "a" for i in items) == 200
    assert all(x.arrival <= y.arrival for x, y in pairwise(items))


def test_jsonl_trace_tenants_prompts_and_models(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [
        {
            "timestamp": 10.0,
            "input_tokens": 4,
            "output_tokens": 3,
            "tenant": "acme",
            "prompt": "hello there",
        },
        {
            "timestamp": 10.5,
            "input_tokens": 6,
            "output_tokens": 2,
            "tenant": "globex",
            "model": "m2",
        },
        {
            "timestamp": 11.0,
            "input_tokens": 5,
            "output_tokens": 8,
            "max_tokens": 4,
            "tenant": "other",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tenants = parse_tenants("acme:k1,globex:k2:0.000001")
    items = build_workload(read_trace_source(path), tenants, WorkloadConfig(arrivals="trace"))
    assert [i.tenant for i in items[:2]] == ["acme", "globex"]
    assert items[2].tenant == "acme"  # not in SPEC: drawn by share, globex's is tiny
    assert items[0].prompt == "hello there" and items[0].input_tokens == 4
    assert items[1].model == "m2" and len(items[1].prompt.split()) == 6
    assert items[2].max_tokens == 4


def test_dataset_formats(tmp_path):
    scorer = tmp_path / "rows.jsonl"
    scorer.write_text(
        json.dumps({"prompt": "Write a poem about the sea.", "output_tokens": 40})
        + "\n"
        + json.dumps(
            {
                "instruction": "Name three colors.",
                "output_tokens_llama2": 12,
                "prompt_tokens_llama2": 5,
                "model": "alpaca-7b",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    source = read_dataset_source(scorer)
    assert not source.timed and source.sample
    assert [r.output_tokens for r in source.records] == [40, 12]
    assert source.records[1].input_tokens == 5 and source.records[1].model is None
    tenants = [TenantSpec("default", "k")]
    items = build_workload(source, tenants, WorkloadConfig(num_requests=5, seed=3))
    assert len(items) == 5 and all(i.arrival == 0.0 for i in items)  # rate inf
    assert {i.prompt for i in items} == {"Write a poem about the sea.", "Name three colors."}
    assert build_workload(source, tenants, WorkloadConfig(num_requests=5, seed=3)) == items
    with pytest.raises(ValueError, match="timestamps"):
        build_workload(source, tenants, WorkloadConfig(arrivals="trace"))

    timed = tmp_path / "timed.jsonl"
    timed.write_text(
        json.dumps({"timestamp": 0, "input_tokens": 3, "output_tokens": 2}) + "\n", encoding="utf-8"
    )
    assert read_dataset_source(timed).timed

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_dataset_source(bad)


@pytest.mark.parametrize(
    ("tenants", "config"),
    [
        ("a:k", WorkloadConfig(arrivals="trace", burstiness=0.5)),
        ("a:k", WorkloadConfig(arrivals="gamma", time_scale=2.0)),
        ("a:k:rate=1", WorkloadConfig(arrivals="trace")),
        ("a:k:rate=1", WorkloadConfig(arrivals="gamma", rate=5.0)),
        ("a:k", WorkloadConfig(num_requests=0)),
        ("a:k", WorkloadConfig(max_output_tokens=0)),
    ],
)
def test_inconsistent_configs_are_refused(azure_csv, tenants, config):
    with pytest.raises(ValueError):
        build_workload(read_trace_source(azure_csv), parse_tenants(tenants), config)
