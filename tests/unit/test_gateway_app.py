"""HTTP paths that end before any I/O (the app's lifespan is never started here)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import MAX_HEADER_BYTES, check_content_type, create_app, never_started
from services.gateway.errors import ApiError, timed_out
from services.localinfra import free_port
from services.settings import Settings

MODEL = "test-model"
KEY = {"Authorization": "Bearer key-a"}


@pytest.fixture
def client() -> TestClient:
    settings = Settings(
        model_name=MODEL, api_keys="acme:key-a,beta:key-b", max_body_bytes=2000, max_model_len=64
    )
    return TestClient(create_app(settings))  # no `with`: lifespan (AMQP, Redis) never starts


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-a"}]
)
def test_missing_or_bad_key_is_401(client: TestClient, path: str, headers: dict[str, str]) -> None:
    response = client.post(path, json={"model": MODEL, "prompt": "x"}, headers=headers)
    assert_openai_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_auth_comes_before_body_checks(client: TestClient) -> None:
    assert_openai_error(client.post("/v1/completions", content=b"{broken"), 401)


def test_models_need_a_key(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/models"), 401)
    listing = client.get("/v1/models", headers=KEY).json()
    assert [m["id"] for m in listing["data"]] == [MODEL] and listing["object"] == "list"
    assert client.get(f"/v1/models/{MODEL}", headers=KEY).json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/other/model", headers=KEY), 404, "model_not_found")


def test_gateway_serves_the_models_own_context_length_when_smaller(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    settings = Settings(model_name=MODEL, model_path=str(tmp_path), api_keys="acme:key-a")
    client = TestClient(create_app(settings))
    assert client.get("/v1/models", headers=KEY).json()["data"][0]["max_model_len"] == 512
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1000}
    error = assert_openai_error(client.post("/v1/completions", headers=KEY, json=body), 400)
    assert "context length (512)" in error["message"]


def test_body_over_limit_is_413_from_content_length(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b"x" * 2001, headers={**KEY, "content-type": "application/json"}
    )
    assert_openai_error(response, 413, "request_too_large")


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    response = client.post(
        "/v1/completions", content=chunks(), headers={**KEY, "content-type": "application/json"}
    )
    assert_openai_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_type_is_415(client: TestClient, content_type: str) -> None:
    response = client.post(
        "/v1/completions", content=b"{}", headers={**KEY, "content-type": content_type}
    )
    assert_openai_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "application/vnd.x+json"],
)
def test_json_content_types_are_accepted(content_type: str | None) -> None:
    check_content_type(content_type)


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/completions",
        content=b'{"model": ',
        headers={**KEY, "content-type": "application/json"},
    )
    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "test-model", "prompt": "x", "temperature": NaN}',
        b'{"model": "test-model", "prompt": "x", "max_tokens": 0}',
        b'{"model": "test-model", "prompt": "x", "max_tokens": 65}',
        b'{"model": "test-model", "messages": []}',
    ],
)
def test_invalid_fields_are_400(client: TestClient, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    assert_openai_error(
        client.post(path, content=body, headers={**KEY, "content-type": "application/json"}), 400
    )


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}, headers=KEY)
    assert_openai_error(response, 404, "model_not_found")


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404, "unknown_url")
    assert_openai_error(client.get("/v1/completions"), 405)


def test_valid_request_without_broker_is_503_with_request_id(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers=KEY,
    )
    assert_openai_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-request-id"].startswith("chatcmpl-")


def test_a_response_request_is_checked_as_the_chat_it_means(client: TestClient) -> None:
    """Bad Responses bodies are 400s naming the Responses field; a good one gets as far as
    the broker (503 here), with a response id."""
    for body, param in (
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 65}, "max_output_tokens"),
        ({"model": MODEL, "input": [{"role": "user", "content": 5}]}, "input.0.content"),
    ):
        assert assert_openai_error(client.post("/v1/responses", json=body, headers=KEY), 400)["param"] == param
    assert_openai_error(client.post("/v1/responses", json={"model": "other", "input": "hi"}, headers=KEY), 404)
    continued = {"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}
    assert_openai_error(client.post("/v1/responses", json=continued, headers=KEY), 503)  # no Redis here
    response = client.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=KEY)
    assert_openai_error(response, 503, "service_unavailable")
    assert response.headers["x-request-id"].startswith("resp_")


def test_tokenize_and_detokenize_are_checked_then_sent_as_requests(client: TestClient) -> None:
    """The bodies are read as vLLM's (a prompt, a chat, token ids); a bad one is a 400
    naming its field, a good one gets as far as the broker (503 here)."""
    from services.gateway.tokenization import read_detokenize, read_tokenize

    prompt, strs = read_tokenize(json.dumps({"model": MODEL, "prompt": "hi", "return_token_strs": True}).encode())
    assert (prompt.prompt, prompt.add_special_tokens, strs) == (["hi"], True, True)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat, strs = read_tokenize(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                           "tools": [tool], "add_generation_prompt": False}).encode())
    assert (chat.tool_choice, chat.add_generation_prompt, chat.add_special_tokens, strs) == (
        "none", False, False, False)
    assert read_detokenize(json.dumps({"model": MODEL, "tokens": [1, 2]}).encode()).prompt == [[1, 2]]
    for path, body, param in (
        ("/tokenize", {"model": MODEL}, "prompt"),
        ("/tokenize", {"model": MODEL, "messages": []}, "messages"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
        ("/detokenize", {"model": MODEL, "tokens": []}, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, "tokens.0"),
    ):
        assert assert_openai_error(client.post(path, json=body, headers=KEY), 400)["param"] == param
    assert_openai_error(client.post("/tokenize", json={"model": "other", "prompt": "x"}, headers=KEY), 404)
    assert_openai_error(client.post("/detokenize", json={"model": MODEL, "tokens": [1]}), 401)
    response = client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}, headers=KEY)
    assert_openai_error(response, 503, "service_unavailable")
    assert response.headers["x-request-id"].startswith("tokenize-")


def test_response_input_tokens_reads_a_responses_body(client: TestClient) -> None:
    """OpenAI's /v1/responses/input_tokens reads the body a response would have: a bad
    one is a 400 naming the Responses field, a good one gets as far as the broker."""
    from services.gateway.responses_api import ResponsesBody, input_tokens_chat

    body = ResponsesBody.model_validate({"model": MODEL, "input": "hi", "instructions": "Be brief",
                                         "max_output_tokens": 5000, "stream": True, "background": True})
    chat = input_tokens_chat(body)
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert (chat.max_tokens, chat.max_completion_tokens, chat.stream) == (1, None, None)
    path = "/v1/responses/input_tokens"
    for body, param in (({"model": MODEL}, "input"),
                        ({"model": MODEL, "input": "x", "text": {"format": {"type": "bad"}}}, "text.format.type"),
                        ({"model": MODEL, "input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"},
                         "conversation")):
        assert assert_openai_error(client.post(path, json=body, headers=KEY), 400)["param"] == param
    assert_openai_error(client.post(path, json={"model": "other", "input": "x"}, headers=KEY), 404)
    assert_openai_error(client.post(path, json={"model": MODEL, "input": "x"}), 401)
    assert_openai_error(client.post(path, json={"model": MODEL, "input": "x"}, headers=KEY), 503, "service_unavailable")


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    text = client.get("/metrics").text
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert 'fairway:gateway_requests_rejected_total{reason="unauthorized"} 1.0' in text


def test_openapi_documents_bodies_and_no_422(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, model in (
        ("/v1/completions", "CompletionBody"),
        ("/v1/chat/completions", "ChatCompletionBody"),
        ("/v1/responses", "ResponsesBody"),
    ):
        operation = spec["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert {"400", "401", "404", "413", "415", "429", "503"} <= set(operation["responses"])
    assert {"ChatMessageBody", "StreamOptions", "TextPart", "ErrorResponse"} <= set(schemas)
    text = str(spec)
    assert "'422'" not in text and "$defs" not in text


def test_oversized_headers_are_431(client: TestClient) -> None:
    headers = {"X-Padding": "x" * MAX_HEADER_BYTES}
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
    assert_openai_error(response, 431, "request_headers_too_large")
    assert_openai_error(client.get("/v1/models", headers={"X-Padding": "x" * 1000}), 401)


@pytest.mark.parametrize(
    "path",
    [
        "~fairway-no-such-user/adapter",  # Path.expanduser raised RuntimeError: was 500
        "a" * 300,  # ENAMETOOLONG from Path.exists: was 500
        "/adapters/\ud800",  # was stored, then every answer listing it failed (500)
        "/adapters/nul\x00",
    ],
)
def test_unusable_adapter_path_is_400(path: str) -> None:
    settings = Settings(
        model_name=MODEL,
        api_keys="acme:key-a",
        admin_key="admin-key",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: 503 if reached
    )
    response = TestClient(create_app(settings)).put(
        "/admin/adapters/acme-lora",
        content=json.dumps({"path": path, "owner": "acme"}),  # \ud800 escaped, as clients send it
        headers={"Authorization": "Bearer admin-key", "content-type": "application/json"},
    )
    assert assert_openai_error(response, 400)["param"] == "path"


def test_api_error_keeps_headers() -> None:
    err = ApiError(429, "slow down", reason="tenant_limit", headers={"Retry-After": "1"})
    assert err.body() == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }


def test_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, services.gateway.app; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )


SIGNALLED_WHILE_STARTING = """
import asyncio, os, signal, sys
import services.gateway.app as gateway_app
from services.logs import configure
from services.settings import Settings

