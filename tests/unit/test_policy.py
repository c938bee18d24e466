"""SchedulerPolicy: VTC counters and lift, ordering, deadlines, admission, placement, state."""

from __future__ import annotations

import pytest

from services.latency_model import LatencyModel
from services.scheduler.policy import (
    UNLIMITED_KV,
    PolicyConfig,
    PoolView,
    QueuedRequest,
    SchedulerPolicy,
)

GPU = LatencyModel(
    prefill_ms_per_token=0.1, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=4
)
CPU = LatencyModel(
    prefill_ms_per_token=1.0, decode_base_ms=50.0, decode_per_seq_ms=0.0, max_batch=4
)


def req(
    rid: str,
    tenant: str = "a",
    *,
    inp: int = 10,
    out: float = 10,
    arrival: float = 0.0,
    max_tokens: int = 100,
    **kw,
) -> QueuedRequest:
    return QueuedRequest(rid, tenant, inp, max_tokens, out, kw.pop("p90", out), arrival, **kw)


def pool(
    name: str = "gpu",
    slots: int = 1,
    kv: int = UNLIMITED_KV,
    latency: LatencyModel = GPU,
    running: int = 0,
    backlog: float = 0.0,
    **kw,
) -> PoolView:
    return PoolView(name, slots, kv, running, latency, backlog, **kw)


def policy(name: str, **kw) -> SchedulerPolicy:
    kw.setdefault("latency", GPU)
    return SchedulerPolicy(PolicyConfig(name=name, **kw))


def order(p: SchedulerPolicy, now: float = 0.0, n: int | None = None) -> list[str]:
    """Dispatch one at a time (``n`` times, or until the queue is empty); the ids in order."""
    out = []
    while p.num_queued() and (n is None or len(out) < n):
        result = p.schedule(now, [pool()])
        assert len(result.dispatches) == 1
        out.append(result.dispatches[0].request_id)
    return out


def test_unknown_policy_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig(name="sjf")


def test_named_policies_switch_their_parts() -> None:
    parts = {
        n: (c.fair, c.cost_order, c.consolidate, c.offload)
        for n in ("fcfs", "vtc", "rtlm", "fairway")
        for c in [PolicyConfig(name=n)]
    }
    assert parts == {
        "fcfs": (False, False, False, False),
        "vtc": (True, False, False, False),
        "rtlm": (False, True, True, True),
        "fairway": (True, True, True, True),
    }


def test_fcfs_dispatches_in_arrival_order_whatever_the_cost() -> None:
    p = policy("fcfs")
    p.add(req("long", out=90, arrival=1.0), 1.0)
    p.add(req("short", out=1, arrival=2.0), 2.0)
    assert order(p, 3.0) == ["long", "short"]


def test_cost_order_runs_the_cheaper_predicted_request_first() -> None:
    p = policy("rtlm", tail_slack=10.0)
    # "busy" arrived to an empty queue: FCFS would start it at once, so it is not delayed.
    p.add(req("busy", out=5), 0.0)
    p.add(req("long", out=90), 0.0)
    p.add(req("short", out=1), 0.0)
    assert order(p, 0.0) == ["busy", "short", "long"]


def test_vtc_charges_input_at_dispatch_divided_by_weight() -> None:
    p = policy("vtc", tenant_weights={"b": 2.0})
    p.add(req("a1", "a", inp=30), 0.0)
    p.add(req("b1", "b", inp=30), 0.0)
    result = p.schedule(0.0, [pool(slots=2)])
    charges = {d.request_id: d.charge for d in result.dispatches}
    assert charges == {"a1": 30.0, "b1": 15.0}
    assert p.counters == {"a": 30.0, "b": 15.0}
    assert p.served == {"a": 30.0, "b": 30.0}


def test_vtc_serves_the_backlogged_tenant_with_the_smallest_counter() -> None:
    p = policy("vtc")
    p.restore({"a": 100.0, "b": 10.0}, {}, [], [])
    p.add(req("b1", "b", arrival=0.0), 0.0)
    p.add(req("b2", "b", arrival=1.0), 1.0)
    p.add(req("a1", "a", arrival=2.0), 2.0)
    # b's counter (10, +10 per dispatch) stays below a's (100) until b is charged past it.
    assert order(p, 3.0) == ["b1", "b2", "a1"]


