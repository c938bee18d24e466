"""Every Prometheus metric of every service, named once.

Names follow vLLM where they mean the same thing (``vllm:*``, with a ``model_name``
label), so existing dashboards and alerts read them; what is Fairway's own is
``fairway:*``. Counters are exposed with the ``_total`` suffix.

Where each service serves them:

=============  ============================================================
gateway        ``GET /metrics`` on its HTTP port (``FAIRWAY_PORT``, 8000)
scheduler      ``FAIRWAY_METRICS_PORT``, default 9101
scorer         ``FAIRWAY_METRICS_PORT``, default 9102
cpu-worker     ``FAIRWAY_METRICS_PORT``, default 9103 (``fairway up`` gives the
               n-th one 9103 + 10 n)
gpu-worker     ``FAIRWAY_METRICS_PORT``, default 9104 (likewise + 10 n)
=============  ============================================================

``FAIRWAY_METRICS_PORT=0`` turns a service's endpoint off. A port that is taken is
logged and skipped, never fatal.

Non-gateway metrics live on one registry per process (:data:`REGISTRY`), so a service
defines them at import and they exist once however many service objects a test makes.
State that lives in memory (the scheduler's queues and counters, an engine's running
requests) is exposed through a snapshot the service refreshes from its event loop, so
the HTTP thread never reads a structure the loop is changing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from services.logs import get_logger

log = get_logger(__name__)

MODEL = "model_name"

# --- names (vLLM's where they mean the same) ----------------------------------------

TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
PROMPT_TOKENS = "vllm:prompt_tokens"
GENERATION_TOKENS = "vllm:generation_tokens"
REQUEST_SUCCESS = "vllm:request_success"
NUM_PREEMPTIONS = "vllm:num_preemptions"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
TIME_PER_OUTPUT_TOKEN = "vllm:request_time_per_output_token_seconds"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"

TENANT_SERVED_TOKENS = "fairway:tenant_served_tokens"
TENANT_TIME_TO_FIRST_TOKEN = "fairway:tenant_time_to_first_token_seconds"
TENANT_E2E_REQUEST_LATENCY = "fairway:tenant_e2e_request_latency_seconds"
TENANT_QUEUE_TIME = "fairway:tenant_queue_time_seconds"
TENANT_VIRTUAL_COUNTER = "fairway:tenant_virtual_token_counter"
QUEUE_DEPTH = "fairway:queue_depth"
POOL_INFLIGHT = "fairway:pool_requests_inflight"
PLACEMENTS = "fairway:placements"
PREEMPTIONS = "fairway:preemptions"
REQUESTS_EXPIRED = "fairway:requests_expired"
PREDICTED_OUTPUT_TOKENS = "fairway:predicted_output_tokens"
ACTUAL_OUTPUT_TOKENS = "fairway:actual_output_tokens"
OUTPUT_LENGTH_RATIO = "fairway:output_length_actual_over_predicted"
DEAD_LETTERED = "fairway:messages_dead_lettered"
HANDLER_RETRIES = "fairway:message_handler_retries"
HANDED_BACK = "fairway:worker_requests_handed_back"
RESUMED = "fairway:worker_requests_resumed"
GATEWAY_REJECTED = "fairway:gateway_requests_rejected"
GATEWAY_CANCELLED = "fairway:gateway_requests_cancelled"
GATEWAY_REAPED = "fairway:dead_gateway_requests_cancelled"
GATEWAY_IN_FLIGHT = "fairway:gateway_requests_in_flight"
GATEWAY_BROKER_OUTAGE = "fairway:gateway_broker_outage_streams"
GATEWAY_BATCH_REQUESTS = "fairway:gateway_batch_requests"
GATEWAY_BACKGROUND_RESPONSES = "fairway:gateway_background_responses"
TENANTS_FILE_RELOADS = "fairway:tenants_file_reloads"
TENANT_RATE_LIMITED = "fairway:tenant_rate_limited_requests"

# vLLM's buckets for the two latency histograms.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""vLLM's buckets for time per output token."""
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)

