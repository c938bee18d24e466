"""EchoEngine: the engine interface without a model, for measuring the pipeline itself.

It answers every request with the request's own prompt token ids, cycling, at a fixed
pace of ``tokens_per_s`` per request (output token ``k``, counted from 1, is due ``k /
tokens_per_s`` seconds after the request was admitted; 0 means no pacing). So a request
that ends with ``n`` output tokens spends exactly ``n / tokens_per_s`` seconds in the
engine, and whatever a client measures beyond that is what the pipeline costs.

Everything else follows :class:`~services.engine.engine.LLMEngine`: the same request
checks and errors, ``max_tokens``, stop token ids (EOS unless ``ignore_eos``), stop
strings through the same incremental detokenizer (neither ends an answer before
``min_tokens``), aborts answered ``cancelled`` on the next step, at most
``max_num_seqs`` running with the rest waiting, a KV-token budget (a request reserves
prompt + ``max_tokens`` when admitted, so it is never preempted),
and the same :class:`EngineStats`. It samples nothing, so penalties, ``logit_bias``,
``min_p`` and the temperature are checked but have nothing to act on, and each token it
echoes is certain (log-probability 0) where log-probabilities are asked for. A structured
request (``response_format`` json, ...) is refused: an echoed prompt would not hold to it.

:meth:`wait_s` tells the engine thread how long it may sleep (on its command queue)
before the next token is due, so the engine never busy-waits and a new request is
admitted at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.engine.detokenizer import (
    IncrementalDetokenizer,
    StopStringBuffer,
    append_token,
    stop_reason,
    text_state,
)
from services.engine.engine import _as_id_set, check_request
from services.engine.interface import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStats,
    RequestOutput,
)
from services.logs import get_logger
from services.messages import SamplingParams, TokenLogprob, TopLogprob
from services.models import model_context_length

log = get_logger(__name__)


@dataclass
class _EchoRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    text: StopStringBuffer
    reserved_tokens: int
    started_at: float = 0.0
    generated: int = 0
    prompt_logprobs_due: bool = False
    """The request asked for the prompt's log-probabilities and they are not sent yet."""


