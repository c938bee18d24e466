"""Discrete-event simulator: the production :class:`SchedulerPolicy` on a virtual clock.

Virtual workers batch continuously (one token per running sequence per engine step),
priced by :class:`LatencyModel`: a step that admits new sequences pays their prefill
(prompt plus any output being recomputed) on top of the decode step of those already
running; a decode step costs ``decode_step_s(batch, context)``. With a KV limit, a step
that would overflow preempts the most recently admitted sequence, which goes back to
the scheduler (recompute, no output lost or repeated) - what a too-short length
prediction costs.

Runs of identical decode steps are simulated in one jump (a "segment") that ends at the
first completion, at a KV overflow, or at the step boundary after a new dispatch. At
every event the workers' progress is reported to the policy before it decides, just as
the real workers report progress, so VTC sees the same counters it would live.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np

from services.latency_model import LatencyModel
from services.scheduler.policy import (
    UNLIMITED_KV,
    PolicyConfig,
    PoolView,
    QueuedRequest,
    SchedulerPolicy,
)
from services.scheduler.traces import TraceRecord

DEFAULT_CPU_LATENCY = LatencyModel(
    prefill_ms_per_token=0.5,
    decode_base_ms=40.0,
    decode_per_seq_ms=4.0,
    max_batch=4,
    name="cpu-default",
)
"""Placeholder CPU worker model until a profiled one is supplied with ``--latency-model``:
a sequence decodes about 6x slower than on the default GPU model at full batch, and the
worker's throughput is about 1/20 of it."""

_MAX_RESCHEDULES = 1000


@dataclass(slots=True)
class SimRequest:
    """One simulated request: what the trace says, what the predictor said, what happened."""

    request_id: str
    tenant: str
    arrival: float
    input_tokens: int
    output_tokens: int
    max_tokens: int
    predicted_p50: float
    predicted_p90: float
    uncertainty: float = 0.0
    deadline: float | None = None
    fail_if_late: bool = False
    background: bool = False
    """Served from spare capacity only (a batch's request)."""
    priority: int = 0
    """Lower first, inside its tenant (the API's ``priority``)."""
    # Outcome.
    generated: int = 0
    first_dispatch: float | None = None
    first_token: float | None = None
    finish: float | None = None
    preemptions: int = 0
    pool: str = ""
    expired: str | None = None
    input_served: bool = False

    def queued(self) -> QueuedRequest:
        return QueuedRequest(
            request_id=self.request_id,
            tenant=self.tenant,
            input_tokens=self.input_tokens,
            max_tokens=self.max_tokens,
            predicted_p50=self.predicted_p50,
            predicted_p90=self.predicted_p90,
            arrival=self.arrival,
            deadline=self.deadline,
            fail_if_late=self.fail_if_late,
            uncertainty=self.uncertainty,
            generated=self.generated,
            background=self.background,
            priority=self.priority,
        )


@dataclass(slots=True)
class WorkerSpec:
    name: str
    kind: str
    latency: LatencyModel
    kv_limit: int | None = None


@dataclass
class ClusterConfig:
    gpu_workers: int = 1
    cpu_workers: int = 0
    gpu_latency: LatencyModel = field(default_factory=LatencyModel)
    cpu_latency: LatencyModel = DEFAULT_CPU_LATENCY
    kv_tokens: int | None = None
    """KV limit per GPU worker in tokens; ``None``: only the batch-slot limit binds. CPU
    workers (host memory) have no KV limit."""

    def workers(self) -> list[WorkerSpec]:
        gpus = [
            WorkerSpec(f"gpu-{i}", "gpu", self.gpu_latency, self.kv_tokens)
            for i in range(self.gpu_workers)
        ]
        cpus = [WorkerSpec(f"cpu-{i}", "cpu", self.cpu_latency) for i in range(self.cpu_workers)]
        if not gpus and not cpus:
            raise ValueError("the cluster needs at least one worker")
        return gpus + cpus


@dataclass(slots=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, req: SimRequest) -> bool:
        if req.finish is None or req.first_token is None:
            return False
        if self.ttft_s is not None and req.first_token - req.arrival > self.ttft_s:
            return False
        return self.tpot_s is None or tpot(req) <= self.tpot_s


