"""OpenAI's Conversations API (``/v1/conversations``): a conversation the server keeps for
the Responses API.

A conversation is a list of items (messages, function calls and their outputs, reasoning)
with metadata, kept in Redis for ``conversations_ttl_s`` after its last change and
readable by its own tenant only (another's reads as not found). A Responses request that
names it (``conversation``) runs with its items before its own input, and once answered
its input and output items are appended to it, in the order the answers end. Items can
also be added, read and deleted directly. Ids are the server's own: an item given with
an id gets a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import Field
from starlette.responses import JSONResponse, Response

from services import keys
from services.gateway.auth import authenticate
from services.gateway.bodies import read_body
from services.gateway.errors import ApiError, documented_errors, invalid, redis_or_503
from services.gateway.responses import cursor_page
from services.gateway.responses_api import check_items, check_metadata, listed_item
from services.gateway.schemas import StrictBody, Text, parse_body
from services.logs import get_logger
from services.runtime import BackgroundTasks

log = get_logger(__name__)

MAX_ITEMS_PER_CALL = 20
"""Items one create or add call may carry (OpenAI's limit)."""
MAX_ITEMS = 10_000
"""Items one conversation may hold."""
MAX_LIST = 100
DEFAULT_LIST = 20
REDIS_TIMEOUT_S = 5.0
_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}

