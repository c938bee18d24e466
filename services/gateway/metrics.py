"""Prometheus metrics of the gateway, named as vLLM names them where they mean the same.

Each :class:`GatewayMetrics` owns its registry, so several apps (tests) can coexist. The
names and buckets come from :mod:`services.metrics`, where every service's are defined.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services import metrics as names
from services.gateway.replies import TimedReplies
from services.metrics import E2E_BUCKETS, TTFT_BUCKETS

__all__ = ["E2E_BUCKETS", "TTFT_BUCKETS", "GatewayMetrics"]


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            names.TIME_TO_FIRST_TOKEN,
            "Time from request arrival at the gateway to its first token.",
            ["model_name"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            names.E2E_REQUEST_LATENCY,
            "Time from request arrival at the gateway to its final answer.",
            ["model_name"], buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
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
        self.in_flight = Gauge(
            names.GATEWAY_IN_FLIGHT,
            "Accepted requests of this gateway without a final answer yet.",
            registry=r,
        )

    def observe_finished(self, stream: TimedReplies) -> None:
        """Record latency and token counts of a request whose final answer was read."""
        final = stream.final
        if (
            final is None
            or final.error is not None
            or final.finish_reason not in ("stop", "length")
        ):
            return
        model = self.model_name
        if stream.first_token_at is not None:
            self.ttft.labels(model).observe(stream.first_token_at - stream.opened_at)
        if stream.final_at is not None:
            self.e2e.labels(model).observe(stream.final_at - stream.opened_at)
        self.prompt_tokens.labels(model).inc(final.prompt_tokens)
        self.generation_tokens.labels(model).inc(final.completion_tokens)
        self.success.labels(model, final.finish_reason).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
