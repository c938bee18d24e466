"""LLMEngine: continuous batching over a transformers causal LM with a paged KV cache.

One ``step()`` = schedule (pure) -> one forward over the flattened ragged batch ->
sample -> detokenize and check stops -> outputs. The model runs unchanged; only its
attention is swapped for the paged hook in :mod:`services.engine.attention`.
"""

from __future__ import annotations

import heapq
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.attention import (
    PagedAttentionFn,
    PagedAttentionMetadata,
    forward_context,
    make_slot_plan,
    paged_attention_reference,
    use_paged_attention,
)
from services.engine.detokenizer import (
    IncrementalDetokenizer,
    StopStringBuffer,
    TokenBytes,
    append_token,
    stop_reason,
    text_state,
)
from services.engine.forward import LlamaStepForward
from services.engine.interface import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStats,
    RequestOutput,
    ResumedOutput,
)
from services.engine.kernels import install_kernels
from services.engine.kv_cache import (
    BlockAllocator,
    KVCacheSpec,
    allocate_kv_cache,
    allocate_layer_caches,
)
from services.engine.lora import LoraConfig, LoraManager, lora_step
from services.engine.sampling import (
    allowed_ids,
    bad_word_ids,
    make_generator,
    sample_tokens,
    token_logprobs,
    validate_sampling,
)
from services.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput, Sequence
from services.engine.structured import GrammarCompiler, GrammarState
from services.logs import get_logger
from services.messages import MIN_LOGPROB, SamplingParams, TokenLogprob, TopLogprob
from services.models import model_context_length

log = get_logger(__name__)

EWMA_ALPHA = 0.2
PROMPT_LOGPROBS_ROWS = 256
"""Prompt positions whose log-softmax is taken at once (a [rows, vocab] fp32 tensor)."""


@dataclass
class _RequestState:
    """A request in the engine; what the sampler reads of it (a ``SamplingRow``)."""

    seq: Sequence
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    text: StopStringBuffer
    prompt_logprobs: list[TokenLogprob] | None = None
    """The prompt's log-probabilities as far as computed, while the request asked for them
    and they are not sent yet (then None)."""
    grammar: GrammarState | None = None
    """A structured request's place in its language."""
    bad_word_ids: list[list[int]] = field(default_factory=list)
    """Its ``bad_words`` as token ids (:func:`sampling.bad_word_ids`)."""
    allowed_ids: torch.Tensor | None = None
    """Its ``allowed_token_ids`` on the engine's device (:func:`sampling.allowed_ids`)."""

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens


def _ewma(old: float, sample: float) -> float:
    return sample if old == 0.0 else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * sample


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _cache_salt(req: EngineRequest) -> bytes:
    """What a request's K/V depend on besides its tokens: its adapter, and the salt the
    worker gives it."""
    adapter = (req.lora.name, req.lora.path) if req.lora is not None else ("", "")
    return "\0".join((*adapter, req.cache_salt)).encode()


def check_request(
    prompt: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int, kv_tokens: int,
    resume: ResumedOutput | None = None,
) -> None:
    """Raise EngineError when a request can never be served (any engine, same words)."""
    if not prompt:
        raise EngineError("the prompt is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise EngineError(f"prompt token ids must be in [0, {vocab_size})")
    if params.logit_bias and max(b.token_id for b in params.logit_bias) >= vocab_size:
        raise EngineError(f"logit_bias token ids must be in [0, {vocab_size})")
    if params.allowed_token_ids and max(params.allowed_token_ids) >= vocab_size:
        raise EngineError(f"allowed_token_ids must be in [0, {vocab_size})")
    if resume is not None and resume.token_ids:
        if len(resume.token_ids) >= params.max_tokens:
            raise EngineError("the resumed output already has max_tokens tokens")
        if min(resume.token_ids) < 0 or max(resume.token_ids) >= vocab_size:
            raise EngineError(f"resumed output token ids must be in [0, {vocab_size})")
    problem = validate_sampling(params)
    if problem:
        raise EngineError(problem)
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise EngineError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds the maximum context length of {max_model_len} tokens"
        )
    if total > kv_tokens:
        raise EngineError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds the KV cache of this worker ({kv_tokens} tokens)"
        )


