"""What the benchmark sends: tenants, prompts, and the timed list of requests.

Sources:

- ``--trace FILE``: a trace read by :mod:`services.scheduler.traces` (Azure CSV or the
  JSONL trace format, optionally gzipped). Its first N arrivals are replayed in order.
- ``--dataset FILE``: JSONL(.gz) of ``{"prompt", "output_tokens"}`` (the predictor's
  format; the shared AlpacaEval rows ``{"instruction", "output_tokens_llama2"}`` are read
  the same way), or the JSONL trace format (rows with ``timestamp``). Dataset rows are
  sampled at random (seeded), repeating only when N exceeds the rows.

Prompts: a row's own prompt when it has one. Otherwise the client cannot know the
server's tokenizer, so it synthesizes ``input_tokens`` words drawn at random (seeded)
from :data:`WORDS`, short common English words that are one token each (with their
leading space) in the GPT-2, Llama and Qwen BPE vocabularies and in Fairway's tiny
model: about one token per word, plus any BOS or template tokens the server adds. The
random order keeps prompts distinct, so prefix caching cannot share them. The server's
``usage.prompt_tokens`` is what the metrics count; when a prompt's length is unknown
(a dataset row without a count) it is estimated as ``len(text) / 4``.

Tenants SPEC (``--tenants``): comma-separated entries ``NAME:KEY[:AMOUNT]``, where
AMOUNT is ``SHARE`` or ``share=SHARE`` (a positive weight; the tenant receives that
share of the requests, default 1) or ``rate=R`` (the tenant has its own arrival stream
at R requests/s). Either every entry has a rate or none has. The key is everything
between the first ``:`` and the amount, so it may contain ``:``, but a key that ends in
``:<number>`` needs an explicit amount. A trace row whose ``tenant`` names a SPEC
tenant goes to that tenant; other rows are drawn at random by share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from services.benchmark.arrivals import gamma_arrivals, merged_tenant_arrivals, trace_arrivals
from services.scheduler.traces import (
    TraceError,
    TraceRecord,
    iter_jsonl_objects,
    load_trace,
    read_jsonl,
)

WORDS = (
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "or",
    "an",
    "are",
    "but",
    "you",
    "one",
    "can",
    "we",
    "their",
    "there",
    "more",
    "has",
    "so",
    "if",
    "about",
    "time",
    "out",
    "new",
    "first",
    "into",
    "its",
    "who",
    "than",
    "over",
    "many",
    "long",
    "use",
    "every",
    "how",
    "while",
    "day",
    "much",
    "could",
    "must",
    "three",
)


def synthesize_prompt(num_tokens: int, rng: np.random.Generator) -> str:
    """About ``num_tokens`` tokens of text: that many words from :data:`WORDS`."""
    if num_tokens < 1:
        raise ValueError("a prompt needs at least one token")
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=num_tokens))


def approx_token_count(text: str) -> int:
    """The usual ~4 characters per token of English BPE tokenizers."""
    return max(1, round(len(text) / 4))


# --- tenants --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantSpec:
    name: str
    api_key: str = field(repr=False)
    share: float = 1.0
    rate: float | None = None
    """Requests/s of the tenant's own arrival stream; None: a share of the common one."""


_AMOUNT = re.compile(r"^(?:(share|rate)=)?([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_tenants(spec: str) -> list[TenantSpec]:
    """Parse the ``--tenants`` SPEC (module doc). Messages never repeat a key."""
    tenants: list[TenantSpec] = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, rest = entry.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"tenant entry {name!r}...: expected NAME:KEY[:SHARE|:rate=R]")
        key, share, rate = rest, 1.0, None
        head, colon, last = rest.rpartition(":")
        match = _AMOUNT.match(last.strip()) if colon else None
        if match:
            key = head
            value = float(match.group(2))
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"tenant {name!r}: share or rate must be a positive finite number")
            if match.group(1) == "rate":
                rate = value
            else:
                share = value
        key = key.strip()
        if not key:
            raise ValueError(f"tenant {name!r}: empty API key")
        if any(t.name == name for t in tenants):
            raise ValueError(f"tenant {name!r} given twice")
        tenants.append(TenantSpec(name, key, share, rate))
    if not tenants:
        raise ValueError("no tenants in SPEC")
    if len({t.rate is None for t in tenants}) > 1:
        raise ValueError("give every tenant a rate=R, or none")
    return tenants


# --- sources --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    records: list[TraceRecord]
    timed: bool
    """Whether the timestamps are real arrival times (a trace) or placeholders."""
    sample: bool
    """Draw rows at random (a dataset) instead of replaying the first N in order."""


def read_trace_source(path: str | Path) -> Source:
    return Source(load_trace(path), timed=True, sample=False)


def _dataset_row(obj: dict) -> TraceRecord:
    if "prompt" in obj and "output_tokens" in obj:
        prompt, output = obj["prompt"], obj["output_tokens"]
        known_input = obj.get("input_tokens")
    elif "instruction" in obj and "output_tokens_llama2" in obj:
        prompt, output = obj["instruction"], obj["output_tokens_llama2"]
        known_input = obj.get("prompt_tokens_llama2")
    else:
        raise ValueError(
            "expected prompt and output_tokens (or instruction and output_tokens_llama2)"
        )
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if isinstance(output, bool) or not isinstance(output, int) or output < 1:
        raise ValueError("output_tokens must be a positive integer")
    if isinstance(known_input, bool) or not (isinstance(known_input, int) and known_input > 0):
        known_input = approx_token_count(prompt)
    return TraceRecord(timestamp=0.0, input_tokens=known_input, output_tokens=output, prompt=prompt)


