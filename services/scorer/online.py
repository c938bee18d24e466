"""The length predictor's online head, shared by all scorer replicas through Redis.

State of one served model lives in one hash (``keys.predictor_state(model)``):

- ``n``, ``ee``: number of observations and sum of squared predictive residuals;
- ``zy:i``: sums of ``z_i * y``; ``zz:i:j`` (i <= j): sums of ``z_i * z_j``;
- ``e:k``: counts of predictive residuals in bin ``k`` (for the quantiles);
- ``lt``: sum of residuals against the offline prediction; ``c:g`` / ``s:g``: count and
  residual sum of word bucket ``g`` (the lexical memory, at most 2 x 4096 fields);
- ``artifact``: ``<artifact id>/<STATE_FORMAT>``, what the features and layout mean.

Every update is a set of HINCRBYFLOAT increments in one Lua call, so replicas learn
concurrently without lost updates, a reader never sees half an update, and a restart
reloads exactly what was learned (about 550 fields plus 2 per word bucket seen).
Observations that arrive while a write is in flight go into the next one, so a burst of
completions costs a few round trips, not one each. Deltas that could not be written
(Redis down) are kept and retried on the next call.

Each request is learned at most once: the same call sets its ``keys.MARKER_LEARNED``
marker (NX) and applies the request's increments only if it was not set. A completion event
redelivered because a scorer died between learning it and acking it, or a retry of a
write whose reply was lost, is skipped, and the replica that skipped it reloads the
shared state so its local copy drops the duplicate too. Past ``MAX_PENDING_REQUESTS``
unsent observations (a long Redis outage) the oldest are merged into one anonymous
delta: memory stays flat, and those lose only the duplicate check.
If the hash was written for another artifact or layout, the features mean something
else, so the state is reset.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import msgpack
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services import keys
from services.logs import get_logger
from services.scorer.predictor import (
    LEXICAL_SIZE,
    RESIDUAL_BINS,
    LengthPrediction,
    LengthPredictor,
    ModelState,
    Observation,
    log_tokens,
    residual_bin,
)

log = get_logger(__name__)

ARTIFACT_FIELD = "artifact"
STATE_FORMAT = "s3"
"""Bump when the head input or the field layout changes."""
MAX_PENDING_REQUESTS = 1024
"""Unsent observations kept one by one (with their request ids) while Redis is down."""


_INCREMENT_SCRIPT = """
local tag = redis.call('HGET', KEYS[1], 'artifact')
if not tag then
  redis.call('HSET', KEYS[1], 'artifact', ARGV[2])
elseif tag ~= ARGV[2] then
  return -1
end
local batch = cmsgpack.unpack(ARGV[1])
local ttl = tonumber(ARGV[3])
local skipped = 0
for b = 1, #batch, 2 do
  local marker, delta = batch[b], batch[b + 1]
  if marker == 0 or redis.call('HSETNX', KEYS[marker], ARGV[4], '1') == 1 then
    if marker > 0 then
      redis.call('EXPIRE', KEYS[marker], ttl)
    end
    for i = 1, #delta, 2 do
      redis.call('HINCRBYFLOAT', KEYS[1], delta[i], string.format('%.17g', delta[i + 1]))
    end
  else
    skipped = skipped + 1
  end
end
return skipped
"""
"""All increments of a write in one atomic server-side call, applied only if the hash
belongs to the writer's artifact (an old replica during a rolling deploy must not mix
its features into the new state), and each request's only if its learned marker was not
set yet. The batch travels as one msgpack blob ``[marker, [name, value, ...], ...]``
where ``marker`` indexes the request's marker hash in KEYS (0: no request id, always
applied): a MULTI of hundreds of commands, or hundreds of script arguments, costs
milliseconds of client-side encoding. Returns how many requests were skipped as already
learned, or -1 for a foreign hash."""
_READ_SCRIPT = "return cmsgpack.pack(redis.call('HGETALL', KEYS[1]))"
"""The whole hash as one msgpack blob: thousands of fields decode in C, not in the
client's RESP parser (~5 ms instead of ~60 ms without hiredis)."""


