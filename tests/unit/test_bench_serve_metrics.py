"""Benchmark arithmetic on a synthetic timeline whose answers were computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.benchmark.metrics import (
    RequestRecord,
    ServiceWeights,
    Slo,
    backlog_intervals,
    cumulative_service,
    intersect_intervals,
    max_service_difference,
    merge_intervals,
    parse_slo,
    per_tenant_summary,
    service_events,
    summarize,
    tpot,
)


def rec(index, tenant, send, chunks, end, inp, out, error=None):
    return RequestRecord(
        index=index,
        tenant=tenant,
        scheduled_time=send or 0.0,
        send_time=send,
        chunk_times=list(chunks),
        end_time=end,
        input_tokens=inp,
        output_tokens=out,
        success=send is not None and error is None,
        error=error,
    )


def timeline() -> list[RequestRecord]:
    """Two tenants over 2 s.

    a1: ttft .1, e2el .5, tpot .4/3, itl .1 .1 .2 | a2: ttft .3, e2el .4, tpot .1, itl .1
    b1: ttft .2, e2el 1.0, tpot .16, itl .4 .4 (6 tokens in 3 chunks) | b2: HTTP 500
    b3: one token, ttft .4, e2el .5 | a3: never sent.
    """
    return [
        rec(0, "A", 0.0, [0.1, 0.2, 0.3, 0.5], 0.5, 10, 4),
        rec(1, "B", 0.0, [0.2, 0.6, 1.0], 1.0, 5, 6),
        rec(2, "B", 0.5, [], 0.6, 7, 0, error="HTTP 500: boom"),
        rec(3, "A", 1.0, [1.3, 1.4], 1.4, 20, 2),
        rec(4, "B", 1.1, [1.5], 1.6, 3, 1),
        rec(5, "A", None, [], None, 9, 0, error=None),
    ]


def test_counts_and_throughput():
    s = summarize(timeline(), duration=2.0)
    assert (s["completed"], s["failed"], s["not_sent"]) == (4, 1, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (38, 13)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_throughput"] == pytest.approx(6.5)
    assert s["total_token_throughput"] == pytest.approx(25.5)
    assert "request_goodput" not in s


def test_latency_distributions():
    s = summarize(timeline(), duration=2.0)
    # TTFT ms: 100, 300, 200, 400
    assert s["mean_ttft_ms"] == pytest.approx(250)
    assert s["median_ttft_ms"] == pytest.approx(250)
    assert s["std_ttft_ms"] == pytest.approx(math.sqrt(12500))
    assert s["p90_ttft_ms"] == pytest.approx(370)
    assert s["p99_ttft_ms"] == pytest.approx(397)
    # TPOT ms: 133.33, 100, 160 (b3 has one token: excluded)
    assert s["mean_tpot_ms"] == pytest.approx((400 / 3 + 100 + 160) / 3)
    assert s["median_tpot_ms"] == pytest.approx(400 / 3)
    assert s["p90_tpot_ms"] == pytest.approx(400 / 3 + 0.8 * (160 - 400 / 3))
    # ITL ms pooled: 100 100 200 | 100 | 400 400
    assert s["mean_itl_ms"] == pytest.approx(1300 / 6)
    assert s["median_itl_ms"] == pytest.approx(150)
    assert s["p90_itl_ms"] == pytest.approx(400)
    assert s["p99_itl_ms"] == pytest.approx(400)
    # E2E ms: 500, 1000, 400, 500
    assert s["mean_e2el_ms"] == pytest.approx(600)
    assert s["median_e2el_ms"] == pytest.approx(500)
    assert s["p90_e2el_ms"] == pytest.approx(850)
    assert s["p99_e2el_ms"] == pytest.approx(985)


def test_tpot_definition():
    a1 = timeline()[0]
    assert tpot(a1) == pytest.approx((0.5 - 0.1) / 3)
    assert tpot(timeline()[4]) is None


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (Slo(ttft_ms=250, tpot_ms=150), 1),  # only a1
        (Slo(e2el_ms=600), 3),  # all but b1
        (Slo(tpot_ms=120), 2),  # a2, and b3 whose single token counts as TPOT 0
        (Slo(ttft_ms=1000, tpot_ms=1000, e2el_ms=1000), 4),
    ],
)
def test_goodput(slo, good):
    assert summarize(timeline(), 2.0, slo)["request_goodput"] == pytest.approx(good / 2.0)


def test_empty_run_reports_zero_like_vllm():
    s = summarize([], duration=0.0)
    assert s["completed"] == 0 and s["request_throughput"] == 0.0
    assert s["mean_ttft_ms"] == 0.0 and s["p99_e2el_ms"] == 0.0


def test_parse_slo():
    assert parse_slo("ttft_ms=200, tpot_ms=50") == Slo(ttft_ms=200, tpot_ms=50)
    assert parse_slo("e2el_ms=1e3").e2el_ms == 1000
    for bad in ("", "ttft=200", "ttft_ms=abc", "ttft_ms=-1", "ttft_ms=1,ttft_ms=2", "tpot_ms=inf"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_service_events_charge_input_at_first_chunk_and_spread_output():
    events = service_events(timeline(), ServiceWeights(1, 2))
    t_a, a_a = events["A"]
    assert t_a.tolist() == [0.1, 0.2, 0.3, 0.5, 1.3, 1.4]
    assert a_a.tolist() == [12, 2, 2, 2, 22, 2]
    t_b, a_b = events["B"]
    assert t_b.tolist() == [0.2, 0.6, 1.0, 1.5]
    assert a_b.tolist() == [9, 4, 4, 5]
    assert cumulative_service(events["A"], np.array([0.0, 0.1, 0.25, 2.0])).tolist() == [
        0,
        12,
        14,
        42,
    ]
    other = service_events(timeline(), ServiceWeights(0.5, 1))
    assert other["B"][1].sum() == pytest.approx(0.5 * 8 + 7)


def test_backlog_and_interval_helpers():
    assert merge_intervals([(2, 3), (0, 1), (0.5, 1.5), (3, 4)]) == [(0, 1.5), (2, 4)]
    assert intersect_intervals([(0, 1), (2, 5)], [(0.5, 3), (4, 6)]) == [(0.5, 1), (2, 3), (4, 5)]
    assert intersect_intervals([(0, 1)], [(1, 2)]) == []
    backlog = backlog_intervals(timeline())
    assert backlog == {"A": [(0.0, 0.5), (1.0, 1.4)], "B": [(0.0, 1.0), (1.1, 1.6)]}


def test_max_service_difference():
    # Joint backlog: [0, .5] and [1.1, 1.4]. In the first, S_A - S_B goes 0, 12, 5, 7, 9
    # (range 12); in the second it starts at 18 - 17 = 1 and reaches 25 when a2's
    # tokens arrive while b3 waits (range 24).
    diff = max_service_difference(timeline(), ServiceWeights(1, 2))
    assert diff is not None
    assert diff.value == pytest.approx(24)
    assert diff.tenants == ("A", "B")
    assert diff.interval == (1.1, 1.4)


def test_max_service_difference_edge_cases():
    only_a = [r for r in timeline() if r.tenant == "A"]
    assert max_service_difference(only_a) is None
    apart = [rec(0, "A", 0.0, [0.1], 0.2, 1, 1), rec(1, "B", 0.3, [0.4], 0.5, 1, 1)]
    diff = max_service_difference(apart)
    assert diff is not None and diff.value == 0.0
    # Three tenants, the worst pair wins: C (backlogged 0..1.6) gets 102 at 1.5 while
    # B, backlogged on [1.1, 1.6], stands at 17 then 22: S_B - S_C goes 17 -> -80.
    three = timeline() + [rec(6, "C", 0.0, [1.5], 1.6, 100, 1)]
    diff3 = max_service_difference(three)
    assert diff3 is not None and diff3.tenants == ("B", "C") and diff3.value == pytest.approx(97)


def test_per_tenant_summary():
    per = per_tenant_summary(timeline(), 2.0, Slo(e2el_ms=600))
    assert set(per) == {"A", "B"}
    assert (per["A"]["completed"], per["A"]["failed"], per["A"]["not_sent"]) == (2, 0, 1)
    assert (per["B"]["completed"], per["B"]["failed"]) == (2, 1)
    assert per["A"]["service"] == pytest.approx(42) and per["B"]["service"] == pytest.approx(22)
    assert per["A"]["service_rate"] == pytest.approx(21)
    assert per["A"]["mean_ttft_ms"] == pytest.approx(200)
    assert per["B"]["request_goodput"] == pytest.approx(0.5)