def tpot(req: SimRequest) -> float:
    """Time per output token after the first."""
    assert req.finish is not None and req.first_token is not None
    return (
        (req.finish - req.first_token) / (req.output_tokens - 1) if req.output_tokens > 1 else 0.0
    )


# --- virtual workers ----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Seq:
    req: SimRequest
    view: QueuedRequest
    """The scheduler's view, for predicted remaining time."""
    reserved: int
    kv: int = 0
    """Tokens in this sequence's KV cache."""
    reported: int = 0
    """Generated tokens already reported to the policy."""
    leaving: bool = False
    """Its hand-back was asked: it leaves at the end of the running segment."""


@dataclass(slots=True)
class _Segment:
    start: float
    steps: int
    first_s: float
    """Duration of the first step."""
    growth_s: float
    """Each further step takes this much longer (the context grows by one token per sequence)."""
    members: list[_Seq]
    prefill: bool

    def end_of(self, n: int) -> float:
        return self.start + n * self.first_s + self.growth_s * n * (n - 1) / 2

    def steps_done_by(self, t: float) -> int:
        lo, hi = 0, self.steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.end_of(mid) <= t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def first_boundary_at_or_after(self, t: float) -> int:
        done = self.steps_done_by(t)
        return min(done if self.end_of(done) >= t else done + 1, self.steps)