def test_a_tenant_with_requests_in_flight_leaves_the_idle_tenant_slot_free() -> None:
    """A heavy tenant fills a pool of 8 but its last slot while another tenant is about:
    that one starts there at once instead of waiting for the heavy answers to end."""
    p = policy("fairway")
    p.add(req("l0", "light", arrival=0.0), 0.0)
    assert [d.request_id for d in p.schedule(0.0, [pool(slots=8)]).dispatches] == ["l0"]
    p.on_finished("l0", "light", 10, 0.5)
    for i in range(10):
        p.add(req(f"h{i}", "heavy", arrival=1.0), 1.0)
    first = p.schedule(1.0, [pool(slots=8)]).dispatches
    assert [d.request_id[0] for d in first] == ["h"] * 7  # one slot kept
    assert p.schedule(1.1, [pool(slots=1, running=7)]).dispatches == []
    p.add(req("l1", "light", arrival=1.2), 1.2)
    assert [d.request_id for d in p.schedule(1.2, [pool(slots=1, running=7)]).dispatches] == ["l1"]
    # One slot is always kept: a heavy answer ending while the light one runs frees the
    # slot the next idle tenant will need; the light one ending frees one for heavy.
    p.on_finished("h0", "heavy", 10, 2.0)
    assert p.schedule(2.0, [pool(slots=1, running=7)]).dispatches == []
    p.on_finished("l1", "light", 10, 2.1)
    assert [d.request_id for d in p.schedule(2.1, [pool(slots=2, running=6)]).dispatches] == ["h7"]
    # Once the light tenant has been away a window long, the heavy one takes every slot.
    assert [d.request_id for d in p.schedule(62.0, [pool(slots=1, running=7)]).dispatches] == ["h8"]


def test_no_slot_is_kept_for_a_tenant_alone_below_its_share_small_pools_or_unfair_policies() -> None:
    def started(p: SchedulerPolicy, in_flight: int, free: int, running: int) -> int:
        """``heavy`` with ``in_flight`` running, ``other`` about; heavy's new requests started."""
        p.add(req("other0", "other", arrival=0.0), 0.0)
        p.schedule(0.0, [pool(slots=1)])
        for i in range(in_flight + 3):
            p.add(req(f"heavy{i}", "heavy", arrival=0.0), 0.0)
        p.schedule(0.0, [pool(slots=in_flight, running=1)])
        return len(p.schedule(0.0, [pool(slots=free, running=running)]).dispatches)

    assert started(policy("fairway"), 6, 3, 7) == 2  # holds 6 of 10 slots, share 5: one kept
    assert started(policy("fairway"), 2, 3, 7) == 3  # holds 2, then 4 < 5: may take the last
    assert started(policy("fcfs"), 6, 3, 7) == 3
    assert started(policy("fairway", idle_tenant_slots=0), 6, 3, 7) == 3
    assert started(policy("fairway"), 3, 1, 3) == 1  # a pool of 4 keeps nothing
    alone = policy("fairway")
    for i in range(10):
        alone.add(req(f"h{i}", "heavy", arrival=0.0), 0.0)
    assert len(alone.schedule(0.0, [pool(slots=8)]).dispatches) == 8  # nobody else about


def test_progress_charges_w_out_per_token() -> None:
    p = policy("vtc", w_out=2.0, tenant_weights={"a": 4.0})
    assert p.on_progress("a", 10, 0.0) == pytest.approx(5.0)
    assert p.counters["a"] == pytest.approx(5.0)
    assert p.served["a"] == pytest.approx(20.0)


def test_newly_backlogged_tenant_is_lifted_to_the_smallest_backlogged_counter() -> None:
    p = policy("vtc")
    p.restore({"a": 500.0, "b": 800.0, "idle": 0.0}, {}, [], [])
    p.add(req("a1", "a"), 0.0)
    p.add(req("b1", "b"), 0.0)
    p.add(req("i1", "idle"), 0.0)
    # Lifted to min(500, 800): an idle tenant cannot bank credit while others wait.
    assert p.counters["idle"] == 500.0
    # A tenant already above the minimum keeps its counter.
    p2 = policy("vtc")
    p2.restore({"a": 10.0, "b": 300.0}, {}, [], [])
    p2.add(req("a1", "a"), 0.0)
    p2.add(req("b1", "b"), 0.0)
    assert p2.counters["b"] == 300.0


