"""A streamed request that waits long for its first reply gets its headers and SSE
keep-alive comments meanwhile, with a fake backend whose replies come late."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from services import messages as m
from services.gateway.app import KEEPALIVE, create_app
from services.settings import Settings
from services.tenants import NO_LIMITS, RateLimits

KEY = "key-acme"


class LateStream:
    """A submission's replies: the first after ``delay_s``."""

    waiting = False
    final = None
    first_token_at = None

    def __init__(self, replies: list, delay_s: float) -> None:
        self.replies, self.delay_s = replies, delay_s

    async def next(self):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
            self.delay_s = 0
        reply = self.replies.pop(0)
        if isinstance(reply, m.FinalAnswer):
            self.final = reply
        return reply


class LateSubmission:
    closed = True  # nothing to release
    rate = None

    def __init__(self, request: m.CompletionRequest, stream: LateStream) -> None:
        self.request, self.stream = request, stream


def answered(request_id: str) -> list:
    return [m.TokenChunk(request_id=request_id, token_offset=0, text_offset=0, text="hello", token_ids=[1]),
            m.FinalAnswer(request_id=request_id, token_offset=1, text_offset=5, finish_reason="stop",
                          prompt_tokens=1, completion_tokens=1)]


def failed(request_id: str) -> list:
    return [m.FinalAnswer(request_id=request_id, token_offset=0, text_offset=0, finish_reason="error",
                          error=m.ErrorInfo(message="the prompt is too long", code="context_length_exceeded"))]


def gateway(replies, delay_s: float, keepalive_s: float, timeout_s: float = 30.0) -> httpx.AsyncClient:
    settings = Settings(model_name="tiny", api_keys=f"acme:{KEY}", redis_url="redis://127.0.0.1:1/0",
                        stream_keepalive_s=keepalive_s, request_timeout_s=timeout_s)
    app = create_app(settings)  # the lifespan (AMQP) never starts

    async def submit_all(requests: list[m.CompletionRequest], arrived_at: float,
                         limits: RateLimits = NO_LIMITS) -> list[LateSubmission]:
        return [LateSubmission(r, LateStream(replies(r.request_id), delay_s)) for r in requests]

    app.state.gateway.backend.submit_all = submit_all
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                             headers={"Authorization": f"Bearer {KEY}"})


BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "stream": True}


async def lines_of(client: httpx.AsyncClient, path: str = "/v1/completions", body: dict = BODY):
    async with client.stream("POST", path, json=body) as response:
        return response.status_code, [line async for line in response.aiter_lines() if line]


async def test_a_late_first_reply_is_preceded_by_keep_alives():
    status, lines = await lines_of(gateway(answered, delay_s=0.35, keepalive_s=0.1))
    assert status == 200
    comments = [line for line in lines if line.startswith(":")]
    assert 2 <= len(comments) <= 4 and all(line == KEEPALIVE.decode().strip() for line in comments)
    data = [line for line in lines if line.startswith("data: ")]
    assert json.loads(data[0][6:])["choices"][0]["text"] == "hello" and data[-1] == "data: [DONE]"
    assert lines.index(data[0]) > lines.index(comments[-1])  # every comment came first


async def test_a_prompt_reply_sends_none_and_an_early_error_keeps_its_status():
    status, lines = await lines_of(gateway(answered, delay_s=0.0, keepalive_s=0.1))
    assert status == 200 and not any(line.startswith(":") for line in lines)
    refused = await gateway(failed, delay_s=0.0, keepalive_s=0.1).post("/v1/completions", json=BODY)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


async def test_an_error_after_the_headers_is_the_streams_error_event():
    status, lines = await lines_of(gateway(failed, delay_s=0.25, keepalive_s=0.1))
    assert status == 200 and lines[0].startswith(":")
    [error] = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert error["error"]["code"] == "context_length_exceeded"


async def test_a_request_that_never_starts_ends_with_a_timeout_event():
    status, lines = await lines_of(gateway(answered, delay_s=5.0, keepalive_s=0.1, timeout_s=0.35))
    assert status == 200
    [error] = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert error["error"]["code"] == "timeout"


async def test_a_chat_and_a_response_stream_keep_alive_too():
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    status, lines = await lines_of(gateway(answered, 0.25, 0.1), "/v1/chat/completions", chat)
    assert status == 200 and lines[0].startswith(":") and lines[-1] == "data: [DONE]"
    response = {"model": "tiny", "input": "hi", "max_output_tokens": 16, "stream": True, "store": False}
    status, lines = await lines_of(gateway(answered, 0.25, 0.1), "/v1/responses", response)
    assert status == 200 and lines[0].startswith(":")
    assert lines[-1].startswith("data: ") and json.loads(lines[-1][6:])["type"] == "response.completed"


@pytest.mark.parametrize("delay_s", [0.0, 0.3])
async def test_openais_client_reads_through_the_comments(delay_s):
    http = gateway(answered, delay_s, keepalive_s=0.1)
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=KEY, http_client=http, max_retries=0)
    chunks = [chunk async for chunk in await client.completions.create(
        model="tiny", prompt="hi", max_tokens=1, stream=True)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello"
