"""What a request's sampling options cost the engine per decode step, on the logits
alone: ``allowed_token_ids`` of several sizes, ``bad_words``, a logit bias and the
penalties, each timed through the sampler's own ``adjust_logits`` on one row of a
vocabulary as large as Qwen's (151,936 tokens).

    python bench/bench_sampling.py [--vocab 151936] [--steps 200] [--json OUT.json]

``ms_per_step`` is the mean over ``--steps`` calls (each on a fresh copy of the same
logits, whose copying is timed apart and taken off); one thread, as a worker's step loop
runs it. The row's state is made once, as the engine makes it when it takes the request.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.engine.sampling import adjust_logits, allowed_ids
from services.messages import SamplingParams, TokenBias


@dataclass
class Row:
    """A request as the sampler sees it (the engine's request state in production)."""

    sampling: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    generator: None = None
    stop_token_ids: frozenset[int] = frozenset({2})
    grammar: None = None
    bad_word_ids: list[list[int]] = field(default_factory=list)
    allowed_ids: torch.Tensor | None = None


def cases(vocab: int, rng: random.Random) -> dict[str, Row]:
    tokens = [rng.randrange(vocab) for _ in range(1024)]  # a 512-token prompt and as much output
    made: dict[str, Row] = {}
    for size in (16, 1024, 65536):
        params = SamplingParams(allowed_token_ids=rng.sample(range(vocab), size))
        made[f"allowed_token_ids_{size}"] = Row(params, tokens, 512, allowed_ids=allowed_ids(params, "cpu"))
    words = [[rng.randrange(vocab) for _ in range(rng.randint(1, 3))] for _ in range(128)]
    made["bad_words_128"] = Row(SamplingParams(bad_words=["w"]), tokens, 512, bad_word_ids=words)
    bias = [TokenBias(t, 5.0) for t in rng.sample(range(vocab), 300)]
    made["logit_bias_300"] = Row(SamplingParams(logit_bias=bias), tokens, 512)
    made["penalties"] = Row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.5,
                                           repetition_penalty=1.1), tokens, 512)
    return made


def time_row(row: Row, base: torch.Tensor, steps: int) -> float:
    """Mean milliseconds of one ``adjust_logits`` call, the copy of the logits taken off."""
    adjust_logits(base.clone(), row)  # warm
    start = time.perf_counter()
    for _ in range(steps):
        base.clone()
    copying = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        adjust_logits(base.clone(), row)
    return max(time.perf_counter() - start - copying, 0.0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = torch.randn(args.vocab, generator=torch.Generator().manual_seed(0))
    results: dict[str, Any] = {"vocab": args.vocab, "steps": args.steps, "ms_per_step": {
        name: round(time_row(row, base, args.steps), 4) for name, row in cases(args.vocab, random.Random(0)).items()}}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