def test_lift_only_when_the_tenant_becomes_backlogged() -> None:
    p = policy("vtc")
    p.restore({"a": 0.0, "b": 100.0}, {}, [], [])
    p.add(req("a1", "a"), 0.0)
    p.add(req("b1", "b"), 0.0)
    p.counters["a"] = 50.0
    p.add(req("a2", "a"), 0.0)  # a was already backlogged: no lift to b's 100
    assert p.counters["a"] == 50.0


def test_no_lift_without_fairness() -> None:
    p = policy("fcfs")
    p.restore({"a": 0.0, "b": 100.0}, {}, [], [])
    p.add(req("b1", "b"), 0.0)
    p.add(req("a1", "a"), 0.0)
    assert p.counters["a"] == 0.0


def test_add_is_idempotent_for_queued_and_inflight_requests() -> None:
    p = policy("vtc")
    p.add(req("x"), 0.0)
    p.add(req("x"), 0.0)
    assert p.num_queued() == 1
    assert [d.request_id for d in p.schedule(0.0, [pool(slots=4)]).dispatches] == ["x"]
    p.add(req("x"), 1.0)  # redelivered after dispatch
    assert p.num_queued() == 0
    assert p.schedule(1.0, [pool(slots=4)]).dispatches == []
    assert p.counters["a"] == 10.0


def test_requeue_does_not_charge_the_input_twice() -> None:
    p = policy("vtc")
    p.add(req("x", inp=40), 0.0)
    first = p.schedule(0.0, [pool()]).dispatches
    assert first[0].charge == 40.0
    p.on_progress("a", 3, 1.0)
    p.requeue(req("x", inp=40, generated=3), 2.0)
    assert p.num_queued("a") == 1
    again = p.schedule(2.0, [pool()]).dispatches
    assert [d.request_id for d in again] == ["x"] and again[0].charge == 0.0
    assert p.counters["a"] == pytest.approx(40.0 + 2 * 3)
    assert p.served["a"] == pytest.approx(40.0 + 2 * 3)


def test_cached_prompt_tokens_are_repriced_at_w_cached() -> None:
    """Charged w_in at dispatch (nobody knows yet what a worker holds), the prompt tokens
    a worker read from its prefix cache cost w_cached in the end."""
    p = policy("vtc", w_in=1.0, w_cached=0.1, tenant_weights={"a": 2.0})
    p.add(req("x", inp=40), 0.0)
    (first,) = p.schedule(0.0, [pool()]).dispatches
    assert first.charge == pytest.approx(20.0)
    assert p.on_cached_input("a", 32) == pytest.approx(-0.9 * 32 / 2)
    assert p.counters["a"] == pytest.approx((40 - 0.9 * 32) / 2)
    assert p.served["a"] == pytest.approx(40)  # tokens served: a counter only grows
    assert p.on_cached_input("a", 0) == 0.0


def test_w_cached_equal_to_w_in_charges_cached_tokens_in_full() -> None:
    p = policy("vtc", w_cached=1.0)
    p.add(req("x", inp=40), 0.0)
    p.schedule(0.0, [pool()])
    assert p.on_cached_input("a", 32) == 0.0 and p.counters["a"] == 40.0
    with pytest.raises(ValueError, match="w_cached"):
        PolicyConfig(name="vtc", w_cached=-0.1)


def test_requeue_of_a_request_unknown_to_this_replica_is_not_charged_either() -> None:
    p = policy("vtc")
    p.requeue(req("x", inp=40), 0.0)
    assert p.schedule(0.0, [pool()]).dispatches[0].charge == 0.0
    assert p.counters["a"] == 0.0


def test_cancel_drops_a_queued_request_only() -> None:
    p = policy("vtc")
    p.add(req("x"), 0.0)
    p.add(req("y"), 0.0)
    assert p.cancel("x").request_id == "x"
    assert p.cancel("x") is None
    assert p.num_queued() == 1 and p.num_queued("a") == 1
    p.schedule(0.0, [pool()])
    assert p.cancel("y") is None  # in flight: the worker's business