# KEYS: the conversation's hash, items and order. ARGV: TTL (s), the item cap, the
# tenant, then item id and JSON pairs. Appends the items after the last one, but an id
# it holds already (an append tried again), and returns how many it added (-1: no such
# conversation of that tenant; -2: it would hold more than the cap).
_APPEND = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[3] then return -1 end
local new = {}
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then table.insert(new, i) end
end
if redis.call('ZCARD', KEYS[3]) + #new > tonumber(ARGV[2]) then return -2 end
for _, i in ipairs(new) do
  local position = redis.call('HINCRBY', KEYS[1], 'next', 1)
  redis.call('ZADD', KEYS[3], position, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return #new
"""
TURN_RETRY_S = 300.0
"""How long an answer's turn is tried again while Redis cannot take it."""


def not_found(conversation_id: str) -> ApiError:
    return ApiError(404, f"Conversation with id {conversation_id!r} not found.", reason="not_found",
                    param="conversation_id", code="not_found")


def item_not_found(item_id: str) -> ApiError:
    return ApiError(404, f"Item with id {item_id!r} not found.", reason="not_found", param="item_id",
                    code="not_found")


def full() -> ApiError:
    return invalid(f"A conversation holds at most {MAX_ITEMS} items.", param="items",
                   code="conversation_full")


def conversation_id(value: Any) -> str | None:
    """The id a Responses request's ``conversation`` names (a string, or ``{"id": ...}``)."""
    if value is None:
        return None
    named = value.get("id") if isinstance(value, dict) else value
    if not isinstance(named, str) or not named:
        raise invalid('conversation must be a conversation id or {"id": <conversation id>}.',
                      param="conversation")
    return named


def _keys(conversation: str) -> list[str]:
    return [keys.conversation(conversation), keys.conversation_items(conversation),
            keys.conversation_order(conversation)]


def _with_id(item: dict[str, Any]) -> dict[str, Any]:
    prefix = _ID_PREFIXES.get(item.get("type", "message"), "item")
    return {**item, "id": f"{prefix}_{uuid.uuid4().hex}"}


class ConversationStore:
    """Conversations in Redis (see the module doc)."""

    def __init__(self, redis: Any, ttl_s: int, *, retry_s: float = TURN_RETRY_S) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._append = redis.register_script(_APPEND) if redis is not None else None
        self._retries = BackgroundTasks()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    @contextlib.asynccontextmanager
    async def _reach(self) -> AsyncIterator[None]:
        if not self.enabled:
            raise invalid("Conversations are not kept by this server (conversations_ttl_s is 0); "
                          "send the whole conversation in input.", param="conversation", code="unsupported")
        async with redis_or_503("Conversations cannot be reached now; retry later.", REDIS_TIMEOUT_S):
            yield

    async def _meta(self, conversation: str, tenant: str) -> dict[bytes, bytes]:
        meta, = await self._read(conversation, tenant)
        return meta

    async def _read(self, conversation: str, tenant: str, *reads: Any) -> list[Any]:
        """The conversation's hash and ``reads`` (each ``(command, key, *args)``), in one
        round trip; 404 unless it is ``tenant``'s."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.conversation(conversation))
            for command, *args in reads:
                getattr(pipe, command)(*args)
            results = await pipe.execute()
        if results[0].get(b"tenant", b"").decode() != tenant:
            raise not_found(conversation)
        return results

    @staticmethod
    def _object(conversation: str, meta: dict[bytes, bytes]) -> dict[str, Any]:
        return {"id": conversation, "object": "conversation", "created_at": int(meta[b"created_at"]),
                "metadata": json.loads(meta[b"metadata"])}

    async def create(self, tenant: str, items: list[dict[str, Any]],
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        conversation = f"conv_{uuid.uuid4().hex}"
        meta = {"tenant": tenant, "created_at": int(time.time()), "metadata": json.dumps(metadata or {}),
                "next": len(items)}
        stored = [_with_id(item) for item in items]
        hash_key, items_key, order_key = _keys(conversation)
        async with self._reach(), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(hash_key, mapping=meta)
            if stored:
                pipe.hset(items_key, mapping={item["id"]: json.dumps(item) for item in stored})
                pipe.zadd(order_key, {item["id"]: i for i, item in enumerate(stored, 1)})
            for key in (hash_key, items_key, order_key):
                pipe.expire(key, self.ttl_s)
            await pipe.execute()
        return {"id": conversation, "object": "conversation", "created_at": meta["created_at"],
                "metadata": metadata or {}}

    async def get(self, conversation: str, tenant: str) -> dict[str, Any]:
        async with self._reach():
            return self._object(conversation, await self._meta(conversation, tenant))

    async def update(self, conversation: str, tenant: str, metadata: dict[str, str]) -> dict[str, Any]:
        async with self._reach():
            meta = await self._meta(conversation, tenant)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.conversation(conversation), "metadata", json.dumps(metadata))
                for key in _keys(conversation):
                    pipe.expire(key, self.ttl_s)
                await pipe.execute()
        meta[b"metadata"] = json.dumps(metadata).encode()
        return self._object(conversation, meta)

    async def delete(self, conversation: str, tenant: str) -> None:
        async with self._reach():
            await self._meta(conversation, tenant)
            await self.redis.delete(*_keys(conversation))

    async def items(self, conversation: str, tenant: str) -> list[dict[str, Any]]:
        """Every item, first to last, as stored (what a Responses request runs after)."""
        async with self._reach():
            _, ids, stored = await self._read(conversation, tenant,
                                              ("zrange", keys.conversation_order(conversation), 0, -1),
                                              ("hgetall", keys.conversation_items(conversation)))
        return [json.loads(stored[i]) for i in ids if i in stored]

    async def append(self, conversation: str, tenant: str, items: list[dict[str, Any]],
                     *, new_ids: bool = True) -> list[dict[str, Any]]:
        """Add ``items`` after the last one (each with a new id, or, without ``new_ids``,
        the one it has: a response's output items); returns them as stored."""
        stored = [_with_id(item) if new_ids or not isinstance(item.get("id"), str) else item
                  for item in items]
        args: list[Any] = [self.ttl_s, MAX_ITEMS, tenant]
        for item in stored:
            args += [item["id"], json.dumps(item, ensure_ascii=False)]
        async with self._reach():
            added = await self._append(keys=_keys(conversation), args=args)
        if added == -1:
            raise not_found(conversation)
        if added == -2:
            raise full()
        return stored

    async def item(self, conversation: str, tenant: str, item_id: str) -> dict[str, Any]:
        async with self._reach():
            _, raw = await self._read(conversation, tenant,
                                      ("hget", keys.conversation_items(conversation), item_id))
        if raw is None:
            raise item_not_found(item_id)
        return json.loads(raw)

    async def delete_item(self, conversation: str, tenant: str, item_id: str) -> dict[str, Any]:
        """Forget one item; returns the conversation object."""
        async with self._reach():
            meta = await self._meta(conversation, tenant)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.conversation_order(conversation), item_id)
                pipe.hdel(keys.conversation_items(conversation), item_id)
                removed, _ = await pipe.execute()
        if not removed:
            raise item_not_found(item_id)
        return self._object(conversation, meta)

    async def add_turn(self, conversation: str, tenant: str, inputs: list[dict[str, Any]],
                       response: dict[str, Any]) -> None:
        """Append a Responses answer's own input and its output items (not of one that
        failed), in one step. The answer goes out regardless: while Redis cannot take
        the turn it is tried again in the background for ``retry_s`` (the items' ids
        are fixed first, so a try that did land is not appended twice); a conversation
        deleted or full meanwhile is logged."""
        if response.get("status") == "failed":
            return
        items = [*(_with_id(item) for item in inputs),
                 *(item if isinstance(item.get("id"), str) else _with_id(item)
                   for item in response.get("output") or [])]
        if not await self._try_turn(conversation, tenant, items, response.get("id")):
            self._retries.spawn(self._retry_turn(conversation, tenant, items, response.get("id")))

    async def _try_turn(self, conversation: str, tenant: str, items: list[dict[str, Any]],
                        response_id: Any) -> bool:
        """Whether the turn is settled (appended, or it never can be)."""
        try:
            await self.append(conversation, tenant, items, new_ids=False)
        except ApiError as err:
            log.warning("conversation_not_extended", conversation=conversation, response_id=response_id,
                        error=err.message)
            return err.status != 503
        return True

    async def _retry_turn(self, conversation: str, tenant: str, items: list[dict[str, Any]],
                          response_id: Any) -> None:
        deadline = time.monotonic() + self.retry_s
        pause = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            if await self._try_turn(conversation, tenant, items, response_id):
                log.info("conversation_extended_late", conversation=conversation, response_id=response_id)
                return
            pause = min(pause * 2, 5.0)
        log.error("conversation_turn_lost", conversation=conversation, response_id=response_id)


# --- routes ------------------------------------------------------------------------------


class ConversationBody(StrictBody):
    """POST /v1/conversations."""

    items: list[Any] | None = Field(default=None, max_length=MAX_ITEMS_PER_CALL)
    metadata: dict[Text, Text] | None = None


class ConversationUpdateBody(StrictBody):
    """POST /v1/conversations/{conversation_id}."""

    metadata: dict[Text, Text]


class ConversationItemsBody(StrictBody):
    """POST /v1/conversations/{conversation_id}/items."""

    items: list[Any] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)


