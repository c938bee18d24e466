"""Engine API types: configuration, requests in, outputs and stats out."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.messages import FinishReason, SamplingParams, TokenLogprob


class EngineError(ValueError):
    """A request the engine cannot take (too long, empty, duplicate id, bad sampling)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    """Most requests running (holding KV blocks) at once."""
    kv_cache_tokens: int = 65536
    """Size of the paged KV pool in tokens (rounded down to whole blocks)."""
    block_size: int = 16
    max_num_batched_tokens: int = 512
    """Per-step token budget: one per decoding request plus prefill chunks."""
    max_model_len: int = 2048
    """Longest prompt + output a request may have."""
    max_loras: int = 0
    """LoRA adapter slots on the device (S-LoRA pool); 0 serves the base model only."""
    max_lora_rank: int = 64
    """Pool rank: adapters of rank up to this are served, smaller ones zero-padded."""
    max_cpu_loras: int = 64
    """Adapters kept in host memory (LRU; those of live requests always stay)."""
    enable_prefix_caching: bool = True
    """Keep computed KV blocks named by their tokens, so that a request starting as an
    earlier one did (a system prompt, a conversation's earlier turns) skips computing
    them (vLLM's automatic prefix caching, on by default as in vLLM)."""

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "kv_cache_tokens",
            "block_size",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("EngineConfig.kv_cache_tokens must hold at least one block")
        if self.max_loras < 0 or not 1 <= self.max_lora_rank <= 128 or self.max_cpu_loras < 1:
            raise ValueError("EngineConfig: max_loras >= 0, max_lora_rank in [1, 128], "
                             "max_cpu_loras >= 1")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size


@dataclass(frozen=True)
class LoraRequest:
    """A tenant adapter (PEFT directory) a request runs with, as vLLM's LoRARequest."""

    name: str
    path: str


@dataclass(frozen=True)
class ResumedOutput:
    """Output an earlier run of a request produced before it was handed back (a worker
    draining for a deploy): the new run continues after it instead of regenerating."""

    token_ids: list[int]
    streamed_chars: int
    """How much of those tokens' text the caller already has; the rest (text an earlier
    run held back: a partial character, a possible stop string) is streamed first."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: float = 0.0
    """Lower is more important; preemption picks the highest value, ties the latest arrival."""
    lora: LoraRequest | None = None
    """The adapter to apply; None: the base model."""
    resume: ResumedOutput | None = None
    """Continue after this output of an earlier run; None: a fresh request."""
    cache_salt: str = ""
    """Only requests of the same salt share cached prefixes (the worker's: the tenant,
    when the cache is kept per tenant)."""


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per new token when the request asked for log-probabilities."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per prompt token, with the request's first output, when it asked for them
    (the first entry has no log-probability: nothing predicts it)."""
    num_cached_tokens: int = 0
    """Prompt tokens its first admission found in the prefix cache (final output only)."""
    stop_reason: str | int | None = None
    """What stopped an answer that ended ``stop`` (:func:`detokenizer.stop_reason`)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_kv_tokens: int
    num_total_kv_tokens: int
    max_num_seqs: int
    num_preemptions: int
    prefill_tokens_per_s: float
    """EWMA over steps that carried prefill tokens (whole step time, so a lower bound)."""
    decode_step_ms: float
    """EWMA of the time of steps that only decoded."""
    adapters: list[str] = field(default_factory=list)
    """LoRA adapters resident in the device pool (for the scheduler's affinity)."""
    prefix_cache_queries: int = 0
    """Tokens of admitted requests looked up in the prefix cache, since the start."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
