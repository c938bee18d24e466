"""Simulator: hand-computable runs, preemption, saturation, metrics and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.latency_model import LatencyModel
from services.scheduler import sim_cli
from services.scheduler.policy import PolicyConfig
from services.scheduler.simulator import (
    ClusterConfig,
    ServiceTracker,
    SimRequest,
    Slo,
    fcfs_saturation_rps,
    make_requests,
    parse_tenants,
    rescale_arrivals,
    simulate,
)
from services.scheduler.traces import TraceRecord, write_jsonl

# 1 ms per prompt token, 10 ms per decode step whatever the batch: easy to add up by hand.
ONE_SLOT = LatencyModel(
    prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=1
)


def sim_req(
    rid: str, arrival: float, inp: int, out: int, pred: float | None = None, tenant: str = "t"
) -> SimRequest:
    p = float(out if pred is None else pred)
    return SimRequest(rid, tenant, arrival, inp, out, 100, p, p)


def three_requests() -> list[SimRequest]:
    # A: 0.1 s prefill (first token) + 4 steps = 0.14 s. B: 0.1 + 19 * 0.01 = 0.29 s.
    # C: 0.01 + 1 * 0.01 = 0.02 s. All arrive at t=0, in this order.
    return [sim_req("A", 0.0, 100, 5), sim_req("B", 0.0, 100, 20), sim_req("C", 0.0, 10, 2)]


def outcome(result) -> dict[str, tuple[float, float]]:
    return {r.request_id: (round(r.first_token, 6), round(r.finish, 6)) for r in result.requests}


def test_fcfs_on_one_slot_matches_the_hand_computed_timeline() -> None:
    result = simulate(
        three_requests(),
        PolicyConfig(name="fcfs", latency=ONE_SLOT),
        ClusterConfig(gpu_latency=ONE_SLOT),
    )
    assert outcome(result) == {"A": (0.1, 0.14), "B": (0.24, 0.43), "C": (0.44, 0.45)}
    summary = result.summary(Slo(ttft_s=0.2))
    assert summary["latency_s"]["e2e"]["mean"] == pytest.approx((0.14 + 0.43 + 0.45) / 3)
    assert summary["latency_s"]["tpot"]["mean"] == pytest.approx(0.01)
    assert summary["throughput"]["requests_per_s"] == pytest.approx(3 / 0.45)
    assert summary["goodput"]["requests_per_s"] == pytest.approx(1 / 0.45)  # only A's TTFT <= 0.2 s
    assert summary["completed"] == 3 and summary["preemptions"] == 0


def test_cost_order_runs_the_short_request_before_the_long_one() -> None:
    # A arrived to an empty queue, so even the tail guard lets it start at once; C then
    # passes B, whose guard (11x A's 0.15 s of work) is far away.
    config = PolicyConfig(name="rtlm", latency=ONE_SLOT, tail_slack=10.0)
    result = simulate(three_requests(), config, ClusterConfig(gpu_latency=ONE_SLOT))
    assert outcome(result) == {"A": (0.1, 0.14), "C": (0.15, 0.16), "B": (0.26, 0.45)}
    assert result.summary()["latency_s"]["e2e"]["mean"] == pytest.approx((0.14 + 0.16 + 0.45) / 3)


def test_batch_shares_steps_and_prefill_stalls_running_sequences() -> None:
    model = LatencyModel(
        prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_per_seq_ms=5.0, max_batch=2
    )
    reqs = [sim_req("A", 0.0, 10, 3), sim_req("B", 0.015, 20, 2)]
    result = simulate(
        reqs, PolicyConfig(name="fcfs", latency=model), ClusterConfig(gpu_latency=model)
    )
    # A: prefill 0.01 -> token 1 at 0.01; step (batch 1) 15 ms -> token 2 at 0.025. B arrived at
    # 0.015, so the next step prefills B (20 ms) and decodes A (15 ms): A's last token and B's
    # first at 0.06; then B alone (15 ms) finishes at 0.075.
    assert outcome(result) == {"A": (0.01, 0.06), "B": (0.06, 0.075)}


def test_too_short_prediction_is_preempted_and_recomputed_without_losing_output() -> None:
    model = LatencyModel(
        prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=2
    )
    reqs = [sim_req("R1", 0.0, 10, 10, pred=2), sim_req("R2", 0.0, 10, 6, pred=2)]
    result = simulate(
        reqs,
        PolicyConfig(name="rtlm", latency=model),
        ClusterConfig(gpu_latency=model, kv_tokens=25),
    )
    # Both admitted on 12 predicted tokens each. After the 20 ms prefill and one step both hold
    # 12 KV tokens: the next step would need 26 > 25, so R2 (admitted last) is preempted at
    # 0.03 with 2 tokens out. It now asks for 10 + 2 + 2 (double what it has) > the 12 left,
    # so it waits for R1 (done at 0.03 + 8 steps = 0.11), recomputes 12 tokens (12 ms) and
    # emits its remaining 4 tokens: 0.122, then 3 steps to 0.152.
    assert outcome(result) == {"R1": (0.02, 0.11), "R2": (0.02, 0.152)}
    assert result.preemptions == 1
    assert all(r.generated == r.output_tokens for r in result.requests)
    assert result.summary()["preemptions"] == 1
    # Charged once: inputs 10 + 10 and outputs 10 + 6 tokens at w_out = 2.
    assert result.counters == {"t": pytest.approx(20 + 2 * 16)}
    assert result.tracker.service == {"t": pytest.approx(20 + 2 * 16)}


def test_admission_by_max_tokens_never_preempts() -> None:
    model = LatencyModel(prefill_ms_per_token=1.0, decode_base_ms=10.0, max_batch=2)
    reqs = [sim_req("R1", 0.0, 10, 10, pred=2), sim_req("R2", 0.0, 10, 6, pred=2)]
    reqs = [SimRequest(r.request_id, "t", 0.0, 10, r.output_tokens, 12, 2.0, 2.0) for r in reqs]
    result = simulate(
        reqs,
        PolicyConfig(name="fcfs", latency=model),
        ClusterConfig(gpu_latency=model, kv_tokens=25),
    )
    assert result.preemptions == 0
    assert [r.request_id for r in sorted(result.requests, key=lambda r: r.finish)] == ["R1", "R2"]


def test_fcfs_saturation_is_throughput_with_everything_waiting_at_zero() -> None:
    reqs = [sim_req("A", 5.0, 100, 5), sim_req("C", 9.0, 10, 2)]
    assert fcfs_saturation_rps(reqs, ClusterConfig(gpu_latency=ONE_SLOT)) == pytest.approx(2 / 0.16)


def test_rescale_arrivals_sets_the_mean_rate_and_moves_deadlines_along() -> None:
    reqs = [sim_req(f"r{i}", 10.0 + 2.0 * i, 5, 1) for i in range(5)]
    reqs[4].deadline = reqs[4].arrival + 3.0
    scaled, factor = rescale_arrivals(reqs, rate_rps=2.0)
    assert factor == pytest.approx(0.25)
    assert [r.arrival for r in scaled] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert scaled[4].deadline == pytest.approx(5.0)
    assert reqs[1].arrival == 12.0  # inputs untouched


def test_cpu_worker_takes_short_work_only_when_the_gpu_is_backed_up() -> None:
    gpu = LatencyModel(
        prefill_ms_per_token=0.1, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=1
    )
    cpu = LatencyModel(
        prefill_ms_per_token=1.0, decode_base_ms=30.0, decode_per_seq_ms=0.0, max_batch=1
    )
    cluster = ClusterConfig(gpu_workers=1, cpu_workers=1, gpu_latency=gpu, cpu_latency=cpu)
    light = [sim_req("only", 0.0, 10, 5)]
    assert {
        r.pool for r in simulate(light, PolicyConfig(name="rtlm", latency=gpu), cluster).requests
    } == {"gpu-0"}
    burst = [sim_req(f"r{i}", 0.0, 10, 20) for i in range(8)]
    pools = [
        r.pool for r in simulate(burst, PolicyConfig(name="rtlm", latency=gpu), cluster).requests
    ]
    assert "cpu-0" in pools and pools.count("gpu-0") > pools.count("cpu-0")
    fcfs = [
        r.pool for r in simulate(burst, PolicyConfig(name="fcfs", latency=gpu), cluster).requests
    ]
    assert set(fcfs) == {"gpu-0"}


def test_expired_requests_are_reported_and_deadlines_counted() -> None:
    reqs = [sim_req("A", 0.0, 100, 30), sim_req("B", 0.0, 100, 30)]
    for r in reqs:
        r.deadline, r.fail_if_late = 0.5, True
    result = simulate(
        reqs, PolicyConfig(name="fcfs", latency=ONE_SLOT), ClusterConfig(gpu_latency=ONE_SLOT)
    )
    summary = result.summary()
    # A runs 0.1 + 0.29 = 0.39 s; B cannot start before 0.39 and needs 0.39 s more.
    assert summary["expired"] == 1 and summary["completed"] == 1
    assert summary["deadlines"] == {"with_deadline": 2, "met": 1, "attainment": 0.5}


def test_service_tracker_measures_drift_only_while_both_are_backlogged() -> None:
    tracker = ServiceTracker(["a", "b"], {"b": 2.0}, sample_every_s=1.0)
    tracker.waiting.update(a=1, b=1)
    tracker.update(0.0)
    tracker.service["a"] += 100
    tracker.update(1.0)  # a - b/2 went 0 -> 100
    tracker.waiting["b"] = 0
    tracker.service["a"] += 1000  # b not backlogged: does not count
    tracker.update(2.0)
    tracker.waiting["b"] = 1
    tracker.update(3.0)
    tracker.service["b"] += 400  # weighted 200: a - b/2 goes 1100 -> 900
    tracker.update(4.0)
    assert tracker.max_difference == pytest.approx(200)
    assert tracker.jain_index() == pytest.approx((100 + 200) ** 2 / (2 * (100**2 + 200**2)))


def test_vtc_keeps_two_tenants_at_four_to_one_within_the_bound() -> None:
    reqs = [sim_req(f"h{i}", i * 0.02, 20, 10, tenant="heavy") for i in range(400)]
    reqs += [sim_req(f"l{i}", i * 0.08, 20, 10, tenant="light") for i in range(100)]
    model = LatencyModel(
        prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=2
    )
    cluster = ClusterConfig(gpu_latency=model)
    fcfs = simulate(reqs, PolicyConfig(name="fcfs", latency=model), cluster).summary()["fairness"]
    vtc = simulate(reqs, PolicyConfig(name="vtc", latency=model), cluster).summary()["fairness"]
    assert vtc["max_service_difference"] <= vtc["vtc_bound"]
    assert fcfs["max_service_difference"] > 5 * vtc["max_service_difference"]


def test_parse_tenants() -> None:
    a, b = parse_tenants("a:3,b:1:2.5")
    assert (a.name, a.share, a.weight, b.name, b.share, b.weight) == (
        "a",
        0.75,
        1.0,
        "b",
        0.25,
        2.5,
    )
    for bad in ("", "a", "a:x", "a:1:0", "a:1,a:2", "a:0"):
        with pytest.raises(ValueError):
            parse_tenants(bad)


def test_make_requests_oracle_noise_and_none_predictor() -> None:
    records = [TraceRecord(float(i), 10, 100) for i in range(2000)]
    exact = make_requests(records, predictor="oracle", max_tokens=500)
    assert {(r.predicted_p50, r.predicted_p90, r.max_tokens) for r in exact} == {
        (100.0, 100.0, 500)
    }
    noisy = make_requests(records, predictor="oracle", oracle_noise=0.5, max_tokens=10_000, seed=3)
    above_p90 = sum(r.output_tokens > r.predicted_p90 for r in noisy) / len(noisy)
    assert 0.05 < above_p90 < 0.15  # the p90 is calibrated to the noise
    none = make_requests(records, predictor="none", max_tokens=500)
    assert {(r.predicted_p50, r.predicted_p90) for r in none} == {(500.0, 500.0)}
    split = make_requests(records, tenants=parse_tenants("x:0.8,y:0.2"), seed=1)
    assert 0.75 < sum(r.tenant == "x" for r in split) / len(split) < 0.85


def test_background_requests_run_after_every_other_on_the_simulated_clock() -> None:
    """On one slot, the background tenant's request that arrived first runs last: the
    production policy's background class, on the virtual clock."""
    records = [TraceRecord(0.0, 10, 2, tenant="batch"), TraceRecord(0.0, 100, 5, tenant="chat"),
               TraceRecord(0.0, 100, 20, tenant="chat")]
    requests = make_requests(records, background_tenants=frozenset({"batch"}))
    assert [r.background for r in requests] == [True, False, False]
    for name in ("fcfs", "fairway"):
        result = simulate(requests, PolicyConfig(name=name, latency=ONE_SLOT),
                          ClusterConfig(gpu_latency=ONE_SLOT))
        order = sorted(result.requests, key=lambda r: r.finish)
        assert order[-1].tenant == "batch", name
        assert order[-1].finish == pytest.approx(0.43 + 0.02)