class VirtualWorker:
    def __init__(self, spec: WorkerSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.running: list[_Seq] = []
        self.pending: list[_Seq] = []
        self.segment: _Segment | None = None
        self.epoch = 0

    @property
    def latency(self) -> LatencyModel:
        return self.spec.latency

    def view(self, policy: SchedulerPolicy) -> PoolView:
        lat = self.latency
        seqs = self.running + self.pending
        free_slots = max(lat.max_batch - len(seqs), 0)
        if self.spec.kv_limit is None:
            free_kv = UNLIMITED_KV
        else:
            # A running sequence needs its next token's slot too.
            held = sum(max(s.reserved, s.kv + 1) for s in self.running) + sum(
                s.reserved for s in self.pending
            )
            free_kv = max(self.spec.kv_limit - held, 0)
        backlog = 0.0
        if self.running and (free_slots == 0 or self.spec.kv_limit is not None):
            step = lat.decode_step_s(len(self.running), sum(s.kv for s in self.running))
            left = []
            for s in self.running:
                s.view.generated = s.req.generated
                left.append(policy.remaining_tokens(s.view))
            backlog = min(left) * step
        return PoolView(
            name=self.spec.name,
            free_slots=free_slots,
            free_kv_tokens=free_kv,
            running=len(seqs),
            latency=lat,
            backlog_s=backlog,
            kind=self.spec.kind,
            kv_capacity=self.spec.kv_limit,
        )


# --- metrics -------------------------------------------------------------------------


class ServiceTracker:
    """Service per tenant over time and VTC's fairness measure: the largest difference in
    weighted service two tenants received over any interval in which both were backlogged."""

    def __init__(
        self, tenants: list[str], weights: dict[str, float], sample_every_s: float
    ) -> None:
        self.tenants = tenants
        self.weights = {t: weights.get(t, 1.0) for t in tenants}
        self.service = {t: 0.0 for t in tenants}
        self.waiting = {t: 0 for t in tenants}
        self.pairs = [(a, b) for i, a in enumerate(tenants) for b in tenants[i + 1 :]]
        self._window: dict[tuple[str, str], tuple[float, float] | None] = {
            p: None for p in self.pairs
        }
        self.max_difference = 0.0
        self.all_backlogged_service = {t: 0.0 for t in tenants}
        self._last_all: dict[str, float] | None = None
        self.sample_every_s = sample_every_s
        self._next_sample = 0.0
        self.samples: list[tuple[float, dict[str, float]]] = []

    def weighted(self, tenant: str) -> float:
        return self.service[tenant] / self.weights[tenant]

    def update(self, now: float) -> None:
        for pair in self.pairs:
            a, b = pair
            if self.waiting[a] > 0 and self.waiting[b] > 0:
                diff = self.weighted(a) - self.weighted(b)
                window = self._window[pair]
                lo, hi = (
                    (diff, diff) if window is None else (min(window[0], diff), max(window[1], diff))
                )
                self._window[pair] = (lo, hi)
                self.max_difference = max(self.max_difference, hi - lo)
            else:
                self._window[pair] = None
        if len(self.tenants) > 1 and all(self.waiting[t] > 0 for t in self.tenants):
            current = {t: self.weighted(t) for t in self.tenants}
            if self._last_all is not None:
                for t in self.tenants:
                    self.all_backlogged_service[t] += current[t] - self._last_all[t]
            self._last_all = current
        else:
            self._last_all = None
        if now >= self._next_sample:
            self.samples.append((now, dict(self.service)))
            self._next_sample = now + self.sample_every_s

    def jain_index(self) -> float | None:
        """Jain's index of weighted service received while every tenant was backlogged."""
        values = np.array(list(self.all_backlogged_service.values()))
        if len(values) < 2 or values.sum() <= 0:
            return None
        return float(values.sum() ** 2 / (len(values) * (values**2).sum()))


@dataclass
class SimResult:
    requests: list[SimRequest]
    policy: str
    tracker: ServiceTracker
    preemptions: int
    pool_kinds: dict[str, str]
    vtc_bound: float
    served: dict[str, float]
    counters: dict[str, float]
    events: int

    def summary(self, slo: Slo | None = None) -> dict:
        reqs = self.requests
        done = [r for r in reqs if r.finish is not None]
        start = min((r.arrival for r in reqs), default=0.0)
        end = max((r.finish for r in done), default=start)
        makespan = max(end - start, 1e-9)

        def stats(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
            arr = np.asarray(values)
            return {
                "mean": float(arr.mean()),
                "p50": float(np.percentile(arr, 50)),
                "p90": float(np.percentile(arr, 90)),
                "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max()),
            }

        e2e = [r.finish - r.arrival for r in done]
        ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
        tpots = [tpot(r) for r in done if r.output_tokens > 1]
        out_tokens = sum(r.output_tokens for r in done)
        tenants = {}
        for tenant in self.tracker.tenants:
            mine = [r for r in done if r.tenant == tenant]
            lat = stats([r.finish - r.arrival for r in mine])
            tenants[tenant] = {
                "requests": sum(1 for r in reqs if r.tenant == tenant),
                "completed": len(mine),
                "weight": self.tracker.weights[tenant],
                "service": self.tracker.service[tenant],
                "weighted_service": self.tracker.weighted(tenant),
                "mean_e2e_s": lat["mean"],
                "p99_e2e_s": lat["p99"],
                "mean_ttft_s": stats([r.first_token - r.arrival for r in mine])["mean"],
                "mean_tpot_s": stats([tpot(r) for r in mine if r.output_tokens > 1])["mean"],
            }
        with_deadline = [r for r in reqs if r.deadline is not None]
        met = [r for r in with_deadline if r.finish is not None and r.finish <= r.deadline]
        summary: dict = {
            "policy": self.policy,
            "requests": len(reqs),
            "completed": len(done),
            "expired": sum(1 for r in reqs if r.expired),
            "unfinished": sum(1 for r in reqs if r.finish is None and not r.expired),
            "makespan_s": makespan,
            "latency_s": {"e2e": stats(e2e), "ttft": stats(ttft), "tpot": stats(tpots)},
            "throughput": {
                "requests_per_s": len(done) / makespan,
                "output_tokens_per_s": out_tokens / makespan,
            },
            "tenants": tenants,
            "fairness": {
                "max_service_difference": self.tracker.max_difference,
                "vtc_bound": self.vtc_bound,
                "jain_index": self.tracker.jain_index(),
            },
            "deadlines": {
                "with_deadline": len(with_deadline),
                "met": len(met),
                "attainment": len(met) / len(with_deadline) if with_deadline else None,
            },
            "preemptions": self.preemptions,
            "pools": {
                kind: sum(1 for r in done if self.pool_kinds.get(r.pool) == kind)
                for kind in sorted(set(self.pool_kinds.values()))
            },
            "sim_events": self.events,
        }
        if slo is not None and (slo.ttft_s is not None or slo.tpot_s is not None):
            good = sum(1 for r in reqs if slo.met(r))
            summary["goodput"] = {
                "requests_per_s": good / makespan,
                "fraction": good / len(reqs) if reqs else 0.0,
                "slo_ttft_ms": None if slo.ttft_s is None else slo.ttft_s * 1000,
                "slo_tpot_ms": None if slo.tpot_s is None else slo.tpot_s * 1000,
            }
        return summary


# --- the simulation -------------------------------------------------------------------


class Simulation:
    """One run: requests arrive, the policy decides, virtual workers execute."""

    def __init__(
        self, requests: list[SimRequest], config: PolicyConfig, cluster: ClusterConfig
    ) -> None:
        self.requests = sorted(requests, key=lambda r: r.arrival)
        self.config = config
        self.policy = SchedulerPolicy(config)
        self.workers = [VirtualWorker(spec, i) for i, spec in enumerate(cluster.workers())]
        self.by_name = {w.spec.name: w for w in self.workers}
        self.by_id = {r.request_id: r for r in self.requests}
        if len(self.by_id) != len(self.requests):
            raise ValueError("request ids must be unique")
        tenants = sorted({r.tenant for r in self.requests})
        span = (self.requests[-1].arrival - self.requests[0].arrival) if self.requests else 0.0
        self.tracker = ServiceTracker(tenants, config.tenant_weights, max(span, 1.0) / 400)
        self.preemptions = 0
        self.events = 0
        self._heap: list[tuple[float, int, int, int]] = []
        self._order = 0

    def run(self) -> SimResult:
        next_arrival = 0
        arrivals = self.requests
        now = 0.0
        while True:
            t_arrival = arrivals[next_arrival].arrival if next_arrival < len(arrivals) else math.inf
            t_event = self._heap[0][0] if self._heap else math.inf
            if min(t_arrival, t_event) == math.inf:
                break
            now = min(t_arrival, t_event)
            self.events += 1
            while self._heap and self._heap[0][0] <= now:
                _, _, index, epoch = heapq.heappop(self._heap)
                worker = self.workers[index]
                if epoch == worker.epoch and worker.segment is not None:
                    self._complete_segment(worker, now)
            while next_arrival < len(arrivals) and arrivals[next_arrival].arrival <= now:
                req = arrivals[next_arrival]
                next_arrival += 1
                self.tracker.waiting[req.tenant] += 1
                self.policy.add(req.queued(), now)
            self._report_progress(now)
            self.tracker.update(now)
            for _ in range(_MAX_RESCHEDULES):  # a preemption hands work back: decide again at once
                preempted = self.preemptions
                self._schedule(now)
                self.tracker.update(now)
                for worker in self.workers:
                    if worker.segment is None and (worker.running or worker.pending):
                        self._start_segment(worker, now)
                    elif (
                        worker.pending and worker.segment is not None and not worker.segment.prefill
                    ):
                        self._cut_segment(worker, now)
                if self.preemptions == preempted:
                    break
            else:
                raise RuntimeError(
                    f"preemption loop at t={now}: admission and KV accounting disagree"
                )
        self.tracker.samples.append((now, dict(self.tracker.service)))
        return SimResult(
            requests=self.requests,
            policy=self.config.name,
            tracker=self.tracker,
            preemptions=self.preemptions,
            pool_kinds={w.spec.name: w.spec.kind for w in self.workers},
            vtc_bound=self._vtc_bound(),
            served=dict(self.policy.served),
            counters=dict(self.policy.counters),
            events=self.events,
        )

    def _vtc_bound(self) -> float:
        """VTC's Theorem: 2 * max(w_in * L_input, w_out * M), M the tokens a batch can hold."""
        if not self.requests:
            return 0.0
        max_input = max(r.input_tokens for r in self.requests)
        max_seq = max(r.input_tokens + r.max_tokens for r in self.requests)
        batch_tokens = 0
        for w in self.workers:
            cap = w.latency.max_batch * max_seq
            batch_tokens += min(cap, w.spec.kv_limit) if w.spec.kv_limit is not None else cap
        return 2 * max(self.config.w_in * max_input, self.config.w_out * batch_tokens)

    # --- scheduling -----------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        result = self.policy.schedule(now, [w.view(self.policy) for w in self.workers])
        for expired in result.expired:
            req = self.by_id[expired.request_id]
            req.expired = expired.reason
            self.tracker.waiting[req.tenant] -= 1
        for dispatch in result.dispatches:
            req = self.by_id[dispatch.request_id]
            worker = self.by_name[dispatch.pool]
            # Tokens produced before a preemption were reported already.
            worker.pending.append(
                _Seq(req, req.queued(), dispatch.kv_tokens, reported=req.generated)
            )
            if req.first_dispatch is None:
                req.first_dispatch = now
            req.pool = worker.spec.name
            self.tracker.waiting[req.tenant] -= 1
        for request_id in result.preempt:
            self._ask_hand_back(self.by_id[request_id], now)

    def _ask_hand_back(self, req: SimRequest, now: float) -> None:
        """A running request leaves at the next step boundary (as a worker aborts it between
        steps); one not started yet leaves at once."""
        worker = self.by_name[req.pool]
        for seq in worker.pending:
            if seq.req is req:
                worker.pending.remove(seq)
                self._hand_back(seq, now)
                return
        for seq in worker.running:
            if seq.req is req:
                if worker.segment is None:  # between two segments: a step boundary
                    worker.running.remove(seq)
                    self._hand_back(seq, now)
                else:
                    seq.leaving = True
                    self._cut_segment(worker, now)
                return

    def _report_progress(self, now: float) -> None:
        """Report tokens generated so far in running segments (workers report progress)."""
        for worker in self.workers:
            seg = worker.segment
            if seg is None:
                continue
            done = seg.steps_done_by(now)
            if done == 0:
                continue
            for seq in seg.members:
                self._credit_output(seq, seq.req.generated + done, now)

    def _credit_output(self, seq: _Seq, generated: int, now: float) -> None:
        new = generated - seq.reported
        if new > 0:
            seq.reported = generated
            self.tracker.service[seq.req.tenant] += self.config.w_out * new
            self.policy.on_progress(seq.req.tenant, new, now, request_id=seq.req.request_id)

    def _preempt(self, worker: VirtualWorker, now: float) -> None:
        """Evict the most recently admitted sequence and hand it back to the scheduler."""
        self._hand_back(worker.pending.pop() if worker.pending else worker.running.pop(), now)

    def _hand_back(self, seq: _Seq, now: float) -> None:
        seq.req.preemptions += 1
        self.preemptions += 1
        self.tracker.waiting[seq.req.tenant] += 1
        self.policy.requeue(seq.req.queued(), now)

    # --- workers ----------------------------------------------------------------------

    def _push_end(self, worker: VirtualWorker) -> None:
        assert worker.segment is not None
        self._order += 1
        end = worker.segment.end_of(worker.segment.steps)
        heapq.heappush(self._heap, (end, self._order, worker.index, worker.epoch))

    def _start_segment(self, worker: VirtualWorker, now: float) -> None:
        lat = worker.latency
        limit = worker.spec.kv_limit
        if worker.pending:
            if limit is not None:
                while worker.running or worker.pending:
                    need = sum(s.kv + 1 for s in worker.running)
                    need += sum(s.req.input_tokens + s.req.generated + 1 for s in worker.pending)
                    if need <= limit:
                        break
                    self._preempt(worker, now)
            if worker.pending:
                prefill_tokens = sum(s.req.input_tokens + s.req.generated for s in worker.pending)
                old = worker.running
                duration = lat.prefill_s(prefill_tokens)
                if old:
                    duration += lat.decode_step_s(len(old), sum(s.kv for s in old))
                for seq in worker.pending:
                    seq.kv = seq.req.input_tokens + seq.req.generated
                members = old + worker.pending
                worker.running = members
                worker.pending = []
                worker.segment = _Segment(now, 1, duration, 0.0, list(members), prefill=True)
                self._push_end(worker)
                return
        if not worker.running:
            return
        if limit is not None:
            while (
                worker.running and sum(s.kv for s in worker.running) + len(worker.running) > limit
            ):
                self._preempt(worker, now)
            if not worker.running:
                return
        batch = len(worker.running)
        context = sum(s.kv for s in worker.running)
        steps = min(s.req.output_tokens - s.req.generated for s in worker.running)
        if limit is not None:
            steps = min(steps, (limit - context) // batch)
        steps = max(steps, 1)
        first = lat.decode_step_s(batch, context)
        growth = lat.decode_per_ctx_token_ms * batch / 1000.0
        worker.segment = _Segment(now, steps, first, growth, list(worker.running), prefill=False)
        self._push_end(worker)

    def _cut_segment(self, worker: VirtualWorker, now: float) -> None:
        """End the running segment at the next step boundary so pending work can join."""
        seg = worker.segment
        assert seg is not None
        cut = max(seg.first_boundary_at_or_after(now), 1)
        if cut < seg.steps:
            seg.steps = cut
            worker.epoch += 1
            self._push_end(worker)

    def _complete_segment(self, worker: VirtualWorker, now: float) -> None:
        seg = worker.segment
        assert seg is not None
        worker.segment = None
        for seq in seg.members:
            req = seq.req
            req.generated += seg.steps
            seq.kv += seg.steps
            if req.first_token is None:
                req.first_token = seg.end_of(1)
            if not req.input_served:
                req.input_served = True
                self.tracker.service[req.tenant] += self.config.w_in * req.input_tokens
            self._credit_output(seq, req.generated, now)
        finished = [s for s in worker.running if s.req.generated >= s.req.output_tokens]
        if finished:
            worker.running = [s for s in worker.running if s.req.generated < s.req.output_tokens]
            for seq in finished:
                seq.req.finish = now
                self.policy.on_finished(
                    seq.req.request_id, seq.req.tenant, seq.req.output_tokens, now
                )
        leaving = [s for s in worker.running if s.leaving]
        if leaving:
            worker.running = [s for s in worker.running if not s.leaving]
            for seq in leaving:
                self._hand_back(seq, now)


def simulate(requests: list[SimRequest], config: PolicyConfig, cluster: ClusterConfig) -> SimResult:
    """Run ``requests`` (not mutated: outcomes land on copies) through ``config``'s policy."""
    return Simulation([replace(r) for r in requests], config, cluster).run()


def fcfs_saturation_rps(
    requests: list[SimRequest], cluster: ClusterConfig, config: PolicyConfig | None = None
) -> float:
    """Throughput of FCFS when every request is waiting at t=0: the load-1.0 rate."""
    base = config or PolicyConfig(name="fcfs")
    fcfs = replace(base, name="fcfs", fair=None, cost_order=None, consolidate=None, offload=None)
    burst = [replace(r, arrival=0.0, deadline=None, fail_if_late=False) for r in requests]
    result = Simulation(burst, fcfs, cluster).run()
    done = [r for r in result.requests if r.finish is not None]
    makespan = max((r.finish for r in done), default=0.0)
    if not done or makespan <= 0:
        raise ValueError("FCFS completed nothing: no worker can hold these requests")
    return len(done) / makespan


def rescale_arrivals(requests: list[SimRequest], rate_rps: float) -> tuple[list[SimRequest], float]:
    """Stretch arrival times (and relative deadlines) so the mean rate is ``rate_rps``;
    returns the new requests and the factor applied to time."""
    if len(requests) < 2:
        return [replace(r) for r in requests], 1.0
    start = min(r.arrival for r in requests)
    span = max(r.arrival for r in requests) - start
    if span <= 0:
        raise ValueError("all arrivals at one instant: cannot rescale to a rate")
    factor = (len(requests) - 1) / rate_rps / span
    out = []
    for r in requests:
        arrival = (r.arrival - start) * factor
        deadline = None if r.deadline is None else arrival + (r.deadline - r.arrival)
        out.append(replace(r, arrival=arrival, deadline=deadline))
    return out, factor


# --- workloads ------------------------------------------------------------------------


@dataclass(slots=True)
class TenantSpec:
    name: str
    share: float
    weight: float = 1.0


def parse_tenants(spec: str) -> list[TenantSpec]:
    """``"a:0.8,b:0.2:2"`` -> tenants with request shares (normalized) and VTC weights."""
    tenants = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"bad tenant {item!r}: expected NAME:SHARE[:WEIGHT]")
        try:
            share = float(parts[1])
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError as exc:
            raise ValueError(f"bad tenant {item!r}: SHARE and WEIGHT must be numbers") from exc
        if share < 0 or weight <= 0 or not math.isfinite(share + weight):
            raise ValueError(f"bad tenant {item!r}: SHARE must be >= 0 and WEIGHT > 0")
        tenants.append(TenantSpec(parts[0], share, weight))
    if not tenants:
        raise ValueError("no tenants given")
    if len({t.name for t in tenants}) != len(tenants):
        raise ValueError("tenant names must be unique")
    total = sum(t.share for t in tenants)
    if total <= 0:
        raise ValueError("tenant shares must not all be zero")
    return [TenantSpec(t.name, t.share / total, t.weight) for t in tenants]


PREDICTORS = ("oracle", "none", "fairway")
_Z90 = 1.2815515655446004


def predict_lengths(
    records: list[TraceRecord],
    max_tokens: list[int],
    predictor: str,
    *,
    oracle_noise: float = 0.0,
    seed: int = 0,
    train_file: str | None = None,
    model: str = "",
) -> list[tuple[float, float, float]]:
    """(p50, p90, uncertainty) of output tokens per record.

    ``oracle``: the true length, times lognormal noise of sigma ``oracle_noise`` (p90 is
    the matching quantile, so the spread is honest about the noise). ``none``: nothing
    known, predict ``max_tokens``. ``fairway``: the scorer's predictor on each prompt,
    trained from ``train_file`` (scorer JSONL) or its shipped artifact.
    """
    if predictor == "oracle":
        rng = np.random.default_rng(seed)
        noise = np.exp(oracle_noise * rng.standard_normal(len(records)))
        out = []
        for r, cap, factor in zip(records, max_tokens, noise, strict=True):
            p50 = min(max(r.output_tokens * float(factor), 1.0), cap)
            p90 = min(max(p50 * math.exp(_Z90 * oracle_noise), p50), cap)
            out.append((p50, p90, oracle_noise))
        return out
    if predictor == "none":
        return [(float(cap), float(cap), 0.0) for cap in max_tokens]
    if predictor == "fairway":
        missing = sum(1 for r in records if not r.prompt)
        if missing:
            raise ValueError(
                f"--predictor fairway needs prompts, but {missing} of {len(records)} trace "
                "records have none (use a JSONL trace with a 'prompt' field, or --predictor "
                "oracle|none)"
            )
        from services.scorer.predictor import LengthPredictor

        if train_file:
            from services.scorer.evaluate import load_records

            length_predictor = LengthPredictor.train(load_records(train_file))
        else:
            length_predictor = LengthPredictor.default()
        out = []
        for r, cap in zip(records, max_tokens, strict=True):
            pred = length_predictor.predict(r.prompt or "", r.model or model, r.input_tokens)
            p50 = min(max(pred.p50, 1.0), cap)
            out.append((p50, min(max(pred.p90, p50), cap), pred.uncertainty))
        return out
    raise ValueError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")


def make_requests(
    records: list[TraceRecord],
    *,
    predictor: str = "oracle",
    tenants: list[TenantSpec] | None = None,
    max_tokens: int = 1024,
    oracle_noise: float = 0.0,
    seed: int = 0,
    train_file: str | None = None,
    model: str = "",
    deadline_s: float | None = None,
    fail_if_late: bool = False,
    background_tenants: frozenset[str] = frozenset(),
) -> list[SimRequest]:
    """Turn trace records into simulated requests.

    Records without a tenant are assigned one at random by ``tenants`` shares (seeded);
    ``max_tokens`` applies where the record has none and never undercuts the true
    length; ``deadline_s`` applies where the record has no ``deadline_s``; the requests
    of ``background_tenants`` are background (as a batch's).
    """
    rng = np.random.default_rng(seed + 1)
    names = [t.name for t in tenants] if tenants else ["default"]
    shares = [t.share for t in tenants] if tenants else [1.0]
    drawn = rng.choice(len(names), size=len(records), p=shares)
    caps = [max(r.max_tokens or max_tokens, r.output_tokens) for r in records]
    predictions = predict_lengths(
        records,
        caps,
        predictor,
        oracle_noise=oracle_noise,
        seed=seed,
        train_file=train_file,
        model=model,
    )
    out = []
    for i, (r, cap, (p50, p90, unc)) in enumerate(zip(records, caps, predictions, strict=True)):
        relative = r.deadline_s if r.deadline_s is not None else deadline_s
        tenant = r.tenant or names[int(drawn[i])]
        out.append(
            SimRequest(
                request_id=f"r{i}",
                tenant=tenant,
                arrival=r.timestamp,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                max_tokens=cap,
                predicted_p50=p50,
                predicted_p90=p90,
                uncertainty=unc,
                deadline=None if relative is None else r.timestamp + relative,
                fail_if_late=fail_if_late and relative is not None,
                background=tenant in background_tenants,
                priority=r.priority or 0,
            )
        )
    return out
