"""Redis state of the scheduler: leader lease, fenced atomic writes, and state loading.

Redis is the source of truth. One replica at a time holds the lease and runs the
policy in memory; every state transition it makes is written by one Lua script that
first checks the lease is still its own, so a replica that lost the lease (paused,
partitioned) can never write, and two replicas never dispatch the same request. A
restarted or standby replica rebuilds the policy from what this module loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack
import redis.asyncio as aioredis

from services import keys
from services import messages as m
from services.redis_client import RELEASE_LEASE_LUA, RENEW_LEASE_LUA
from services.usage import Usage, record_commands

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

# Applies a batch of writes only while the caller still holds the lease.
_FENCED_APPLY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER')
end
local ops = cmsgpack.unpack(ARGV[2])
local allowed = {HSET=true, HDEL=true, EXPIRE=true, HINCRBY=true}
-- Redis does not roll back a failed script: check every op before the first write.
for _, op in ipairs(ops) do
  if not allowed[op[1]] then
    return redis.error_reply('BADOP ' .. tostring(op[1]))
  end
end
for _, op in ipairs(ops) do
  redis.call(unpack(op))
end
return #ops
"""


class NotLeader(RuntimeError):
    """The lease was lost: this replica must stop acting as the scheduler."""


@dataclass(slots=True)
class InflightRecord:
    """A dispatched request: where it went and how much of its output is charged."""

    scored: m.ScoredRequest
    pool: str
    dispatched_at: float
    charged_output: int = 0
    published: bool = False
    kv_tokens: int = 0
    """KV tokens the policy reserved for it on its pool."""
    arrival: float = 0.0
    """When the request first entered the queue; a requeue keeps it."""

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "scored": m.encode(self.scored),
                "pool": self.pool,
                "dispatched_at": self.dispatched_at,
                "charged_output": self.charged_output,
                "published": self.published,
                "kv_tokens": self.kv_tokens,
                "arrival": self.arrival,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InflightRecord:
        body = msgpack.unpackb(data, raw=False)
        return cls(
            scored=m.decode(body["scored"], m.ScoredRequest),
            pool=body["pool"],
            dispatched_at=float(body["dispatched_at"]),
            charged_output=int(body["charged_output"]),
            published=bool(body["published"]),
            kv_tokens=int(body.get("kv_tokens", 0)),
            arrival=float(body.get("arrival", 0.0)),
        )


@dataclass
class SchedulerState:
    queued: dict[str, m.ScoredRequest] = field(default_factory=dict)
    arrival: dict[str, float] = field(default_factory=dict)
    requeued: dict[str, int] = field(default_factory=dict)
    """Queued requests a worker handed back, with the output they had produced."""
    inflight: dict[str, InflightRecord] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)


class Ops:
    """A batch of Redis writes applied atomically by :meth:`SchedulerStore.apply`."""

    def __init__(self, marker_ttl_s: int = keys.DEFAULT_MARKER_TTL_S) -> None:
        self.ops: list[list[str | bytes | int | float]] = []
        self.marker_ttl_s = marker_ttl_s

    def __bool__(self) -> bool:
        return bool(self.ops)

    def enqueue(self, scored: m.ScoredRequest, arrival: float, generated: int | None = None) -> None:
        """Queue a request; ``generated`` marks one handed back with that much output. A
        handed-back request's work claim is released with it, or the worker that takes
        its next dispatch would drop it as a second copy of the first."""
        self.ops.append(["HSET", keys.SCHED_QUEUED, scored.request_id, m.encode(scored)])
        self.ops.append(["HSET", keys.SCHED_ARRIVAL, scored.request_id, repr(arrival)])
        if generated is not None:
            self.ops.append(["HSET", keys.SCHED_REQUEUED, scored.request_id, str(generated)])
            self.ops.append(["HDEL", keys.request_markers(scored.request_id), keys.MARKER_CLAIM])

    def unqueue(self, request_id: str) -> None:
        self.ops.append(["HDEL", keys.SCHED_QUEUED, request_id])
        self.ops.append(["HDEL", keys.SCHED_ARRIVAL, request_id])
        self.ops.append(["HDEL", keys.SCHED_REQUEUED, request_id])

    def put_inflight(self, record: InflightRecord) -> None:
        self.ops.append(["HSET", keys.SCHED_INFLIGHT, record.scored.request_id, record.to_bytes()])

    def drop_inflight(self, request_id: str) -> None:
        self.ops.append(["HDEL", keys.SCHED_INFLIGHT, request_id])

    def mark_done(self, request_id: str) -> None:
        self._mark(request_id, keys.MARKER_DONE)

    def mark_cancelled(self, request_id: str) -> None:
        self._mark(request_id, keys.MARKER_CANCELLED)

    def _mark(self, request_id: str, marker: str) -> None:
        key = keys.request_markers(request_id)
        self.ops.append(["HSET", key, marker, "1"])
        self.ops.append(["EXPIRE", key, str(self.marker_ttl_s)])

    def usage(self, tenant: str, model: str, used: Usage, at: float, retention_days: int) -> None:
        """Add a finished request's usage to its buckets (:mod:`services.usage`)."""
        self.ops.extend(record_commands(tenant, model, used, at, retention_days))

    def counters(self, counters: dict[str, float], served: dict[str, float], tenants: set[str]) -> None:
        for tenant in tenants:
            self.ops.append(["HSET", keys.SCHED_COUNTERS, tenant, repr(counters.get(tenant, 0.0))])
            self.ops.append(["HSET", keys.SCHED_SERVED, tenant, repr(served.get(tenant, 0.0))])