def test_predicted_charging_prepays_the_p50_and_settles_at_finish() -> None:
    p = policy("vtc", charge_predicted=True, w_out=2.0)
    p.add(req("x", inp=10, out=30), 0.0)
    d = p.schedule(0.0, [pool()]).dispatches[0]
    assert d.charge == pytest.approx(10 + 2 * 30)
    assert p.on_progress("a", 5, 1.0) == 0.0  # output already prepaid
    assert p.served["a"] == pytest.approx(10 + 2 * 5)
    assert p.on_finished("x", "a", 50, 2.0) == pytest.approx(2 * 20)
    assert p.counters["a"] == pytest.approx(10 + 2 * 50)
    assert p.on_finished("x", "a", 50, 3.0) == 0.0  # a repeated finish settles nothing


def test_actual_charging_does_not_charge_again_at_finish() -> None:
    p = policy("vtc")
    p.add(req("x", inp=10), 0.0)
    p.schedule(0.0, [pool()])
    p.on_progress("a", 7, 1.0)
    assert p.on_finished("x", "a", 7, 2.0) == 0.0
    assert p.counters["a"] == pytest.approx(10 + 14)


def test_restore_rebuilds_queues_without_lift_or_charge() -> None:
    p = policy("vtc", charge_predicted=True)
    queued = [req("q2", "b", arrival=2.0), req("q1", "b", arrival=1.0)]
    inflight = [req("f1", "a", inp=10, out=20)]
    p.restore({"a": 5.0, "b": 900.0}, {"a": 5.0, "b": 900.0}, queued, inflight)
    assert p.counters == {"a": 5.0, "b": 900.0}
    assert p.num_queued("b") == 2
    assert [r.request_id for r in p.inflight_requests()] == ["f1"]
    ds = p.schedule(3.0, [pool(slots=2)]).dispatches
    assert [d.request_id for d in ds] == ["q1", "q2"]
    assert p.counters["b"] == pytest.approx(900.0 + 2 * (10 + 2 * 10))
    p.requeue(req("f1", "a", inp=10, out=20), 4.0)  # restored in-flight: input not charged again
    assert p.schedule(4.0, [pool()]).dispatches[0].charge == 0.0
    # The restored in-flight request's prepaid p50 is known again, so finishing settles it.
    assert p.on_finished("f1", "a", 25, 5.0) == pytest.approx(2 * 5)


def test_deadline_near_expiry_wins_over_cheaper_requests() -> None:
    p = policy("rtlm", tail_slack=10.0, express_share=0.0, urgency_slack_s=1.0)
    p.add(req("busy", arrival=0.0), 0.0)
    for i in range(3):
        p.add(req(f"cheap{i}", out=1, arrival=0.0), 0.0)
    # 50 tokens at 10 ms (p90 at full batch) = 0.5 s of work: latest start 9.5, urgent from 8.5.
    p.add(req("dl", out=50, arrival=0.0, deadline=10.0), 0.0)
    assert order(p, 8.0, n=2) == ["busy", "cheap0"]
    assert order(p, 8.6, n=1) == ["dl"]


def test_request_that_can_no_longer_make_its_deadline_expires_if_it_asked() -> None:
    for name in ("fcfs", "fairway"):
        p = policy(name)
        p.add(req("late", out=50, deadline=1.0, fail_if_late=True), 0.0)
        p.add(req("keep", out=50, deadline=1.0), 0.0)
        # Fastest finish: 1 ms prefill + 50 tokens * 10 ms = 0.501 s: hopeless after 0.499 s.
        assert p.schedule(0.4, [pool(slots=0)]).expired == []
        result = p.schedule(0.6, [pool(slots=0)])
        assert [(e.request_id, e.reason) for e in result.expired] == [("late", "deadline")]
        assert p.num_queued() == 1