class EchoEngine:
    """Model-free engine with LLMEngine's interface. All methods are called from one thread."""

    def __init__(
        self,
        tokenizer: Any,
        config: EngineConfig,
        *,
        tokens_per_s: float = 1000.0,
        vocab_size: int | None = None,
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
        max_model_len: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tokens_per_s < 0 or math.isnan(tokens_per_s):
            raise ValueError("tokens_per_s must be >= 0 (0 means as fast as possible)")
        self.tokenizer = tokenizer
        self.config = config
        self.tokens_per_s = float(tokens_per_s)
        self.interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(max_model_len or config.max_model_len, config.max_model_len)
        self.total_kv_tokens = config.num_blocks * config.block_size
        self.clock = clock
        self._waiting: deque[_EchoRequest] = deque()
        self._running: dict[str, _EchoRequest] = {}
        self._pending: list[RequestOutput] = []
        self._reserved = 0
        log.info("echo_engine_ready", tokens_per_s=self.tokens_per_s,
                 max_num_seqs=config.max_num_seqs, kv_tokens=self.total_kv_tokens)

    @classmethod
    def from_pretrained(
        cls, path: str, config: EngineConfig | None = None, tokens_per_s: float = 1000.0
    ) -> EchoEngine:
        """The model's tokenizer and config only: no weights are read."""
        from transformers import AutoConfig

        from services.models import load_tokenizer

        tokenizer = load_tokenizer(path)
        model_config = AutoConfig.from_pretrained(path)
        text_config = (
            model_config.get_text_config()
            if hasattr(model_config, "get_text_config")
            else model_config
        )
        config = config or EngineConfig()
        eos = _as_id_set(getattr(model_config, "eos_token_id", None))
        eos |= _as_id_set(getattr(tokenizer, "eos_token_id", None))
        max_positions = model_context_length(model_config.to_dict())
        return cls(
            tokenizer,
            config,
            tokens_per_s=tokens_per_s,
            vocab_size=int(getattr(text_config, "vocab_size", None) or len(tokenizer)),
            eos_token_ids=frozenset(eos),
            max_model_len=min(config.max_model_len, max_positions or config.max_model_len),
        )

    # ---- requests -------------------------------------------------------------------

    def prepare(self, req: EngineRequest) -> None:
        """Refuse a structured request, as early as LLMEngine would compile it: an echoed
        prompt would not hold to its language."""
        if req.sampling.structured is not None:
            raise EngineError("structured outputs need a model; the echo engine answers with the prompt")
        if req.sampling.allowed_token_ids or req.sampling.bad_words:
            raise EngineError("allowed_token_ids and bad_words need a model; the echo engine "
                              "answers with the prompt")

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises EngineError when it can never be served (as LLMEngine)."""
        prompt = list(req.prompt_token_ids)
        params = req.sampling
        rid = req.request_id
        if rid in self._running or any(r.request_id == rid for r in self._waiting):
            raise EngineError(f"request id {rid!r} is already in the engine")
        check_request(prompt, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                      kv_tokens=self.total_kv_tokens, resume=req.resume)
        self.prepare(req)
        resumed = list(req.resume.token_ids) if req.resume else []
        detokenizer, text = text_state(self.tokenizer, prompt, params.stop, resumed,
                                       req.resume.streamed_chars if req.resume else 0,
                                       keep_stop=params.include_stop_str_in_output,
                                       skip_special_tokens=params.skip_special_tokens,
                                       spaces_between_special_tokens=(
                                           params.spaces_between_special_tokens))
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        self._waiting.append(_EchoRequest(
            request_id=rid,
            prompt=prompt,
            sampling=params,
            stop_token_ids=frozenset(stop_ids),
            detokenizer=detokenizer,
            text=text,
            reserved_tokens=self._blocks(len(prompt) + params.max_tokens) * self.config.block_size,
            generated=len(resumed),  # the echo goes on where the earlier run stopped
            prompt_logprobs_due=params.prompt_logprobs is not None and not resumed,
        ))
        self._admit(self.clock())

    def abort_request(self, request_id: str) -> None:
        """Cancel a request: its final output (``cancelled``) comes with the next step."""
        req = self._running.pop(request_id, None)
        if req is not None:
            self._reserved -= req.reserved_tokens
        else:
            for i, waiting in enumerate(self._waiting):
                if waiting.request_id == request_id:
                    req = waiting
                    del self._waiting[i]
                    break
        if req is None:
            return
        self._pending.append(self._final(req, [], "", "cancelled"))
        self._admit(self.clock())

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting or self._pending)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_free_kv_tokens=self.total_kv_tokens - self._reserved,
            num_total_kv_tokens=self.total_kv_tokens,
            max_num_seqs=self.config.max_num_seqs,
            num_preemptions=0,
            # Echo has no prefill work (0 reads as "not measured"); its decode "step" is
            # the per-request token interval, independent of the batch.
            prefill_tokens_per_s=0.0,
            decode_step_ms=1000.0 * self.interval_s,
        )

    # ---- pacing ---------------------------------------------------------------------

    def wait_s(self) -> float:
        """Seconds until step() has something to return (0: now; the thread may sleep)."""
        if self._pending or not self._running:
            return 0.0
        now = self.clock()
        due = min(r.started_at + (r.generated + 1) * self.interval_s for r in self._running.values())
        return max(due - now, 0.0)

    def step(self) -> list[RequestOutput]:
        """Every token due by now, one output per request that has any (never sleeps)."""
        outputs, self._pending = self._pending, []
        now = self.clock()
        finished: list[str] = []
        for req in self._running.values():
            if self.interval_s:
                due = int((now - req.started_at) / self.interval_s + 1e-9)
            else:
                due = req.sampling.max_tokens
            n = min(due, req.sampling.max_tokens) - req.generated
            if n <= 0:
                continue
            output = self._generate(req, n)
            outputs.append(output)
            if output.finished:
                finished.append(req.request_id)
        for rid in finished:
            self._reserved -= self._running.pop(rid).reserved_tokens
        if finished:
            self._admit(now)
        return outputs

    # ---- internals ------------------------------------------------------------------

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _admit(self, now: float) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            req = self._waiting[0]
            if self._reserved + req.reserved_tokens > self.total_kv_tokens:
                break
            self._waiting.popleft()
            # Paced as if it had run from the start: a resumed request's next token is due
            # one interval from now.
            req.started_at = now - req.generated * self.interval_s
            self._reserved += req.reserved_tokens
            self._running[req.request_id] = req

    def _generate(self, req: _EchoRequest, n: int) -> RequestOutput:
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        text = ""
        reason: str | None = None
        why: str | int | None = None
        for _ in range(n):
            token = req.prompt[req.generated % len(req.prompt)]
            req.generated += 1
            tokens.append(token)
            if req.sampling.logprobs is not None:
                logprobs.append(self._certain(token, req.sampling.logprobs))
            piece, stopped = append_token(token, req.stop_token_ids, req.detokenizer, req.text,
                                          may_stop=req.generated > req.sampling.min_tokens)
            text += piece
            if stopped:
                reason, why = "stop", stop_reason(token, req.text, req.sampling.stop_token_ids)
                break
        if reason is None and req.generated >= req.sampling.max_tokens:
            reason = "length"
        prompt_logprobs: list[TokenLogprob] = []
        if req.prompt_logprobs_due and tokens:
            req.prompt_logprobs_due = False
            first = TokenLogprob(token=self.tokenizer.decode([req.prompt[0]]), logprob=0.0,
                                 token_id=req.prompt[0])
            top = req.sampling.prompt_logprobs or 0
            prompt_logprobs = [first, *(self._certain(t, top) for t in req.prompt[1:])]
        if reason is None:
            return RequestOutput(req.request_id, tokens, text, False, None,
                                 len(req.prompt), req.generated, logprobs=logprobs,
                                 prompt_logprobs=prompt_logprobs)
        if not req.text.stopped:
            text += req.text.append(req.detokenizer.flush())[0]
            text += req.text.flush()
        return self._final(req, tokens, text, reason, logprobs, prompt_logprobs, why)

    def _certain(self, token: int, top: int) -> TokenLogprob:
        """The echo's token is certain: log-probability 0, and the only one at its place."""
        text = self.tokenizer.decode([token])
        return TokenLogprob(token=text, logprob=0.0, top=[TopLogprob(token, text, 0.0)][:top],
                            token_id=token, rank=1)

    @staticmethod
    def _final(req: _EchoRequest, tokens: list[int], text: str, reason: str,
               logprobs: list[TokenLogprob] | None = None,
               prompt_logprobs: list[TokenLogprob] | None = None,
               why: str | int | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_text=text,
            finished=True,
            finish_reason=reason,  # type: ignore[arg-type]
            num_prompt_tokens=len(req.prompt),
            num_output_tokens=req.generated,
            logprobs=logprobs or [],
            prompt_logprobs=prompt_logprobs or [],
            stop_reason=why,
        )