def test_fairway_predictor_needs_prompts() -> None:
    with pytest.raises(ValueError, match="needs prompts"):
        make_requests([TraceRecord(0.0, 10, 5)], predictor="fairway")


def cli_args(trace: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(["--trace", str(trace), "--json", str(out), *extra])


def test_cli_writes_the_hand_computed_summary(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_jsonl(
        [TraceRecord(0.0, 100, 5), TraceRecord(0.0, 100, 20), TraceRecord(0.0, 10, 2)], trace
    )
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"gpu": ONE_SLOT.to_dict()}))
    out = tmp_path / "out.json"
    args = cli_args(
        trace, out, "--policy", "fcfs", "--latency-model", str(model), "--slo-ttft-ms", "200"
    )
    assert sim_cli.run(args) == 0
    summary = json.loads(out.read_text())
    assert summary["latency_s"]["e2e"]["mean"] == pytest.approx((0.14 + 0.43 + 0.45) / 3)
    assert summary["goodput"]["fraction"] == pytest.approx(1 / 3)
    assert summary["setup"]["cluster"]["gpu_latency"]["max_batch"] == 1
    assert summary["tenants"]["default"]["completed"] == 3


def test_cli_load_rescales_to_a_fraction_of_fcfs_saturation(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_jsonl(
        [
            TraceRecord(float(i), 50 + i % 7, 5 + i % 11, tenant="a" if i % 3 else "b")
            for i in range(60)
        ],
        trace,
    )
    out = tmp_path / "out.json"
    assert sim_cli.run(cli_args(trace, out, "--policy", "fairway", "--load", "0.5")) == 0
    setup = json.loads(out.read_text())["setup"]
    assert setup["offered_rps"] == pytest.approx(0.5 * setup["fcfs_saturation_rps"])


def test_cli_passes_the_tail_knobs_to_the_policy(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_jsonl([TraceRecord(float(i), 50, 5 + i % 11) for i in range(20)], trace)
    out = tmp_path / "out.json"
    extra = ("--tail-target-s", "30", "--express-share", "0.3", "--late-first")
    assert sim_cli.run(cli_args(trace, out, *extra)) == 0
    knobs = json.loads(out.read_text())["setup"]["policy"]
    assert (knobs["tail_target_s"], knobs["express_share"], knobs["late_first"]) == (30, 0.3, True)
    assert sim_cli.run(cli_args(trace, out)) == 0
    knobs = json.loads(out.read_text())["setup"]["policy"]
    assert (knobs["tail_target_s"], knobs["late_first"]) == (0.0, False)


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "t.jsonl"
    write_jsonl([TraceRecord(0.0, 10, 5)], trace)
    assert sim_cli.run(cli_args(trace, tmp_path / "o.json", "--predictor", "fairway")) == 2
    assert "needs prompts" in capsys.readouterr().err
    assert sim_cli.run(cli_args(tmp_path / "missing.csv", tmp_path / "o.json")) == 2
    assert sim_cli.run(cli_args(trace, tmp_path / "o.json", "--tenants", "a:x")) == 2


def test_cli_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = tmp_path / "t.jsonl"
    write_jsonl([TraceRecord(i * 0.01, 20, 3, tenant="ab"[i % 2]) for i in range(20)], trace)
    plots = tmp_path / "plots"
    assert sim_cli.run(cli_args(trace, tmp_path / "o.json", "--plot", str(plots))) == 0
    assert sorted(p.name for p in plots.iterdir()) == [
        "latency_cdf_fairway.png",
        "tenant_service_fairway.png",
    ]


def test_a_waiting_chat_request_has_the_running_background_request_handed_back() -> None:
    """On one slot, a chat request that would wait 1.5 s for a batch request's slot has
    it handed back at the next step: the chat request starts at once, the batch request
    continues afterwards from the tokens it had (recomputing them as prompt)."""
    records = [TraceRecord(0.0, 10, 200, tenant="batch"), TraceRecord(0.505, 100, 5, tenant="chat")]
    finish = {}
    for preempt in (True, False):
        requests = make_requests(records, background_tenants=frozenset({"batch"}))
        config = PolicyConfig(name="fairway", latency=ONE_SLOT, preempt_background=preempt)
        result = simulate(requests, config, ClusterConfig(gpu_latency=ONE_SLOT))
        batch, chat = sorted(result.requests, key=lambda r: r.tenant)
        assert batch.generated == 200 and chat.generated == 5
        finish[preempt] = (batch, chat)
    batch, chat = finish[True]
    assert batch.preemptions == 1 and chat.preemptions == 0
    # The batch request's next step boundary: its prefill (10 ms) and 50 steps of 10 ms.
    assert chat.first_dispatch == pytest.approx(0.51)
    assert chat.finish == pytest.approx(0.51 + 0.1 + 4 * 0.01)  # a prefill, then 4 steps
    # The batch request recomputes its 10 + 51 tokens (its 52nd token), then 148 steps.
    assert batch.finish == pytest.approx(chat.finish + 0.061 + 148 * 0.01)
    batch_alone, chat_waited = finish[False]
    assert batch_alone.preemptions == 0 and chat_waited.first_dispatch == pytest.approx(2.0)
