"""OpenAI error objects: one exception type that carries status, body and metric reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

RETRY_AFTER_S = 1
"""Seconds a client is told to wait after a 429 or 503."""

_TYPE_BY_STATUS = {429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for a status: client errors are ``invalid_request_error``."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "server_error"


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status.

    ``reason`` labels ``fairway:gateway_requests_rejected_total``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope, for the OpenAPI spec."""

    error: ErrorObject


def documented_errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route for statuses answered with an OpenAI error object."""
    return {
        status: {"description": description, "model": ErrorResponse}
        for status, description in descriptions.items()
    }


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: error messages may echo client text with lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(err: ApiError) -> JSONResponse:
    return AsciiJSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- common errors -------------------------------------------------------------------


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, reason="invalid_request", param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        reason="unauthorized",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist.",
        reason="model_not_found",
        param="model",
        code="model_not_found",
    )


def too_many_in_flight(limit: int) -> ApiError:
    return ApiError(
        429,
        f"Too many requests in flight for this API key (limit {limit}); retry later.",
        reason="tenant_limit",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def token_budget_exceeded(limit: int) -> ApiError:
    return ApiError(
        429,
        f"Too many tokens in flight for this API key (budget {limit} tokens of max_tokens "
        "plus prompt); retry later.",
        reason="tenant_token_limit",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def overloaded() -> ApiError:
    return ApiError(
        503,
        "The server is overloaded (its queues are full); retry later.",
        reason="overloaded",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unavailable(message: str, reason: str = "unavailable") -> ApiError:
    return ApiError(
        503,
        message,
        reason=reason,
        code="service_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@contextlib.asynccontextmanager
async def redis_or_503(message: str, timeout_s: float) -> AsyncIterator[None]:
    """Redis calls that a client's answer waits for: an error, or no answer within
    ``timeout_s``, is a 503 saying ``message`` (an :class:`ApiError` raised inside goes
    through as it is)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError, TimeoutError):
        raise unavailable(message) from None


def no_spare_capacity(timeout_s: float) -> ApiError:
    """A background request (``service_tier: "flex"``, a batch's) that nothing started
    within the timeout: OpenAI answers flex requests short of capacity with 429
    ``resource_unavailable``, to be tried again (a batch does so itself)."""
    return ApiError(
        429,
        f"No spare capacity started this background request within {timeout_s:g} s; retry later.",
        reason="no_spare_capacity",
        code="resource_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(
        504, f"The request did not finish within {timeout_s:g} s.", reason="timeout", code="timeout"
    )


def from_validation_error(exc: ValidationError | Any) -> ApiError:
    """First error of a pydantic/FastAPI validation error as a 400 with its field path."""
    errors = exc.errors()
    if not errors:
        return invalid("Invalid request body.")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "Field required"
    text = f"{param}: {message}" if param else message
    if len(errors) > 1:
        text += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid(text, param=param)
