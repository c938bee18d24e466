"""Prometheus metrics of the gateway, named as vLLM names them where they mean the same.

Each :class:`GatewayMetrics` owns its registry, so several apps (tests) can coexist. The
names and buckets come from :mod:`services.metrics`, where every service's are defined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services import metrics as names
from services.gateway.replies import TimedReplies
from services.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, token_count_buckets

__all__ = ["E2E_BUCKETS", "TTFT_BUCKETS", "GatewayMetrics"]


class GatewayMetrics:
    def __init__(self, model_name: str, max_model_len: int = 2048) -> None:
        self.model_name = model_name
        self.on_answered: Callable[[str, float | None, float], None] = lambda tenant, ttft_s, e2e_s: None
        """Told of each request answered normally: its tenant, time to first token (None
        without tokens) and end to end, in seconds (the dashboard keeps them)."""
        self.registry = CollectorRegistry()
        r = self.registry
        def histogram(name: str, doc: str, buckets: Sequence[float], *labels: str) -> Histogram:
            return Histogram(name, doc, ["model_name", *labels], buckets=buckets, registry=r)

        arrival = "Time from request arrival at the gateway to its"
        self.ttft = histogram(names.TIME_TO_FIRST_TOKEN, f"{arrival} first token.", TTFT_BUCKETS)
        self.e2e = histogram(names.E2E_REQUEST_LATENCY, f"{arrival} final answer.", E2E_BUCKETS)
        self.tenant_ttft = histogram(names.TENANT_TIME_TO_FIRST_TOKEN, f"{arrival} first token, by tenant (not batch or flex requests).",
                                     TTFT_BUCKETS, "tenant")
        self.tenant_e2e = histogram(names.TENANT_E2E_REQUEST_LATENCY, f"{arrival} final answer, by tenant (not batch or flex requests).",
                                    E2E_BUCKETS, "tenant")
        self.time_per_output_token = histogram(
            names.TIME_PER_OUTPUT_TOKEN,
            "Time from a request's first token to its final answer, per token after the first.", TPOT_BUCKETS)
        counts = token_count_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            names.REQUEST_PROMPT_TOKENS, "Prompt tokens of each finished request.", counts)
        self.request_generation_tokens = histogram(
            names.REQUEST_GENERATION_TOKENS, "Generated tokens of each finished request.", counts)
        self.prompt_tokens = Counter(
            names.PROMPT_TOKENS, "Prompt tokens of finished requests.", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            names.GENERATION_TOKENS,
            "Generated tokens of finished requests.",
            ["model_name"],
            registry=r,
        )
        self.success = Counter(
            names.REQUEST_SUCCESS,
            "Requests that finished normally, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            names.GATEWAY_REJECTED,
            "Requests answered with an error, by reason.",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            names.GATEWAY_CANCELLED,
            "Accepted requests cancelled downstream before their final answer (client gone, timeout).",
            registry=r,
        )
        self.reaped = Counter(
            names.GATEWAY_REAPED,
            "Requests of dead gateways whose admission slots this gateway freed and whose "
            "work it cancelled downstream.",
            registry=r,
        )
        self.broker_outage = Counter(
            names.GATEWAY_BROKER_OUTAGE,
            "Streams open when the gateway's broker link dropped (outcome open), and those of them "
            "ended with an error: failed (the broker stayed away too long) or answer_lost (done "
            "without its answer, which the broker lost); the others went on.",
            ["outcome"],
            registry=r,
        )
        self.batch_requests = Counter(
            names.GATEWAY_BATCH_REQUESTS,
            "Batch requests this gateway ran, by outcome: completed (answered 200), failed "
            "(answered with an error, in the batch's error file) or retried (the tenant was at "
            "its admission limit or the system unavailable: tried again).",
            ["outcome"],
            registry=r,
        )
        self.background_responses = Counter(
            names.GATEWAY_BACKGROUND_RESPONSES,
            "Runs of background responses (Responses API, background true) this gateway made, by "
            "outcome: completed (answered, completed or incomplete), failed (answered with an "
            "error), cancelled (by its client while it ran), retried (the tenant was at its "
            "admission limit or the system unavailable: tried again) or handed_over (this gateway "
            "lost its lease or stopped: another runs it).",
            ["outcome"],
            registry=r,
        )
        self.rate_limited = Counter(
            names.TENANT_RATE_LIMITED,
            "Requests refused (429) for being past their tenant's rate limit, by tenant and by "
            "the limit that refused them: requests or tokens per minute.",
            ["tenant", "limit"],
            registry=r,
        )
        self.tenants_file_reloads = Counter(
            names.TENANTS_FILE_RELOADS,
            "Times this gateway read the changed API keys file again (keys, weights, rate limits), "
            "by outcome: ok, or failed (it did not parse, or gave a tenant the admin key; the keys "
            "read before stay).",
            ["outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            names.GATEWAY_IN_FLIGHT,
            "Accepted requests of this gateway without a final answer yet.",
            registry=r,
        )

    def observe_finished(self, stream: TimedReplies, tenant: str, background: bool = False) -> None:
        """Record latency and token counts of a request whose final answer was read (its
        tenant's latency too, which is how an operator sees whether each is served alike;
        not for a ``background`` one, a batch's or flex request, which waits for spare
        capacity by design and would hide how the tenant's interactive requests fare)."""
        final = stream.final
        if (
            final is None
            or final.error is not None
            or final.finish_reason not in ("stop", "length")
        ):
            return
        model = self.model_name
        first, last = stream.first_token_at, stream.final_at
        if first is not None:
            self.ttft.labels(model).observe(first - stream.opened_at)
            if not background:
                self.tenant_ttft.labels(model, tenant).observe(first - stream.opened_at)
        if last is not None:
            self.e2e.labels(model).observe(last - stream.opened_at)
            if not background:
                self.tenant_e2e.labels(model, tenant).observe(last - stream.opened_at)
                self.on_answered(tenant, None if first is None else first - stream.opened_at,
                                 last - stream.opened_at)
        if first is not None and last is not None and final.completion_tokens > 1:
            self.time_per_output_token.labels(model).observe((last - first) / (final.completion_tokens - 1))
        self.prompt_tokens.labels(model).inc(final.prompt_tokens)
        self.generation_tokens.labels(model).inc(final.completion_tokens)
        self.request_prompt_tokens.labels(model).observe(final.prompt_tokens)
        self.request_generation_tokens.labels(model).observe(final.completion_tokens)
        self.success.labels(model, final.finish_reason).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