class HashLayout:
    """Names of a model's hash fields and where each sits in one flat state vector.

    Flat order: ``n, ee, lt, zy[dim], zz[upper triangle], e[bins], c[buckets], s[buckets]``.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.upper = np.triu_indices(dim)
        zy_names = [f"zy:{i}" for i in range(dim)]
        zz_names = [f"zz:{i}:{j}" for i, j in zip(*self.upper, strict=True)]
        self.names = [
            "n",
            "ee",
            "lt",
            *zy_names,
            *zz_names,
            *(f"e:{k}" for k in range(RESIDUAL_BINS)),
            *(f"c:{g}" for g in range(LEXICAL_SIZE)),
            *(f"s:{g}" for g in range(LEXICAL_SIZE)),
        ]
        self.zy_start = 3
        self.zz_start = self.zy_start + dim
        self.e_start = self.zz_start + len(zz_names)
        self.c_start = self.e_start + RESIDUAL_BINS
        self.s_start = self.c_start + LEXICAL_SIZE
        self.position = {name: pos for pos, name in enumerate(self.names)}

    def delta(self, obs: Observation) -> dict[str, float]:
        """Hash increments for one observation (zeros left out)."""
        names = self.names
        out = {
            "n": 1.0,
            "ee": obs.residual * obs.residual,
            "lt": obs.offline_residual,
            names[self.e_start + residual_bin(obs.residual)]: 1.0,
        }
        for g in obs.buckets:
            out[names[self.c_start + g]] = 1.0
            out[names[self.s_start + g]] = obs.offline_residual
        zy = obs.z * obs.y
        zz = np.outer(obs.z, obs.z)[self.upper]
        for offset, values in ((self.zy_start, zy), (self.zz_start, zz)):
            for k in np.flatnonzero(values):
                out[names[offset + k]] = float(values[k])
        return out

    def parse(self, raw: dict, pending: dict[str, float]) -> np.ndarray:
        """Flat state from the hash's fields (unknown ones ignored) plus pending deltas."""
        flat = np.zeros(len(self.names))
        position = self.position
        for name, value in raw.items():
            pos = position.get(name)
            if pos is not None:
                flat[pos] = float(value)
        for name, value in pending.items():
            flat[position[name]] += value
        return flat

    def load(self, state: ModelState, flat: np.ndarray) -> None:
        """Replace ``state``'s learned sums with a flat state vector."""
        dim = self.dim
        zz = np.zeros((dim, dim))
        zz[self.upper] = flat[self.zz_start : self.e_start]
        zz = zz + np.triu(zz, 1).T
        n = flat[0]
        state.head.set_stats(
            n, zz, flat[self.zy_start : self.zz_start], flat[1], flat[self.e_start : self.c_start]
        )
        state.lexical.set_stats(n, flat[2], flat[self.c_start : self.s_start], flat[self.s_start :])


def _merge(into: dict[str, float], delta: dict[str, float]) -> None:
    for name, value in delta.items():
        into[name] = into.get(name, 0.0) + value


