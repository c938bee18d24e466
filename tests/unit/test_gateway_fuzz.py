"""Hostile input: fuzzing against the gateway's own OpenAPI spec, and oversized headers.

Schemathesis sends every documented operation generated requests (valid and invalid
bodies, path parameters, headers), mostly with a valid key (the tenant's, or the admin
key on admin routes) and some without one. No answer may be a server error. Neither the
broker nor Redis is reachable (their URLs point at closed ports and the app's lifespan
never starts), so a valid completion is answered 503 by design: a 503 passes only as an
OpenAI error object, and ``/ready``'s as its documented not-ready report. Answers must
also match the spec: documented status, content type and schema.

Oversized headers go to the real server (``fairway gateway`` under uvicorn).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.gateway.app import MAX_HEAD_READ_BYTES, create_app
from services.localinfra import free_port, wait_for_port
from services.settings import Settings

MODEL = "test-model"
TENANT_KEY = "key-a"
ADMIN_KEY = "admin-key"
ADMIN_PATHS = ("/admin/", "/dashboard/")


def _closed_ports() -> dict[str, str]:
    """Broker and Redis URLs where nothing listens."""
    return {
        "amqp_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
    }


APP = create_app(
    Settings(
        model_name=MODEL,
        api_keys=f"acme:{TENANT_KEY},beta:key-b",
        admin_key=ADMIN_KEY,
        **_closed_ports(),
    )
)


async def _without_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # refused before any message: "no lifespan support"
        raise RuntimeError("no lifespan in unit tests: no broker, no Redis")
    await APP(scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan)


def _error_object(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "code" in error
    )


def _not_ready(body: Any) -> bool:
    return isinstance(body, dict) and body.get("status") == "not_ready" and "checks" in body


def no_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Any
) -> None:
    """No 5xx, except a 503 that says why: an OpenAI error object (or /ready's report)."""
    status = response.status_code
    if status < 500:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    allowed = _not_ready(body) if case.operation.path == "/ready" else _error_object(body)
    assert status == 503 and allowed, f"server error {status}: {response.text[:500]!r}"


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _key(path: str) -> str:
    return ADMIN_KEY if path.startswith(ADMIN_PATHS) else TENANT_KEY


ADAPTER = "fuzz-adapter"
MODES = ("no-key", "key", "served", "adapter")
"""Per case: no key; a key and the data as generated; a key, ``model`` the served model
and ``name`` a valid adapter name (generated names are nearly all 404s or 400s, so the
checks past them would go untested); a key and ``model`` an adapter of the served model,
whose lookup needs Redis."""


def _steer(case: schemathesis.Case, mode: str) -> dict[str, str]:
    """Point the case at names the gateway knows, as ``mode`` says; the headers to send."""
    if mode == "no-key":
        return {}
    if mode != "key":
        model = MODEL if mode == "served" else f"{MODEL}:{ADAPTER}"
        for fields in (case.body, case.path_parameters):
            if isinstance(fields, dict):
                fields.update(
                    {k: v for k, v in (("model", model), ("name", ADAPTER)) if k in fields}
                )
    return {"Authorization": f"Bearer {_key(case.operation.path)}"}


@schema.parametrize()
@schema.given(mode=st.sampled_from(MODES))
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
def test_gateway_never_answers_5xx(case: schemathesis.Case, mode: str) -> None:
    headers = _steer(case, mode)
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS, headers=headers)


@pytest.mark.parametrize(
    "path", ["/metrics", "/dashboard", "/dashboard/app.js", "/dashboard/style.css", "/docs"]
)
def test_routes_outside_the_spec_answer(path: str) -> None:
    assert TestClient(APP).get(path).status_code == 200


# --- the real server ------------------------------------------------------------------


@pytest.fixture
def gateway_port(tmp_path: Path) -> Iterator[int]:
    """``fairway gateway`` on a free port, without broker or Redis; SIGTERM at the end."""
    port = free_port()
    urls = _closed_ports()
    env = {
        **os.environ,
        "FAIRWAY_HOST": "127.0.0.1",
        "FAIRWAY_PORT": str(port),
        "FAIRWAY_MODEL_NAME": MODEL,
        "FAIRWAY_API_KEYS": f"acme:{TENANT_KEY}",
        "FAIRWAY_AMQP_URL": urls["amqp_url"],
        "FAIRWAY_REDIS_URL": urls["redis_url"],
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway"],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(port, 60)
        except TimeoutError:
            pytest.fail(f"the gateway did not start:\n{log.read_text(errors='replace')[-3000:]}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status_of_head(port: int, header: bytes) -> int | None:
    """Status of a request with ``header`` sent raw; None if the server reset the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n" + header + b"\r\n\r\n")
            line = sock.recv(4096).split(b"\r\n", 1)[0]
        except ConnectionError:
            return None
    return int(line.split()[1]) if line else None


def test_oversized_headers_are_refused_by_the_server(gateway_port: int) -> None:
    url = f"http://127.0.0.1:{gateway_port}"
    for name in ("Authorization", "X-Padding"):
        value = "Bearer " + "k" * (64 * 1024)
        response = httpx.get(f"{url}/v1/models", headers={name: value}, timeout=10)
        assert response.status_code == 431, response.text
        assert response.json()["error"]["code"] == "request_headers_too_large"
        # A head far beyond the limit is cut off while it is read: 400 and closed, or a reset.
        huge = name.encode() + b": " + b"k" * (4 * MAX_HEAD_READ_BYTES)
        assert _status_of_head(gateway_port, huge) in (400, None)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
