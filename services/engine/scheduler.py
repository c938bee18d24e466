"""Step scheduler (vLLM v1 style): pure bookkeeping, no model and no tensors.

Each step it picks which requests run and how many of their tokens are computed, within
``max_num_seqs``, the token budget and the free KV blocks. A request's state is just
``num_computed_tokens`` against its ``token_ids`` (prompt + output so far): decode,
prefill, chunked prefill and recompute after preemption are the same rule. With prefix
caching, a request admitted with nothing computed first takes the cached blocks its
tokens start with (:class:`BlockAllocator`), and begins with those tokens computed; one
whose next block a running request is computing now waits for it rather than computing
it too (a burst of requests with one system prompt, or a request's ``n`` choices,
computes the prompt once).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

from services.engine.kv_cache import BlockAllocator, block_hash

LORA_MAX_SKIPS = 64
"""Steps a request may be passed over for want of a free LoRA slot before admission
stops for everyone behind it, so the slots drain and it cannot starve."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Scheduling state of one request."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    priority: float = 0.0
    arrival: int = 0
    """Order of arrival, set by the scheduler; breaks priority ties (earlier first)."""
    num_computed_tokens: int = 0
    """Tokens whose K/V are in this request's blocks."""
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    lora: Hashable | None = None
    """The request's adapter (the engine's key), or None for the base model."""
    lora_skips: int = 0
    cache_salt: bytes = b""
    """What its K/V depend on besides its tokens (adapter, tenant): part of its blocks' names."""
    reads_prefix_cache: bool = True
    """Whether it may start from cached blocks (not when its prompt's log-probabilities
    are wanted: they are computed with the prompt). Its own blocks are cached either way."""
    num_cached_tokens: int | None = None
    """Tokens its first admission found cached (None: not admitted yet)."""
    block_names: list[bytes] = field(default_factory=list)
    """Names of its full blocks of known tokens, as far as computed so far."""
    num_registered_blocks: int = 0
    """Its first blocks named in the cache (taken from it, or computed and registered)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[float, int]:
        """Most important first: lower priority value, then earlier arrival."""
        return (self.priority, self.arrival)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    """Tokens computed this step, starting at ``seq.num_computed_tokens``."""

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[str]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Admission, chunked prefill, prefix caching and preemption by recompute over a block
    allocator."""

    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        allocator: BlockAllocator,
        max_loras: int | None = None,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        """Most distinct adapters among running requests (the device pool's slots)."""
        self.max_num_batched_tokens = max_num_batched_tokens
        self.allocator = allocator
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        """Tokens of admitted requests looked up in the prefix cache (vLLM's counters)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found cached."""
        self._computing: dict[bytes, str] = {}
        """Names of the blocks running requests are computing, and whose they are."""
        self._arrivals = itertools.count()

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []

        # Running requests first, most important first; victims come from the tail.
        queue = sorted(self.running, key=lambda s: s.sort_key)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                kept.append(seq)
                continue
            need = self._blocks_needed(seq, num_new)
            while not self.allocator.can_allocate(need) and queue:
                victim = queue.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
            if not self.allocator.can_allocate(need):
                self._preempt(seq)
                preempted.append(seq.request_id)
                break
            seq.block_ids.extend(self.allocator.allocate(need))
            scheduled.append(ScheduledSeq(seq, num_new))
            kept.append(seq)
            budget -= num_new
        kept.extend(queue)  # not reached: budget ran out
        self.running = kept

        # Admit waiting requests, unless this step had to preempt (memory is short).
        if not preempted:
            self.waiting.sort(key=lambda s: s.sort_key)
            loras = {s.lora for s in self.running if s.lora is not None}
            passed: list[Sequence] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if self._lora_full(seq, loras):
                    # Every slot holds the adapter of a running request: others may pass,
                    # until this one has waited LORA_MAX_SKIPS steps.
                    seq.lora_skips += 1
                    if seq.lora_skips > LORA_MAX_SKIPS:
                        break
                    passed.append(self.waiting.pop(0))
                    continue
                cached = self._cached_prefix(seq)
                if self._next_block_computing(seq, cached):
                    passed.append(self.waiting.pop(0))  # it finds it cached in a step or two
                    continue
                computed = seq.num_computed_tokens + len(cached) * self.allocator.block_size
                num_new = min(seq.num_tokens - computed, budget)
                need = self.allocator.blocks_for(computed + num_new) - len(cached)
                if not self.allocator.can_allocate(need + self.allocator.num_held_by_none(cached)):
                    break
                self.waiting.pop(0)
                self._take_cached(seq, cached)
                seq.block_ids.extend(self.allocator.allocate(need))
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                self._computes(seq)
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                if seq.lora is not None:
                    loras.add(seq.lora)
            self.waiting[:0] = passed

        return SchedulerOutput(scheduled, preempted, self.max_num_batched_tokens - budget)

    def commit(self, output: SchedulerOutput) -> None:
        """Mark the scheduled tokens as computed once the forward pass ran, and name the
        blocks they completed in the prefix cache."""
        for item in output.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if self.allocator.enable_caching:
                full = seq.num_computed_tokens // self.allocator.block_size
                names = self._block_names(seq, full)
                for i in range(seq.num_registered_blocks, full):
                    self.allocator.register(seq.block_ids[i], names[i])
                    if self._computing.get(names[i]) == seq.request_id:
                        del self._computing[names[i]]
                seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def finish(self, seq: Sequence) -> None:
        """Remove a request wherever it is and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_ids)
        self._stops_computing(seq)
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED

    def _lora_full(self, seq: Sequence, loras: set[Hashable]) -> bool:
        """Whether admitting ``seq`` would need more adapter slots than the pool has."""
        return (
            self.max_loras is not None
            and seq.lora is not None
            and seq.lora not in loras
            and len(loras) >= self.max_loras
        )

    def _block_names(self, seq: Sequence, count: int) -> list[bytes]:
        """The names of the sequence's first ``count`` full blocks (made as needed)."""
        bs = self.allocator.block_size
        names = seq.block_names
        while len(names) < count:
            i = len(names)
            names.append(block_hash(names[-1] if names else b"", seq.token_ids[i * bs : (i + 1) * bs],
                                    seq.cache_salt))
        return names[:count]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a request admitted with nothing computed may start from: of
        its tokens before the last, which is computed to sample from (and so no write
        ever lands in a shared block)."""
        if not self.allocator.enable_caching or seq.num_computed_tokens or not seq.reads_prefix_cache:
            return []
        return self.allocator.cached_prefix(
            self._block_names(seq, (seq.num_tokens - 1) // self.allocator.block_size))

    def _next_block_computing(self, seq: Sequence, cached: list[int]) -> bool:
        """Whether another running request is computing the block a request admitted
        now would compute first (so it would be computed twice)."""
        if not self.allocator.enable_caching or seq.num_computed_tokens or not seq.reads_prefix_cache:
            return False
        names = self._block_names(seq, (seq.num_tokens - 1) // self.allocator.block_size)
        owner = self._computing.get(names[len(cached)]) if len(cached) < len(names) else None
        return owner is not None and owner != seq.request_id

    def _computes(self, seq: Sequence) -> None:
        """Note the full blocks of known tokens an admitted request is to compute."""
        if self.allocator.enable_caching:
            names = self._block_names(seq, seq.num_tokens // self.allocator.block_size)
            for name in names[seq.num_registered_blocks:]:
                self._computing.setdefault(name, seq.request_id)

    def _stops_computing(self, seq: Sequence) -> None:
        for name in seq.block_names:
            if self._computing.get(name) == seq.request_id:
                del self._computing[name]

    def _take_cached(self, seq: Sequence, cached: list[int]) -> None:
        self.allocator.take(cached)
        seq.block_ids = list(cached)
        seq.num_computed_tokens += len(cached) * self.allocator.block_size
        seq.num_registered_blocks = len(cached)
        if seq.num_cached_tokens is None:  # its first admission: what the client is told
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.allocator.enable_caching and seq.reads_prefix_cache:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_computed_tokens

    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        total = self.allocator.blocks_for(seq.num_computed_tokens + num_new)
        return max(total - len(seq.block_ids), 0)

    def _preempt(self, seq: Sequence) -> None:
        """Free all blocks and send back to waiting; its tokens are recomputed on return."""
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        self._stops_computing(seq)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