def big_dispatch_time(**cfg) -> float | None:
    """One slot, a cheap request arriving every 0.1 s for 20 s after an expensive one:
    when the expensive one starts (``None``: never)."""
    p = policy("rtlm", express_share=0.0, aging_rate=0.0, **cfg)
    p.add(req("busy", out=20, arrival=0.0), 0.0)  # 0.2 s of work at full batch
    p.add(req("big", out=100, arrival=0.0), 0.0)
    t = 0.0
    for i in range(200):
        t = round(t + 0.1, 6)
        p.add(req(f"c{i}", out=2, arrival=t), t)
        d = p.schedule(t, [pool()]).dispatches
        if d and d[0].request_id == "big":
            return t
    return None


def test_tail_guard_stops_cheap_requests_from_starving_an_expensive_one() -> None:
    """Under pure shortest-first the expensive request never runs; with the tail guard it
    runs once it has waited about as long as FCFS would have made it wait (+10%)."""
    assert big_dispatch_time(tail_slack=1e9) is None  # starves without the guard
    started = big_dispatch_time(tail_slack=0.1)
    assert started is not None and started <= 0.1 + 0.5


def test_tail_target_lets_cheaper_requests_pass_until_the_target_then_guards() -> None:
    """With a tail target the expensive request is passed by cheap ones until it has
    waited the target (longer than 1.1x its FCFS wait), then runs."""
    without = big_dispatch_time(tail_slack=0.1)
    started = big_dispatch_time(tail_slack=0.1, tail_target_s=3.0)
    assert without is not None and without <= 0.6
    assert started is not None and 3.0 <= started <= 3.0 + 0.2


def test_late_first_puts_requests_past_their_guard_before_the_express_tier() -> None:
    def first_at_5s(**cfg) -> str:
        p = policy("rtlm", express_share=0.5, aging_rate=0.0, tail_slack=0.0, **cfg)
        for i in range(320):  # history for the express threshold (cheapest half of the work)
            p.add(req(f"h{i}", out=1 + i % 50, arrival=0.0), 0.0)
            p.cancel(f"h{i}")
        p.add(req("busy", out=20, arrival=0.0), 0.0)
        p.add(req("old", out=100, arrival=0.0), 0.0)  # guard: after busy's work, 0.05 s
        assert [d.request_id for d in p.schedule(0.0, [pool()]).dispatches] == ["busy"]
        p.add(req("fresh", out=2, arrival=5.0), 5.0)  # cheap: express
        return p.schedule(5.0, [pool()]).dispatches[0].request_id

    assert first_at_5s() == "fresh"
    assert first_at_5s(late_first=True) == "old"


def test_tail_target_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(tail_target_s=-1.0)


def test_aging_lets_an_old_request_pass_newer_cheaper_ones() -> None:
    p = policy("rtlm", tail_slack=1e9, express_share=0.0, aging_rate=1.0)
    p.add(req("busy", arrival=0.0), 0.0)
    p.add(req("old", out=50, arrival=0.0), 0.0)  # cost 0.5 s
    p.add(req("new", out=10, arrival=0.45), 0.45)  # cost 0.1 s, but 0.45 s younger
    assert order(p, 1.0) == ["busy", "old", "new"]


def test_consolidation_admits_by_predicted_length_not_max_tokens() -> None:
    def admitted(name: str, **kw) -> list[int]:
        p = policy(name, **kw)
        for i in range(5):
            p.add(req(f"r{i}", inp=500, out=100, p90=200, max_tokens=2000, arrival=i), i)
        return [d.kv_tokens for d in p.schedule(10.0, [pool(slots=5, kv=3000)]).dispatches]

    assert admitted("fcfs") == [2500]
    assert admitted("rtlm") == [700, 700, 700, 700]
    assert admitted("rtlm", kv_quantile="p50") == [600] * 5


def test_request_waiting_for_kv_holds_the_pool_against_later_smaller_ones() -> None:
    p = policy("fcfs")
    p.add(req("big", inp=900, max_tokens=100, arrival=0.0), 0.0)
    p.add(req("small", inp=10, max_tokens=10, arrival=1.0), 1.0)
    assert p.schedule(1.0, [pool(slots=2, kv=500)]).dispatches == []
    assert [d.request_id for d in p.schedule(2.0, [pool(slots=2, kv=1000)]).dispatches] == ["big"]