class LLMEngine:
    """Continuous-batching engine. All methods are called from one thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: EngineConfig,
        device: str,
        attention_fn: PagedAttentionFn | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = config
        model_config = model.config
        text_config = (
            model_config.get_text_config()
            if hasattr(model_config, "get_text_config")
            else model_config
        )
        max_positions = model_context_length(model_config.to_dict())
        self.max_model_len = min(config.max_model_len, max_positions or config.max_model_len)
        self.vocab_size = int(text_config.vocab_size)

        use_paged_attention(model)
        # None: by device, the Triton decode-attention and fused-norm kernels on CUDA
        # (when Triton imports), the torch reference path elsewhere.
        self.attention_fn = attention_fn or install_kernels(model, self.device)
        self.dtype = next(model.parameters()).dtype
        spec = KVCacheSpec.from_model_config(model_config)
        self.allocator = BlockAllocator(config.num_blocks, config.block_size,
                                        enable_caching=config.enable_prefix_caching)
        self.kv_caches = allocate_kv_cache(
            spec, config.num_blocks, config.block_size, self.dtype, self.device
        )
        # On CPU every running request also keeps its context contiguous in a slot, so
        # attention reads views instead of gathering blocks: the gather copies every
        # context every layer every step, the largest cost of a CPU decode step. Only
        # when the slots take no more memory than the paged pool itself.
        self.slot_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kv_heads = spec.num_kv_heads
        slot_tokens = config.max_num_seqs * self.max_model_len
        if self.device.type == "cpu" and slot_tokens <= config.num_blocks * config.block_size:
            # [slot, kv_heads, position, head_dim]: a request's keys per head contiguous.
            shape = (config.max_num_seqs, spec.num_kv_heads, self.max_model_len, spec.head_dim)
            self.slot_caches = allocate_layer_caches(spec, shape, self.dtype, self.device)
        self._free_slots = list(range(config.max_num_seqs))
        self._slot_of: dict[str, int] = {}
        self._token_spellings: dict[int, tuple[str, bytes]] = {}
        self._token_bytes = TokenBytes(tokenizer)
        self.lora = None
        if config.max_loras > 0:
            lora_config = LoraConfig(config.max_loras, config.max_lora_rank, config.max_cpu_loras)
            self.lora = LoraManager(model, lora_config, self.device, self.dtype)
        self.scheduler = Scheduler(
            config.max_num_seqs, config.max_num_batched_tokens, self.allocator,
            max_loras=config.max_loras or None,
        )

        eos = _as_id_set(getattr(model_config, "eos_token_id", None))
        eos |= _as_id_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        eos |= _as_id_set(getattr(tokenizer, "eos_token_id", None))
        self.eos_token_ids = frozenset(eos)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # On CPU a plain Llama runs a lean forward (same operations, less Python per step);
        # elsewhere, or for other models, transformers' forward with the paged hook.
        self._lean = (
            LlamaStepForward(model)
            if self.device.type == "cpu" and LlamaStepForward.supports(model)
            else None
        )

        self._grammars: GrammarCompiler | None = None
        """Compiles structured requests' languages; made with the first of them."""
        self._grammars_lock = threading.Lock()
        self._requests: dict[str, _RequestState] = {}
        self._pending: list[RequestOutput] = []
        self._prefill_tokens_per_s = 0.0
        self._decode_step_ms = 0.0
        log.info(
            "engine_ready",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            kv_blocks=config.num_blocks,
            block_size=config.block_size,
            kv_cache_mib=round(
                spec.bytes_per_token(self.dtype) * config.num_blocks * config.block_size / 2**20, 1
            ),
            max_model_len=self.max_model_len,
        )

    @classmethod
    def from_pretrained(
        cls, path: str, device: str = "cpu", dtype: str = "auto", config: EngineConfig | None = None
    ) -> LLMEngine:
        from services.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(path)
        model = load_model(path, device, dtype)
        return cls(model, tokenizer, config or EngineConfig(), device)

    # ---- requests -------------------------------------------------------------------

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises EngineError when it can never be served."""
        prompt = list(req.prompt_token_ids)
        params = req.sampling
        if req.request_id in self._requests:
            raise EngineError(f"request id {req.request_id!r} is already in the engine")
        check_request(prompt, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                      kv_tokens=self.allocator.num_blocks * self.allocator.block_size,
                      resume=req.resume)
        resumed = list(req.resume.token_ids) if req.resume else []
        grammar = None
        if params.structured is not None:
            grammar = self._grammar_compiler().state(params.structured, resumed)
        seq = Sequence(  # a resumed request prefills its earlier output too (as a recompute)
            request_id=req.request_id,
            token_ids=prompt + resumed,
            num_prompt_tokens=len(prompt),
            max_tokens=params.max_tokens,
            priority=req.priority,
            cache_salt=_cache_salt(req),
            reads_prefix_cache=params.prompt_logprobs is None,
        )
        if req.lora is not None:
            if self.lora is None:
                raise EngineError("this worker serves no LoRA adapters (max_loras is 0)")
            live = {s.seq.lora for s in self._requests.values() if s.seq.lora is not None}
            seq.lora = self.lora.acquire(req.lora, live)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        detokenizer, text = text_state(self.tokenizer, prompt, params.stop, resumed,
                                       req.resume.streamed_chars if req.resume else 0,
                                       keep_stop=params.include_stop_str_in_output,
                                       skip_special_tokens=params.skip_special_tokens,
                                       spaces_between_special_tokens=(
                                           params.spaces_between_special_tokens))
        self._requests[req.request_id] = _RequestState(
            seq=seq,
            sampling=params,
            stop_token_ids=frozenset(stop_ids),
            generator=make_generator(params.seed, self.device),
            detokenizer=detokenizer,
            text=text,
            # A resumed request's earlier run sent them with its first output.
            prompt_logprobs=[self._unscored(prompt[0])]
            if params.prompt_logprobs is not None and not resumed else None,
            grammar=grammar,
            bad_word_ids=bad_word_ids(self.tokenizer, params.bad_words),
            allowed_ids=allowed_ids(params, self.device),
        )
        self.scheduler.add(seq)

    def prepare(self, req: EngineRequest) -> None:
        """The slow part of taking ``req`` that touches no engine state, for any thread:
        compile a structured request's language (with a large vocabulary and schema,
        long enough to stall every running request were it done in the step loop).
        ``add_request`` then finds it compiled. Raises EngineError as that would."""
        if req.sampling.structured is not None:
            self._grammar_compiler().compile(req.sampling.structured)

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._grammars

    def abort_request(self, request_id: str) -> None:
        """Cancel a request: blocks are freed now, its final output comes with the next step."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        self.scheduler.finish(state.seq)
        self._release_slot(request_id)
        self._pending.append(self._final(state, [], "", "cancelled"))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._pending)

    def stats(self) -> EngineStats:
        bs = self.allocator.block_size
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_kv_tokens=self.allocator.num_free_blocks * bs,
            num_total_kv_tokens=self.allocator.num_blocks * bs,
            max_num_seqs=self.config.max_num_seqs,
            num_preemptions=self.scheduler.num_preemptions,
            prefill_tokens_per_s=self._prefill_tokens_per_s,
            decode_step_ms=self._decode_step_ms,
            adapters=self.lora.resident_names() if self.lora is not None else [],
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )

    # ---- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: an output for every request that produced tokens or finished."""
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return outputs
        sched = self.scheduler.schedule()
        if sched.preempted:
            log.debug("preempted", request_ids=sched.preempted)
            for request_id in sched.preempted:  # recomputed from scratch when back
                self._release_slot(request_id)
        if sched.is_empty:
            return outputs
        decode_tokens = sum(
            1
            for item in sched.scheduled
            if item.num_new_tokens == 1 and item.seq.num_computed_tokens == item.seq.num_tokens - 1
        )
        start = time.perf_counter()
        try:
            samplers = [item for item in sched.scheduled if item.samples]
            tokens, logprobs = self._execute(sched, samplers)
        except Exception as exc:  # a failed forward must not take the worker down
            log.exception("engine_step_failed", num_seqs=len(sched.scheduled))
            for item in sched.scheduled:
                state = self._requests[item.seq.request_id]
                outputs.append(self._fail(state, f"{type(exc).__name__}: {exc}"))
            return outputs
        self.scheduler.commit(sched)
        for item, token in zip(samplers, tokens, strict=True):
            state = self._requests[item.seq.request_id]
            output = self._append_token(state, token, logprobs.get(item.seq.request_id))
            outputs.append(output)
        self._record_timing(
            sched.num_batched_tokens - decode_tokens, decode_tokens, time.perf_counter() - start
        )
        return outputs

    def _execute(
        self, sched: SchedulerOutput, samplers: list[ScheduledSeq]
    ) -> tuple[list[int], dict[str, TokenLogprob]]:
        """Run the model over the scheduled tokens and sample for requests at their end;
        the log-probabilities of the sampled tokens of requests that asked for them."""
        bs = self.allocator.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[_RequestState, int]] = []
        starts = [0]
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            c = seq.num_computed_tokens
            state = self._requests[seq.request_id]
            if state.prompt_logprobs is not None:  # positions p predict prompt token p + 1, once
                done = len(state.prompt_logprobs) - 1
                for p in range(max(c, done), min(c + n, seq.num_prompt_tokens - 1)):
                    prompt_rows.append(starts[-1] + p - c)
                    prompt_targets.append((state, seq.token_ids[p + 1]))
            blocks = seq.block_ids
            if n == 1:  # a decode: one token, no ranges
                input_ids.append(seq.token_ids[c])
                positions.append(c)
                slots.append(blocks[c // bs] * bs + c % bs)
            else:
                input_ids.extend(seq.token_ids[c : c + n])
                positions.extend(range(c, c + n))
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(c, c + n))
            query_lens.append(n)
            context_lens.append(c + n)
            tables.append(blocks)
            starts.append(starts[-1] + n)
            if item.samples:
                logit_rows.append(starts[-1] - 1)
        width = max(len(blocks) for blocks in tables)
        if self.slot_caches is not None:
            for item in sched.scheduled:
                if item.seq.num_computed_tokens and item.seq.request_id not in self._slot_of:
                    self._fill_slot(item.seq)

        dev = self.device
        meta = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=torch.tensor(
                [blocks + [0] * (width - len(blocks)) for blocks in tables], dtype=torch.int32
            ).to(dev, non_blocking=True),
            seq_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev, non_blocking=True),
            kv_caches=self.kv_caches,
            attention_fn=self.attention_fn,
        )
        if self.slot_caches is not None:
            meta.slot_caches = self.slot_caches
            meta.slot_plan = make_slot_plan(
                query_lens,
                context_lens,
                [self._slot(item.seq.request_id) for item in sched.scheduled],
                self._kv_heads,
                self.max_model_len,
                self.dtype,
                dev,
                # A custom attention function gets the paged cache; the slots stay written.
                attend=self.attention_fn is paged_attention_reference,
            )
        ids = torch.tensor([input_ids], dtype=torch.long).to(dev, non_blocking=True)
        pos = torch.tensor([positions], dtype=torch.long).to(dev, non_blocking=True)
        kept = logit_rows + prompt_rows
        rows = torch.tensor(kept, dtype=torch.long).to(dev, non_blocking=True)
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": pos, "use_cache": False}
        if self._takes_logits_to_keep:
            # No request samples during a pure prefill chunk: keep one row, not all.
            kwargs["logits_to_keep"] = rows if kept else 1
        lora = None
        if self.lora is not None:  # page in this step's adapters, between steps
            lora = self.lora.step(
                [(item.seq.lora, item.num_new_tokens) for item in sched.scheduled],
                {s.lora for s in self.scheduler.running if s.lora is not None},
                all_decode=len(input_ids) == len(sched.scheduled),
            )
        with torch.inference_mode(), forward_context(meta), lora_step(lora):
            if self._lean is not None:
                logits = self._lean(ids, pos, rows if kept else None, meta)
                if logits is None:
                    return [], {}
            else:
                logits = self.model(**kwargs).logits[0]
            if logits.shape[0] != len(kept):
                logits = logits[rows]
            if prompt_rows:
                self._add_prompt_logprobs(logits[len(logit_rows):], prompt_targets)
                logits = logits[: len(logit_rows)]
            if not samplers:
                return [], {}
            states = [self._requests[item.seq.request_id] for item in samplers]
            asked = [i for i, s in enumerate(states) if s.sampling.logprobs is not None]
            raw = logits[asked] if asked else None  # a copy: sampling adjusts logits in place
            tokens = sample_tokens(logits, states)
            if raw is None:
                return tokens, {}
            found = token_logprobs(raw, [tokens[i] for i in asked],
                                   [states[i].sampling.logprobs or 0 for i in asked])
            return tokens, {
                states[i].seq.request_id: self._token_logprob(tokens[i], *entry)
                for i, entry in zip(asked, found, strict=True)
            }

    def _add_prompt_logprobs(self, logits: torch.Tensor,
                             targets: list[tuple[_RequestState, int]]) -> None:
        """Extend each request's prompt log-probabilities by the positions computed now
        (``logits`` rows in the order of ``targets``: request, the prompt token predicted)."""
        found: list[tuple[float, int, list[int], list[float]]] = []
        for start in range(0, len(targets), PROMPT_LOGPROBS_ROWS):  # bounds the fp32 copy
            part = targets[start : start + PROMPT_LOGPROBS_ROWS]
            found += token_logprobs(logits[start : start + len(part)], [token for _, token in part],
                                    [state.sampling.prompt_logprobs or 0 for state, _ in part],
                                    ranked=True)
        for (state, token), entry in zip(targets, found, strict=True):
            if state.prompt_logprobs is not None:
                state.prompt_logprobs.append(self._token_logprob(token, *entry))

    def _token_spelling(self, token_id: int) -> tuple[str, bytes]:
        """A token's own text for log-probabilities (special tokens spelled out) and its
        bytes where the text does not spell them (else empty), cached."""
        known = self._token_spellings.get(token_id)
        if known is None:
            text = self.tokenizer.decode([token_id])
            raw = self._token_bytes(token_id)
            known = self._token_spellings[token_id] = (text, b"" if raw == text.encode() else raw)
        return known

    def _unscored(self, token: int) -> TokenLogprob:
        """The entry of a prompt's first token, which nothing predicts: its text only."""
        text, raw = self._token_spelling(token)
        return TokenLogprob(token=text, logprob=0.0, raw=raw, token_id=token)

    def _token_logprob(self, token: int, logprob: float, rank: int, top_ids: list[int],
                       top_logprobs: list[float]) -> TokenLogprob:
        text, raw = self._token_spelling(token)
        top = []
        for i, value in zip(top_ids, top_logprobs, strict=True):
            alt_text, alt_raw = self._token_spelling(i)
            top.append(TopLogprob(i, alt_text, max(value, MIN_LOGPROB), raw=alt_raw))
        return TokenLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), top=top, raw=raw,
                            token_id=token, rank=rank)

    def _slot(self, request_id: str) -> int:
        """The request's slot of the slot caches, the lowest free one on its first step
        (low slots keep the decode range short)."""
        slot = self._slot_of.get(request_id)
        if slot is None:
            slot = self._slot_of[request_id] = heapq.heappop(self._free_slots)
        return slot

    def _fill_slot(self, seq: Sequence) -> None:
        """Copy the K/V a request starts with (cached blocks) into its new slot, where
        attention reads its context on CPU."""
        slot, bs = self._slot(seq.request_id), self.allocator.block_size
        computed = seq.num_computed_tokens
        blocks = torch.tensor(seq.block_ids[: computed // bs], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for (key_cache, value_cache), (key_slots, value_slots) in zip(
                    self.kv_caches, self.slot_caches or [], strict=True):
                for paged, slots in ((key_cache, key_slots), (value_cache, value_slots)):
                    # [blocks, block_size, heads, dim] -> [heads, positions, dim]
                    context = paged.index_select(0, blocks).flatten(0, 1).transpose(0, 1)
                    slots[slot, :, :computed].copy_(context)

    def _release_slot(self, request_id: str) -> None:
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            heapq.heappush(self._free_slots, slot)

    def _append_token(
        self, state: _RequestState, token: int, logprob: TokenLogprob | None = None
    ) -> RequestOutput:
        seq = state.seq
        seq.token_ids.append(token)
        stops, may_stop = state.stop_token_ids, seq.num_output_tokens > state.sampling.min_tokens
        if state.grammar is not None:
            try:
                if state.grammar.accept(token):  # a stop token where the language is complete
                    stops, may_stop = stops | {token}, True
            except EngineError as exc:
                return self._fail(state, str(exc))
        text, stopped = append_token(token, stops, state.detokenizer, state.text, may_stop=may_stop)
        reason: str | None = "stop" if stopped else None
        if reason is None and seq.num_output_tokens >= seq.max_tokens:
            reason = "length"
        logprobs = [] if logprob is None else [logprob]
        prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs or [], None  # sent once
        if reason is None:
            return RequestOutput(
                seq.request_id,
                [token],
                text,
                False,
                None,
                seq.num_prompt_tokens,
                seq.num_output_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        if not state.text.stopped:
            text += state.text.append(state.detokenizer.flush())[0]
            text += state.text.flush()
        del self._requests[seq.request_id]
        self.scheduler.finish(seq)
        self._release_slot(seq.request_id)
        return self._final(state, [token], text, reason, logprobs=logprobs,
                           prompt_logprobs=prompt_logprobs,
                           stop_reason=stop_reason(token, state.text, state.sampling.stop_token_ids)
                           if stopped else None)

    def _fail(self, state: _RequestState, error: str) -> RequestOutput:
        """End a request with an error: its blocks and slot freed, its final output."""
        del self._requests[state.seq.request_id]
        self.scheduler.finish(state.seq)
        self._release_slot(state.seq.request_id)
        return self._final(state, [], "", "error", error=error)

    @staticmethod
    def _final(
        state: _RequestState, tokens: list[int], text: str, reason: str, error: str | None = None,
        logprobs: list[TokenLogprob] | None = None, prompt_logprobs: list[TokenLogprob] | None = None,
        stop_reason: str | int | None = None,
    ) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_text=text,
            finished=True,
            finish_reason=reason,  # type: ignore[arg-type]
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            error=error,
            logprobs=logprobs or [],
            prompt_logprobs=prompt_logprobs or [],
            num_cached_tokens=min(seq.num_cached_tokens or 0, seq.num_prompt_tokens),
            stop_reason=stop_reason,
        )

    def _record_timing(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """Update the EWMAs. In a mixed step the decode share is taken off using the
        decode-step estimate, so prefill speed is not understated by riding decodes."""
        if prefill_tokens > 0:
            prefill_s = seconds
            if decode_tokens and self._decode_step_ms:
                prefill_s = max(seconds - self._decode_step_ms / 1000.0, 0.1 * seconds)
            self._prefill_tokens_per_s = _ewma(
                self._prefill_tokens_per_s, prefill_tokens / prefill_s
            )
        else:
            self._decode_step_ms = _ewma(self._decode_step_ms, seconds * 1000.0)
