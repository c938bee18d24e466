"""Scorer service: tokenize, score uncertainty, predict output length, forward to the scheduler.

Story: connect to RabbitMQ and Redis, load the served model's tokenizer and the
length predictor (its online state shared through Redis), consume submitted requests,
publish scored ones, learn from the completion events that workers report, and stop
cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from services import amqp, keys, redis_client, topology
from services import messages as m
from services import metrics as prom
from services.adapters import AdapterCatalog, CatalogUnavailable, ModelNotFound
from services.engine.sampling import validate_sampling
from services.engine.structured import grammar_problem
from services.logs import get_logger
from services.models import (
    generation_defaults,
    load_tokenizer,
    model_vocab_size,
    resolve_model_path,
    served_max_model_len,
)
from services.recent import RecentLog
from services.scorer.online import OnlinePredictor
from services.scorer.predictor import LengthPredictor
from services.settings import Settings
from services.tokens import tokenize

log = get_logger(__name__)

FEEDBACK_PROMPT_CHARS = 4000
REFRESH_INTERVAL_S = 5.0


class RequestRejected(Exception):
    """A request that cannot be served as given; becomes a 4xx error answer."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


async def check_model(catalog: AdapterCatalog, request: m.CompletionRequest) -> str | None:
    """The adapter the request selects (None: the base model), which its (resolved) tenant
    may use: the same 404 as the gateway's for an unknown name and for another tenant's
    adapter, since AMQP producers reach the scorer without passing the gateway."""
    try:
        spec = await catalog.resolve(request.model, request.tenant)
        return spec.name if spec is not None else None
    except ModelNotFound:
        raise RequestRejected(
            f"The model `{request.model}` does not exist.", "model_not_found", 404
        ) from None
    except CatalogUnavailable:
        raise RequestRejected(
            "the adapter registry (Redis) is not reachable; retry later", "service_unavailable", 503
        ) from None


def resolve_tenant(request: m.CompletionRequest, user_id: str | None, trusted: set[str]) -> str:
    """A tenant comes from authentication: the gateway's word, or the AMQP user itself."""
    if user_id and user_id not in trusted:
        return user_id
    if user_id in trusted and request.tenant:
        return request.tenant
    raise RequestRejected(
        "the publisher is not authenticated: set the AMQP user_id property", "unauthenticated", 401
    )


MAX_STOP_SEQUENCES = 4
MAX_STOP_TOKEN_IDS = 256
MAX_TEMPERATURE = 2.0
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_fields(request: m.CompletionRequest) -> None:
    """The gateway's schema limits, for requests that come straight over AMQP: bad
    sampling parameters are refused here, before any work or charge, and never reach a
    worker's batch."""
    if request.kind == "chat" and not request.messages:
        raise RequestRejected("messages must not be empty")
    params = request.sampling
    problem = validate_sampling(params)
    if problem is None and not params.temperature <= MAX_TEMPERATURE:
        problem = f"temperature must be in [0, {MAX_TEMPERATURE:g}]"
    if problem is None and len(params.stop) > MAX_STOP_SEQUENCES:
        problem = f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
    if problem is None and len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        problem = f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed"
    if problem is None and any(msg.role not in CHAT_ROLES for msg in request.messages):
        problem = f"chat roles must be one of {', '.join(CHAT_ROLES)}"
    if problem is None and request.prompt_token_ids is not None and request.kind != "completion":
        problem = "prompt_token_ids is for completions; a chat sends messages"
    keep = request.truncate_prompt_tokens
    if problem is None and keep is not None and not (keep == -1 or keep >= 1):
        problem = "truncate_prompt_tokens must be -1 or at least 1"
    if problem is None and request.continue_final_message and request.add_generation_prompt:
        problem = "continue_final_message and add_generation_prompt cannot both be true"
    if problem is None and len(request.chat_template_kwargs) > m.MAX_TEMPLATE_ARGS:
        problem = f"at most {m.MAX_TEMPLATE_ARGS} chat_template_kwargs are allowed"
    if problem is None and len(request.tools) > m.MAX_TOOLS:
        problem = f"at most {m.MAX_TOOLS} tools are allowed"
    if problem is None and not m.INT64_MIN <= request.priority <= m.INT64_MAX:
        problem = f"priority must be in [{m.INT64_MIN}, {m.INT64_MAX}]"
    if problem is None and not set(request.defaulted) <= set(m.DEFAULTABLE):
        problem = f"defaulted may only name {', '.join(m.DEFAULTABLE)}"
    if problem is not None:
        raise RequestRejected(problem)