def _conversations(request: Request) -> tuple[ConversationStore, str]:
    """The store and the caller's tenant (401 without a valid key)."""
    state = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    request.state.tenant = tenant  # for the recent-errors log
    return state.conversations, tenant


async def _body(request: Request, model):
    return parse_body(await read_body(request, request.app.state.gateway.settings.max_body_bytes), model)


async def create_conversation(request: Request) -> Response:
    store, tenant = _conversations(request)
    body = await _body(request, ConversationBody)
    check_metadata(body.metadata)
    check_items(body.items or [], "items")
    return JSONResponse(await store.create(tenant, body.items or [], body.metadata))


async def retrieve_conversation(request: Request, conversation_id: str) -> Response:
    store, tenant = _conversations(request)
    return JSONResponse(await store.get(conversation_id, tenant))


async def update_conversation(request: Request, conversation_id: str) -> Response:
    store, tenant = _conversations(request)
    body = await _body(request, ConversationUpdateBody)
    check_metadata(body.metadata)
    return JSONResponse(await store.update(conversation_id, tenant, body.metadata))


async def delete_conversation(request: Request, conversation_id: str) -> Response:
    store, tenant = _conversations(request)
    await store.delete(conversation_id, tenant)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: Request, conversation_id: str,
                     limit: int = Query(DEFAULT_LIST, ge=1, le=MAX_LIST), after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> Response:
    """Every item is listed whole, whatever ``include`` asks for."""
    store, tenant = _conversations(request)
    items = [listed_item(item) for item in await store.items(conversation_id, tenant)]
    return JSONResponse(cursor_page(items[::-1] if order == "desc" else items, limit, after))