class SchedulerStore:
    def __init__(self, redis: aioredis.Redis, replica_id: str, lease_ttl_s: float) -> None:
        self.redis = redis
        self.replica_id = replica_id
        self.lease_ms = int(lease_ttl_s * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(RENEW_LEASE_LUA)
        self._release = redis.register_script(RELEASE_LEASE_LUA)
        self._apply = redis.register_script(_FENCED_APPLY)
        self.fence = 0

    async def try_acquire(self) -> bool:
        fence = int(await self._acquire(keys=[keys.SCHED_LEASE, keys.SCHED_FENCE],
                                        args=[self.replica_id, self.lease_ms]))
        if fence:
            self.fence = fence
        return bool(fence)

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[keys.SCHED_LEASE], args=[self.replica_id, self.lease_ms]))

    async def release(self) -> None:
        await self._release(keys=[keys.SCHED_LEASE], args=[self.replica_id])

    async def apply(self, ops: Ops) -> None:
        if not ops:
            return
        try:
            await self._apply(keys=[keys.SCHED_LEASE],
                              # Redis' Lua cmsgpack predates the bin type: pack bytes as raw.
                              args=[self.replica_id, msgpack.packb(ops.ops, use_bin_type=False)])
        except aioredis.ResponseError as exc:
            if "NOTLEADER" in str(exc):
                raise NotLeader(self.replica_id) from None
            raise

    async def load(self) -> SchedulerState:
        pipe = self.redis.pipeline(transaction=True)
        for key in (keys.SCHED_QUEUED, keys.SCHED_ARRIVAL, keys.SCHED_INFLIGHT,
                    keys.SCHED_COUNTERS, keys.SCHED_SERVED, keys.SCHED_REQUEUED):
            pipe.hgetall(key)
        queued, arrival, inflight, counters, served, requeued = await pipe.execute()
        state = SchedulerState()
        for rid, blob in queued.items():
            scored = m.decode(blob, m.ScoredRequest)
            state.queued[scored.request_id] = scored
            state.arrival[scored.request_id] = float(arrival.get(rid, time.time()))
            if rid in requeued:
                state.requeued[scored.request_id] = int(requeued[rid])
        for blob in inflight.values():
            record = InflightRecord.from_bytes(blob)
            state.inflight[record.scored.request_id] = record
        state.counters = {k.decode(): float(v) for k, v in counters.items()}
        state.served = {k.decode(): float(v) for k, v in served.items()}
        return state

    async def already_done(self, request_ids: list[str]) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hexists(keys.request_markers(rid), keys.MARKER_DONE)
        return [bool(x) for x in await pipe.execute()]

    async def live_workers(self, now: float, timeout_s: float) -> list[m.WorkerHeartbeat]:
        """Latest heartbeat of every worker seen within ``timeout_s``."""
        ids = await self.redis.zrangebyscore(keys.WORKERS_SEEN, now - timeout_s, "+inf")
        if not ids:
            return []
        blobs = await self.redis.hmget(keys.WORKERS, ids)
        out = []
        for blob in blobs:
            if blob:
                try:
                    out.append(m.decode(blob, m.WorkerHeartbeat))
                except m.MessageError:
                    continue
        return out
