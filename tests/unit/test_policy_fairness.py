"""VTC's fairness bound as a property: two or three tenants that stay backlogged never see
their weighted service drift apart by more than 2*U (Sheng et al., OSDI 2024, Thm. 4.4),
U = max(w_in * longest input, w_out * M), M the tokens (input and output) a running batch
can hold."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from services.latency_model import LatencyModel
from services.scheduler.policy import (
    UNLIMITED_KV,
    PolicyConfig,
    PoolView,
    QueuedRequest,
    SchedulerPolicy,
)

MAX_INPUT = 40
MAX_OUTPUT = 30


@dataclass
class Running:
    request: QueuedRequest
    output: int
    done: int = 0


def max_service_drift(
    policy_name: str,
    tenants: list[str],
    weights: dict[str, float],
    sizes: list[tuple[int, int]],
    slots: int,
    steps: int,
    arrivals_per_step: dict[str, int] | None = None,
) -> tuple[float, float]:
    """Run a toy engine (``slots`` sequences, one token each per step) with every tenant
    kept backlogged; return the largest spread of the pairwise weighted-service
    difference over the run and the VTC bound 2*U."""
    policy = SchedulerPolicy(
        PolicyConfig(name=policy_name, tenant_weights=weights, latency=LatencyModel())
    )
    service = dict.fromkeys(tenants, 0.0)
    outputs: dict[str, int] = {}
    running: list[Running] = []
    next_size = itertools.cycle(sizes)
    counter = 0

    def submit(tenant: str, now: float) -> None:
        nonlocal counter
        inp, out = next(next_size)
        counter += 1
        rid = f"{tenant}-{counter}"
        outputs[rid] = out
        policy.add(QueuedRequest(rid, tenant, inp, MAX_OUTPUT, out, out, now), now)

    for tenant in tenants:
        for _ in range(slots + 1):
            submit(tenant, 0.0)
    lo = {pair: 0.0 for pair in itertools.combinations(tenants, 2)}
    hi = dict(lo)
    for step in range(steps):
        now = float(step)
        for tenant in tenants:
            extra = (arrivals_per_step or {}).get(tenant, 0)
            for _ in range(extra):
                submit(tenant, now)
            while policy.num_queued(tenant) <= slots:  # stays backlogged through dispatch
                submit(tenant, now)
        view = PoolView(
            "gpu", slots - len(running), UNLIMITED_KV, len(running), LatencyModel(max_batch=slots)
        )
        for d in policy.schedule(now, [view]).dispatches:
            assert d.request is not None
            service[d.request.tenant] += policy.config.w_in * d.request.input_tokens
            running.append(Running(d.request, outputs[d.request_id]))
        for run in running:
            run.done += 1
            service[run.request.tenant] += policy.config.w_out
            policy.on_progress(run.request.tenant, 1, now)
        for run in [r for r in running if r.done >= r.output]:
            policy.on_finished(run.request.request_id, run.request.tenant, run.output, now)
        running = [r for r in running if r.done < r.output]
        for a, b in list(lo):
            diff = service[a] / weights.get(a, 1.0) - service[b] / weights.get(b, 1.0)
            lo[(a, b)] = min(lo[(a, b)], diff)
            hi[(a, b)] = max(hi[(a, b)], diff)
    spread = max(hi[p] - lo[p] for p in lo)
    config = policy.config
    u = max(config.w_in * MAX_INPUT, config.w_out * slots * (MAX_INPUT + MAX_OUTPUT))
    return spread, 2 * u


sizes = st.lists(
    st.tuples(st.integers(1, MAX_INPUT), st.integers(1, MAX_OUTPUT)), min_size=1, max_size=20
)


@settings(max_examples=25, deadline=None)
@given(
    sizes=sizes,
    slots=st.integers(1, 6),
    n_tenants=st.integers(2, 3),
    policy_name=st.sampled_from(["vtc", "fairway"]),
)
def test_backlogged_tenants_stay_within_the_vtc_bound(
    sizes: list[tuple[int, int]], slots: int, n_tenants: int, policy_name: str
) -> None:
    tenants = ["a", "b", "c"][:n_tenants]
    spread, bound = max_service_drift(policy_name, tenants, {}, sizes, slots, steps=150)
    assert spread <= bound


@settings(max_examples=15, deadline=None)
@given(sizes=sizes, slots=st.integers(1, 6), weight=st.sampled_from([0.5, 2.0, 3.0]))
def test_weighted_tenants_stay_within_the_bound_in_weighted_service(
    sizes: list[tuple[int, int]], slots: int, weight: float
) -> None:
    spread, bound = max_service_drift("vtc", ["a", "b"], {"b": weight}, sizes, slots, steps=150)
    assert spread <= bound / min(weight, 1.0)


def test_fcfs_breaks_the_bound_when_one_tenant_sends_four_times_more() -> None:
    """The property has teeth: without VTC the heavy tenant's service runs away."""
    sizes = [(20, 10)]
    args = (["heavy", "light"], {}, sizes, 4)
    fcfs, bound = max_service_drift("fcfs", *args, steps=600, arrivals_per_step={"heavy": 4})
    vtc, _ = max_service_drift("vtc", *args, steps=600, arrivals_per_step={"heavy": 4})
    assert fcfs > bound
    assert vtc <= bound