def test_request_larger_than_any_worker_is_answered_not_kept_forever() -> None:
    p = policy("fcfs")
    p.add(req("huge", inp=5000), 0.0)
    result = p.schedule(0.0, [pool(kv_capacity=4096)])
    assert [(e.request_id, e.reason) for e in result.expired] == [("huge", "exceeds_kv_capacity")]
    assert p.num_queued() == 0


def test_placement_uses_the_cpu_only_when_it_finishes_sooner() -> None:
    cpu = pool("cpu", slots=4, latency=CPU)

    def placed(backlog: float, out: float, name: str = "rtlm") -> list[tuple[str, str]]:
        p = policy(name, express_share=0.0)
        p.add(req("x", out=out), 0.0)
        gpu = pool("gpu", slots=0, running=4, backlog=backlog)
        return [(d.request_id, d.pool) for d in p.schedule(0.0, [gpu, cpu]).dispatches]

    # GPU: backlog + 1 ms + out * 10 ms; CPU: 10 ms + out * 50 ms.
    assert placed(backlog=0.1, out=10) == []  # GPU 0.201 s < CPU 0.51 s: wait for the GPU
    assert placed(backlog=1.0, out=10) == [("x", "cpu")]  # GPU 1.101 s > CPU 0.51 s
    assert placed(backlog=1.0, out=100) == []  # GPU 2.001 s < CPU 5.01 s
    assert placed(backlog=1.0, out=10, name="fcfs") == []  # no offloading
    p = policy("rtlm")
    p.add(req("x"), 0.0)
    free_gpu = pool("gpu", slots=1)
    assert [d.pool for d in p.schedule(0.0, [free_gpu, cpu]).dispatches] == ["gpu"]


def test_placement_counts_the_requests_already_waiting_for_the_gpu() -> None:
    p = policy("rtlm", express_share=0.0, tail_slack=10.0)
    for i in range(30):
        p.add(req(f"r{i}", out=10, arrival=0.0), 0.0)
    gpu = pool("gpu", slots=0, running=4, backlog=0.05)
    cpu = pool("cpu", slots=4, latency=CPU)
    placed = [(d.request_id, d.pool) for d in p.schedule(0.0, [gpu, cpu]).dispatches]
    # The k-th request in line expects the GPU at 0.05 + k * 0.101 s / 4 slots, plus 0.101 s
    # to run; from k = 15 that is later than the CPU's 0.51 s, so r15..r18 fill the CPU.
    assert placed == [(f"r{k}", "cpu") for k in range(15, 19)]
    assert p.num_queued() == 26


def test_non_offloading_policies_still_use_cpu_pools_when_there_is_no_gpu() -> None:
    p = policy("fcfs")
    p.add(req("x"), 0.0)
    assert [d.pool for d in p.schedule(0.0, [pool("cpu", latency=CPU)]).dispatches] == ["cpu"]


def test_static_batching_pool_groups_similar_predicted_lengths() -> None:
    p = policy("rtlm", group_static=True, group_ratio=1.5, tail_slack=1e9, express_share=0.0)
    for rid, out in (("a", 10), ("b", 12), ("c", 100), ("d", 14)):
        p.add(req(rid, out=out), 0.0)
    static = pool(slots=4, static_batching=True)
    assert sorted(d.request_id for d in p.schedule(0.0, [static]).dispatches) == ["a", "b", "d"]


def test_schedule_respects_free_slots_and_kv_per_pool() -> None:
    p = policy("rtlm", express_share=0.0)
    for i in range(10):
        p.add(req(f"r{i}", inp=100, out=10, arrival=i * 0.001), 0.0)
    result = p.schedule(0.0, [pool(slots=3, kv=10_000), pool("gpu2", kind="gpu", slots=5, kv=330)])
    per_pool: dict[str, int] = {}
    for d in result.dispatches:
        per_pool[d.pool] = per_pool.get(d.pool, 0) + 1
    assert per_pool == {"gpu": 3, "gpu2": 3}
    assert p.num_queued() == 4


