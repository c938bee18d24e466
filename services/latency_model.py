"""Worker latency model: what a prefill and a decode step cost on one engine.

Measured by ``fairway profile-engine`` on our own engine, reported by workers for
placement, and used by the simulator's virtual workers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Step time = prefill part + decode part, both linear in their drivers.

    prefill_s(tokens) = prefill_ms_per_token * tokens / 1000
    decode_step_s(batch, ctx) = (decode_base_ms + decode_per_seq_ms * batch
                                 + decode_per_ctx_token_ms * ctx) / 1000
    where ``ctx`` is the total context (KV tokens) over the batch.
    """

    prefill_ms_per_token: float = 0.05
    decode_base_ms: float = 5.0
    decode_per_seq_ms: float = 0.3
    decode_per_ctx_token_ms: float = 0.0
    max_batch: int = 16
    kv_tokens: int = 65536
    name: str = "default"

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_ms_per_token * tokens / 1000.0

    def decode_step_s(self, batch: int, context_tokens: int = 0) -> float:
        if batch <= 0:
            return 0.0
        return (
            self.decode_base_ms
            + self.decode_per_seq_ms * batch
            + self.decode_per_ctx_token_ms * context_tokens
        ) / 1000.0

    def decode_tokens_per_s(self, batch: int, context_tokens: int = 0) -> float:
        step = self.decode_step_s(batch, context_tokens)
        return batch / step if step > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("latency_model", data))

    @classmethod
    def fit(
        cls,
        prefill: list[tuple[int, float]],
        decode: list[tuple[int, int, float]],
        **extra: object,
    ) -> LatencyModel:
        """Least-squares fit from (tokens, seconds) prefill samples and
        (batch, context_tokens, seconds) decode-step samples."""
        import numpy as np

        p = np.asarray(prefill, dtype=float)
        per_token = float((p[:, 0] @ p[:, 1]) / (p[:, 0] @ p[:, 0])) * 1000 if len(p) else 0.05
        d = np.asarray(decode, dtype=float)
        if len(d):
            design = np.column_stack([np.ones(len(d)), d[:, 0], d[:, 1]])
            coef, *_ = np.linalg.lstsq(design, d[:, 2] * 1000, rcond=None)
            base, per_seq, per_ctx = (max(float(c), 0.0) for c in coef)
        else:
            base, per_seq, per_ctx = 5.0, 0.3, 0.0
        return cls(
            prefill_ms_per_token=max(per_token, 0.0),
            decode_base_ms=base,
            decode_per_seq_ms=per_seq,
            decode_per_ctx_token_ms=per_ctx,
            **extra,  # type: ignore[arg-type]
        )
