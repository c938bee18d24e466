"""Every Redis key Fairway uses, in one place (as ``arq/constants.py`` does).

Services and tests build keys only through these names and functions.
"""

from __future__ import annotations

PREFIX = "fairway"

# --- scheduler (source of truth for queues, fairness counters and in-flight work) ---
SCHED_LEASE = f"{PREFIX}:sched:lease"
"""Leader lease of the active scheduler replica (value: replica id, with TTL)."""
SCHED_FENCE = f"{PREFIX}:sched:fence"
"""Monotonic counter, bumped on every lease takeover; fences out stale leaders."""
SCHED_QUEUED = f"{PREFIX}:sched:queued"
"""Hash request_id -> msgpack ScoredRequest waiting to be dispatched."""
SCHED_ARRIVAL = f"{PREFIX}:sched:arrival"
"""Hash request_id -> arrival time (float seconds) used for aging."""
SCHED_REQUEUED = f"{PREFIX}:sched:requeued"
"""Hash: request id -> output tokens it had produced when a worker handed it back."""
SCHED_INFLIGHT = f"{PREFIX}:sched:inflight"
"""Hash request_id -> msgpack in-flight record (pool, charge, dispatch time)."""
SCHED_COUNTERS = f"{PREFIX}:sched:vtc"
"""Hash tenant -> VTC virtual token counter (float)."""
SCHED_SERVED = f"{PREFIX}:sched:served"
"""Hash tenant -> tokens actually served (input + output), for fairness reports."""
SCHED_POOL_RESERVED = f"{PREFIX}:sched:pool_reserved"
"""Hash pool -> requests dispatched but not yet seen running by a worker heartbeat."""


def usage_bucket(width: str, start: int) -> str:
    """Hash of the token usage of the ``width`` bucket (``1m``, ``1h``, ``1d``) starting at
    unix time ``start``: tenant, model and measure (tab-separated) -> count
    (:mod:`services.usage`)."""
    return f"{PREFIX}:usage:{width}:{start}"

# --- tenant LoRA adapters ---
ADAPTERS = f"{PREFIX}:adapters"
"""Hash adapter name -> JSON spec (path, owner, shared_with) registered by an admin."""


def request_markers(request_id: str) -> str:
    """Hash of one request's markers (the ``MARKER_*`` fields), kept ``marker_ttl_s`` after
    its last write. One hash rather than a key per marker: a key costs about as much
    memory as a whole hash of a few small fields, and Redis holds rate x TTL of these."""
    return f"{PREFIX}:req:{request_id}"


MARKER_OWNER = "owner"
"""Tenant that owns the request id (set NX by the scorer), so another tenant's request
with the same id is refused, and cancels from other tenants too."""
MARKER_CLAIM = "claim"
"""Worker that started the request (set NX), so a second publish of the same work item
(a scheduler republishing after a crash) is dropped, not run twice."""
MARKER_DONE = "done"
"""The request reached its terminal answer (idempotency on redelivery)."""
MARKER_CANCELLED = "cancelled"
"""The request was cancelled: set by the gateway that owns the request and by the
scheduler (an AMQP producer's cancel, once its tenant checked); workers check it as they
start a request and with every heartbeat while it runs, so a cancel whose broadcast was
lost (broker restarting) still stops the work."""
MARKER_LEARNED = "learned"
"""The request's real output length was learned (set NX in the same atomic call as the
predictor's increments, so a completion event redelivered after a scorer died between
learning and acking is not learned twice)."""


DEFAULT_MARKER_TTL_S = 24 * 3600
"""Default of ``Settings.marker_ttl_s``: how long per-request markers and resume points
stay in Redis."""

# --- workers ---


def work_resume(request_id: str) -> str:
    """The :class:`~services.messages.ResumePoint` a draining worker left for a request it
    handed back, read by the worker that takes it next (in the claim's round trip)."""
    return f"{PREFIX}:req:{request_id}:resume"


WORKERS = f"{PREFIX}:workers"
"""Hash worker_id -> msgpack WorkerHeartbeat (latest)."""
WORKERS_SEEN = f"{PREFIX}:workers:seen"
"""Sorted set worker_id -> last heartbeat unix time."""

# --- scorer ---


def predictor_state(model: str) -> str:
    """Hash of the online length predictor's learned state for one served model."""
    return f"{PREFIX}:predictor:{model}"


# --- gateway ---


def tenant_inflight(tenant: str) -> str:
    """Sorted set of a tenant's accepted, unfinished requests: request id -> unix time
    after which the entry no longer counts (admission limit; a leaked entry expires)."""
    return f"{PREFIX}:tenant:{tenant}:inflight"


def tenant_tokens(tenant: str) -> str:
    """Hash request id -> token cost of each entry of :func:`tenant_inflight`."""
    return f"{PREFIX}:tenant:{tenant}:tokens"


def tenant_tokens_total(tenant: str) -> str:
    """Sum of :func:`tenant_tokens`, kept beside it so admission is O(1) per request."""
    return f"{PREFIX}:tenant:{tenant}:tokens-total"


def tenant_rate(tenant: str) -> str:
    """Hash of a tenant's rate-limit buckets, requests and tokens per minute: each one's
    level and the Redis time it was measured (:mod:`services.gateway.rate_limits`)."""
    return f"{PREFIX}:tenant:{tenant}:rate"


GATEWAY_INFLIGHT = f"{PREFIX}:gateway:inflight"
"""Sorted set of every tenant's accepted, unfinished requests (global back-pressure)."""
GATEWAYS_SEEN = f"{PREFIX}:gateways:seen"
"""Sorted set gateway incarnation (``instance_id:boot_id``) -> last heartbeat, in Redis
server time (so gateways on hosts with disagreeing clocks agree on who is silent)."""


