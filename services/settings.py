"""Typed settings, parsed once from ``FAIRWAY_*`` environment variables."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services import keys

DEFAULT_MODEL_NAME = "fairway-tiny-llama"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


DEFAULT_AMQP_RECONNECT_S = 1.0
"""Seconds between reconnect attempts to the broker, for services and AMQP clients alike."""

DEFAULT_AMQP_HEARTBEAT_S = 10
"""AMQP heartbeat interval (seconds), for services and AMQP clients alike: a link cut
without a reset is noticed, by both ends, within two of them."""

DEFAULT_BROKER_OUTAGE_GRACE_S = 30.0
"""How long open streams wait for a lost broker connection to come back, in the gateway
and in AMQP clients alike."""


class Settings(BaseSettings):
    """Every knob of every service. Each service reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="FAIRWAY_", extra="ignore")

    # Infrastructure
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_heartbeat_s: int = DEFAULT_AMQP_HEARTBEAT_S
    amqp_reconnect_s: float = Field(default=DEFAULT_AMQP_RECONNECT_S, gt=0)
    """Seconds between attempts to reconnect to the broker. aio-pika's 5 s default keeps a
    service away for up to 5 s after a restarted broker is back (``bench/bench_broker_restart.py``:
    2.4 s on average, 3.8 s at most, against 0.5 s and 0.8 s at 1 s); an attempt on a
    broker that is down costs a refused connect."""
    declare_topology: bool = True
    """False where an administrator declared the topology (``fairway provision``) and the
    services run as least-privilege RabbitMQ users: they then only check it exists."""
    instance_id: str = Field(default_factory=_default_instance_id)

    # Model
    model_name: str = DEFAULT_MODEL_NAME
    """Name clients send in the ``model`` field."""
    model_path: str | None = None
    """Local path or hub id; unset means the built-in tiny random-weight model."""
    cache_dir: Path = Path(os.path.expanduser("~/.cache/fairway"))
    max_model_len: int = 2048
    adapters_file: Path | None = None
    """JSON or YAML registry of tenant LoRA adapters (see :mod:`services.adapters`)."""

    # Logging
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""
    """Comma-separated ``tenant:key`` pairs (development); keys are hashed at load."""
    api_keys_file: Path | None = None
    """JSON file ``{"tenants": {"name": {"key_sha256": "...", "weight": 1.0}}}``; a tenant
    may also have ``requests_per_minute`` and ``tokens_per_minute`` rate limits."""
    tenants_reload_s: float = Field(default=5.0, ge=0)
    """How often the gateway and the scheduler look whether ``api_keys_file`` changed, to
    read its tenants, keys, weights and limits again (0: never)."""
    admin_key: str = ""
    max_body_bytes: int = 1_000_000
    max_queued_per_tenant: int = 256
    max_queued_tokens_per_tenant: int = 262_144
    """Token budget of a tenant's unfinished requests: ``max_tokens`` plus a prompt
    estimate of one token per 4 bytes (the gateway has no tokenizer)."""
    max_queued_total: int = 4096
    """Unfinished requests of all tenants together; beyond it every tenant gets 503."""
    tenant_requests_per_minute: int = Field(default=0, ge=0)
    """Each tenant's rate limit in requests per minute (0: none); a tenant of the API
    keys file may have its own (``requests_per_minute``)."""
    tenant_tokens_per_minute: int = Field(default=0, ge=0)
    """Each tenant's rate limit in tokens per minute, counted as admission counts them
    and settled to the tokens used (0: none; the keys file's ``tokens_per_minute``)."""
    request_timeout_s: float = 600.0
    stream_keepalive_s: float = Field(default=15.0, ge=0)
    """A streamed request with no reply yet after this long gets its response headers and
    then an SSE comment this often until its first reply, so that proxies with an idle
    timeout (often 60 s) do not cut it while it waits in the queue (0: never)."""
    worker_alive_s: float = 10.0
    broker_outage_grace_s: float = Field(default=DEFAULT_BROKER_OUTAGE_GRACE_S, gt=0)
    """How long the gateway's open streams wait for a lost broker connection to come back
    before each gets an error answer (``broker_connection_lost``); within it they go on
    where they were once the gateway has reconnected."""
    tool_call_parser: Literal["", "hermes"] = ""
    """The model's own format of tool calls, read out of its answers when a chat lets it
    choose (``tool_choice`` auto), as vLLM's ``--tool-call-parser``; empty: such chats are
    refused. ``hermes``: ``<tool_call>{...}</tool_call>`` (Hermes, Qwen 2.5 and 3)."""
    reasoning_parser: Literal["", "deepseek_r1", "qwen3"] = ""
    """How a reasoning model's thinking is split from its chat answers into
    ``reasoning_content``, as vLLM's ``--reasoning-parser``; empty: it stays in the content."""
    responses_ttl_s: int = Field(default=3600, ge=0)
    """How long the gateway keeps a Responses API answer stored (``store``, OpenAI's
    default) for ``previous_response_id`` and ``GET /v1/responses/{id}``, in Redis; 0
    stores none (then ``previous_response_id`` is refused)."""
    conversations_ttl_s: int = Field(default=30 * 24 * 3600, ge=0)
    """How long a Responses API conversation (``/v1/conversations``) is kept in Redis after
    its last change; 0 keeps none (then ``conversation`` is refused)."""
    files_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    """How long uploaded files, batch output files and ended batches are kept in Redis."""
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """The largest file ``POST /v1/files`` takes (it is held in Redis)."""
    background_response_concurrency: int = Field(default=16, ge=1)
    """Background responses (Responses API, ``background: true``) one gateway runs at once
    (their requests take the tenant's admission slots as any request's do)."""
    background_responses_per_tenant: int = Field(default=256, ge=1)
    """The most background responses a tenant may have queued or running (429 past it)."""
    background_response_timeout_s: float = Field(default=3600.0, gt=0)
    """How long one run of a background response may take before it fails (a request
    sent and waited on has ``request_timeout_s``)."""
    batch_max_requests: int = Field(default=50_000, ge=1)
    """The most requests one batch input file may hold (OpenAI's limit)."""
    batch_concurrency: int = Field(default=8, ge=1)
    """Requests of batches one gateway runs at once (they take the tenant's admission
    slots as any request does; a 429 or 503 is retried, not failed)."""
    gateway_dead_after_s: float = 15.0
    """A gateway whose heartbeat in Redis is this old is dead: the other gateways free its
    admission slots and cancel its requests downstream. A restarted gateway (same
    ``instance_id``) does so for its previous life at once."""

    # Scorer
    predictor_artifact: Path | None = None
    trusted_amqp_users: str = "guest,fairway-gateway"
    """AMQP users allowed to set ``tenant`` on a request (the gateway's); for any other
    publisher the tenant is the broker-validated ``user_id`` of the message."""

    # Scheduler
    policy: Literal["fcfs", "vtc", "rtlm", "fairway"] = "fairway"
    usage_retention_days: int = Field(default=400, ge=1)
    """How long each day's token usage per tenant and model is kept in Redis (minute
    buckets are kept two days, hour buckets 32; :mod:`services.usage`)."""
    vtc_w_in: float = 1.0
    vtc_w_out: float = 2.0
    vtc_w_cached: float = Field(default=0.1, ge=0)
    """VTC charge per prompt token a worker read from its prefix cache instead of
    computing it (``PolicyConfig.w_cached``); ``vtc_w_in`` charges it in full."""
    preempt_background: bool = True
    """Hand a running background request (a batch's, or ``service_tier: "flex"``) back to
    the queue when a foreground request would wait for its room (``PolicyConfig``)."""
    preempt_background_after_s: float = Field(default=0.5, ge=0)
    """...only when that request's estimated wait is at least this long
    (``PolicyConfig.preempt_after_s``)."""
    lease_ttl_s: float = 3.0
    worker_timeout_s: float = 6.0
    """A worker whose last heartbeat is older is dead to the scheduler (no work is placed
    on it); a worker whose heartbeats fail this long stops taking work from the queue."""
    tenant_weights: str = ""
    """Comma-separated ``tenant:weight`` pairs for VTC."""
    idle_tenant_slots: int = Field(default=1, ge=0)
    """Slots of each pool (of more than four times as many) kept from a tenant that holds
    an even share of all slots while other tenants are about, so a light tenant starts at
    once (``PolicyConfig.idle_tenant_slots``)."""

    # Workers
    pool: Literal["gpu", "cpu"] = "cpu"
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_running: int = 32
    """Requests a worker runs at once. 32 measured on 2 CPU cores: +20-40% output tokens/s
    over 16 (tiny and ~100M Llama), per-token latency about 1.5x (bench engine)."""
    kv_tokens: int = 65536
    heartbeat_interval_s: float = 1.0
    worker_drain_s: float = 20.0
    """On SIGTERM a worker stops taking work and lets its requests finish for this long;
    the rest it hands back to the queue with resume points, and another worker continues
    them where their callers are."""
    engine: Literal["model", "echo"] = "model"
    echo_tokens_per_s: float = 1000.0
    threads: int = 0
    """torch intra-op threads for CPU workers; 0 lets torch decide (one per core: on 2 idle
    cores 2 threads decode 1.2-1.45x faster than 1; keep CPU workers off busy cores)."""

    # Redis
    marker_ttl_s: int = Field(default=keys.DEFAULT_MARKER_TTL_S, ge=60)
    """How long per-request markers stay in Redis (done, cancelled, the worker's and the
    scorer's claims, learned, resume points): the window in which a redelivered or
    re-sent copy of a request is recognised, as an idempotency key is. They take about
    1.1 KB per request (``bench/bench_control_plane.py``, ``redis_growth``), so Redis
    holds about rate x TTL x 1.1 KB: shorten it for high request rates."""

    # Metrics (the gateway serves /metrics on its own port)
    metrics_port: int | None = None
    """Prometheus port of a scheduler, scorer or worker; unset: the service's default
    (see ``services.metrics``), 0: none."""
    metrics_host: str = "127.0.0.1"
    max_loras: int = 8
    """LoRA adapter slots in the engine's device pool (S-LoRA); 0 serves the base model only."""
    max_lora_rank: int = 64
    """Largest adapter rank the pool holds; smaller ranks are zero-padded to it."""
    max_cpu_loras: int = 64
    """Adapters kept in host memory (LRU), loaded from disk on first use."""
    enable_prefix_caching: bool = True
    """A worker keeps computed KV blocks named by their tokens, so a request that starts
    as an earlier one did (a system prompt, a conversation's earlier turns) skips
    computing them (vLLM's automatic prefix caching)."""
    prefix_cache_scope: Literal["tenant", "global"] = "tenant"
    """Whose requests share cached prefixes: each tenant's own (the default, so that no
    tenant can time another's prompts, as vLLM's ``cache_salt`` keeps them apart), or
    every tenant's (a system prompt all tenants send is computed once)."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
