"""Scheduling policy: which request runs next, on which pool, and what it costs its tenant.

Pure code with no I/O, and time is an argument: the Redis-backed scheduler service and
the simulator drive the same :class:`SchedulerPolicy`. It combines

- VTC (Sheng et al., OSDI 2024): a virtual token counter per tenant, charged ``w_in``
  per input token at dispatch and ``w_out`` per generated token, divided by the tenant's
  weight; the backlogged tenant with the smallest counter is served next, and a tenant
  that becomes backlogged is lifted to the smallest counter among the backlogged ones.
  Prompt tokens a worker read from its prefix cache instead of computing them are
  re-priced at ``w_cached`` in the counter when the request completes, so a tenant is
  charged for the compute it took, not for repeating its system prompt (``served``, a
  count of tokens served, keeps them: it only ever grows).
- RT-LM (Li et al., RTSS 2023): inside a tenant, cheaper predicted work first (prefill
  plus predicted output, in seconds of the worker latency model) with linear aging;
  admission by a KV budget from predicted lengths instead of ``max_tokens``
  (consolidation, as in S3); placement on the GPU or CPU pool with the earlier
  estimated completion (offloading).

Shortest-first alone buys mean latency with the tail. Two rules keep the tail: a *tail
guard* (a request that has waited ``1 + tail_slack`` times what FCFS would have made it
wait goes before any that has not) and an *express* tier limited to the cheapest
``tail_slack / (1 + tail_slack)`` of the work, which is what the guard can absorb (a
non-preemptive priority class of load r delays the rest by about ``1 / (1 - r)``).
Under a long backlog that per-request promise leaves little to gain (every request may
be delayed by only ``tail_slack`` of its wait); an operator with a tail SLO can set
``tail_target_s`` so the guard fires only past the target, and ``late_first`` so late
requests precede the (then larger) express tier.
Deadlines near their latest safe start beat everything inside a tenant.

A request may carry a ``priority`` (vLLM's field: lower first, default 0). It orders a
tenant's own requests strictly, before all the rules above, which then order requests
of equal priority; it never moves a request ahead of another tenant's (VTC picks the
tenant first). A policy that is not fair has one queue, so there it orders all requests.

A *background* request (a batch's) runs only from capacity no other request waits for:
inside its tenant it comes after every other request, and a tenant with only background
requests left is served after every tenant with others. It is charged as any request.
When a foreground request would wait ``preempt_after_s`` or more for room on its pool
while background requests run there, one of them is handed back to the queue for it
(``preempt`` in the result: the one with the least context to recompute; the worker
keeps what the caller has, and the next run continues from it), as vLLM preempts its
lowest priority first.

The named policies ``fcfs``, ``vtc``, ``rtlm`` and ``fairway`` switch these parts on.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from services.latency_model import LatencyModel

POLICY_NAMES: tuple[str, ...] = ("fcfs", "vtc", "rtlm", "fairway")

# name -> (fair, cost_order, consolidate, offload)
_POLICY_PARTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "fcfs": (False, False, False, False),
    "vtc": (True, False, False, False),
    "rtlm": (False, True, True, True),
    "fairway": (True, True, True, True),
}

_CALIBRATION_WINDOW = 1000
_SHARE_KEEP = 1.0 - 1.0 / 500
_EXPRESS_HISTORY = 2048
_EXPRESS_MIN_HISTORY = 256
_EXPRESS_REFRESH = 64

UNLIMITED_KV = 1 << 62
"""``free_kv_tokens`` for a pool without a KV limit."""


@dataclass(slots=True)
class QueuedRequest:
    """What the policy knows about one request."""

    request_id: str
    tenant: str
    input_tokens: int
    max_tokens: int
    predicted_p50: float
    predicted_p90: float
    arrival: float
    deadline: float | None = None
    fail_if_late: bool = False
    uncertainty: float = 0.0
    generated: int = 0
    """Output tokens already produced; a requeued request recomputes them as prompt."""
    input_charged: bool = False
    """Set once the input was charged to the tenant; a requeue never charges it again."""
    prepaid_output: float = 0.0
    """Output tokens charged in advance (predicted charging), settled at finish."""
    adapter: str | None = None
    """The tenant LoRA adapter the request runs with; None: the base model."""
    background: bool = False
    """Runs from spare capacity only (a batch's request): after every other request."""
    pool: str | None = None
    """The pool an in-flight request was dispatched to."""
    run_output: int = 0
    """Output tokens its current run reported (in flight): what a hand-back recomputes."""
    priority: int = 0
    """Lower goes first, as vLLM's ``priority``: strictly, inside the tenant's queue (or
    the one queue of a policy that is not fair); deadlines, the tail guard and cost order
    only order requests of equal priority."""


@dataclass(slots=True)
class PoolView:
    """A worker pool's capacity as the caller sees it right now."""

    name: str
    free_slots: int
    free_kv_tokens: int
    running: int
    latency: LatencyModel
    backlog_s: float = 0.0
    """Predicted seconds until the first of its running requests ends, freeing a slot and
    its KV (0 with none running; may be left 0 while the pool has free slots and KV)."""
    kind: str = ""
    """``"gpu"`` or ``"cpu"``; empty means the name is the kind."""
    kv_capacity: int | None = None
    """KV tokens of one worker: a request needing more can never run on this pool."""
    static_batching: bool = False
    """The pool runs fixed batches: group requests of similar predicted length."""
    adapters: dict[str, float] = field(default_factory=dict)
    """LoRA adapter -> share of the pool's workers that hold it in their device pool."""

    @property
    def pool_kind(self) -> str:
        return self.kind or self.name


@dataclass(slots=True)
class Dispatch:
    request_id: str
    pool: str
    charge: float
    """Counter increment made at dispatch (already divided by the tenant weight)."""
    kv_tokens: int = 0
    """KV tokens the admission reserved for this request."""
    request: QueuedRequest | None = None
    """The request as dispatched (charge flags set): what to persist as in-flight."""


@dataclass(slots=True)
class Expired:
    request_id: str
    reason: str


@dataclass(slots=True)
class ScheduleResult:
    dispatches: list[Dispatch]
    expired: list[Expired]
    preempt: list[str] = field(default_factory=list)
    """In-flight background requests to hand back: foreground requests wait for their room."""


@dataclass
class PolicyConfig:
    """Knobs of the policy; ``fair``/``cost_order``/``consolidate``/``offload`` left as
    ``None`` take their value from ``name``."""

    name: str = "fairway"
    w_in: float = 1.0
    w_out: float = 2.0
    w_cached: float = 0.1
    """Charge per prompt token read from a worker's prefix cache (charged ``w_in`` at
    dispatch, before anyone knows, and re-priced when the request completes)."""
    tenant_weights: dict[str, float] = field(default_factory=dict)
    aging_rate: float = 0.05
    """Seconds of predicted cost forgiven per second waited."""
    tail_slack: float = 0.1
    """Tail guard: cheaper requests may pass a request until it has waited this fraction
    longer than FCFS would have made it wait (the predicted work queued ahead of it at
    arrival over the pools' capacity); then it is late and goes before the others."""
    tail_margin_s: float = 0.0
    """Absolute allowance added to the tail guard."""
    tail_target_s: float = 0.0
    """Wait the operator accepts for any request (a tail SLO on queueing): the guard never
    fires before a request has waited this long, so a request that FCFS would serve well
    inside the target may be passed until the target, not only for ``tail_slack`` of its
    FCFS wait. ``0``: the guard is relative to FCFS alone. A target gains little unless
    it is near the longest waits FCFS would make (set it from the tail SLO)."""
    late_first: bool = False
    """Requests past their guard go before the express tier (instead of after it), so the
    guard rather than ``express_share`` bounds the tail; pairs with ``tail_target_s`` and a
    larger ``express_share``."""
    express_share: float | None = None
    """Share of the work (cheapest requests first) that skips the queue; ``None``:
    ``tail_slack / (1 + tail_slack)``, what the guard can absorb."""
    charge_predicted: bool = False
    """Charge the predicted output at dispatch and settle at finish, instead of per token."""
    fair: bool | None = None
    cost_order: bool | None = None
    consolidate: bool | None = None
    offload: bool | None = None
    kv_quantile: Literal["p50", "p90"] = "p90"
    """Predicted output quantile that admission reserves KV for (consolidation)."""
    risk_weight: float = 0.0
    """Cost adds this fraction of the predicted p90-p50 spread: uncertain requests wait more."""
    urgency_slack_s: float = 1.0
    """A deadline request becomes urgent this long (plus the time FCFS would make it wait)
    before its latest safe start."""
    lookahead: int = 64
    """At most this many queued requests are considered per schedule call."""
    offload_idle_rescan_s: float = 0.25
    """When only offload pools have room and a scan found nothing worth moving there, the
    next such scan waits this long (bounds the scheduler's own CPU time)."""
    group_static: bool = False
    group_ratio: float = 1.5
    """On static-batching pools, one call's batch keeps predicted lengths within this ratio."""
    latency: LatencyModel = field(default_factory=LatencyModel)
    """Reference model (the GPU's) for cost keys and deadline estimates."""
    idle_tenant_slots: int = 1
    """Fair policies keep this many of a pool's free slots from a tenant that already
    holds an even share of all slots (their number over the tenants that sent requests
    in the last ``idle_tenant_window_s``), so a light tenant starts at once instead of
    waiting for a full pool to free a slot (a heavy tenant holding every slot with answers
    of equal length frees them all at once, seconds apart). A tenant alone keeps nothing
    from itself (at saturation a slot less is a much longer queue), nor do pools of four
    times as many slots or fewer. ``0``: off."""
    idle_tenant_window_s: float = 60.0
    preempt_background: bool = True
    """Hand running background requests back when foreground ones wait for their room."""
    preempt_after_s: float = 0.5
    """Only a foreground request estimated to wait this long for room (a slot or KV that
    running requests free) has a background one handed back: below it, recomputing the
    background request's context costs more than the wait saves. (Simulated on the Azure
    conversation trace at saturation with 30% batch traffic: 0 cuts the foreground's
    mean time to first token from 0.51 to 0.27 s for 5% of the throughput, spent on
    recomputation; 0.5 s to 0.35 s for 2%.)"""
    preempt_retry_s: float = 5.0
    """A hand-back not seen this long after it was asked (the request had not reached a
    worker yet, or the message was lost) may be asked again."""
    adapter_load_s: float = 0.05
    """Estimated seconds to page a LoRA adapter into a worker that does not hold it
    (disk or host memory to the device): placement adds it, weighted by the share of a
    pool's workers that lack the adapter, so a pool holding it wins otherwise-equal
    choices (S-LoRA affinity)."""

    def __post_init__(self) -> None:
        if self.name not in _POLICY_PARTS:
            raise ValueError(
                f"unknown policy {self.name!r}; choose one of {', '.join(POLICY_NAMES)}"
            )
        fair, cost_order, consolidate, offload = _POLICY_PARTS[self.name]
        self.fair = fair if self.fair is None else self.fair
        self.cost_order = cost_order if self.cost_order is None else self.cost_order
        self.consolidate = consolidate if self.consolidate is None else self.consolidate
        self.offload = offload if self.offload is None else self.offload
        if (
            min(
                self.aging_rate,
                self.tail_slack,
                self.tail_margin_s,
                self.tail_target_s,
                self.w_in,
                self.w_out,
                self.w_cached,
            )
            < 0
        ):
            raise ValueError(
                "aging_rate, tail_slack, tail_margin_s, tail_target_s, w_in, w_out and "
                "w_cached must be >= 0"
            )
        if self.express_share is not None and not 0 <= self.express_share < 1:
            raise ValueError("express_share must be in [0, 1)")
        if any(w <= 0 for w in self.tenant_weights.values()):
            raise ValueError("tenant weights must be > 0")
        if self.idle_tenant_slots < 0:
            raise ValueError("idle_tenant_slots must be >= 0")


def remaining_output(predicted: float, generated: int, max_tokens: int) -> float:
    """Predicted output tokens still to generate, of an answer predicted ``predicted``
    long that has ``generated``. One that already outlived its prediction is expected to
    double its length (lengths are heavy-tailed), so a preempted request asks for room to
    grow instead of thrashing, and a full pool is not expected to free a slot after one
    more token."""
    left = predicted - generated
    if generated > 0 and generated >= predicted:
        left = float(generated)
    return min(max(left, 1.0), float(max(max_tokens - generated, 1)))


def remaining_tokens(req: QueuedRequest, quantile: Literal["p50", "p90"] = "p50") -> float:
    """:func:`remaining_output` of a request, by its predicted median or p90 length."""
    predicted = req.predicted_p90 if quantile == "p90" else req.predicted_p50
    return remaining_output(predicted, req.generated, req.max_tokens)


# --- charging ---------------------------------------------------------------------


class Charging(Protocol):
    """When output tokens reach a tenant's counter (input is always charged at dispatch)."""

    def prepay(self, req: QueuedRequest) -> float:
        """Output tokens charged at dispatch."""
        ...

    def on_progress(self, new_tokens: int) -> float:
        """Output tokens charged when a worker reports progress."""
        ...

    def settle(self, prepaid: float, output_tokens: int) -> float:
        """Output tokens charged (or refunded, if negative) at finish."""
        ...


class ActualCharging:
    """VTC as published: every generated token is charged as it is reported."""

    def prepay(self, req: QueuedRequest) -> float:
        return 0.0

    def on_progress(self, new_tokens: int) -> float:
        return float(new_tokens)

    def settle(self, prepaid: float, output_tokens: int) -> float:
        return 0.0


class PredictedCharging:
    """VTC with length prediction: charge the predicted p50 at dispatch, settle at finish."""

    def prepay(self, req: QueuedRequest) -> float:
        return float(min(max(req.predicted_p50, 0.0), req.max_tokens))

    def on_progress(self, new_tokens: int) -> float:
        return 0.0

    def settle(self, prepaid: float, output_tokens: int) -> float:
        return output_tokens - prepaid


# --- queues -----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Entry:
    req: QueuedRequest
    key: float
    seq: int
    work: float = 0.0
    """Predicted busy time on the reference worker (cost-ordered policies)."""
    decode_work: float = 0.0
    """The part of ``work`` that depends on the predicted output length."""
    guard: float = math.inf
    """Tail guard: from this time on the request goes before any that is not late."""
    expire_at: float = math.inf
    """``fail_if_late`` requests: past this the deadline cannot be met."""
    scan: int = 0
    """Id of the schedule call that last took it off its heaps."""


_TimerItem = tuple[float, int, _Entry]
"""(when, seq, entry): a request waiting to enter a tier, or to expire."""
_HeapItem = tuple[int, float, int, _Entry]
"""(priority, key, seq, entry): a request in a tier."""
_Popped = list[tuple[list[_HeapItem], _HeapItem]]


@dataclass(slots=True)
class _Queue:
    """One queue (per tenant when fair, else one for all) as heaps with lazy deletion.

    Requests are taken from the first non-empty tier: ``due`` (deadline near), then
    ``express`` (cheapest share of the work), ``late`` (past the tail guard), ``main``,
    then ``background``; but a request of a lower ``priority`` value in a later tier goes
    first (only ``background`` waits for every other tier whatever its priorities).
    ``soon_due``/``soon_late`` hold requests until they enter ``due``/``late``.
    """

    main: list[_HeapItem] = field(default_factory=list)
    express: list[_HeapItem] = field(default_factory=list)
    late: list[_HeapItem] = field(default_factory=list)
    due: list[_HeapItem] = field(default_factory=list)
    soon_late: list[_TimerItem] = field(default_factory=list)
    soon_due: list[_TimerItem] = field(default_factory=list)
    expiry: list[_TimerItem] = field(default_factory=list)
    background: list[_HeapItem] = field(default_factory=list)
    work: float = 0.0
    """Predicted work queued here (reference-worker seconds), for the tail guard."""
    decode_work: float = 0.0

    def timed(self) -> bool:
        return bool(self.soon_late or self.soon_due or self.expiry)


@dataclass(slots=True)
class _PoolState:
    """A pool's capacity as one schedule call uses it up."""

    view: PoolView
    free_slots: int
    free_kv: int
    running: int
    wait_s: float
    """Estimated start for the next request that has to wait for this pool."""
    primary: bool
    """Of the kind every policy uses (GPU); the others only take offloaded work."""
    blocked: bool = False
    """A waiting request holds this pool: later requests must not take its capacity."""
    anchor: float | None = None

    @property
    def open(self) -> bool:
        return self.free_slots > 0 and not self.blocked


def _service_s(lat: LatencyModel, running: int, prompt: int, tokens: float) -> float:
    """Prefill plus ``tokens`` decode steps in a batch of ``running + 1`` (capped)."""
    batch = max(1, min(running + 1, lat.max_batch))
    context = batch * (prompt + tokens / 2)
    return lat.prefill_s(prompt) + tokens * lat.decode_step_s(batch, context)


class SchedulerPolicy:
    """Fair, uncertainty-aware ordering, admission and placement (see module doc)."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.counters: dict[str, float] = {}
        self.served: dict[str, float] = {}
        self._charging: Charging = (
            PredictedCharging() if config.charge_predicted else ActualCharging()
        )
        self._queues: dict[str, _Queue] = {}
        self._queued: dict[str, _Entry] = {}
        self._inflight: dict[str, QueuedRequest] = {}
        """In dispatch order (a requeued request's next dispatch moves it to the end)."""
        self._background_inflight: dict[str, None] = {}
        """The in-flight requests that are background, in dispatch order."""
        self._preempting: dict[str, float] = {}
        """In-flight background request -> when its hand-back was asked."""
        self._last_arrival: dict[str, float] = {}
        """Tenant -> when it last sent a request (for the idle-tenant slots)."""
        self._tenant_queued: dict[str, int] = {}
        self._tenant_foreground: dict[str, int] = {}
        """Tenant -> its queued requests that are not background."""
        self._timed_queues: set[str] = set()
        self._output_actual = 0.0
        self._output_predicted = 0.0
        self._tenant_work: dict[str, tuple[float, int]] = {}
        self._total_work = 0.0
        self._dispatch_count = 0
        self._capacity = 1.0
        self._offload_idle_until = -math.inf
        self._recent_work: deque[float] = deque(maxlen=_EXPRESS_HISTORY)
        self._since_threshold = 0
        self._express_below = 0.0
        share = config.express_share
        self._express_share = (
            config.tail_slack / (1 + config.tail_slack) if share is None else share
        )
        self._seq = itertools.count()
        self._scans = itertools.count(1)

    # --- public API ---------------------------------------------------------------

    def add(self, req: QueuedRequest, now: float) -> None:
        """Enqueue a new request; a known request id is ignored (redelivery)."""
        if req.request_id in self._queued or req.request_id in self._inflight:
            return
        if not req.background:  # slots are kept for tenants waiting on an answer, not batches
            self._last_arrival[req.tenant] = now
        self._enqueue(req, now, lift=True)

    def cancel(self, request_id: str) -> QueuedRequest | None:
        """Drop a queued request; in-flight ones are the worker's business."""
        entry = self._queued.get(request_id)
        if entry is None:
            return None
        self._remove(entry)
        return entry.req

    def requeue(self, req: QueuedRequest, now: float) -> None:
        """Put a dispatched request back (worker died, preempted) without charging its
        input again. It keeps its arrival (FCFS order) or counts as late at once (cost
        order), so it goes near the front of its tenant's queue."""
        self._preempting.pop(req.request_id, None)
        self._background_inflight.pop(req.request_id, None)
        if req.request_id in self._queued:
            return
        known = self._inflight.pop(req.request_id, None)
        req.input_charged = True
        if known is not None:
            req.prepaid_output = known.prepaid_output
        elif self.config.charge_predicted and req.prepaid_output == 0.0:
            req.prepaid_output = self._charging.prepay(req)
        self._enqueue(req, now, lift=True, requeued=True)

    def schedule(self, now: float, pools: list[PoolView]) -> ScheduleResult:
        """Decide which queued requests start now and where; expire hopeless deadlines.

        Only capacity the pools advertise is used. A request whose best pool (earliest
        estimated completion) is full waits for it; one that waits for KV on a pool
        with free slots holds that pool, so smaller later requests cannot starve it.
        Foreground requests that wait while background ones run on their pool have those
        handed back (``preempt``).
        """
        expired = self._expire(now)
        states = self._pool_states(pools)
        askable, preemptable = self._preemptable(now)
        if not self._queued or not (any(s.open for s in states) or askable):
            return ScheduleResult([], expired)
        offload_only = any(s.open for s in states) and not any(s.open and s.primary for s in states)
        if offload_only and now < self._offload_idle_until:
            return ScheduleResult([], expired)
        scan = next(self._scans)
        scan_counters = dict(self.counters) if self.config.fair else {}
        keeping = bool(self.config.fair and self.config.idle_tenant_slots)
        # A tenant's batch does not count against the slots kept for its own waiting requests.
        in_flight = Counter(req.tenant for req in self._inflight.values()
                            if not req.background) if keeping else Counter()
        recent = self._recent_tenants(now)
        share = sum(s.running + s.free_slots for s in states) / max(len(recent), 1)
        held: dict[str, int] = {}
        popped: _Popped = []
        dispatches: list[Dispatch] = []
        waiting: list[str] = []
        """Pools of the foreground requests that would wait ``preempt_after_s`` or more."""
        looked = 0
        while looked < self.config.lookahead and (
            any(s.open for s in states) or len(waiting) < preemptable
        ):
            entry = self._next_candidate(scan, scan_counters, held, popped)
            if entry is None:
                break
            looked += 1
            req = entry.req
            if req.background and not any(s.open for s in states):
                break  # looking on for foreground requests to preempt for: none is left
            # Kept slots are for tenants below an even share of the slots, while others
            # are about: not for one that holds its share (or has the system to itself),
            # nor for background work, which a kept slot would start ahead of the others.
            keeps_out = keeping and (req.background or (
                in_flight[req.tenant] >= share and len(recent - {req.tenant}) > 0))
            choice = self._place(req, states, busy=keeps_out)
            if choice is None:
                self._remove(entry)
                expired.append(Expired(req.request_id, "exceeds_kv_capacity"))
                continue
            state, fits, need, wait_s = choice
            if fits:
                dispatch = self._dispatch(entry, state, need)
                dispatches.append(dispatch)
                in_flight[req.tenant] += not req.background
                if self.config.fair:
                    scan_counters[req.tenant] += dispatch.charge
            elif keeps_out and all(not s.open or s.free_slots <= self._idle_tenant_slots(s)
                                   for s in states):
                # Only kept slots are left: none of this tenant's requests fits this scan.
                held[req.tenant] = self._tenant_queued[req.tenant]
            else:
                held[req.tenant] = held.get(req.tenant, 0) + 1
                if self.config.fair:
                    scan_counters[req.tenant] += self._expected_charge(req)
            if not fits and not req.background and wait_s >= self.config.preempt_after_s:
                waiting.append(state.view.name)
        for heap, item in popped:
            if self._live(item[3]):
                heapq.heappush(heap, item)
        if offload_only and not dispatches:
            self._offload_idle_until = now + self.config.offload_idle_rescan_s
        return ScheduleResult(dispatches, expired, self._hand_backs(now, waiting) if askable else [])

    @staticmethod
    def _context_tokens(req: QueuedRequest) -> int:
        return req.input_tokens + req.generated + req.run_output

    def _preemptable(self, now: float) -> tuple[int, int]:
        """In-flight background requests whose hand-back may be asked now, and all of them
        (those asked already count for as many waiting requests)."""
        if not self.config.preempt_background:
            return 0, 0
        retry = self.config.preempt_retry_s
        askable = sum(1 for rid in self._background_inflight
                      if rid not in self._preempting or now - self._preempting[rid] >= retry)
        return askable, len(self._background_inflight)

    def _hand_backs(self, now: float, waiting: list[str]) -> list[str]:
        """One background request per foreground request waiting on its pool, the one
        with the least context to recompute first (then the latest dispatched); a
        hand-back asked earlier and not overdue counts for one."""
        retry = self.config.preempt_retry_s
        asked: Counter[str] = Counter()
        running: dict[str, list[str]] = {}
        for rid in self._background_inflight:
            req = self._inflight[rid]
            if req.pool is None:
                continue
            if rid in self._preempting and now - self._preempting[rid] < retry:
                asked[req.pool] += 1
            else:
                running.setdefault(req.pool, []).append(rid)
        victims: list[str] = []
        for pool in waiting:
            if asked[pool]:
                asked[pool] -= 1
            elif running.get(pool):
                candidates = running[pool]
                cheapest = min(range(len(candidates)), key=lambda i: (
                    self._context_tokens(self._inflight[candidates[i]]), -i))
                rid = candidates.pop(cheapest)
                self._preempting[rid] = now
                victims.append(rid)
        return victims

    def on_progress(
        self, tenant: str, new_tokens: int, now: float, request_id: str | None = None
    ) -> float:
        """Charge ``new_tokens`` generated output tokens; returns the counter increment."""
        if new_tokens <= 0:
            return 0.0
        running = self._inflight.get(request_id) if request_id is not None else None
        if running is not None:
            running.run_output += new_tokens
        self.served[tenant] = self.served.get(tenant, 0.0) + self.config.w_out * new_tokens
        delta = self.config.w_out * self._charging.on_progress(new_tokens) / self._weight(tenant)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + delta
        return delta

    def on_cached_input(self, tenant: str, cached_tokens: int) -> float:
        """Re-price ``cached_tokens`` prompt tokens, charged ``w_in`` at dispatch, that a
        worker read from its prefix cache: they cost ``w_cached`` in the VTC counter (not
        in ``served``, a counter of tokens served that only grows). Returns the counter
        change (negative while ``w_cached < w_in``). Called once a request, at its end."""
        if cached_tokens <= 0:
            return 0.0
        delta = (self.config.w_cached - self.config.w_in) * cached_tokens / self._weight(tenant)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + delta
        return delta

    def on_finished(self, request_id: str, tenant: str, output_tokens: int, now: float) -> float:
        """Forget an in-flight request and settle its charge; returns the counter change."""
        self._preempting.pop(request_id, None)
        self._background_inflight.pop(request_id, None)
        req = self._inflight.pop(request_id, None)
        if req is None:
            return 0.0
        keep = 1.0 - 1.0 / _CALIBRATION_WINDOW
        self._output_actual = self._output_actual * keep + output_tokens
        self._output_predicted = self._output_predicted * keep + max(req.predicted_p50, 1.0)
        delta = self.config.w_out * self._charging.settle(req.prepaid_output, output_tokens)
        delta /= self._weight(tenant)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + delta
        return delta

    def queued_requests(self) -> list[QueuedRequest]:
        return [entry.req for entry in self._queued.values()]

    def inflight_requests(self) -> list[QueuedRequest]:
        return list(self._inflight.values())

    def restore(
        self,
        counters: dict[str, float],
        served: dict[str, float],
        queued: list[QueuedRequest],
        inflight: list[QueuedRequest],
    ) -> None:
        """Rebuild after a restart from persisted state: no lift, no charge."""
        self.counters.clear()
        self.counters.update(counters)
        self.served.clear()
        self.served.update(served)
        self._queues.clear()
        self._queued.clear()
        self._inflight.clear()
        self._preempting.clear()
        self._background_inflight.clear()
        self._tenant_queued.clear()
        self._tenant_foreground.clear()
        self._timed_queues.clear()
        for req in sorted(queued, key=lambda r: r.arrival):
            if req.request_id not in self._queued:
                self._enqueue(req, req.arrival, lift=False)
        for req in inflight:
            req.input_charged = True
            if self.config.charge_predicted and req.prepaid_output == 0.0:
                req.prepaid_output = self._charging.prepay(req)
            self._inflight[req.request_id] = req
            if req.background:
                self._background_inflight[req.request_id] = None

    def num_queued(self, tenant: str | None = None) -> int:
        if tenant is None:
            return len(self._queued)
        return self._tenant_queued.get(tenant, 0)

    def backlogged(self) -> list[str]:
        """Tenants with queued requests."""
        return [t for t, n in self._tenant_queued.items() if n > 0]

    # --- estimates ----------------------------------------------------------------

    def remaining_tokens(
        self, req: QueuedRequest, quantile: Literal["p50", "p90"] = "p50"
    ) -> float:
        return remaining_tokens(req, quantile)

    def cost_s(self, req: QueuedRequest) -> float:
        """Predicted service time on the reference model at full batch: the ordering cost."""
        lat = self.config.latency
        tokens = self.remaining_tokens(req)
        if self.config.risk_weight:
            tokens += self.config.risk_weight * max(req.predicted_p90 - req.predicted_p50, 0.0)
        return lat.prefill_s(req.input_tokens + req.generated) + tokens * lat.decode_step_s(
            lat.max_batch
        )

    def work_s(self, req: QueuedRequest) -> float:
        """Predicted busy time the request costs the reference worker: its prefill plus its
        share of the decode steps at full batch."""
        return sum(self._work_parts(req))

    def _work_parts(self, req: QueuedRequest) -> tuple[float, float]:
        lat = self.config.latency
        per_token = lat.decode_step_s(lat.max_batch) / max(lat.max_batch, 1)
        return lat.prefill_s(req.input_tokens + req.generated), self.remaining_tokens(
            req
        ) * per_token

    def output_calibration(self) -> float:
        """Recent real output tokens per predicted (p50) token, from finished requests."""
        if self._output_predicted <= 0:
            return 1.0
        return min(max(self._output_actual / self._output_predicted, 0.25), 4.0)

    def kv_need(self, req: QueuedRequest) -> int:
        """KV tokens admission reserves: predicted length when consolidating, else max_tokens."""
        if self.config.consolidate:
            out = self.remaining_tokens(req, self.config.kv_quantile)
        else:
            out = float(max(req.max_tokens - req.generated, 1))
        return math.ceil(req.input_tokens + req.generated + out)

    def service_s(self, req: QueuedRequest, view: PoolView, running: int | None = None) -> float:
        """Predicted time from start to finish on ``view`` with ``running`` others in the batch."""
        running = view.running if running is None else running
        return _service_s(
            view.latency, running, req.input_tokens + req.generated, self.remaining_tokens(req)
        )

    # --- internals ----------------------------------------------------------------

    def _weight(self, tenant: str) -> float:
        return self.config.tenant_weights.get(tenant, 1.0)

    def _live(self, entry: _Entry) -> bool:
        return self._queued.get(entry.req.request_id) is entry

    def _order_key(self, req: QueuedRequest) -> float:
        # cost - aging*(now - arrival) orders like cost + aging*arrival: a static key.
        if self.config.cost_order:
            return self.cost_s(req) + self.config.aging_rate * req.arrival
        return req.arrival

    def _lift(self, tenant: str) -> None:
        others = [
            self.counters.get(t, 0.0)
            for t, n in self._tenant_queued.items()
            if n > 0 and t != tenant
        ]
        if others:
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(others))

    def _enqueue(self, req: QueuedRequest, now: float, lift: bool, requeued: bool = False) -> None:
        tenant = req.tenant
        if lift and self.config.fair and self._tenant_queued.get(tenant, 0) == 0:
            self._lift(tenant)
        self.counters.setdefault(tenant, 0.0)
        self.served.setdefault(tenant, 0.0)
        qkey = tenant if self.config.fair else ""
        queue = self._queues.setdefault(qkey, _Queue())
        entry = _Entry(req, self._order_key(req), next(self._seq))
        tier = queue.main
        if req.background:
            # Neither guarded nor counted as work ahead of others: it waits for them all.
            tier = queue.background
        elif self.config.cost_order:
            prefill, entry.decode_work = self._work_parts(req)
            entry.work = prefill + entry.decode_work
            if requeued:
                # Preempted or orphaned: it already waited its turn, so it is late at once.
                entry.guard, entry.key, wait = now, req.arrival, 0.0
            else:
                wait = self._fcfs_wait(queue, tenant)
                # Tail guard: cheaper requests may pass this one until it has waited
                # 1 + tail_slack times what FCFS would have made it wait (or the tail
                # target, if that is longer).
                allowance = max(wait * (1.0 + self.config.tail_slack), self.config.tail_target_s)
                entry.guard = now + allowance + self.config.tail_margin_s
                if self._is_express(entry.work):
                    tier = queue.express
            queue.work += entry.work
            queue.decode_work += entry.decode_work
            heapq.heappush(queue.soon_late, (entry.guard, entry.seq, entry))
            if req.deadline is not None:
                # Urgent once its slack is down to what the queue ahead needs: with tight
                # deadlines that is at once (FCFS order), with loose ones much later.
                latest_start = req.deadline - self._typical_service_s(req)
                urgent_at = latest_start - self.config.urgency_slack_s - wait
                heapq.heappush(queue.soon_due, (urgent_at, entry.seq, entry))
        heapq.heappush(tier, (req.priority, entry.key, entry.seq, entry))
        if req.deadline is not None and req.fail_if_late:
            lat = self.config.latency
            fastest = lat.prefill_s(req.input_tokens + req.generated)
            fastest += self.remaining_tokens(req) * lat.decode_step_s(1)
            entry.expire_at = req.deadline - fastest
            heapq.heappush(queue.expiry, (entry.expire_at, entry.seq, entry))
        if queue.timed():
            self._timed_queues.add(qkey)
        self._queued[req.request_id] = entry
        self._tenant_queued[tenant] = self._tenant_queued.get(tenant, 0) + 1
        if not req.background:
            self._tenant_foreground[tenant] = self._tenant_foreground.get(tenant, 0) + 1

    def _fcfs_wait(self, queue: _Queue, tenant: str) -> float:
        """How long FCFS would make a request arriving now wait: the work queued ahead of
        it in its queue at the pools' capacity (under VTC, at the tenant's share of it),
        with predicted decode work corrected by how predictions compared with real lengths."""
        correction = (self.output_calibration() - 1.0) * queue.decode_work
        capacity = self._capacity
        if self.config.fair:
            others = sum(self._weight(t) for t in self._tenant_queued if t != tenant)
            fair_share = self._weight(tenant) / (self._weight(tenant) + others)
            capacity *= max(fair_share, self._recent_share(tenant))
        return max(queue.work + correction, 0.0) / capacity

    def _recent_share(self, tenant: str) -> float:
        """The tenant's share of recently dispatched work (decayed per dispatch)."""
        value, at = self._tenant_work.get(tenant, (0.0, self._dispatch_count))
        if self._total_work <= 0:
            return 0.0
        return value * _SHARE_KEEP ** (self._dispatch_count - at) / self._total_work

    def _note_dispatched_work(self, tenant: str, work: float) -> None:
        self._dispatch_count += 1
        value, at = self._tenant_work.get(tenant, (0.0, self._dispatch_count))
        value = value * _SHARE_KEEP ** (self._dispatch_count - at) + work
        self._tenant_work[tenant] = (value, self._dispatch_count)
        self._total_work = self._total_work * _SHARE_KEEP + work

    def _is_express(self, work: float) -> bool:
        """Cheap enough to skip the queue: below the work quantile that holds the
        ``express_share`` of recent arrivals' work (so others wait at most ~1/(1-share)x)."""
        self._recent_work.append(work)
        self._since_threshold += 1
        if (
            self._since_threshold >= _EXPRESS_REFRESH
            and len(self._recent_work) >= _EXPRESS_MIN_HISTORY
        ):
            self._since_threshold = 0
            ordered = sorted(self._recent_work)
            cumulative = list(itertools.accumulate(ordered))
            index = bisect.bisect_right(cumulative, self._express_share * cumulative[-1]) - 1
            self._express_below = ordered[index] if index >= 0 else 0.0
        return work <= self._express_below

    def _typical_service_s(self, req: QueuedRequest) -> float:
        lat = self.config.latency
        typical = lat.prefill_s(req.input_tokens + req.generated)
        return typical + self.remaining_tokens(req, "p90") * lat.decode_step_s(lat.max_batch)

    def _remove(self, entry: _Entry) -> None:
        """Take a queued entry out; its heap items go stale and are dropped lazily."""
        req = entry.req
        del self._queued[req.request_id]
        left = self._tenant_queued[req.tenant] - 1
        if left:
            self._tenant_queued[req.tenant] = left
        else:
            del self._tenant_queued[req.tenant]
        if not req.background:
            foreground = self._tenant_foreground[req.tenant] - 1
            if foreground:
                self._tenant_foreground[req.tenant] = foreground
            else:
                del self._tenant_foreground[req.tenant]
        queue = self._queues[req.tenant if self.config.fair else ""]
        if left == 0 and (self.config.fair or not self._queued):
            queue.work = queue.decode_work = 0.0  # empty: no rounding drift
        else:
            queue.work = max(queue.work - entry.work, 0.0)
            queue.decode_work = max(queue.decode_work - entry.decode_work, 0.0)

    def _expire(self, now: float) -> list[Expired]:
        """Move requests whose guard passed or whose deadline nears into their tiers;
        answer ``fail_if_late`` requests that can no longer finish in time."""
        expired: list[Expired] = []
        for qkey in list(self._timed_queues):
            queue = self._queues[qkey]
            while queue.soon_late and queue.soon_late[0][0] <= now:
                _, seq, entry = heapq.heappop(queue.soon_late)
                if self._live(entry):
                    heapq.heappush(queue.late, (entry.req.priority, entry.guard, seq, entry))
            while queue.soon_due and queue.soon_due[0][0] <= now:
                _, seq, entry = heapq.heappop(queue.soon_due)
                if self._live(entry) and entry.req.deadline is not None:
                    heapq.heappush(queue.due, (entry.req.priority, entry.req.deadline, seq, entry))
            while queue.expiry and queue.expiry[0][0] < now:
                _, _, entry = heapq.heappop(queue.expiry)
                if self._live(entry):
                    self._remove(entry)
                    expired.append(Expired(entry.req.request_id, "deadline"))
            if not queue.timed():
                self._timed_queues.discard(qkey)
        return expired

    def _pool_states(self, pools: list[PoolView]) -> list[_PoolState]:
        """Pools this policy may use, the primary kind (GPU) first; without offloading
        only the primary kind is used."""
        kinds = {p.pool_kind for p in pools}
        primary = "gpu" if "gpu" in kinds or not kinds else min(kinds)
        eligible = pools if self.config.offload else [p for p in pools if p.pool_kind == primary]
        eligible = sorted(eligible, key=lambda p: p.pool_kind != primary)
        if eligible:
            self._capacity = max(sum(self._relative_speed(p.latency) for p in eligible), 1e-6)
        return [
            _PoolState(
                p,
                p.free_slots,
                p.free_kv_tokens,
                p.running,
                0.0 if p.free_slots > 0 else p.backlog_s,
                p.pool_kind == primary,
            )
            for p in eligible
        ]

    def _relative_speed(self, lat: LatencyModel) -> float:
        """Full-batch decode throughput relative to the reference model."""
        ref = self.config.latency
        ref_rate = ref.decode_tokens_per_s(ref.max_batch)
        return lat.decode_tokens_per_s(lat.max_batch) / ref_rate if ref_rate > 0 else 1.0

    def _head(self, heap: list[_HeapItem], scan: int, popped: _Popped) -> _HeapItem | None:
        """The heap's first live item not yet taken this scan (those taken go to
        ``popped``, to be pushed back when the scan ends; dead ones are dropped)."""
        while heap:
            item = heap[0]
            entry = item[3]
            if not self._live(entry):
                heapq.heappop(heap)
            elif entry.scan == scan:
                popped.append((heap, heapq.heappop(heap)))
            else:
                return item
        return None

    def _next_candidate(
        self,
        scan: int,
        scan_counters: dict[str, float],
        held: dict[str, int],
        popped: _Popped,
    ) -> _Entry | None:
        """Next request in policy order: VTC picks the tenant (one with requests other than
        background ones first), the queue picks the request."""
        if not self.config.fair:
            return self._pop_queue(self._queues[""], scan, popped) if self._queued else None
        while True:
            candidates = [t for t, n in self._tenant_queued.items() if n > held.get(t, 0)]
            if not candidates:
                return None
            # A tenant's queue gives its other requests first: past as many as it holds
            # back this scan, only background ones are left.
            tenant = min(candidates, key=lambda t: (
                held.get(t, 0) >= self._tenant_foreground.get(t, 0), scan_counters[t], t))
            entry = self._pop_queue(self._queues[tenant], scan, popped)
            if entry is not None:
                return entry
            held[tenant] = self._tenant_queued[tenant]

    def _pop_queue(self, queue: _Queue, scan: int, popped: _Popped) -> _Entry | None:
        """The queue's next request: the first tier's head, unless a later tier's head
        has a lower priority value; background requests when no other is left."""
        if not self.config.cost_order:
            tiers: tuple[list[_HeapItem], ...] = (queue.main,)
        elif self.config.late_first:
            tiers = (queue.due, queue.late, queue.express, queue.main)
        else:
            tiers = (queue.due, queue.express, queue.late, queue.main)
        best: tuple[int, list[_HeapItem]] | None = None
        for tier in tiers:
            head = self._head(tier, scan, popped)
            if head is not None and (best is None or head[0] < best[0]):
                best = (head[0], tier)
        if best is None:
            if self._head(queue.background, scan, popped) is None:
                return None
            best = (0, queue.background)
        heap = best[1]
        item = heapq.heappop(heap)
        popped.append((heap, item))
        item[3].scan = scan
        return item[3]

    def _place(
        self, req: QueuedRequest, states: list[_PoolState], busy: bool = False
    ) -> tuple[_PoolState, bool, int, float] | None:
        """The pool with the earliest estimated completion, whether the request fits there
        now, the KV it reserves and its estimated wait there; ``None`` if no pool could
        ever hold it. A ``busy`` request (its tenant holds its share of the slots while
        others are about) does not fit into a pool's kept slots."""
        need = self.kv_need(req)
        prompt = req.input_tokens + req.generated
        tokens = self.remaining_tokens(req)
        best: tuple[float, float, _PoolState, bool, int] | None = None
        for state in states:
            cap = state.view.kv_capacity
            if cap is not None and prompt + 1 > cap:
                continue
            need_here = min(need, cap) if cap is not None else need
            fits = (state.open and need_here <= state.free_kv and self._groups_with(tokens, state)
                    and not (busy and state.free_slots <= self._idle_tenant_slots(state)))
            service = _service_s(state.view.latency, state.running, prompt, tokens)
            done = (0.0 if fits else state.wait_s) + service + self._adapter_load_s(req, state.view)
            if best is None or done < best[0]:
                best = (done, service, state, fits, need_here)
        if best is None:
            return None
        _, service, state, fits, need_here = best
        if fits:
            return state, fits, need_here, 0.0
        # Waiting for KV on a pool with free slots: at least until a running request ends.
        short_of_kv = state.open and need_here > state.free_kv
        wait_s = max(state.wait_s, state.view.backlog_s) if short_of_kv else state.wait_s
        # Queue behind this pool: the next request that waits for it starts later.
        state.wait_s += service / max(state.running + state.free_slots, 1)
        if short_of_kv:
            state.blocked = True
        return state, fits, need_here, wait_s

    def _recent_tenants(self, now: float) -> set[str]:
        """Tenants that sent a request in the last ``idle_tenant_window_s``."""
        window = self.config.idle_tenant_window_s
        for tenant in [t for t, at in self._last_arrival.items() if now - at > window]:
            del self._last_arrival[tenant]
        return set(self._last_arrival)

    def _idle_tenant_slots(self, state: _PoolState) -> int:
        reserve = self.config.idle_tenant_slots if self.config.fair else 0
        return reserve if state.running + state.free_slots > 4 * reserve else 0

    def _adapter_load_s(self, req: QueuedRequest, view: PoolView) -> float:
        """Expected adapter paging time of ``req`` on ``view``: 0 where every worker holds it."""
        if req.adapter is None:
            return 0.0
        return self.config.adapter_load_s * (1.0 - min(view.adapters.get(req.adapter, 0.0), 1.0))

    def _groups_with(self, tokens: float, state: _PoolState) -> bool:
        if not (self.config.group_static and state.view.static_batching) or state.anchor is None:
            return True
        length = max(tokens, 1.0)
        ratio = max(length, state.anchor) / max(min(length, state.anchor), 1.0)
        return ratio <= self.config.group_ratio

    def _expected_charge(self, req: QueuedRequest) -> float:
        cfg = self.config
        charge = 0.0 if req.input_charged else cfg.w_in * req.input_tokens
        return (charge + cfg.w_out * self.remaining_tokens(req)) / self._weight(req.tenant)

    def _dispatch(self, entry: _Entry, state: _PoolState, need: int) -> Dispatch:
        req = entry.req
        self._remove(entry)
        if self.config.fair and self.config.cost_order:
            self._note_dispatched_work(req.tenant, entry.work)
        cfg = self.config
        charge = 0.0
        if not req.input_charged:
            req.prepaid_output = self._charging.prepay(req)
            charge = cfg.w_in * req.input_tokens + cfg.w_out * req.prepaid_output
            self.served[req.tenant] = self.served.get(req.tenant, 0.0) + cfg.w_in * req.input_tokens
            req.input_charged = True
        charge /= self._weight(req.tenant)
        self.counters[req.tenant] = self.counters.get(req.tenant, 0.0) + charge
        self._inflight[req.request_id] = req
        if req.background:
            self._background_inflight[req.request_id] = None
        req.pool = state.view.name
        state.free_slots -= 1
        state.free_kv -= need
        state.running += 1
        if state.anchor is None:
            state.anchor = max(self.remaining_tokens(req), 1.0)
        return Dispatch(req.request_id, state.view.name, charge, kv_tokens=need, request=req)