@pytest.mark.parametrize("name", ["fcfs", "vtc", "rtlm", "fairway"])
def test_background_requests_wait_for_every_other_request(name) -> None:
    """A batch's (background) requests run only from capacity nothing else waits for: a
    tenant's own cheap background request after its costly one, and a tenant with only
    background requests left after any other tenant's requests, however low its counter."""
    p = policy(name)
    p.restore({"a": 0.0, "b": 1000.0}, {}, [], [])
    p.add(req("a-bg-cheap", "a", out=1, arrival=0.0, background=True), 0.0)
    p.add(req("a-bg", "a", out=5, arrival=0.5, background=True), 0.5)
    p.add(req("a-costly", "a", out=50, arrival=1.0), 1.0)
    p.add(req("b-1", "b", out=20, arrival=2.0), 2.0)
    p.add(req("b-2", "b", out=20, arrival=3.0), 3.0)
    got = order(p, now=3.0)
    assert got[-2:] == ["a-bg-cheap", "a-bg"]
    assert set(got[:3]) == {"a-costly", "b-1", "b-2"}
    if name in ("vtc", "fairway"):
        assert got[0] == "a-costly"  # the lower counter goes first among foreground work


def test_background_requests_run_at_once_when_nothing_else_waits_and_are_charged() -> None:
    p = policy("fairway")
    p.add(req("bg", "a", inp=30, background=True), 0.0)
    (dispatch,) = p.schedule(0.0, [pool(slots=2)]).dispatches
    assert dispatch.request_id == "bg" and dispatch.charge == 30.0
    assert p.num_queued() == 0



def test_background_requests_never_take_the_slots_kept_for_waiting_tenants() -> None:
    """A pool keeps a slot for a tenant with nothing in flight; a batch is not waited on,
    so its requests leave that slot for the next interactive request (and a tenant with
    only a batch under way does not make the others keep slots for it)."""
    p = policy("fairway")
    for i in range(5):
        p.add(req(f"chat-{i}", "chat"), 0.0)
    assert len(p.schedule(0.0, [pool(slots=8)]).dispatches) == 5
    for i in range(3):
        p.add(req(f"bg-{i}", "batch", background=True), 0.0)
    started = p.schedule(0.0, [pool(slots=3, running=5)]).dispatches
    assert [d.request_id for d in started] == ["bg-0", "bg-1"]  # one of the three is kept
    p.add(req("chat-5", "chat"), 1.0)
    assert [d.request_id for d in p.schedule(1.0, [pool(slots=1, running=7)]).dispatches] == ["chat-5"]


def test_a_tenants_own_batch_does_not_keep_its_waiting_requests_from_the_kept_slot() -> None:
    """A tenant whose batch holds most slots is still a tenant waiting on one answer: its
    interactive request takes the slot kept for tenants with nothing (interactive) in flight."""
    p = policy("fairway")
    p.add(req("other-0", "other"), 0.0)  # another tenant about, so slots are kept
    for i in range(6):
        p.add(req(f"bg-{i}", "acme", background=True), 0.0)
    started = [d.request_id for d in p.schedule(0.0, [pool(slots=8)]).dispatches]
    assert started[0] == "other-0" and len(started) == 7  # the batch leaves the kept slot
    p.add(req("acme-live", "acme"), 1.0)
    assert [d.request_id for d in p.schedule(1.0, [pool(slots=1, running=7)]).dispatches] == ["acme-live"]


def running_batch(p: SchedulerPolicy, *inputs: int) -> None:
    """Dispatch one background request per input length, in order, onto one pool."""
    for i, inp in enumerate(inputs):
        p.add(req(f"bg-{i}", "batch", inp=inp, background=True), 0.0)
    assert len(p.schedule(0.0, [pool(slots=len(inputs))]).dispatches) == len(inputs)


def test_a_waiting_foreground_request_has_the_cheapest_background_request_handed_back() -> None:
    """The background request with the least context to recompute goes (its output so far
    counts), once: asked again only after ``preempt_retry_s``; handed back, it waits
    while the foreground request takes its slot."""
    p = policy("fairway")
    running_batch(p, 10, 50)
    p.on_progress("batch", 100, 0.5, request_id="bg-0")  # bg-0: 110 tokens of context now
    p.add(req("chat-0", "chat"), 1.0)
    full = [pool(slots=0, running=2, backlog=5.0)]
    result = p.schedule(1.0, full)
    assert result.dispatches == [] and result.preempt == ["bg-1"]
    assert p.schedule(2.0, full).preempt == []  # asked; its slot is on its way
    assert p.schedule(6.0, full).preempt == ["bg-1"]  # not seen for 5 s: ask again
    p.requeue(req("bg-1", "batch", inp=50, background=True, generated=7), 6.5)
    one_free = [pool(slots=1, running=1)]
    assert [d.request_id for d in p.schedule(6.5, one_free).dispatches] == ["chat-0"]
    assert [d.request_id for d in p.schedule(7.0, one_free).dispatches] == ["bg-1"]