def read_dataset_source(path: str | Path) -> Source:
    """A dataset JSONL(.gz): the trace format when the first row has a timestamp."""
    path = Path(path)
    records: list[TraceRecord] = []
    for line, obj in iter_jsonl_objects(path):
        if not records and "timestamp" in obj:
            return Source(read_jsonl(path), timed=True, sample=True)
        try:
            records.append(_dataset_row(obj))
        except ValueError as exc:
            raise TraceError(f"{path}:{line}: {exc}") from exc
    if not records:
        raise TraceError(f"{path}: no rows")
    return Source(records, timed=False, sample=True)


# --- the workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request to send, ``arrival`` seconds after the run starts."""

    index: int
    arrival: float
    tenant: str
    prompt: str
    input_tokens: int
    """Intended prompt length in tokens (approximate: see the module doc)."""
    max_tokens: int
    model: str | None = None


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    num_requests: int = 1000
    arrivals: Literal["trace", "gamma"] = "gamma"
    rate: float | None = None
    """Gamma: requests/s (None: infinite). Trace: rescale to this mean rate."""
    burstiness: float = 1.0
    time_scale: float | None = None
    """Trace only: multiply the trace's gaps by this."""
    max_input_tokens: int | None = None
    """Cap on synthesized prompts (a row's own prompt text is sent as is)."""
    max_output_tokens: int | None = None
    seed: int = 0


def _check(config: WorkloadConfig, source: Source, tenants: list[TenantSpec]) -> None:
    if config.num_requests < 1:
        raise ValueError("the number of requests must be >= 1")
    per_tenant_rates = tenants[0].rate is not None
    if config.arrivals == "trace":
        if not source.timed:
            raise ValueError("trace arrivals need timestamps; this dataset has none (use --rate)")
        if config.burstiness != 1.0:
            raise ValueError("burstiness applies to generated arrivals, not a trace's own")
        if per_tenant_rates:
            raise ValueError(
                "per-tenant rates generate their own arrivals; not with trace arrivals"
            )
    elif config.time_scale is not None:
        raise ValueError("time scale applies to trace arrivals only")
    if per_tenant_rates and config.rate is not None:
        raise ValueError("give per-tenant rates or one total rate, not both")
    for name, cap in (
        ("max input", config.max_input_tokens),
        ("max output", config.max_output_tokens),
    ):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} tokens must be >= 1")


def _select(source: Source, n: int, rng: np.random.Generator) -> list[TraceRecord]:
    records = source.records
    if not source.sample:
        return records[:n]
    picks: list[int] = []
    while len(picks) < n:
        picks.extend(int(i) for i in rng.permutation(len(records)))
    return [records[i] for i in picks[:n]]


def build_workload(
    source: Source, tenants: list[TenantSpec], config: WorkloadConfig
) -> list[WorkItem]:
    """The requests of a run, sorted by arrival; deterministic for a given seed."""
    _check(config, source, tenants)
    select_rng, arrival_rng, tenant_rng, prompt_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4)
    )
    chosen = _select(source, config.num_requests, select_rng)
    if source.sample and source.timed and config.arrivals == "trace":
        chosen.sort(key=lambda r: r.timestamp)
    n = len(chosen)

    owner: list[int | None] = [None] * n
    if tenants[0].rate is not None:
        offsets, who = merged_tenant_arrivals(
            n, [t.rate for t in tenants], config.burstiness, arrival_rng
        )
        owner = [int(i) for i in who]
    elif config.arrivals == "trace":
        offsets = trace_arrivals([r.timestamp for r in chosen], config.time_scale, config.rate)
    else:
        rate = math.inf if config.rate is None else config.rate
        offsets = gamma_arrivals(n, rate, config.burstiness, arrival_rng)

    by_name = {t.name: i for i, t in enumerate(tenants)}
    shares = np.array([t.share for t in tenants]) / sum(t.share for t in tenants)
    items = []
    for i, record in enumerate(chosen):
        tenant = owner[i]
        if tenant is None:
            tenant = by_name.get(record.tenant or "")
        if tenant is None:
            tenant = int(tenant_rng.choice(len(tenants), p=shares))
        max_tokens = record.max_tokens or record.output_tokens
        if config.max_output_tokens is not None:
            max_tokens = min(max_tokens, config.max_output_tokens)
        if record.prompt:
            prompt, input_tokens = record.prompt, record.input_tokens
        else:
            input_tokens = record.input_tokens
            if config.max_input_tokens is not None:
                input_tokens = min(input_tokens, config.max_input_tokens)
            prompt = synthesize_prompt(input_tokens, prompt_rng)
        items.append(
            WorkItem(
                i,
                float(offsets[i]),
                tenants[tenant].name,
                prompt,
                input_tokens,
                max_tokens,
                record.model,
            )
        )
    return items