def usable_generation_defaults(defaults: dict[str, float | int]) -> dict[str, float | int]:
    """The model's sampling defaults when a request may carry them (else none, with a
    warning: a generation config with a temperature of 5 is not applied)."""
    probe = m.CompletionRequest(request_id="-", model="-",
                                sampling=m.SamplingParams(**defaults))  # type: ignore[arg-type]
    try:
        check_fields(probe)
    except RequestRejected as exc:
        log.warning("generation_defaults_ignored", defaults=defaults, problem=str(exc))
        return {}
    return defaults


class Scorer:
    """Pure scoring step: request in, scored request out (or :class:`RequestRejected`)."""

    def __init__(self, tokenizer, predictor: OnlinePredictor, max_model_len: int,
                 generation_defaults: dict[str, float | int] | None = None,
                 vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.predictor = predictor
        self.max_model_len = max_model_len
        self.generation_defaults = generation_defaults or {}
        """The model's own sampling defaults, for the fields a request left unset."""
        self.vocab_size = vocab_size
        """Token ids a ``logit_bias`` may name are below this (the model's vocabulary);
        None leaves the check to the worker."""

    def score(self, request: m.CompletionRequest) -> m.ScoredRequest:
        check_fields(request)
        if request.sampling.structured is not None:
            problem = grammar_problem(request.sampling.structured)
            if problem is not None:
                raise RequestRejected(problem)
        vocab = self.vocab_size
        if vocab is not None and any(b.token_id >= vocab for b in request.sampling.logit_bias):
            raise RequestRejected(f"logit_bias token ids must be in [0, {vocab}) for this model")
        if vocab is not None and any(t >= vocab for t in request.sampling.allowed_token_ids):
            raise RequestRejected(f"allowed_token_ids must be in [0, {vocab}) for this model")
        ids = self._prompt_ids(request)
        if request.prompt_token_ids is not None:
            request = dataclasses.replace(request, prompt=self._spell(ids))
        if not ids:  # an empty prompt, for a model without a BOS token to start from
            raise RequestRejected("prompt must not be empty: this model has no token to start from")
        request = self._fill_defaults(request, room=self.max_model_len - len(ids))
        max_tokens = request.sampling.max_tokens
        if len(ids) + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                f"{max_tokens} for the completion).",
                "context_length_exceeded",
            )
        pred = self.predictor.predict(request.prompt_text(), input_tokens=len(ids))
        shortest = max(1.0, request.sampling.min_tokens)  # no answer ends before min_tokens
        longest = min(max_tokens, self._longest_choice(request.sampling.structured))
        clamp = lambda x: float(min(max(x, shortest), longest))
        score = m.LengthScore(
            uncertainty=float(pred.uncertainty),
            p10=clamp(pred.p10),
            p50=clamp(pred.p50),
            p90=clamp(pred.p90),
            predictor="fairway",
            features=[float(x) for x in pred.features],
        )
        return m.ScoredRequest(
            request_id=request.request_id, request=request, prompt_token_ids=ids, score=score
        )

    def tokenized(self, request: m.CompletionRequest) -> m.FinalAnswer:
        """The answer to a tokenize-only request: its prompt's token ids as the model
        would see them (a chat's as its template renders it, truncated as asked), their
        names in the vocabulary and the text they decode to. A prompt longer than the
        context is tokenized all the same: the caller counts it to know."""
        check_fields(request)
        ids = self._prompt_ids(request)
        text = self._spell(ids) if request.prompt_token_ids is not None else ""
        names = [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        return m.FinalAnswer(request_id=request.request_id, token_offset=0, text_offset=0,
                             finish_reason="stop", prompt_tokens=len(ids),
                             tokenized=m.Tokenized(ids, names, text))

    def _prompt_ids(self, request: m.CompletionRequest) -> list[int]:
        """The prompt's token ids, truncated as the request asks."""
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            try:
                ids = tokenize(self.tokenizer, request)
            except Exception as exc:  # noqa: BLE001 - any tokenizer refusal is a 400, not a crash
                raise RequestRejected(f"the input cannot be tokenized: {exc}") from None
        keep = request.truncate_prompt_tokens
        if keep is not None:
            ids = ids[-(self.max_model_len if keep == -1 else keep):]
        return ids

    def _longest_choice(self, structured: m.StructuredOutput | None) -> float:
        """A choice's answer is one of its strings and its end: no longer than the longest
        as the tokenizer spells it, plus the stop token (the model could spell it in
        more, smaller tokens, but hardly does). Anything else: no bound."""
        if structured is None or structured.kind != "choice" or structured.after_reasoning:
            return math.inf
        return 1.0 + max(len(self.tokenizer.encode(choice, add_special_tokens=False))
                         for choice in structured.choices)

    def _spell(self, ids: list[int]) -> str:
        """A token-id prompt's text (what the predictor reads and ``echo`` gives back, as
        vLLM decodes it), once its ids are checked against the model's vocabulary."""
        vocab = self.vocab_size if self.vocab_size is not None else len(self.tokenizer)
        if any(not 0 <= token < vocab for token in ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab}) for this model")
        try:
            return self.tokenizer.decode(ids)
        except Exception as exc:  # noqa: BLE001 - any tokenizer refusal is a 400, not a crash
            raise RequestRejected(f"the prompt's token ids cannot be decoded: {exc}") from None

    def _fill_defaults(self, request: m.CompletionRequest, room: int) -> m.CompletionRequest:
        """The fields the client left unset: the model's sampling defaults, and a default
        ``max_tokens`` lowered to the ``room`` the prompt leaves (none left: refused later)."""
        updates = {k: v for k, v in self.generation_defaults.items() if k in request.defaulted}
        # Not below min_tokens: such a request does not fit, and is refused so.
        room = max(room, request.sampling.min_tokens)
        if "max_tokens" in request.defaulted and 0 < room < request.sampling.max_tokens:
            updates["max_tokens"] = room
        if not updates:
            return request
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, **updates))