def token_count_buckets(max_model_len: int) -> list[int]:
    """vLLM's buckets for per-request token counts: 1, 2, 5, 10, 20, 50, ... up to the
    context length."""
    buckets, mantissas, exponent = [], (1, 2, 5), 0
    while True:
        for m in mantissas:
            value = m * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


DEFAULT_PORTS = {"scheduler": 9101, "scorer": 9102, "cpu-worker": 9103, "gpu-worker": 9104}
WORKER_PORT_STRIDE = 10

# --- the per-process registry of the non-gateway services ---------------------------

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

dead_lettered = Counter(
    DEAD_LETTERED, "Messages rejected without requeue (so dead-lettered), by queue and reason.",
    ["queue", "reason"], registry=REGISTRY,
)

handler_retries = Counter(
    HANDLER_RETRIES, "Message handlers run again because Redis could not serve them (down, "
    "timing out, read-only or out of memory), by queue; they cost no delivery.",
    ["queue"], registry=REGISTRY,
)

# scheduler
placements = Counter(PLACEMENTS, "Requests dispatched, by worker pool (gpu or cpu).", ["pool"],
                     registry=REGISTRY)
preemptions = Counter(
    PREEMPTIONS, "Running requests a worker handed back to the queue, by pool.", ["pool"],
    registry=REGISTRY,
)
tenant_queue_time = Histogram(
    TENANT_QUEUE_TIME, "Time from a request's arrival at the scheduler to its dispatch to a "
    "worker, by tenant (a request handed back once it has output is not counted again).",
    ["tenant"], buckets=TTFT_BUCKETS, registry=REGISTRY,
)
tenants_file_reloads = Counter(
    TENANTS_FILE_RELOADS, "Times the scheduler read the changed API keys file again (its tenant "
    "weights), by outcome: ok, or failed (it did not parse; the weights read before stay).",
    ["outcome"], registry=REGISTRY,
)
requests_expired = Counter(
    REQUESTS_EXPIRED, "Queued requests the scheduler answered with an error instead of running.",
    ["reason"], registry=REGISTRY,
)

# scorer
predicted_output_tokens = Histogram(
    PREDICTED_OUTPUT_TOKENS, "Predicted output length (p50) of finished requests.", [MODEL],
    buckets=LENGTH_BUCKETS, registry=REGISTRY,
)
actual_output_tokens = Histogram(
    ACTUAL_OUTPUT_TOKENS, "Actual output length of finished requests.", [MODEL],
    buckets=LENGTH_BUCKETS, registry=REGISTRY,
)
output_length_ratio = Histogram(
    OUTPUT_LENGTH_RATIO, "Actual over predicted (p50) output length of finished requests.",
    [MODEL], buckets=RATIO_BUCKETS, registry=REGISTRY,
)

# workers
worker_prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens of requests this worker finished.",
                               [MODEL], registry=REGISTRY)
worker_generation_tokens = Counter(
    GENERATION_TOKENS, "Tokens this worker generated for finished requests.", [MODEL],
    registry=REGISTRY,
)
worker_handed_back = Counter(
    HANDED_BACK, "Running requests this worker handed back to its queue (still running when its "
    "drain ended, or a reply it could not publish).", [MODEL], registry=REGISTRY,
)
worker_resumed = Counter(
    RESUMED, "Handed-back requests this worker continued from the output their caller had, "
    "instead of regenerating it.", [MODEL], registry=REGISTRY,
)
worker_request_success = Counter(
    REQUEST_SUCCESS, "Requests this worker finished, by finish reason.", [MODEL, "finished_reason"],
    registry=REGISTRY,
)


def observe_length(model: str, predicted: float, actual: int) -> None:
    predicted_output_tokens.labels(model).observe(predicted)
    actual_output_tokens.labels(model).observe(actual)
    output_length_ratio.labels(model).observe(actual / max(predicted, 1.0))


