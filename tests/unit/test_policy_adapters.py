"""Adapter affinity: placement prefers pools whose workers hold a request's LoRA adapter."""

from __future__ import annotations

from services import messages as m
from services.latency_model import LatencyModel
from services.scheduler.policy import (
    UNLIMITED_KV,
    PolicyConfig,
    PoolView,
    QueuedRequest,
    SchedulerPolicy,
)
from services.scheduler.service import adapter_shares, pool_views, queued_view

GPU = LatencyModel(prefill_ms_per_token=0.1, decode_base_ms=10.0, decode_per_seq_ms=0.0, max_batch=4)
SLOW_GPU = LatencyModel(prefill_ms_per_token=0.1, decode_base_ms=20.0, decode_per_seq_ms=0.0, max_batch=4)


def pool(name: str, adapters: dict[str, float], latency: LatencyModel = GPU) -> PoolView:
    return PoolView(name, 4, UNLIMITED_KV, 0, latency, kind="gpu", adapters=adapters)


def placed(adapter: str | None, pools: list[PoolView]) -> str:
    policy = SchedulerPolicy(PolicyConfig(name="fairway", latency=GPU))
    policy.add(QueuedRequest("r", "acme", 10, 10, 10.0, 10.0, 0.0, adapter=adapter), now=0.0)
    (dispatch,) = policy.schedule(0.0, pools).dispatches
    return dispatch.pool


def test_placement_prefers_the_pool_holding_the_adapter() -> None:
    pools = [pool("gpu-a", {}), pool("gpu-b", {"sql": 1.0})]
    assert placed("sql", pools) == "gpu-b"
    assert placed(None, pools) == "gpu-a"  # no adapter: the tie goes to the first pool
    assert placed("other", pools) == "gpu-a"  # nobody holds it: no preference
    # More of the pool's workers holding it is better.
    assert placed("sql", [pool("gpu-a", {"sql": 0.5}), pool("gpu-b", {"sql": 1.0})]) == "gpu-b"


def test_affinity_does_not_beat_a_much_faster_pool() -> None:
    # 10 decode steps at 20 ms vs 10 ms: 0.1 s more than paging the adapter in (0.05 s).
    pools = [pool("gpu-a", {}), pool("gpu-b", {"sql": 1.0}, SLOW_GPU)]
    assert placed("sql", pools) == "gpu-a"


def test_heartbeats_and_scored_requests_feed_the_policy() -> None:
    def beat(worker: str, adapters: list[str]) -> m.WorkerHeartbeat:
        return m.WorkerHeartbeat(worker_id=worker, pool="gpu", model="base", max_running=4,
                                 running=0, waiting=0, free_kv_tokens=1000, total_kv_tokens=1000,
                                 adapters=adapters)  # fmt: skip

    workers = [beat("w1", ["sql", "chat"]), beat("w2", ["sql"])]
    assert adapter_shares(workers) == {"sql": 1.0, "chat": 0.5}
    (view,) = pool_views(workers, {})
    assert view.adapters == {"sql": 1.0, "chat": 0.5}
    # A heartbeat survives the wire with its adapters.
    assert m.decode(m.encode(workers[0])).adapters == ["sql", "chat"]

    request = m.CompletionRequest(request_id="r", tenant="acme", model="base:sql", prompt="x")
    scored = m.ScoredRequest(request_id="r", request=request, prompt_token_ids=[1, 2],
                             score=m.LengthScore(0.1, 1, 2, 3), adapter="sql")  # fmt: skip
    assert queued_view(m.decode(m.encode(scored)), 0.0).adapter == "sql"