def length_sample(event: m.RequestFinished, now: float) -> dict[str, object]:
    """A predicted-vs-actual output length entry for the dashboard's scatter plot."""
    return {
        "t": now,
        "request_id": event.request_id,
        "tenant": event.tenant,
        "model": event.model,
        "pool": event.pool,
        "predicted": event.score.p50,
        "p10": event.score.p10,
        "p90": event.score.p90,
        "actual": event.output_tokens,
        "finish_reason": event.finish_reason,
    }


class ScorerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trusted = {u for u in settings.trusted_amqp_users.split(",") if u}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        s = self.settings
        # Local files first: a wrong path fails at once, not after waiting for Redis.
        path = resolve_model_path(s.model_path, s.cache_dir)
        tokenizer = await asyncio.to_thread(load_tokenizer, path)
        base = (
            LengthPredictor.load(s.predictor_artifact)
            if s.predictor_artifact
            else LengthPredictor.default()
        )
        defaults = usable_generation_defaults(generation_defaults(path))
        if defaults:  # as vLLM says when a model's generation config sets the defaults
            log.info("generation_defaults", **defaults,
                     detail="requests that do not set these get the model's own values")
        self.redis = redis_client.connect(s.redis_url)
        await redis_client.wait_until_up(self.redis)  # the learned predictor state lives there
        self.adapters = AdapterCatalog.from_settings(s, self.redis)
        self.length_samples = RecentLog(self.redis, keys.LENGTH_SAMPLES, keys.LENGTH_SAMPLES_CAP)
        online = OnlinePredictor(base, self.redis, s.model_name, marker_ttl_s=s.marker_ttl_s)
        await redis_client.when_up(online.start)
        self.scorer = Scorer(tokenizer, online, served_max_model_len(s), defaults,
                             vocab_size=model_vocab_size(path) or len(tokenizer))

        self.connection, _ = await amqp.open_until_up(s, "scorer", self._consume)
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        log.info("scorer_started", model=s.model_name, model_path=path)

    async def _consume(self, connection: AbstractRobustConnection) -> None:
        """Open the channel, declare (or check) the topology, consume requests and feedback."""
        self.channel = await connection.channel()
        await self.channel.set_qos(prefetch_count=64)
        topo = await topology.declare(self.channel, passive=not self.settings.declare_topology)
        self.scored_exchange = topo.exchange(topology.SCORED_EXCHANGE)
        await amqp.consume(
            self.channel,
            topo.queues[topology.SCORER_QUEUE],
            m.CompletionRequest,
            self.on_request,
            service="scorer",
        )
        await amqp.consume(
            self.channel,
            topo.queues[topology.SCORER_FEEDBACK_QUEUE],
            m.RequestFinished,
            self.on_finished,
            service="scorer",
        )

    async def on_request(
        self, request: m.CompletionRequest, message: AbstractIncomingMessage
    ) -> None:
        request.reply_to = message.reply_to or request.reply_to
        try:
            request.tenant = resolve_tenant(request, message.user_id, self.trusted)
            if not await self.claim(request.request_id, request.tenant):
                raise RequestRejected(
                    f"request_id {request.request_id!r} is in use by another tenant; "
                    "choose a unique id", "duplicate_request_id", 409)
            adapter = await check_model(self.adapters, request)
            if request.tokenize_only:
                await amqp.reply(self.channel, request.reply_to, self.scorer.tokenized(request))
                await message.ack()
                return
            if not request.created:
                request.created = time.time()
            scored = self.scorer.score(request)
            scored.adapter = adapter
        except RequestRejected as exc:
            log.info("request_rejected", request_id=request.request_id, reason=str(exc))
            await amqp.reply(
                self.channel,
                request.reply_to,
                amqp.error_answer(request.request_id, str(exc), status=exc.status, code=exc.code),
            )
            await message.reject(requeue=False)
            prom.dead_lettered.labels(topology.SCORER_QUEUE, exc.code).inc()
            return
        await amqp.publish(self.scored_exchange, scored, topology.SUBMIT_ROUTING_KEY)
        await message.ack()

    async def claim(self, request_id: str, tenant: str) -> bool:
        """Bind a request id to its tenant (for ``marker_ttl_s``): another tenant's request
        with the same id is refused, so it can neither be answered with, nor swallow, this
        one. One round trip: set the owner unless set, and read who it is."""
        async with self.redis.pipeline(transaction=False) as pipe:
            redis_client.set_marker(pipe, request_id, keys.MARKER_OWNER, tenant, self.settings.marker_ttl_s,
                                    nx=True)
            pipe.hget(keys.request_markers(request_id), keys.MARKER_OWNER)
            *_, owner = await pipe.execute()
        return owner is None or owner.decode() == tenant

    async def on_finished(self, event: m.RequestFinished, message: AbstractIncomingMessage) -> None:
        if not event.requeue and event.finish_reason in ("stop", "length"):
            prom.observe_length(event.model, event.score.p50, event.output_tokens)
        if not event.requeue and event.finish_reason in ("stop", "length"):
            self.length_samples.add(length_sample(event, time.time()))
        if (
            event.model == self.settings.model_name
            and not event.requeue
            and event.prompt
            and event.finish_reason in ("stop", "length")
        ):
            await self.scorer.predictor.observe(
                event.prompt,
                event.output_tokens,
                features=event.score.features or None,
                truncated=event.finish_reason == "length",
                request_id=event.request_id,
            )
        await message.ack()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                await self.scorer.predictor.refresh()
            except Exception as exc:  # noqa: BLE001 - Redis blips must not kill the loop
                log.warning("predictor_refresh_failed", error=str(exc))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if getattr(self, "connection", None):
            await self.connection.close()
        if getattr(self, "length_samples", None):
            await self.length_samples.close()
        if getattr(self, "redis", None):
            await self.redis.aclose()


async def main(settings: Settings) -> None:
    service = ScorerService(settings)
    await amqp.run_until_signalled(service.start, service.stop)