def test_one_background_request_handed_back_per_waiting_foreground_request() -> None:
    p = policy("fairway")
    running_batch(p, 10, 20, 30)
    p.add(req("chat-0", "chat"), 1.0)
    p.add(req("chat-1", "chat"), 1.0)
    result = p.schedule(1.0, [pool(slots=0, running=3, backlog=5.0)])
    assert result.preempt == ["bg-0", "bg-1"]
    p.add(req("chat-2", "chat"), 2.0)  # the two asked count for the first two waiting
    assert p.schedule(2.0, [pool(slots=0, running=3, backlog=5.0)]).preempt == ["bg-2"]


def test_no_hand_back_for_a_short_wait_a_background_waiter_or_foreground_work() -> None:
    p = policy("fairway")
    running_batch(p, 10)
    p.add(req("chat-0", "chat"), 1.0)
    # The slot frees in 0.2 s: recomputing the batch request would cost more.
    assert p.schedule(1.0, [pool(slots=0, running=1, backlog=0.2)]).preempt == []
    p.cancel("chat-0")
    p.add(req("bg-late", "batch", background=True), 1.0)  # background waits for background
    assert p.schedule(1.0, [pool(slots=0, running=1, backlog=5.0)]).preempt == []
    off = policy("fairway", preempt_background=False)
    running_batch(off, 10)
    off.add(req("chat-0", "chat"), 1.0)
    assert off.schedule(1.0, [pool(slots=0, running=1, backlog=5.0)]).preempt == []
    foreground = policy("fairway")
    foreground.add(req("chat-0", "chat"), 0.0)
    foreground.schedule(0.0, [pool(slots=1)])
    foreground.add(req("chat-1", "other"), 1.0)
    assert foreground.schedule(1.0, [pool(slots=0, running=1, backlog=5.0)]).preempt == []


def test_hand_back_is_asked_on_the_pool_the_waiting_request_would_use() -> None:
    """A background request on another pool stays: freeing it would not start the waiting one."""
    p = policy("fairway", offload=False)
    p.add(req("bg-0", "batch", background=True), 0.0)
    assert p.schedule(0.0, [pool("gpu", slots=1)]).dispatches[0].pool == "gpu"
    p.add(req("chat-0", "chat"), 1.0)
    cpu = pool("cpu", slots=0, running=1, backlog=5.0)
    assert p.schedule(1.0, [pool("gpu", slots=0, running=1, backlog=5.0), cpu]).preempt == ["bg-0"]
    q = policy("fairway", offload=False)
    q.restore({}, {}, [], [req("bg-0", "batch", background=True, pool="cpu")])
    q.add(req("chat-0", "chat"), 1.0)
    assert q.schedule(1.0, [pool("gpu", slots=0, running=1, backlog=5.0), cpu]).preempt == []


def test_a_foreground_request_short_of_kv_has_background_handed_back_too() -> None:
    """On a pool with free slots whose KV the batch holds, the wait is until a running
    request ends (its ``backlog_s``): long enough, a background request goes."""
    p = policy("fairway")
    running_batch(p, 10, 10)
    p.add(req("chat-0", "chat", inp=500, out=100), 1.0)
    short = [pool(slots=2, kv=100, running=2, backlog=3.0)]
    result = p.schedule(1.0, short)
    assert result.dispatches == [] and len(result.preempt) == 1
    q = policy("fairway")
    running_batch(q, 10, 10)
    q.add(req("chat-0", "chat", inp=500, out=100), 1.0)
    assert q.schedule(1.0, [pool(slots=2, kv=100, running=2, backlog=0.2)]).preempt == []
