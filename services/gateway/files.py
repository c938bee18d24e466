"""OpenAI's Files API, as far as batches need it: upload, list, read, delete.

Files live in Redis, one hash per file (``keys.stored_file``: its tenant and file object,
and its bytes), expiring ``files_ttl_s`` after they were made; a tenant sees only its
own (another's id reads as not found). ``purpose`` ``batch`` is what clients upload;
the batch runner writes ``batch_output`` files (a batch's answers and errors).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from services import keys
from services.gateway.auth import authenticate
from services.gateway.errors import ApiError, documented_errors, invalid, redis_or_503
from services.gateway.responses import cursor_page

UPLOAD_PURPOSES = ("batch",)
"""What a client may upload a file for (``batch``: a Batch API input file)."""
OUTPUT_PURPOSE = "batch_output"
REDIS_TIMEOUT_S = 10.0
MAX_LIST = 10_000


def file_not_found(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", reason="not_found", param="file_id",
                    code="file_not_found")


UNREACHABLE = "Files cannot be reached now (Redis is not reachable); retry later."


@dataclass(frozen=True, slots=True)
class StoredFile:
    tenant: str
    info: dict[str, Any]
    """The OpenAI file object."""


class FileStore:
    """Files in Redis, each readable by its own tenant only."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def create(self, tenant: str, filename: str, purpose: str, content: bytes,
                     file_id: str | None = None) -> dict[str, Any]:
        """Store a file; ``file_id`` names it (an output file is written again under the
        same id when a batch's finalization is retried, so it is never made twice)."""
        now = int(time.time())
        info = {"id": file_id or f"file-{uuid.uuid4().hex}", "object": "file", "bytes": len(content),
                "created_at": now, "expires_at": now + self.ttl_s, "filename": filename,
                "purpose": purpose, "status": "processed", "status_details": None}
        meta = json.dumps({"tenant": tenant, "file": info}, separators=(",", ":"))
        record = keys.stored_file(info["id"])
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping={"meta": meta, "content": content})
            pipe.expire(record, self.ttl_s)
            pipe.zadd(keys.tenant_files(tenant), {info["id"]: now})
            pipe.expire(keys.tenant_files(tenant), self.ttl_s)
            await pipe.execute()
        return info

    async def _meta(self, file_id: str) -> StoredFile | None:
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            raw = await self.redis.hget(keys.stored_file(file_id), "meta")
        if raw is None:
            return None
        data = json.loads(raw)
        return StoredFile(data["tenant"], data["file"])

    async def get(self, file_id: str, tenant: str) -> dict[str, Any]:
        stored = await self._meta(file_id)
        if stored is None or stored.tenant != tenant:
            raise file_not_found(file_id)
        return stored.info

    async def content(self, file_id: str, tenant: str) -> bytes:
        await self.get(file_id, tenant)
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            data = await self.redis.hget(keys.stored_file(file_id), "content")
        if data is None:  # expired between the two reads
            raise file_not_found(file_id)
        return data

    async def delete(self, file_id: str, tenant: str) -> None:
        await self.get(file_id, tenant)
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            await self.redis.delete(keys.stored_file(file_id))
            await self.redis.zrem(keys.tenant_files(tenant), file_id)

    async def listed(self, tenant: str, purpose: str | None = None) -> list[dict[str, Any]]:
        """The tenant's files, oldest first (ids of expired ones are forgotten)."""
        index = keys.tenant_files(tenant)
        async with redis_or_503(UNREACHABLE, REDIS_TIMEOUT_S):
            ids = [i.decode() for i in await self.redis.zrange(index, 0, -1)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hget(keys.stored_file(file_id), "meta")
                metas = await pipe.execute()
            gone = [i for i, meta in zip(ids, metas) if meta is None]
            if gone:
                await self.redis.zrem(index, *gone)
        files = [json.loads(meta)["file"] for meta in metas if meta is not None]
        return [f for f in files if purpose is None or f["purpose"] == purpose]


# --- routes ------------------------------------------------------------------------------


def _files(request: Request) -> tuple[FileStore, str]:
    """The store and the caller's tenant (401 without a valid key)."""
    state = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    request.state.tenant = tenant  # for the recent-errors log
    return state.files, tenant


async def upload_file(request: Request) -> Response:
    """``multipart/form-data`` with ``file`` and ``purpose``, as OpenAI's clients send it."""
    store, tenant = _files(request)
    limit = request.app.state.gateway.settings.max_file_bytes
    length = request.headers.get("content-length")
    if length is None or not length.strip().isdigit():
        raise ApiError(411, "Send the upload with a Content-Length header.", reason="length_required",
                       code="length_required")
    if int(length) > limit + 64 * 1024:  # the form's own bytes besides the file
        raise ApiError(413, f"The file exceeds {limit} bytes.", reason="too_large", code="file_too_large")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "Upload the file as multipart/form-data with the fields file and purpose.",
                       reason="unsupported_media_type", code="unsupported_media_type")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # noqa: BLE001 - a malformed form is the client's error
        raise invalid(f"The upload is not a valid multipart form: {exc}.") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}.", param="purpose")
        if not isinstance(upload, UploadFile):
            raise invalid("The form has no file field.", param="file")
        content = await upload.read(limit + 1)
        if len(content) > limit:
            raise ApiError(413, f"The file exceeds {limit} bytes.", reason="too_large",
                           code="file_too_large")
        filename = (upload.filename or "upload.jsonl")[:255]
    finally:
        await form.close()
    return JSONResponse(await store.create(tenant, filename, purpose, content))


async def list_files(request: Request, purpose: str | None = None,
                     limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST), after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> Response:
    store, tenant = _files(request)
    files = await store.listed(tenant, purpose)
    return JSONResponse(cursor_page(files[::-1] if order == "desc" else files, limit, after))


async def retrieve_file(request: Request, file_id: str) -> Response:
    store, tenant = _files(request)
    return JSONResponse(await store.get(file_id, tenant))


async def file_content(request: Request, file_id: str) -> Response:
    store, tenant = _files(request)
    return Response(await store.content(file_id, tenant), media_type="application/octet-stream")


async def delete_file(request: Request, file_id: str) -> Response:
    store, tenant = _files(request)
    await store.delete(file_id, tenant)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def install(app: FastAPI) -> None:
    """Add the file routes (``app.state.gateway.files`` holds the store)."""
    security = {"security": [{"bearerAuth": []}]}
    errors = {401: "Missing or invalid API key", 503: "Redis is not reachable"}
    found = {**errors, 404: "No such file (of this API key's tenant)"}
    form = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}}}
    app.add_api_route("/v1/files", upload_file, methods=["POST"], summary="Upload a file",
                      openapi_extra={**security, "requestBody": {"required": True, "content": form}},
                      responses=documented_errors({**errors, 400: "Invalid form or purpose",
                                                   411: "No Content-Length", 413: "The file is too large",
                                                   415: "Not a multipart form"}))
    app.add_api_route("/v1/files", list_files, methods=["GET"], summary="List files",
                      openapi_extra=security,
                      responses=documented_errors({**errors, 400: "Invalid query parameters"}))
    app.add_api_route("/v1/files/{file_id}", retrieve_file, methods=["GET"], summary="A file object",
                      openapi_extra=security, responses=documented_errors(found))
    app.add_api_route("/v1/files/{file_id}/content", file_content, methods=["GET"],
                      summary="A file's content", openapi_extra=security, response_class=Response,
                      responses={200: {"description": "The file's bytes", "content": {
                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                          **documented_errors(found)})
    app.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"], summary="Delete a file",
                      openapi_extra=security, responses=documented_errors(found))