def _merged(deltas: Sequence[tuple[str, dict[str, float]]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for _, delta in deltas:
        _merge(total, delta)
    return total


class OnlinePredictor:
    """Wraps LengthPredictor with online state shared through Redis.

    The state lives under ``services.keys.predictor_state(model)``; see the module doc.
    """

    def __init__(self, predictor: LengthPredictor, redis: aioredis.Redis, model: str,
                 marker_ttl_s: int = keys.DEFAULT_MARKER_TTL_S):
        self.predictor = predictor
        self.marker_ttl_s = marker_ttl_s
        self.redis = redis
        self.model = model
        self.key = keys.predictor_state(model)
        self.state_tag = f"{predictor.artifact_id}/{STATE_FORMAT}"
        self.state: ModelState = predictor.new_state(model)
        self.layout = HashLayout(self.state.head.dim)
        self._increment = redis.register_script(_INCREMENT_SCRIPT)
        self._read = redis.register_script(_READ_SCRIPT)
        self._pending: list[tuple[str, dict[str, float]]] = []
        """Unsent observations: (request id or '', hash increments), oldest first."""
        self._io_lock = asyncio.Lock()
        """Serializes writes and reads of the hash, so a read never misses a write in flight."""

    @property
    def observations(self) -> float:
        """Observations learned so far (all replicas, as of the last refresh, plus ours)."""
        return self.state.head.n

    async def start(self) -> None:
        """Load the learned state from Redis (reset it if it belongs to another artifact)."""
        async with self._io_lock:
            artifact = await self.redis.hget(self.key, ARTIFACT_FIELD)
            artifact = artifact.decode() if isinstance(artifact, bytes) else artifact
            if artifact is not None and artifact != self.state_tag:
                log.warning(
                    "predictor_state_reset",
                    model=self.model,
                    stored=artifact,
                    expected=self.state_tag,
                )
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(self.key)
                    pipe.hset(self.key, ARTIFACT_FIELD, self.state_tag)
                    await pipe.execute()
            elif artifact is None:
                await self.redis.hsetnx(self.key, ARTIFACT_FIELD, self.state_tag)
            await self._load()
            log.info("predictor_state_loaded", model=self.model, observations=self.state.head.n)

    def predict(self, prompt: str, input_tokens: int | None = None) -> LengthPrediction:
        """p10/p50/p90 for ``prompt`` with everything learned so far (sync, no I/O)."""
        return self.predictor.predict_with(self.state, self.predictor.encode(prompt))

    async def observe(
        self,
        prompt: str,
        output_tokens: int,
        features: Sequence[float] | None = None,
        truncated: bool = False,
        request_id: str = "",
    ) -> None:
        """Learn one real output length and persist it for other replicas and restarts.

        ``features`` is ``LengthPrediction.features`` echoed by the worker; when missing
        or malformed the prompt is encoded again. ``truncated``: the answer hit
        max_tokens, so its real length is only known to be at least ``output_tokens``.
        ``request_id``: learned at most once across replicas and redeliveries (``''``:
        no such check).
        """
        encoded = self.predictor.encode_for_learning(prompt, features)
        y = log_tokens(output_tokens)
        if not math.isfinite(y):
            return
        observation = self.state.learn(encoded, y, truncated)
        if observation is None:
            return
        self._pending.append((request_id, self.layout.delta(observation)))
        if len(self._pending) > MAX_PENDING_REQUESTS:
            self._pending = [("", _merged(self._pending))]
        async with self._io_lock:
            if await self._flush():
                await self._load()

    async def refresh(self) -> None:
        """Pull what other replicas learned (and retry our unsent updates)."""
        async with self._io_lock:
            await self._flush()
            await self._load()

    async def _flush(self) -> int:
        """Write every pending observation in one atomic call (caller holds ``_io_lock``).

        Returns how many were skipped as already learned (the local state then holds
        duplicates until the next load)."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        script_keys = [self.key]
        blob: list[object] = []
        for request_id, delta in batch:
            flat: list[str | float] = []
            for name, value in delta.items():
                flat += (name, value)
            marker = 0
            if request_id:
                script_keys.append(keys.request_markers(request_id))
                marker = len(script_keys)
            blob += (marker, flat)
        try:
            skipped = await self._increment(
                keys=script_keys,
                args=[msgpack.packb(blob), self.state_tag, self.marker_ttl_s, keys.MARKER_LEARNED],
                client=self.redis,
            )
        except (RedisError, OSError) as exc:
            self._pending = batch + self._pending
            log.warning(
                "predictor_state_write_failed",
                model=self.model,
                pending=len(self._pending),
                error=str(exc),
            )
            return 0
        if skipped == -1:
            log.warning("predictor_state_foreign_write_skipped", model=self.model, key=self.key)
            return 0
        if skipped:
            log.info("predictor_duplicates_skipped", model=self.model, requests=int(skipped))
        return int(skipped)

    async def _load(self) -> None:
        """Local sums := Redis's plus what is still pending (caller holds ``_io_lock``)."""
        try:
            packed = await self._read(keys=[self.key], client=self.redis)
        except (RedisError, OSError) as exc:
            log.warning("predictor_state_read_failed", model=self.model, error=str(exc))
            return
        items = msgpack.unpackb(packed, raw=False) if packed else []
        if not isinstance(items, list):  # an empty hash packs as an empty map
            items = []
        raw = dict(zip(items[::2], items[1::2], strict=True))
        stored = raw.get(ARTIFACT_FIELD)
        if stored is not None and stored != self.state_tag:
            log.warning("predictor_state_foreign", model=self.model, stored_artifact=stored)
            return
        self.layout.load(self.state, self.layout.parse(raw, _merged(self._pending)))
