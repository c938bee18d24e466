"""Reading a request's body: its size limit (413, also for chunked uploads) and a client
that goes away meanwhile."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from services.gateway.errors import ApiError, invalid


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was complete."""


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body exceeds {limit} bytes.",
        reason="too_large",
        code="request_too_large",
    )


def check_content_length(content_length: str | None, limit: int) -> None:
    if content_length is None:
        return
    text = content_length.strip()
    if not text.isascii() or not text.isdigit():
        raise invalid("Invalid Content-Length header.")
    if int(text) > limit:
        raise body_too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 beyond, also for chunked uploads)."""
    check_content_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)