def observe_worker_finish(model: str, reason: str, prompt_tokens: int, output_tokens: int) -> None:
    worker_prompt_tokens.labels(model).inc(prompt_tokens)
    worker_generation_tokens.labels(model).inc(output_tokens)
    worker_request_success.labels(model, reason).inc()


# --- state snapshots ----------------------------------------------------------------


class SnapshotCollector(Collector):
    """Yields the metric families of the latest snapshot a service published.

    ``publish`` is called on the service's event loop with plain values; a scrape (on
    the HTTP server's thread) only reads the last published object, replaced whole.
    """

    def __init__(self, build: Callable[[dict], Iterable[Metric]]) -> None:
        self.build = build
        self.snapshot: dict | None = None

    def publish(self, snapshot: dict) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return []
        return list(self.build(snapshot))


def _scheduler_families(s: dict) -> Iterable[Metric]:
    served = CounterMetricFamily(TENANT_SERVED_TOKENS,
                                 "Tokens served per tenant (input + output, unweighted), "
                                 "from the scheduler's durable counters.", labels=["tenant"])
    vtc = GaugeMetricFamily(TENANT_VIRTUAL_COUNTER,
                            "VTC virtual token counter per tenant (weighted service).",
                            labels=["tenant"])
    for tenant, value in sorted(s["served"].items()):
        served.add_metric([tenant], value)
    for tenant, value in sorted(s["counters"].items()):
        vtc.add_metric([tenant], value)
    depth = GaugeMetricFamily(QUEUE_DEPTH, "Requests queued in the scheduler, per tenant.",
                              labels=["tenant"])
    for tenant, n in sorted(s["queued"].items()):
        depth.add_metric([tenant], n)
    inflight = GaugeMetricFamily(POOL_INFLIGHT,
                                 "Requests dispatched to a worker pool and not finished yet.",
                                 labels=["pool"])
    for pool, n in sorted(s["inflight"].items()):
        inflight.add_metric([pool], n)
    waiting = GaugeMetricFamily(NUM_REQUESTS_WAITING,
                                "Requests waiting in the scheduler's queues (all tenants).",
                                labels=[MODEL])
    waiting.add_metric([s["model"]], sum(s["queued"].values()))
    return [served, vtc, depth, inflight, waiting]


def _worker_families(s: dict) -> Iterable[Metric]:
    labels = [s["model"]]
    out = []
    for name, doc, key in (
        (NUM_REQUESTS_RUNNING, "Requests running in this worker's engine.", "running"),
        (NUM_REQUESTS_WAITING, "Requests waiting in this worker's engine.", "waiting"),
        (KV_CACHE_USAGE, "Fraction of the KV cache in use (1 = full).", "kv_usage"),
    ):
        family = GaugeMetricFamily(name, doc, labels=[MODEL])
        family.add_metric(labels, s[key])
        out.append(family)
    for name, doc, key in (
        (NUM_PREEMPTIONS, "Engine preemptions since the worker started.", "preemptions"),
        (PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
        (PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ):
        counter = CounterMetricFamily(name, doc, labels=[MODEL])
        counter.add_metric(labels, s.get(key, 0))
        out.append(counter)
    return out


scheduler_state = SnapshotCollector(_scheduler_families)
worker_state = SnapshotCollector(_worker_families)
REGISTRY.register(scheduler_state)
REGISTRY.register(worker_state)


# --- serving ------------------------------------------------------------------------


def metrics_port(service: str, configured: int | None) -> int:
    """The port a service serves /metrics on (0: none)."""
    if configured is not None:
        return configured
    return DEFAULT_PORTS.get(service, 0)


def serve(service: str, configured: int | None, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint of a non-gateway service; returns the port (0: none)."""
    port = metrics_port(service, configured)
    if not port:
        return 0
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.warning("metrics_port_unavailable", service=service, port=port, error=str(exc))
        return 0
    log.info("metrics_serving", service=service, port=port)
    return port