def gateway_life(instance_id: str, boot_id: str) -> str:
    """One process's life of gateway ``instance_id``: its member of :data:`GATEWAYS_SEEN`
    and the owner of its :func:`gateway_slots`."""
    return f"{instance_id}:{boot_id}"


def gateway_instance(life: str) -> str:
    """The instance id of a :func:`gateway_life` (which may itself contain colons)."""
    return life.rpartition(":")[0] or life


def gateway_slots(incarnation: str) -> str:
    """Hash request id -> tenant of the admission slots one gateway incarnation holds, so
    that when it dies another gateway (or its own restart) frees them and cancels the
    requests downstream: their clients' connections died with it."""
    return f"{PREFIX}:gateway:{incarnation}:slots"


def stored_response(response_id: str) -> str:
    """String (JSON): a Responses API answer kept for ``previous_response_id`` and
    ``GET /v1/responses/{id}`` (its tenant, its conversation's items, the response),
    expiring after the gateway's ``responses_ttl_s``."""
    return f"{PREFIX}:responses:{response_id}"


def background_response(response_id: str) -> str:
    """Hash of a background response not yet ended (``background: true``): its tenant,
    request body, status and runs so far; gone once it ends (its answer is then the
    ``stored_response``)."""
    return f"{PREFIX}:responses:{response_id}:job"


def background_response_events(response_id: str) -> str:
    """Stream of a streamed background response's events (``stream`` and ``background``):
    entry ``0-<n+1>`` holds the SSE bytes of its event of sequence number ``n``, read by
    ``GET /v1/responses/{id}?stream=true&starting_after=...``; it expires with the response."""
    return f"{PREFIX}:responses:{response_id}:events"


def background_response_lease(response_id: str) -> str:
    """The gateway that runs a background response (value: its runner id, with TTL)."""
    return f"{PREFIX}:responses:{response_id}:lease"


def tenant_background_responses(tenant: str) -> str:
    """Sorted set: a tenant's background responses not yet ended, by creation time (its
    size is what the gateway's per-tenant cap counts)."""
    return f"{PREFIX}:tenant:{tenant}:background_responses"


BACKGROUND_RESPONSES_ACTIVE = f"{PREFIX}:responses:background"
"""Sorted set: the background responses not yet ended, by creation time: what the
gateways' runners take leases on, oldest first (fairest first among tenants)."""

BACKGROUND_RESPONSES_TENANT = f"{PREFIX}:responses:background:tenants"
"""Hash response id -> tenant of the background responses not yet ended."""


def conversation(conversation_id: str) -> str:
    """Hash of one Responses API conversation: ``tenant``, ``created_at``, ``metadata``
    (JSON) and ``next`` (the position its next item takes)."""
    return f"{PREFIX}:conversations:{conversation_id}"


def conversation_items(conversation_id: str) -> str:
    """Hash item id -> item (JSON) of a conversation."""
    return f"{PREFIX}:conversations:{conversation_id}:items"


def conversation_order(conversation_id: str) -> str:
    """Sorted set: a conversation's item ids by position (all three keys expire together,
    ``conversations_ttl_s`` after the last write)."""
    return f"{PREFIX}:conversations:{conversation_id}:order"


# --- files and batches (OpenAI's Files and Batch APIs, served by the gateways) ---
def stored_file(file_id: str) -> str:
    """Hash of one uploaded or batch output file: ``meta`` (JSON: its tenant and file
    object) and ``content`` (bytes), expiring with the file."""
    return f"{PREFIX}:files:{file_id}"


def tenant_files(tenant: str) -> str:
    """Sorted set: a tenant's file ids by creation time (ids of expired files are dropped
    when a listing finds them gone)."""
    return f"{PREFIX}:tenant:{tenant}:files"


def batch(batch_id: str) -> str:
    """Hash of one batch: its tenant, input, status, counts and times (see
    ``services.gateway.batches``)."""
    return f"{PREFIX}:batches:{batch_id}"


def batch_results(batch_id: str) -> str:
    """Hash: input line index -> its result (JSON), written once per line while the batch
    runs; the output and error files are made from it."""
    return f"{PREFIX}:batches:{batch_id}:results"


def batch_lease(batch_id: str) -> str:
    """The gateway that runs the batch (value: its runner id, with TTL)."""
    return f"{PREFIX}:batches:{batch_id}:lease"


def tenant_batches(tenant: str) -> str:
    """Sorted set: a tenant's batch ids by creation time."""
    return f"{PREFIX}:tenant:{tenant}:batches"


BATCHES_ACTIVE = f"{PREFIX}:batches:active"
"""Set of the batches not yet ended (validating, in progress, finalizing, cancelling):
what the gateways' batch runners take leases on."""


# --- dashboard (capped lists of recent events, newest first; JSON entries) ---
LENGTH_SAMPLES = f"{PREFIX}:recent:lengths"
"""List of finished requests' predicted (p10/p50/p90) and actual output lengths."""
LENGTH_SAMPLES_CAP = 500
RECENT_ERRORS = f"{PREFIX}:recent:errors"
"""List of error answers the gateways sent (status, code, message, tenant, path)."""
RECENT_ERRORS_CAP = 100
LATENCY_SAMPLES = f"{PREFIX}:recent:latencies"
"""List of the requests the gateways answered: tenant, time to first token and end to end."""
LATENCY_SAMPLES_CAP = 2000
