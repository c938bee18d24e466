"""The gateway's view of a reply stream: ordered replies (services.replies) plus read times."""

from __future__ import annotations

from structlog.testing import capture_logs

from services.gateway.backend import log_finished
from services.gateway.metrics import GatewayMetrics
from services.gateway.replies import TimedReplies
from services.messages import CompletionRequest, ErrorInfo, FinalAnswer, SamplingParams, TokenChunk
from services.replies import ReplyStream


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tok(i: int) -> TokenChunk:
    """Output token ``i``, whose text is ``<i>`` (single digits: three characters each)."""
    return TokenChunk(request_id="r", token_offset=i, text_offset=3 * i, text=f"<{i}>", token_ids=[i])


def final(tokens: int, reason: str = "length", **fields) -> FinalAnswer:
    return FinalAnswer(request_id="r", token_offset=tokens, text_offset=3 * tokens,
                       finish_reason=reason, **fields)


async def test_read_times_of_first_token_and_final() -> None:
    clock = FakeClock()
    stream = ReplyStream("r")
    replies = TimedReplies(stream, opened_at=99.0, clock=clock)
    for reply in (tok(0), tok(0), tok(1), final(2, prompt_tokens=5, completion_tokens=2)):
        stream.offer(reply)
    assert replies.arrived and replies.final is None

    clock.now = 100.5
    assert (await replies.next()).token_offset == 0
    clock.now = 101.0
    assert (await replies.next()).token_offset == 1  # the repeated token 0 was dropped
    clock.now = 102.0
    last = await replies.next()
    assert isinstance(last, FinalAnswer)
    assert (replies.first_token_at, replies.final_at, replies.final) == (100.5, 102.0, last)


def test_metrics_from_a_finished_stream() -> None:
    metrics = GatewayMetrics("m")
    replies = TimedReplies(ReplyStream("r"), opened_at=10.0)
    replies.first_token_at, replies.final_at = 10.25, 12.0
    replies.final = final(3, "stop", prompt_tokens=5, completion_tokens=3)
    metrics.observe_finished(replies, "acme")
    errored = TimedReplies(ReplyStream("e"), opened_at=0.0)
    errored.final = final(0, "error")
    metrics.observe_finished(errored, "acme")  # not a success: nothing recorded

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model_name": "m", **labels})

    assert value("vllm:time_to_first_token_seconds_sum") == 0.25
    assert value("vllm:e2e_request_latency_seconds_sum") == 2.0
    assert value("vllm:e2e_request_latency_seconds_count") == 1.0
    assert value("vllm:prompt_tokens_total") == 5.0
    assert value("vllm:generation_tokens_total") == 3.0
    assert value("vllm:request_success_total", finished_reason="stop") == 1.0
    assert value("vllm:request_success_total", finished_reason="error") is None
    # Per tenant, so an operator sees whether each is served alike.
    assert value("fairway:tenant_time_to_first_token_seconds_sum", tenant="acme") == 0.25
    assert value("fairway:tenant_e2e_request_latency_seconds_count", tenant="acme") == 1.0
    assert value("fairway:tenant_e2e_request_latency_seconds_count", tenant="globex") is None
    # 1.75 s after the first token for the two tokens after it.
    assert value("vllm:request_time_per_output_token_seconds_sum") == 0.875
    assert value("vllm:request_prompt_tokens_bucket", le="5.0") == 1.0
    assert value("vllm:request_prompt_tokens_bucket", le="2.0") == 0.0
    assert value("vllm:request_generation_tokens_sum") == 3.0
    # A batch's or flex request counts for the model, not in its tenant's latency.
    answered: list[str] = []
    metrics.on_answered = lambda tenant, ttft, e2e: answered.append(tenant)
    metrics.observe_finished(replies, "acme", background=True)
    assert value("vllm:e2e_request_latency_seconds_count") == 2.0
    assert value("fairway:tenant_e2e_request_latency_seconds_count", tenant="acme") == 1.0
    assert answered == []


def test_token_count_buckets_are_vllms_1_2_5_up_to_the_context() -> None:
    from services.metrics import token_count_buckets

    assert token_count_buckets(1024) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert token_count_buckets(1) == [1]


def test_each_answered_request_is_logged_once_with_its_outcome_and_times() -> None:
    request = CompletionRequest(request_id="r", tenant="acme", model="m", kind="completion",
                                sampling=SamplingParams(max_tokens=3), created=0.0, reply_to="q")
    done = TimedReplies(ReplyStream("r"), opened_at=10.0)
    done.first_token_at, done.final_at = 10.25, 12.0
    done.final = final(3, "stop", prompt_tokens=5, completion_tokens=3)
    refused = TimedReplies(ReplyStream("r"), opened_at=0.0)
    refused.final_at = 0.0125
    refused.final = final(0, "error", error=ErrorInfo("too long", code="context_length_exceeded"))
    with capture_logs() as logs:
        log_finished(request, done)
        log_finished(request, refused)
        log_finished(request, TimedReplies(ReplyStream("r"), opened_at=0.0))  # no answer: no line
    assert [entry.pop("log_level") for entry in logs] == ["info", "info"]
    assert logs == [
        {"event": "request_finished", "request_id": "r", "tenant": "acme", "finish_reason": "stop",
         "prompt_tokens": 5, "completion_tokens": 3, "ttft_ms": 250.0, "e2e_ms": 2000.0},
        {"event": "request_finished", "request_id": "r", "tenant": "acme", "finish_reason": "error",
         "prompt_tokens": 0, "completion_tokens": 0, "ttft_ms": None, "e2e_ms": 12.5,
         "error_code": "context_length_exceeded", "status": 400},
    ]
