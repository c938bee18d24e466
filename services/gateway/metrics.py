"""Prometheus metrics of the gateway, named as vLLM names them where they mean the same.

Each :class:`GatewayMetrics` owns its registry, so several apps (tests) can coexist.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.gateway.replies import TimedReplies

# vLLM's buckets for these two histograms.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from request arrival at the gateway to its first token.",
            ["model_name"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from request arrival at the gateway to its final answer.",
            ["model_name"], buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of finished requests.", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Generated tokens of finished requests.",
            ["model_name"],
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Requests that finished normally, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "fairway:gateway_requests_rejected",
            "Requests answered with an error, by reason.",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "fairway:gateway_requests_cancelled",
            "Accepted requests cancelled downstream before their final answer (client gone, timeout).",
            registry=r,
        )
        self.in_flight = Gauge(
            "fairway:gateway_requests_in_flight",
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
