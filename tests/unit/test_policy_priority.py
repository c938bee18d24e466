"""SchedulerPolicy: a request's ``priority`` orders its tenant's own queue, strictly."""

from __future__ import annotations

import pytest

from services.scheduler.service import queued_view
from services.scheduler.simulator import ClusterConfig, SimRequest, simulate
from tests.unit.test_policy import order, policy, pool, req


@pytest.mark.parametrize("name", ["fcfs", "vtc", "rtlm", "fairway"])
def test_a_lower_priority_value_runs_first_whatever_the_arrival_or_cost(name) -> None:
    p = policy(name, tail_slack=10.0)
    p.add(req("bulk-cheap", out=1, arrival=0.0, priority=1), 0.0)
    p.add(req("bulk-old", out=50, arrival=0.0, priority=1), 0.0)
    p.add(req("urgent-costly", out=80, arrival=1.0, priority=-1), 1.0)
    p.add(req("normal", out=40, arrival=2.0), 2.0)
    got = order(p, 2.0)
    assert got[:2] == ["urgent-costly", "normal"]
    assert set(got[2:]) == {"bulk-cheap", "bulk-old"}


def test_equal_priorities_keep_the_policys_own_order() -> None:
    """Requests of one priority are cost-ordered as if no request named one."""
    p = policy("rtlm", tail_slack=10.0)
    p.add(req("busy", out=5), 0.0)
    for rid, out in (("long", 90), ("short", 1), ("mid", 30)):
        p.add(req(rid, out=out, priority=3), 0.0)
    assert order(p) == ["busy", "short", "mid", "long"]


def test_priority_beats_deadlines_the_guard_and_the_express_tier_of_less_urgent_requests() -> None:
    p = policy("rtlm", tail_slack=0.0, urgency_slack_s=1.0, aging_rate=0.0, express_share=0.5)
    for i in range(320):  # history for the express threshold (cheapest half of the work)
        p.add(req(f"h{i}", out=1 + i % 50, arrival=0.0), 0.0)
        p.cancel(f"h{i}")
    p.add(req("busy", out=20, arrival=0.0), 0.0)
    assert order(p, 0.0) == ["busy"]
    p.add(req("due", out=50, arrival=0.0, deadline=1.0, priority=1), 0.0)
    p.add(req("late", out=100, arrival=0.0, priority=1), 0.0)
    p.add(req("express", out=1, arrival=0.0, priority=1), 0.0)
    p.add(req("first", out=100, arrival=5.0), 5.0)
    got = order(p, 5.0)
    assert got[0] == "first"
    # Among themselves the less urgent ones keep the tiers: deadline, express, guard.
    assert got[1:] == ["due", "express", "late"]


def test_priority_never_moves_a_request_ahead_of_another_tenants() -> None:
    """VTC picks the tenant; a tenant's priority only reorders its own requests."""
    p = policy("fairway")
    p.restore({"a": 0.0, "b": 1000.0}, {}, [], [])
    p.add(req("a-1", "a", arrival=0.0), 0.0)
    p.add(req("a-2", "a", arrival=0.5, priority=2), 0.5)
    p.add(req("b-urgent", "b", arrival=1.0, priority=-100), 1.0)
    assert order(p, 1.0) == ["a-1", "a-2", "b-urgent"]


def test_a_less_urgent_foreground_request_still_goes_before_background_ones() -> None:
    p = policy("fairway")
    p.add(req("bg-urgent", background=True, priority=-5), 0.0)
    p.add(req("fg-bulk", priority=5), 0.0)
    p.add(req("bg", background=True), 0.0)
    assert order(p) == ["fg-bulk", "bg-urgent", "bg"]


def test_a_requeued_request_keeps_its_priority() -> None:
    p = policy("fairway")
    p.add(req("bulk", priority=1), 0.0)
    assert [d.request_id for d in p.schedule(0.0, [pool()]).dispatches] == ["bulk"]
    p.add(req("normal", arrival=1.0), 1.0)
    p.requeue(req("bulk", priority=1), 2.0)  # a worker died: late at once, but less urgent
    assert order(p, 2.0) == ["normal", "bulk"]


def test_restore_keeps_priorities() -> None:
    p = policy("fairway")
    queued = [req("q1", arrival=1.0, priority=1), req("q2", arrival=2.0)]
    p.restore({}, {}, queued, [])
    assert order(p, 3.0) == ["q2", "q1"]


def test_priority_reaches_the_policy_from_the_wire_message() -> None:
    from services import messages as m

    request = m.CompletionRequest(request_id="r", tenant="a", model="m", prompt="hi",
                                  priority=-7)
    scored = m.ScoredRequest(request_id="r", request=request, prompt_token_ids=[1, 2],
                             score=m.LengthScore(uncertainty=0.1, p10=1, p50=2, p90=3))
    decoded = m.decode(m.encode(scored), m.ScoredRequest)
    assert queued_view(decoded, arrival=0.0).priority == -7


def test_the_simulator_orders_a_tenants_urgent_requests_first() -> None:
    """Through the simulator (the same policy, a virtual clock): one tenant's urgent
    requests, sent behind a burst of its bulk ones, wait less than the bulk ones."""
    requests = [
        SimRequest(request_id=f"r{i}", tenant="app", arrival=i * 0.01, input_tokens=20,
                   output_tokens=40, max_tokens=64, predicted_p50=40, predicted_p90=40,
                   priority=0 if i % 5 == 4 else 1)
        for i in range(100)
    ]
    result = simulate(requests, policy("fairway").config, ClusterConfig(gpu_workers=1))
    waits = {0: [], 1: []}
    for r in result.requests:
        waits[r.priority].append(r.first_dispatch - r.arrival)
    mean = {k: sum(v) / len(v) for k, v in waits.items()}
    assert mean[0] * 3 < mean[1]

