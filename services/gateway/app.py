"""The gateway: an OpenAI-compatible HTTP API in front of the AMQP pipeline.

``create_app(settings)`` builds the FastAPI app without any I/O; its lifespan connects
to RabbitMQ (retrying in the background, so ``/health`` answers at once) and closes
everything on shutdown. ``serve(settings)`` runs it under uvicorn and drains in-flight
requests on SIGTERM.

Order of checks on the generation routes (completions, chat, responses; also tokenize
and detokenize): header size (431, on every route), API key (401), Content-Type (415
unless ``application/json`` or ``*+json``; a missing Content-Type is read as JSON), body
size (413, from Content-Length and while reading), JSON and field types (400), a
``previous_response_id`` (404, or 503 without Redis), model (404), settings-dependent
limits (400), tenant admission and rate limits (429; 400 for a request over a minute's
tokens), publish confirm (503), the first reply (an upstream error answers with its own
status; 504 on timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services import __version__
from services.adapters import AdapterCatalog
from services.amqp import error_answer
from services.gateway.adapters import adapter_card, resolve_adapter, usable_adapters
from services.gateway.adapters import install as install_adapters
from services.gateway.auth import AdminAuth, KeyStore, authenticate
from services.gateway.backend import Backend, Submission, token_cost
from services.gateway.background import BackgroundRun, BackgroundRunner, BackgroundStore
from services.gateway.background import install as install_background
from services.gateway.batches import BatchBody, BatchRunner, BatchStore
from services.gateway.batches import install as install_batches
from services.gateway.bodies import ClientDisconnected, read_body
from services.gateway.conversations import (
    ConversationBody,
    ConversationItemsBody,
    ConversationStore,
    ConversationUpdateBody,
    conversation_id,
)
from services.gateway.conversations import install as install_conversations
from services.gateway.dashboard import Dashboard
from services.gateway.dashboard import install as install_dashboard
from services.gateway.errors import (
    ApiError,
    documented_errors,
    error_response,
    error_type,
    from_validation_error,
    invalid,
    model_not_found,
    no_spare_capacity,
    timed_out,
)
from services.gateway.files import FileStore
from services.gateway.files import install as install_files
from services.gateway.http import GatewayServer, protocol_options
from services.gateway.metrics import GatewayMetrics
from services.gateway.rate_limits import RateLimits, rate_limit_headers
from services.gateway.replies import ChoiceStream
from services.gateway.responses import (
    KEEPALIVE,
    ChoiceAnswer,
    ResponseMeta,
    answer_error,
    collect_answer,
    completion_response,
    cursor_page,
    sse_events,
)
from services.gateway.responses_api import (
    ResponsesBody,
    ResponseStore,
    answered_response,
    input_tokens_chat,
    queued_events,
    read_request,
    response_events,
    responses_error,
)
from services.gateway.schemas import (
    DEADLINE_HEADER,
    AnyBody,
    ChatCompletionBody,
    CompletionBody,
    check_body,
    choice_requests,
    continuous_usage,
    include_usage,
    parse_body,
    reasoning_parser_for,
    request_kind,
    resolve_deadline_ms,
    served_tier,
    to_completion_request,
    tool_calling,
)
from services.gateway.tokenization import (
    DetokenizeBody,
    TokenizeChatBody,
    TokenizeCompletionBody,
    detokenize_response,
    input_tokens_response,
    read_detokenize,
    read_tokenize,
    tokenize_response,
)
from services.gateway.usage import UsageReader
from services.gateway.usage import install as install_usage
from services.logs import get_logger
from services.messages import CompletionRequest, FinalAnswer
from services.models import served_max_model_len
from services.replies import Reply
from services.runtime import STOP_SIGNALS, BackgroundTasks, early_stops, freeze_heap
from services.settings import Settings
from services.tenants import watch_file

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 30.0
"""How long SIGTERM waits for in-flight requests and streams before cancelling them."""
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED_STATUS = 499
"""Logged status for a client that went away (nginx's convention); nobody receives it."""
MAX_HEADER_BYTES = 16 * 1024
"""Bytes of request headers: beyond it a request is answered 431."""
MAX_HEAD_READ_BYTES = 1024 * 1024
"""Bytes of a request head the server buffers at most; a longer one is cut off with 400
and the connection closed. Above MAX_HEADER_BYTES, so that every head that arrives whole
gets the 431 however the network splits it."""


@dataclass
class GatewayState:
    """What the route handlers share; reachable as ``app.state.gateway``."""

    settings: Settings
    keys: KeyStore
    backend: Backend
    metrics: GatewayMetrics
    started_at: int
    adapters: AdapterCatalog | None = None
    """Tenant LoRA adapters; None serves the base model only."""
    responses: ResponseStore = dataclasses.field(default_factory=lambda: ResponseStore(None, 0))
    """Stored Responses API answers."""
    conversations: ConversationStore = dataclasses.field(default_factory=lambda: ConversationStore(None, 0))
    """Responses API conversations (``/v1/conversations``)."""
    files: FileStore | None = None
    batches: BatchStore | None = None
    background: BackgroundStore | None = None
    """Background responses (``background: true``); None runs none."""


# --- pure request helpers --------------------------------------------------------------


def check_content_type(content_type: str | None) -> None:
    """415 unless the body is declared as JSON (a missing Content-Type counts as JSON)."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise ApiError(
        415,
        f"Unsupported Content-Type {media!r}: send 'application/json'.",
        reason="unsupported_media_type",
        code="unsupported_media_type",
    )


def new_request_id(body: AnyBody) -> str:
    prefix = "chatcmpl" if isinstance(body, ChatCompletionBody) else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


Events = Callable[[ResponseMeta, ChoiceStream, tuple[int, Reply], float, float],
                  AsyncIterator[bytes]]
"""SSE bytes of a streamed answer whose first reply was read: (meta, stream, first
reply, deadline in event-loop time, timeout in seconds)."""


def _same_error(err: ApiError) -> ApiError:
    return err


@dataclass(frozen=True, slots=True)
class Generation:
    """A generation request as its route reads it: the completion or chat body it runs
    as, and how its answer is written, whole or streamed."""

    body: AnyBody
    request_id: str
    whole: Callable[[ResponseMeta, list[ChoiceAnswer]], dict[str, Any]]
    events: Events
    named: Callable[[ApiError], ApiError] = _same_error
    """An error of the body's checks, in the route's own field names."""
    keep: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    """What to do with a whole answer before it goes out (store it)."""
    answer_id: str | None = None
    """The id its answer carries where it is not the request's (a background response's)."""
    answer_created: int | None = None
    """Its answer's creation time where it is not now (a background response's: queued)."""
    later: Callable[[ResponseMeta, dict[str, str]], Awaitable[Response]] | None = None
    """Set: the request is queued to run in the background, and answered at once with
    what this gives (meta, headers) -> (a background response, ``queued``, or its events)."""


def read_openai_body(raw: bytes, model: type[CompletionBody | ChatCompletionBody]) -> Generation:
    """/v1/completions and /v1/chat/completions: answered in their own shapes."""
    body = parse_body(raw, model)
    with_usage, running_usage = include_usage(body), continuous_usage(body)

    def events(meta: ResponseMeta, stream: ChoiceStream, first: tuple[int, Reply],
               deadline: float, timeout_s: float) -> AsyncIterator[bytes]:
        return sse_events(meta, stream, first, include_usage=with_usage, deadline=deadline,
                          timeout_s=timeout_s, continuous_usage=running_usage)

    return Generation(body, new_request_id(body), completion_response, events)


async def _conversation_so_far(body: ResponsesBody, conversation: str | None, store: ResponseStore,
                               conversations: ConversationStore, tenant: str) -> list[dict[str, Any]] | None:
    """The items a Responses body goes on from: its ``conversation``'s, or the stored
    conversation of its ``previous_response_id`` (None: it starts afresh, or nothing is
    stored here)."""
    if conversation is not None:
        if body.previous_response_id is not None:
            raise invalid("Give conversation or previous_response_id, not both.", param="conversation")
        return await conversations.items(conversation, tenant)
    if body.previous_response_id is not None and store.enabled:
        return await store.conversation(body.previous_response_id, tenant)
    return None


async def read_responses_body(raw: bytes, store: ResponseStore, conversations: ConversationStore,
                              tenant: str, *, background: BackgroundStore | None = None,
                              run: BackgroundRun | None = None) -> Generation:
    """/v1/responses: run as the chat it means (going on from its ``conversation``'s items
    or the stored conversation of its ``previous_response_id``), answered as a
    ``response``, which is stored and added to its conversation. ``background``: where a
    ``background: true`` request is queued (None refuses it, as in a batch); ``run``: a
    queued background response, run now."""
    body = parse_body(raw, ResponsesBody)
    conversation = conversation_id(body.conversation)
    earlier = await _conversation_so_far(body, conversation, store, conversations, tenant)
    request = read_request(body, earlier, store=store.enabled and body.store is not False,
                           conversation=conversation, background=background is not None or run is not None)
    response_id = run.response_id if run else f"resp_{uuid.uuid4().hex}"

    async def keep(response: dict[str, Any]) -> None:
        await store.keep(tenant, request.items, response, request.inputs)
        if conversation is not None:
            await conversations.add_turn(conversation, tenant, request.items[len(request.items) - request.inputs:],
                                         response)

    def whole(meta: ResponseMeta, answers: list[ChoiceAnswer]) -> dict[str, Any]:
        return answered_response(meta, request.echo, answers[0])

    def events(meta: ResponseMeta, stream: ChoiceStream, first: tuple[int, Reply],
               deadline: float, timeout_s: float) -> AsyncIterator[bytes]:
        return response_events(meta, request.echo, stream, first, deadline=deadline,
                               timeout_s=timeout_s, on_done=keep,
                               first_sequence=run.first_sequence if run else None)

    async def queue(jobs: BackgroundStore, meta: ResponseMeta, headers: dict[str, str]) -> Response:
        queued, first = queued_events(meta, request.echo)
        record = store.record(tenant, request.items, queued, request.inputs)
        if record is None:
            raise invalid("The conversation is too large to store.", param="input")
        await jobs.queue(tenant, response_id, raw, record, first if body.stream else None)
        log.info("background_response_queued", response_id=response_id, tenant=tenant, stream=bool(body.stream))
        if body.stream:
            return event_stream(jobs.events(response_id, -1), headers)
        return JSONResponse(queued, headers=headers)

    later = None
    if body.background and run is None and background is not None:
        later = functools.partial(queue, background)
    return Generation(request.chat, run.request_id if run else response_id, whole, events, responses_error,
                      keep, answer_id=response_id, answer_created=run.created_at if run else None,
                      later=later)


# --- I/O helpers -----------------------------------------------------------------------


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_client(
    request: Request | None, work: Awaitable[Any], deadline: float, timeout_s: float
) -> Any:
    """Await ``work`` unless the client disconnects (ClientDisconnected) or ``deadline``
    passes (504). ``request`` None: no client to watch, only the deadline."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(
        _wait_disconnect(request) if request is not None else asyncio.Event().wait())
    loop = asyncio.get_running_loop()
    try:
        done, _ = await asyncio.wait(
            {work_task, watch_task},
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for task in (work_task, watch_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task in done:
        return work_task.result()
    if watch_task in done:
        raise ClientDisconnected()
    raise timed_out(timeout_s)


async def close_submission(backend: Backend, submission: Submission) -> None:
    """Close in a task of its own: it completes even if the caller is being cancelled."""
    if submission.closed:
        return
    await asyncio.shield(backend.spawn(submission.close()))


class SubmissionStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its submission, even if it never started."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Coroutine[Any, Any, None]],
        **kw: Any,
    ):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class HeaderLimit:
    """ASGI middleware: 431 for a request whose headers exceed ``limit`` bytes."""

    def __init__(
        self, app: ASGIApp, limit: int, answer: Callable[[Request, ApiError], Response]
    ) -> None:
        self.app, self.limit, self.answer = app, limit, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = sum(len(name) + len(value) for name, value in scope.get("headers", ()))
        if scope["type"] == "http" and size > self.limit:
            err = ApiError(
                431,
                f"The request headers exceed {self.limit} bytes.",
                reason="too_large",
                code="request_headers_too_large",
            )
            await self.answer(Request(scope), err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- handlers --------------------------------------------------------------------------


async def _authorized_body(request: Request, state: GatewayState) -> tuple[str, bytes | None]:
    """The tenant of the request's key and its JSON body (None: the client went away
    while sending it); 401, 415 and 413 as the module docstring orders them."""
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    request.state.tenant = tenant  # for the recent-errors log
    check_content_type(request.headers.get("content-type"))
    try:
        return tenant, await read_body(request, state.settings.max_body_bytes)
    except ClientDisconnected:
        return tenant, None


def prepare_generation(
    state: GatewayState, generation: Generation, tenant: str, now: float, deadline_header: str | None,
    background: bool = False,
) -> tuple[list[CompletionRequest], ResponseMeta]:
    """The checks every generation passes once its model is known to be served, and what
    it runs as: one request per choice (``background``: from spare capacity only), and
    how its answer is written."""
    settings = state.settings
    body = generation.body
    try:
        check_body(body, settings, model_checked=True)
        deadline_ms = resolve_deadline_ms(body.deadline_ms, deadline_header)
        completion = to_completion_request(
            body,
            request_id=generation.request_id,
            tenant=tenant,
            now=now,
            reply_to=state.backend.reply_queue_name,
            max_model_len=settings.max_model_len,
            deadline_ms=deadline_ms,
            reasoning_parser=settings.reasoning_parser,
        )
    except ApiError as err:
        raise generation.named(err) from None
    completion.background = completion.background or background
    prompts = body.prompt if isinstance(body, CompletionBody) else None
    meta = ResponseMeta(
        request_id=generation.answer_id or generation.request_id, kind=request_kind(body),
        model=body.model, created=generation.answer_created or int(now),
        logprobs=completion.sampling.logprobs is not None,
        tokens_as_ids=bool(body.return_tokens_as_token_ids),
        top_logprobs=completion.sampling.logprobs or 0,
        prompt_logprobs=body.prompt_logprobs,
        echo=tuple(p if isinstance(p, str) else None for p in prompts)
        if prompts is not None and body.echo else None, n=body.n or 1,
        tool_calling=tool_calling(body, settings.tool_call_parser),
        reasoning_parser=reasoning_parser_for(completion, settings.reasoning_parser),
        service_tier=served_tier(body),
        token_ids=bool(body.return_token_ids),
    )
    return choice_requests(completion, body.n or 1, prompts), meta


async def _complete(request: Request, read: Callable[[bytes, str], Awaitable[Generation]]) -> Response:
    state: GatewayState = request.app.state.gateway
    settings = state.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    arrived_mono = time.monotonic()
    now = time.time()

    tenant, raw = await _authorized_body(request, state)
    if raw is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    generation = await read(raw, tenant)
    request_id = generation.request_id
    headers = {REQUEST_ID_HEADER: request_id}
    try:
        await _served_model(state, generation.body.model, tenant)
    except ApiError as err:
        raise generation.named(err) from None
    choices, meta = prepare_generation(state, generation, tenant, now, request.headers.get(DEADLINE_HEADER))
    limits = state.keys.limits_for(tenant)
    try:
        if generation.later is not None:
            return await _queue_later(state, generation.later, tenant, choices, limits, meta, headers)
        submissions = await state.backend.submit_all(choices, arrived_mono, limits)
        if submissions[0].rate is not None:
            headers.update(rate_limit_headers(submissions[0].rate))
        if generation.body.stream:
            return await _stream(
                request, state, submissions, meta, generation.events, deadline, headers
            )
        return await _answer(request, state, submissions, meta, generation, deadline, headers)
    except ApiError as err:
        err.headers.update(headers)
        raise
    except ClientDisconnected:
        log.info("client_disconnected", request_id=request_id, tenant=tenant)
        return Response(status_code=CLIENT_CLOSED_STATUS, headers=headers)


async def _queue_later(state: GatewayState, later: Callable[[ResponseMeta, dict[str, str]], Awaitable[Response]],
                       tenant: str, choices: list[CompletionRequest], limits: RateLimits,
                       meta: ResponseMeta, headers: dict[str, str]) -> Response:
    """Queue a generation to run later (a background response), charged to its tenant's
    rate limits now; a refusal to queue it gives the charge back."""
    rate = await state.backend.take_rate(tenant, choices, limits)
    if rate is None:
        return await later(meta, headers)
    try:
        return await later(meta, {**headers, **rate_limit_headers(rate)})
    except ApiError:
        await state.backend.give_back_rate(tenant, rate, sum(token_cost(c) for c in choices))
        raise


async def _submit_unattended(state: GatewayState, generation: Generation, tenant: str,
                             background: bool = False) -> tuple[list[Submission], ResponseMeta]:
    """A generation with no HTTP client waiting, checked, admitted and sent as the
    route's (``background``: from spare capacity only)."""
    arrived_mono, now = time.monotonic(), time.time()
    try:
        await _served_model(state, generation.body.model, tenant)
    except ApiError as err:
        raise generation.named(err) from None
    choices, meta = prepare_generation(state, generation, tenant, now, None, background)
    return await state.backend.submit_all(choices, arrived_mono), meta


async def answer_whole(state: GatewayState, generation: Generation, tenant: str,
                       background: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
    """A generation answered whole with no HTTP client waiting (a batch's request, a
    background response): the same checks, admission and answer as the route's, within
    ``timeout_s`` (the request timeout by default); an error is raised as ApiError."""
    deadline = asyncio.get_running_loop().time() + (timeout_s or state.settings.request_timeout_s)
    submissions, meta = await _submit_unattended(state, generation, tenant, background)
    answers = await _collect(None, state, submissions, deadline)
    whole = generation.whole(meta, answers)
    if generation.keep is not None:
        await generation.keep(whole)
    return whole


async def stream_unattended(state: GatewayState, generation: Generation, tenant: str,
                            emit: Callable[[bytes], Awaitable[None]], timeout_s: float) -> None:
    """A generation streamed with no HTTP client waiting (a streamed background
    response): each piece of its events to ``emit``; an error before its first reply is
    raised as ApiError, a later one is its stream's last event."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    submissions, meta = await _submit_unattended(state, generation, tenant)
    stream = ChoiceStream([s.stream for s in submissions])
    try:
        first = await _first_reply(None, state, submissions, stream, deadline, timeout_s)
        async for piece in generation.events(meta, stream, first, deadline, timeout_s):
            await emit(piece)
    finally:
        await close_all(state.backend, submissions, stream)


async def run_background_response(state: GatewayState, tenant: str, raw: bytes, run: BackgroundRun,
                                  store: ResponseStore, emit: Callable[[bytes], Awaitable[None]] | None) -> None:
    """A queued background response, run now as if its tenant sent it (its ``service_tier``
    kept) and stored by ``store``: answered whole, or (``emit``) streamed."""
    generation = await read_responses_body(raw, store, state.conversations, tenant, run=run)
    timeout_s = state.settings.background_response_timeout_s
    if emit is None:
        await answer_whole(state, generation, tenant, timeout_s=timeout_s)
    else:
        await stream_unattended(state, generation, tenant, emit, timeout_s)


async def execute_batch_request(state: GatewayState, tenant: str, endpoint: str,
                                body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """One request of a batch, run as if ``tenant`` sent ``body`` to ``endpoint`` but
    from spare capacity only (background): its HTTP status, its answer (or OpenAI error
    object) and its request id."""
    raw = json.dumps(body).encode()
    generation = None
    try:
        if endpoint == "/v1/responses":
            generation = await read_responses_body(raw, state.responses, state.conversations, tenant)
        else:
            model = ChatCompletionBody if endpoint == "/v1/chat/completions" else CompletionBody
            generation = read_openai_body(raw, model)
        return 200, await answer_whole(state, generation, tenant, background=True), generation.request_id
    except ApiError as err:
        return err.status, err.body(), generation.request_id if generation is not None else ""


async def close_all(backend: Backend, submissions: list[Submission],
                    stream: ChoiceStream | None = None) -> None:
    if stream is not None:
        stream.close()
    await asyncio.gather(*(close_submission(backend, s) for s in submissions))


async def _answer(
    request: Request,
    state: GatewayState,
    submissions: list[Submission],
    meta: ResponseMeta,
    generation: Generation,
    deadline: float,
    headers: dict[str, str],
) -> Response:
    answers = await _collect(request, state, submissions, deadline)
    whole = generation.whole(meta, answers)
    if generation.keep is not None:
        await generation.keep(whole)
    return JSONResponse(whole, headers=headers)


def never_started(err: ApiError, submissions: list[Submission], timeout_s: float) -> ApiError:
    """The error to answer for a timeout: a background request that got no reply at all
    waited for spare capacity in vain (429, to be tried again), else ``err``."""
    if err.status != 504 or not all(
            s.request.background and s.stream.first_token_at is None and s.stream.final is None
            for s in submissions):
        return err
    return no_spare_capacity(timeout_s)


async def _collect(request: Request | None, state: GatewayState, submissions: list[Submission],
                   deadline: float) -> list[ChoiceAnswer]:
    """Every choice's whole answer (the submissions closed after); an error one's raised."""
    stream = ChoiceStream([s.stream for s in submissions])
    try:
        answers = await race_client(request, collect_answer(stream), deadline,
                                    state.settings.request_timeout_s)
    except ApiError as err:
        raise never_started(err, submissions, state.settings.request_timeout_s) from None
    finally:
        await close_all(state.backend, submissions, stream)
    for answer in answers:
        error = answer_error(answer.final)
        if error is not None:
            raise error
    return answers


async def _first_reply(request: Request | None, state: GatewayState, submissions: list[Submission],
                       stream: ChoiceStream, deadline: float, timeout_s: float,
                       pending: asyncio.Future[tuple[int, Reply]] | None = None,
                       wait_s: float | None = None) -> tuple[int, Reply] | None:
    """A stream's first reply (``pending``: the read of it already started); an error one
    is raised (and the submissions closed, as on any failure); a final one's submission
    is closed at once. With ``wait_s``: None when it did not come within that, and
    ``pending`` still waits for it."""
    backend = state.backend
    pending = pending or asyncio.ensure_future(stream.next())
    try:
        if wait_s is None:
            first = await race_client(request, pending, deadline, timeout_s)
        else:
            await race_client(request, asyncio.wait((pending,), timeout=wait_s), deadline, timeout_s)
            if not pending.done():
                return None
            first = pending.result()
    except BaseException as exc:
        pending.cancel()
        await close_all(backend, submissions, stream)
        if isinstance(exc, ApiError):
            raise never_started(exc, submissions, timeout_s) from None
        raise
    index, reply = first
    if isinstance(reply, FinalAnswer):
        error = answer_error(reply)
        if error is not None:
            await close_all(backend, submissions, stream)
            raise error
        await close_submission(backend, submissions[index])
    return first


async def _stream(
    request: Request,
    state: GatewayState,
    submissions: list[Submission],
    meta: ResponseMeta,
    events_of: Events,
    deadline: float,
    headers: dict[str, str],
) -> Response:
    """Wait for the first reply before sending headers, so an early error keeps its status;
    but no longer than ``stream_keepalive_s``: a request still queued then gets its
    headers and an SSE comment every ``stream_keepalive_s`` until its first reply, so
    that no proxy between the client and the gateway takes the quiet stream for dead
    (an error then ends the stream as an error event, as one after the first token does)."""
    backend = state.backend
    stream = ChoiceStream([s.stream for s in submissions])
    timeout_s = state.settings.request_timeout_s
    keepalive_s = state.settings.stream_keepalive_s
    pending = asyncio.ensure_future(stream.next())
    first = await _first_reply(request, state, submissions, stream, deadline, timeout_s, pending,
                               wait_s=keepalive_s or None)
    loop = asyncio.get_running_loop()

    async def events() -> AsyncIterator[bytes]:
        first_reply = first
        if first_reply is None:
            while not pending.done() and loop.time() < deadline:
                await asyncio.wait((pending,), timeout=min(keepalive_s, deadline - loop.time()))
                if not pending.done():
                    yield KEEPALIVE
            first_reply = committed_first(submissions, pending, timeout_s)
        async for piece in events_of(meta, stream, first_reply, deadline, timeout_s):
            for submission in submissions:
                if submission.stream.final is not None and not submission.closed:
                    # Its final answer is read: free the slot before the last bytes go out.
                    await close_submission(backend, submission)
            yield piece

    async def close() -> None:
        pending.cancel()  # a stream closed while it waited for its first reply
        await close_all(backend, submissions, stream)

    return SubmissionStreamingResponse(
        events(),
        on_close=close,
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def committed_first(submissions: list[Submission], pending: asyncio.Future[tuple[int, Reply]],
                    timeout_s: float) -> tuple[int, Reply]:
    """The first reply of a stream whose headers went out before it came; an error (the
    request's, or not having started in time) as an error answer, which the route's
    events write as their error event."""
    if pending.done():
        try:
            return pending.result()
        except ApiError as exc:
            err = exc
    else:
        pending.cancel()
        err = never_started(timed_out(timeout_s), submissions, timeout_s)
    request_id = submissions[0].request.request_id
    return 0, error_answer(request_id, err.message, status=err.status, type_=err.type, code=err.code)


async def completions(request: Request) -> Response:
    async def read(raw: bytes, _tenant: str) -> Generation:
        return read_openai_body(raw, CompletionBody)

    return await _complete(request, read)


async def chat_completions(request: Request) -> Response:
    async def read(raw: bytes, _tenant: str) -> Generation:
        return read_openai_body(raw, ChatCompletionBody)

    return await _complete(request, read)


async def responses(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway

    async def read(raw: bytes, tenant: str) -> Generation:
        return await read_responses_body(raw, state.responses, state.conversations, tenant,
                                         background=state.background)

    return await _complete(request, read)


def event_stream(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def retrieve_response(request: Request, response_id: str, stream: bool = False,
                            starting_after: int | None = Query(None, ge=0)) -> Response:
    """A stored response (the caller's tenant's); ``stream``: a streamed background
    response's events (after ``starting_after``), as they come until it ends."""
    state: GatewayState = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    response = await state.responses.get(response_id, tenant)
    if not stream:
        return JSONResponse(response)
    if not (response.get("background") and state.background is not None
            and await state.background.has_events(response_id)):
        raise invalid(f"Response {response_id!r} was not created with background and stream true: it has "
                      "no events to stream.", param="stream")
    return event_stream(state.background.events(response_id, -1 if starting_after is None else starting_after),
                        {REQUEST_ID_HEADER: response_id})


async def list_input_items(request: Request, response_id: str,
                           limit: int = Query(20, ge=1, le=100), after: str | None = None,
                           order: Literal["asc", "desc"] = "desc") -> Response:
    """A stored response's input items (the caller's tenant's), newest first by default."""
    state: GatewayState = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    items = await state.responses.input_items(response_id, tenant)
    return JSONResponse(cursor_page(items[::-1] if order == "desc" else items, limit, after))


async def delete_response(request: Request, response_id: str) -> Response:
    state: GatewayState = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    await state.responses.delete(response_id, tenant)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def _tokenization(request: Request,
                        read: Callable[[bytes, str], Awaitable[tuple[AnyBody, Answer]]],
                        named: Callable[[ApiError], ApiError] = lambda err: err) -> Response:
    """/tokenize, /detokenize and a response's input tokens: a request the scorer answers
    with its tokens (see :mod:`services.gateway.tokenization`), admitted and checked as
    any other (``read``: the body it means, from the request's bytes and tenant;
    ``named``: its check's errors in the words of the route's own fields)."""
    state: GatewayState = request.app.state.gateway
    deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
    arrived_mono = time.monotonic()
    tenant, raw = await _authorized_body(request, state)
    if raw is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    body, shape = await read(raw, tenant)
    await _served_model(state, body.model, tenant)
    try:
        check_body(body, state.settings, model_checked=True)
    except ApiError as err:
        raise named(err) from None
    request_id = f"tokenize-{uuid.uuid4().hex}"
    headers = {REQUEST_ID_HEADER: request_id}
    wire = to_completion_request(body, request_id=request_id, tenant=tenant, now=time.time(),
                                 reply_to=state.backend.reply_queue_name,
                                 max_model_len=state.settings.max_model_len, deadline_ms=None)
    wire.tokenize_only = True
    try:
        submission = await state.backend.submit(wire, arrived_mono)
        [answer] = await _collect(request, state, [submission], deadline)
    except ApiError as err:
        err.headers.update(headers)
        raise
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_STATUS, headers=headers)
    return JSONResponse(shape(answer.final), headers=headers)


Answer = Callable[[FinalAnswer], dict[str, Any]]
"""The JSON answer of a tokenize or detokenize request, from the scorer's final answer."""


async def tokenize(request: Request) -> Response:
    max_model_len = request.app.state.gateway.settings.max_model_len

    async def read(raw: bytes, _: str) -> tuple[AnyBody, Answer]:
        body, token_strs = read_tokenize(raw)
        return body, lambda final: tokenize_response(final, max_model_len, token_strs)

    return await _tokenization(request, read)


async def detokenize(request: Request) -> Response:
    async def read(raw: bytes, _: str) -> tuple[AnyBody, Answer]:
        return read_detokenize(raw), detokenize_response

    return await _tokenization(request, read)


async def response_input_tokens(request: Request) -> Response:
    """OpenAI's /v1/responses/input_tokens: how many tokens the model would read for a
    response of this body (its conversation so far, instructions and tools included),
    exactly the ``input_tokens`` that response would be charged."""
    state: GatewayState = request.app.state.gateway

    async def read(raw: bytes, tenant: str) -> tuple[AnyBody, Answer]:
        body = parse_body(raw, ResponsesBody)
        conversation = conversation_id(body.conversation)
        earlier = await _conversation_so_far(body, conversation, state.responses, state.conversations, tenant)
        return input_tokens_chat(body, earlier), input_tokens_response

    return await _tokenization(request, read, responses_error)


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {
        "id": state.settings.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "fairway",
        "max_model_len": state.settings.max_model_len,
    }


async def list_models(request: Request) -> Response:
    """The base model and the adapters the caller's tenant may use."""
    state: GatewayState = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    base = _model_card(state)
    cards = [base]
    if state.adapters is not None:
        specs = await usable_adapters(state.adapters, tenant)
        cards += [adapter_card(base, state.adapters, spec) for spec in specs]
    return JSONResponse({"object": "list", "data": cards})


async def retrieve_model(request: Request, model: str) -> Response:
    state: GatewayState = request.app.state.gateway
    tenant = authenticate(state.keys, request.headers.get("authorization"))
    if model == state.settings.model_name:
        return JSONResponse(_model_card(state))
    if state.adapters is None:
        raise model_not_found(model)
    spec = await resolve_adapter(state.adapters, model, tenant)
    if spec is None:
        raise model_not_found(model)
    return JSONResponse(adapter_card(_model_card(state), state.adapters, spec))


async def _served_model(state: GatewayState, model: str, tenant: str) -> None:
    """404 unless ``model`` is the served model or an adapter the tenant may use."""
    if state.adapters is not None:
        await resolve_adapter(state.adapters, model, tenant)  # the base: None; else 404
    elif model != state.settings.model_name:
        raise model_not_found(model)


async def health() -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    checks = await state.backend.readiness(time.time())
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# --- app -------------------------------------------------------------------------------

_ERROR_RESPONSES = documented_errors({
    400: "Invalid request (OpenAI error object)",
    401: "Missing or invalid API key",
    404: "Unknown model",
    413: "Body too large",
    415: "Content-Type is not JSON",
    429: "Too many requests in flight for this tenant, or past its rate limits (Retry-After, x-ratelimit-*)",
    503: "Broker or Redis unavailable (Retry-After)",
    504: "Timed out",
})  # fmt: skip


def _body_spec(model: type[Any]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "security": [{"bearerAuth": []}],
    }


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """OpenAPI with the request bodies (parsed by hand for check order) and bearer auth."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, defs = models_json_schema(
                [(model, "validation") for model in (CompletionBody, ChatCompletionBody, ResponsesBody,
                                                     TokenizeCompletionBody, TokenizeChatBody, DetokenizeBody,
                                                     BatchBody, ConversationBody, ConversationUpdateBody,
                                                     ConversationItemsBody)],
                ref_template="#/components/schemas/{model}",
            )
            components = spec.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs.get("$defs", {}))
            components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
            # Path-parameter errors are answered as 400 OpenAI errors, never FastAPI's 422.
            for operations in spec.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components["schemas"].pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    return build


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; no I/O until its lifespan starts (but reading the served model's
    ``config.json`` for its context length, where the model's files are here)."""
    settings = settings.model_copy(update={"max_model_len": served_max_model_len(settings)})
    keys = KeyStore.from_config(
        settings.api_keys, settings.api_keys_file,
        RateLimits(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute))
    if not len(keys):
        log.warning(
            "no_api_keys",
            detail="set FAIRWAY_API_KEYS or FAIRWAY_API_KEYS_FILE; every request gets 401",
        )
    gateway_metrics = GatewayMetrics(settings.model_name, settings.max_model_len)
    backend = Backend(settings, gateway_metrics)
    adapters = AdapterCatalog.from_settings(settings, backend.redis)
    state = GatewayState(settings, keys, backend, gateway_metrics, started_at=int(time.time()),
                         adapters=adapters,
                         responses=ResponseStore(backend.redis, settings.responses_ttl_s),
                         conversations=ConversationStore(backend.redis, settings.conversations_ttl_s))
    dashboard = Dashboard(settings, keys, backend.redis)
    gateway_metrics.on_answered = dashboard.record_latency
    state.files = FileStore(backend.redis, settings.files_ttl_s)
    state.batches = BatchStore(backend.redis, settings.files_ttl_s)

    async def execute(tenant: str, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        return await execute_batch_request(state, tenant, endpoint, body)

    runner = BatchRunner(state.batches, state.files, execute, owner=backend.incarnation,
                         concurrency=settings.batch_concurrency, max_requests=settings.batch_max_requests,
                         on_outcome=lambda outcome: gateway_metrics.batch_requests.labels(outcome).inc())
    state.background = BackgroundStore(backend.redis, settings.responses_ttl_s,
                                       settings.background_responses_per_tenant, settings.stream_keepalive_s)
    background = BackgroundRunner(
        state.background, state.responses, functools.partial(run_background_response, state),
        owner=backend.incarnation, concurrency=settings.background_response_concurrency,
        on_outcome=lambda outcome: gateway_metrics.background_responses.labels(outcome).inc())

    def reload_tenants() -> None:
        """The keys file read again; ValueError (nothing changed) when it does not parse
        or gives a tenant the admin key."""
        fresh = KeyStore.from_config(settings.api_keys, settings.api_keys_file, keys.default_limits)
        dashboard.auth.check_tenants(fresh)
        keys.replace_with(fresh)
        log.info("tenants_loaded", tenants=len(keys.tenants), keys=len(keys))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        backend.start()
        runner.start()
        background.start()
        watch, tasks = None, BackgroundTasks()
        if settings.api_keys_file is not None and settings.tenants_reload_s > 0:
            watch = tasks.spawn(watch_file(
                settings.api_keys_file, settings.tenants_reload_s, reload_tenants,
                lambda outcome: gateway_metrics.tenants_file_reloads.labels(outcome).inc()))
        log.info("gateway_started", model=settings.model_name, tenants=len(keys.tenants))
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await asyncio.gather(runner.close(), background.close())
            await dashboard.close()
            await backend.close()
            log.info("gateway_stopped")

    app = FastAPI(
        title="Fairway gateway",
        version=__version__,
        description="OpenAI-compatible completions over a fair, multi-tenant AMQP pipeline.",
        lifespan=lifespan,
    )
    app.state.gateway = state

    app.add_api_route(
        "/v1/completions", completions, methods=["POST"], responses=_ERROR_RESPONSES,
        openapi_extra=_body_spec(CompletionBody), summary="Create a completion",
    )  # fmt: skip
    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], responses=_ERROR_RESPONSES,
        openapi_extra=_body_spec(ChatCompletionBody), summary="Create a chat completion",
    )  # fmt: skip
    app.add_api_route(
        "/v1/responses", responses, methods=["POST"], responses=_ERROR_RESPONSES,
        openapi_extra=_body_spec(ResponsesBody), summary="Create a response",
    )  # fmt: skip
    for path, handler, model, summary in (
        ("/tokenize", tokenize, TokenizeCompletionBody, "Tokenize a prompt or a chat"),
        ("/detokenize", detokenize, DetokenizeBody, "The text of token ids"),
        ("/v1/responses/input_tokens", response_input_tokens, ResponsesBody,
         "Count a response's input tokens"),
    ):
        app.add_api_route(path, handler, methods=["POST"], responses=_ERROR_RESPONSES,
                          openapi_extra=_body_spec(model), summary=summary)
    bearer = {"security": [{"bearerAuth": []}]}
    stored_errors = {status: _ERROR_RESPONSES[status] for status in (401, 404, 503)}
    app.add_api_route("/v1/responses/{response_id}", retrieve_response, methods=["GET"],
                      openapi_extra=bearer, responses={**stored_errors, 400: _ERROR_RESPONSES[400]},
                      summary="A stored response, or a streamed background one's events")
    app.add_api_route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"],
                      openapi_extra=bearer, responses={**stored_errors, 400: _ERROR_RESPONSES[400]},
                      summary="A stored response's input")
    app.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"],
                      openapi_extra=bearer, responses=stored_errors, summary="Forget a stored response")
    model_errors = {status: _ERROR_RESPONSES[status] for status in (401, 404)}
    app.add_api_route(
        "/v1/models", list_models, methods=["GET"], openapi_extra=bearer, responses=model_errors
    )
    app.add_api_route(
        "/v1/models/{model:path}",
        retrieve_model,
        methods=["GET"],
        openapi_extra=bearer,
        responses={**model_errors, 503: _ERROR_RESPONSES[503]},  # an adapter needs Redis
    )
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route(
        "/ready", ready, methods=["GET"], responses={503: {"description": "Not ready"}}
    )
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    install_files(app)
    install_batches(app)
    install_background(app)
    install_conversations(app)
    install_adapters(app, adapters, AdminAuth(settings.admin_key, keys))
    install_dashboard(app, dashboard)
    install_usage(app, UsageReader(backend.redis, keys, dashboard.auth))

    def answer(request: Request, err: ApiError) -> Response:
        """Count the error, log it for the dashboard, answer it."""
        gateway_metrics.reject(err.reason)
        dashboard.record_error(
            err,
            path=request.url.path,
            tenant=getattr(request.state, "tenant", None),
            request_id=err.headers.get(REQUEST_ID_HEADER),
        )
        return error_response(err)

    app.add_middleware(HeaderLimit, limit=MAX_HEADER_BYTES, answer=answer)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> Response:
        return answer(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return answer(request, from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
            reason, code = "not_found", "unknown_url"
        else:
            message, reason, code = str(exc.detail), f"http_{status}", None
        err = ApiError(
            status, message, reason=reason, code=code, type=error_type(status), headers=exc.headers
        )
        return answer(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return answer(request, ApiError(500, "Internal server error.", reason="internal_error"))

    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


async def serve(settings: Settings, *, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Run the gateway until SIGTERM/SIGINT; then stop accepting and drain for ``grace_s``.

    Our handler is in place from the start: a signal that comes while the app is built,
    before uvicorn puts its own handlers in, is handed to the server once it exists, so
    it starts, stops at once and exits 0 rather than serve on as if never told. After
    draining, uvicorn puts our handler back and raises the caught signal again, which
    then does nothing more, so a drained gateway exits 0 like the other services."""
    server: uvicorn.Server | None = None
    early: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if server is None:
            early.append(sig)
        else:
            server.handle_exit(sig, frame)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)
    early += early_stops()  # (came while the process imported its modules)
    app = create_app(settings)
    freeze_heap()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(grace_s),
        **protocol_options(MAX_HEAD_READ_BYTES),
    )
    server = GatewayServer(config)
    for sig in early:
        log.info("stop_requested_while_starting", signal=signal.Signals(sig).name)
        server.handle_exit(sig, None)
    await server.serve()