async def add_items(request: Request, conversation_id: str) -> Response:
    store, tenant = _conversations(request)
    body = await _body(request, ConversationItemsBody)
    check_items(body.items, "items")
    added = [listed_item(item) for item in await store.append(conversation_id, tenant, body.items)]
    return JSONResponse(cursor_page(added, len(added), None))


async def retrieve_item(request: Request, conversation_id: str, item_id: str) -> Response:
    store, tenant = _conversations(request)
    return JSONResponse(listed_item(await store.item(conversation_id, tenant, item_id)))


async def delete_item(request: Request, conversation_id: str, item_id: str) -> Response:
    store, tenant = _conversations(request)
    return JSONResponse(await store.delete_item(conversation_id, tenant, item_id))


def install(app: FastAPI) -> None:
    """Add the conversation routes (``app.state.gateway.conversations`` holds the store)."""
    security = {"security": [{"bearerAuth": []}]}
    errors = {401: "Missing or invalid API key", 503: "Redis is not reachable",
              400: "Invalid request (or conversations are not kept by this server)"}
    found = {**errors, 404: "No such conversation (of this API key's tenant)"}
    item_found = {**errors, 404: "No such conversation (of this API key's tenant) or item"}
    with_body = {413: "Body too large", 415: "Not JSON"}

    def body(model: str) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model}"}}}}}

    app.add_api_route("/v1/conversations", create_conversation, methods=["POST"],
                      summary="Create a conversation", openapi_extra={**security, **body("ConversationBody")},
                      responses=documented_errors({**errors, **with_body}))
    app.add_api_route("/v1/conversations/{conversation_id}", retrieve_conversation, methods=["GET"],
                      summary="A conversation", openapi_extra=security, responses=documented_errors(found))
    app.add_api_route("/v1/conversations/{conversation_id}", update_conversation, methods=["POST"],
                      summary="Update a conversation's metadata",
                      openapi_extra={**security, **body("ConversationUpdateBody")},
                      responses=documented_errors({**found, **with_body}))
    app.add_api_route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"],
                      summary="Delete a conversation", openapi_extra=security,
                      responses=documented_errors(found))
    app.add_api_route("/v1/conversations/{conversation_id}/items", list_items, methods=["GET"],
                      summary="List a conversation's items", openapi_extra=security,
                      responses=documented_errors(found))
    app.add_api_route("/v1/conversations/{conversation_id}/items", add_items, methods=["POST"],
                      summary="Add items to a conversation",
                      openapi_extra={**security, **body("ConversationItemsBody")},
                      responses=documented_errors({**found, **with_body}))
    app.add_api_route("/v1/conversations/{conversation_id}/items/{item_id}", retrieve_item,
                      methods=["GET"], summary="A conversation's item", openapi_extra=security,
                      responses=documented_errors(item_found))
    app.add_api_route("/v1/conversations/{conversation_id}/items/{item_id}", delete_item,
                      methods=["DELETE"], summary="Delete a conversation's item", openapi_extra=security,
                      responses=documented_errors(item_found))