configure("INFO", "json", service="gateway")

def freeze_heap_then_a_deploy_stops_us():  # in the window before uvicorn's own handlers
    os.kill(os.getpid(), signal.SIGTERM)

gateway_app.freeze_heap = freeze_heap_then_a_deploy_stops_us
settings = Settings(port=int(sys.argv[1]), api_keys="acme:key-a",
                    redis_url="redis://127.0.0.1:1/0", amqp_url="amqp://guest:guest@127.0.0.1:1/")
asyncio.run(gateway_app.serve(settings, grace_s=1))
print("stopped")
"""


def test_a_sigterm_while_the_gateway_starts_stops_it():
    """A SIGTERM that comes while the app is built (a deploy stopping a gateway that has
    just started) stops it, exit 0, instead of being swallowed and serving on."""
    run = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_STARTING, str(free_port())],
                         capture_output=True, text=True, timeout=60, check=False,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "stopped"
    assert "stop_requested_while_starting" in run.stderr


@pytest.mark.parametrize(("body", "param"), [
    ({"items": [{"role": "robot", "content": "x"}]}, "items.0.role"),
    ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
])
def test_a_bad_conversation_is_a_400_naming_the_field_before_any_store(client: TestClient, body, param) -> None:
    error = assert_openai_error(client.post("/v1/conversations", json=body, headers=KEY), 400)
    assert error["param"] == param
    assert_openai_error(client.post("/v1/conversations", content=b"{broken", headers=KEY), 400)
    assert_openai_error(client.post("/v1/conversations", content=b"x" * 3000, headers=KEY), 413)
    assert_openai_error(client.post("/v1/conversations/conv_1/items", json={"items": []}, headers=KEY), 400)
    assert_openai_error(client.get("/v1/conversations/conv_1"), 401)


def _submission(background: bool, replied: bool = False) -> SimpleNamespace:
    stream = SimpleNamespace(first_token_at=1.0 if replied else None, final=None)
    return SimpleNamespace(request=SimpleNamespace(background=background), stream=stream)


def test_a_background_request_nothing_started_in_time_is_a_429_to_retry_not_a_504() -> None:
    """As OpenAI answers flex requests short of capacity (and a batch tries it again)."""
    timeout = timed_out(60)
    err = never_started(timeout, [_submission(True), _submission(True)], 60)
    assert (err.status, err.code, err.headers["Retry-After"]) == (429, "resource_unavailable", "1")
    # One that had started, or an interactive request, did time out; other errors stay.
    assert never_started(timeout, [_submission(True), _submission(True, replied=True)], 60) is timeout
    assert never_started(timeout, [_submission(False)], 60) is timeout
    other = ApiError(400, "bad", reason="invalid_request")
    assert never_started(other, [_submission(True)], 60) is other


def test_a_bad_background_response_is_a_400_before_it_is_queued(client: TestClient) -> None:
    """What cannot run in the background is refused at once, naming the field; a good one
    gets as far as Redis (503 here); cancelling needs a key."""
    for body, param, words in (
        ({"background": True, "store": False}, "background", "needs store"),
        ({"background": True, "max_output_tokens": 65}, "max_output_tokens", ""),
    ):
        response = client.post("/v1/responses", json={"model": MODEL, "input": "hi", **body}, headers=KEY)
        error = assert_openai_error(response, 400)
        assert error["param"] == param and words in error["message"]
    other = client.post("/v1/responses", json={"model": "other", "input": "hi", "background": True}, headers=KEY)
    assert_openai_error(other, 404, "model_not_found")
    response = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True}, headers=KEY)
    assert_openai_error(response, 503, "service_unavailable")
    assert response.headers["x-request-id"].startswith("resp_")
    streamed = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True,
                                                  "stream": True}, headers=KEY)
    assert_openai_error(streamed, 503, "service_unavailable")
    assert_openai_error(client.get("/v1/responses/resp_1?stream=true&starting_after=-2", headers=KEY), 400)
    assert_openai_error(client.post("/v1/responses/resp_1/cancel"), 401)
    assert_openai_error(client.post("/v1/responses/resp_1/cancel", headers=KEY), 503)


def test_a_server_that_stores_no_responses_runs_none_in_the_background() -> None:
    settings = Settings(model_name=MODEL, api_keys="acme:key-a", responses_ttl_s=0)
    client = TestClient(create_app(settings))
    response = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True}, headers=KEY)
    error = assert_openai_error(response, 400, "unsupported")
    assert error["param"] == "background" and "stores no responses" in error["message"]
