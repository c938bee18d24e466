"""Dashboard: the JSON builder on fake Redis contents, admin auth, routes, error log."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from services import keys
from services import messages as m
from services.gateway.app import create_app
from services.gateway.auth import KeyStore
from services.gateway.dashboard import (
    WORKER_FORGET_S,
    AdminAuth,
    RawSnapshot,
    build_dashboard,
    length_summary,
)
from services.gateway.errors import ApiError
from services.gateway.rate_limits import NO_LIMITS, RateLimits
from services.recent import encode_entry
from services.scheduler.store import InflightRecord
from services.settings import Settings

NOW = 1_700_000_000.0
ADMIN = "adm-0123456789abcdef"
ADMIN_HEADER = {"Authorization": f"Bearer {ADMIN}"}


def scored(request_id: str, tenant: str, p50: float = 10.0) -> m.ScoredRequest:
    request = m.CompletionRequest(request_id=request_id, tenant=tenant, model="x", prompt="hi")
    score = m.LengthScore(uncertainty=0.5, p10=p50 / 2, p50=p50, p90=p50 * 2)
    return m.ScoredRequest(
        request_id=request_id, request=request, prompt_token_ids=[1, 2], score=score
    )


def heartbeat(worker_id: str, pool: str, running: int, sent_at: float, draining: bool = False) -> bytes:
    return m.encode(
        m.WorkerHeartbeat(
            worker_id=worker_id, pool=pool, model="x", max_running=8, running=running, waiting=1,
            free_kv_tokens=3000, total_kv_tokens=4000, sent_at=sent_at, draining=draining,
            prefix_cache_queries=400 if running < 5 else 0, prefix_cache_hits=100 if running < 5 else 0,
            speed=m.SpeedReport(prefill_tokens_per_s=900.0, decode_tokens_per_s=120.0,
                                decode_step_ms=8.5),
        )
    )  # fmt: skip


def inflight(request_id: str, tenant: str, pool: str) -> bytes:
    record = InflightRecord(scored=scored(request_id, tenant), pool=pool, dispatched_at=NOW - 1)
    return record.to_bytes()


def sample(tenant: str, predicted: float, actual: int, p10: float, p90: float) -> bytes:
    entry = {"t": NOW - 5, "tenant": tenant, "pool": "cpu", "predicted": predicted,
             "p10": p10, "p90": p90, "actual": actual, "finish_reason": "stop"}  # fmt: skip
    return encode_entry(entry).encode()


def snapshot() -> RawSnapshot:
    return RawSnapshot(
        now=NOW,
        counters={b"acme": b"120.5", b"globex": b"80.0", b"bad": b"nan"},
        served={b"acme": b"300.0", b"globex": b"100.0"},
        queued=[m.encode(scored("q1", "acme")), m.encode(scored("q2", "acme")),
                m.encode(scored("q3", "globex")), b"\xc1not msgpack"],
        queued_total=4,
        inflight=[inflight("r1", "globex", "cpu"), inflight("r2", "acme", "gpu"),
                  inflight("r3", "globex", "cpu")],
        inflight_total=3,
        heartbeats={
            b"w-live": heartbeat("w-live", "cpu", 2, NOW - 0.5),
            b"w-stale": heartbeat("w-stale", "cpu", 8, NOW - 30),
            b"w-gone": heartbeat("w-gone", "gpu", 1, NOW - WORKER_FORGET_S - 1),
            b"w-junk": b"junk",
        },
        seen={b"w-live": NOW - 0.5, b"w-stale": NOW - 30, b"w-gone": NOW - WORKER_FORGET_S - 1},
        length_samples=[sample("acme", 10, 12, 5, 20), sample("globex", 40, 100, 20, 80),
                        b"{not json", encode_entry({"t": NOW, "predicted": "x"}).encode()],
        errors=[encode_entry({"t": NOW - 1, "status": 429, "code": "rate_limit_exceeded",
                              "message": "m" * 1000, "tenant": "acme",
                              "path": "/v1/completions", "request_id": "cmpl-1"}).encode()],
        leader=b"scheduler-a",
        fence=b"7",
        background_tenants=[b"acme", b"acme"],
    )  # fmt: skip


UNANSWERED = {"answered": 0, "ttft_p50_ms": None, "ttft_p90_ms": None, "e2e_p50_ms": None, "e2e_p90_ms": None,
              "tokens_today": 0, "requests_today": 0, "rate_limits": None}


def latency(tenant: str, ago_s: float, ttft_s: float | None, e2e_s: float) -> bytes:
    return encode_entry({"t": NOW - ago_s, "tenant": tenant, "ttft": ttft_s, "e2e": e2e_s}).encode()


def test_each_tenants_latency_is_over_the_last_minute_of_answers() -> None:
    """Percentiles by nearest rank over the window; an answer without tokens counts end to
    end only; older answers and broken entries are left out."""
    raw = RawSnapshot(now=NOW, latencies=[
        *(latency("acme", 1, 0.01 * i, 0.1 * i) for i in range(1, 11)),
        latency("acme", 120, 9.0, 9.0),  # outside the window
        latency("globex", 2, None, 0.5), b"{not json", encode_entry({"tenant": "acme", "e2e": "x"}).encode()])
    tenants = {t["name"]: t for t in build_dashboard(raw, worker_alive_s=10, model="x")["tenants"]}
    acme = tenants["acme"]
    assert acme["answered"] == 10
    assert (acme["ttft_p50_ms"], acme["ttft_p90_ms"]) == (pytest.approx(50.0), pytest.approx(90.0))
    assert (acme["e2e_p50_ms"], acme["e2e_p90_ms"]) == (pytest.approx(500.0), pytest.approx(900.0))
    assert tenants["globex"] == {"name": "globex", "served_tokens": 0.0, "vtc": 0.0, "queued": 0, "dispatched": 0,
                                 "background_responses": 0, "answered": 1, "ttft_p50_ms": None, "ttft_p90_ms": None,
                                 "e2e_p50_ms": 500.0, "e2e_p90_ms": 500.0, "tokens_today": 0, "requests_today": 0,
                                 "rate_limits": None}


def test_builder_aggregates_tenants_queues_and_pools() -> None:
    data = build_dashboard(snapshot(), tenants={"acme", "initech"}, worker_alive_s=10, model="x")
    assert data["now"] == NOW and data["model"] == "x"
    assert data["scheduler"] == {"leader": "scheduler-a", "fence": 7}
    tenants = {t["name"]: t for t in data["tenants"]}
    assert list(tenants) == ["acme", "globex", "initech"]  # 'bad' has only a NaN counter
    assert tenants["acme"] == {"name": "acme", "served_tokens": 300.0, "vtc": 120.5,
                               "queued": 2, "dispatched": 1, "background_responses": 2, **UNANSWERED}  # fmt: skip
    assert tenants["globex"]["queued"] == 1 and tenants["globex"]["dispatched"] == 2
    assert tenants["initech"] == {"name": "initech", "served_tokens": 0.0, "vtc": 0.0,
                                  "queued": 0, "dispatched": 0, "background_responses": 0, **UNANSWERED}  # fmt: skip
    assert data["queue"] == {"queued": 4, "dispatched": 3, "complete": True}
    assert [p["name"] for p in data["pools"]] == ["gpu", "cpu"]  # topology order, once each
    pools = {p["name"]: p for p in data["pools"]}
    assert pools["cpu"]["workers"] == 1 and pools["cpu"]["dispatched"] == 2
    assert pools["cpu"]["running"] == 2 and pools["cpu"]["slots"] == 8
    assert pools["cpu"]["decode_tokens_per_s"] == 120.0
    # No live gpu worker, but one request is dispatched to that pool: still shown.
    assert pools["gpu"]["workers"] == 0 and pools["gpu"]["dispatched"] == 1


def test_builder_reports_workers_with_load_speed_and_liveness() -> None:
    data = build_dashboard(snapshot(), worker_alive_s=10, model="x")
    workers = {w["id"]: w for w in data["workers"]}
    assert set(workers) == {"w-live", "w-stale"}  # w-gone is forgotten, w-junk undecodable
    live = workers["w-live"]
    assert live["alive"] and live["age_s"] == pytest.approx(0.5)
    assert live["load"] == pytest.approx(2 / 8) and live["kv_used"] == pytest.approx(0.25)
    assert live["decode_tokens_per_s"] == 120.0 and live["prefill_tokens_per_s"] == 900.0
    assert live["decode_step_ms"] == 8.5
    assert live["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert workers["w-stale"]["prefix_cache_hit_rate"] is None  # nothing looked up yet
    assert not workers["w-stale"]["alive"] and workers["w-stale"]["load"] == 1.0
    assert not live["draining"]


def test_a_draining_worker_is_shown_and_offers_no_free_slots() -> None:
    raw = snapshot()
    raw.heartbeats[b"w-stopping"] = heartbeat("w-stopping", "cpu", 3, NOW - 0.2, draining=True)
    raw.seen[b"w-stopping"] = NOW - 0.2
    data = build_dashboard(raw, worker_alive_s=10, model="x")
    assert {w["id"]: w["draining"] for w in data["workers"]}["w-stopping"] is True
    cpu = {p["name"]: p for p in data["pools"]}["cpu"]
    assert cpu["workers"] == 2 and cpu["slots"] == 8 + 3 and cpu["running"] == 2 + 3


def test_builder_reports_gateways_with_liveness_in_redis_time_and_requests_in_flight() -> None:
    raw = snapshot()
    raw.redis_now = 5000.0  # the gateways' clock, not this host's (raw.now)
    raw.gateways = {b"gw-a:1f": 4999.0, b"host:8000:2c": 4980.0}
    raw.gateway_slots = {b"gw-a:1f": 3}
    gateways = build_dashboard(raw, worker_alive_s=10, model="x", gateway_dead_after_s=15)["gateways"]
    assert gateways == [
        {"id": "gw-a:1f", "instance": "gw-a", "alive": True, "age_s": 1.0, "in_flight": 3},
        {"id": "host:8000:2c", "instance": "host:8000", "alive": False, "age_s": 20.0, "in_flight": 0},
    ]


def test_builder_lengths_and_errors() -> None:
    data = build_dashboard(snapshot(), worker_alive_s=10, model="x")
    assert [(p["tenant"], p["predicted"], p["actual"]) for p in data["lengths"]] == [
        ("acme", 10.0, 12.0),
        ("globex", 40.0, 100.0),
    ]
    summary = data["length_summary"]
    assert summary["n"] == 2
    assert summary["mean_abs_error"] == pytest.approx((2 + 60) / 2)
    assert summary["within_p10_p90"] == pytest.approx(0.5)
    (error,) = data["errors"]
    assert error["status"] == 429 and error["tenant"] == "acme" and error["code"]
    assert len(error["message"]) == 300
    json.dumps(data, allow_nan=False)  # what the endpoint sends is strict JSON


def test_builder_marks_a_partially_read_queue_and_handles_empty_redis() -> None:
    raw = snapshot()
    raw.queued_total = 10_000
    assert build_dashboard(raw, worker_alive_s=10, model="x")["queue"]["complete"] is False
    empty = build_dashboard(RawSnapshot(now=NOW), worker_alive_s=10, model="x")
    assert empty["tenants"] == [] and empty["workers"] == [] and empty["pools"] == []
    assert empty["gateways"] == []
    assert empty["scheduler"] == {"leader": None, "fence": None}
    assert length_summary([]) == {"n": 0, "mean_abs_error": None, "within_p10_p90": None}


# --- admin auth ------------------------------------------------------------------------


def tenant_keys() -> KeyStore:
    return KeyStore.from_config("acme:key-a")


def test_admin_auth() -> None:
    auth = AdminAuth(ADMIN, tenant_keys())
    auth.check(f"Bearer {ADMIN}")
    cases = [(None, 401), ("Bearer", 401), (ADMIN, 401), ("Bearer wrong", 401),
             ("Bearer key-a", 403)]  # fmt: skip
    for header, status in cases:
        with pytest.raises(ApiError) as info:
            auth.check(header)
        assert info.value.status == status, header


def test_dashboard_is_off_without_an_admin_key() -> None:
    auth = AdminAuth("", tenant_keys())
    with pytest.raises(ApiError) as info:
        auth.check(f"Bearer {ADMIN}")
    assert info.value.status == 403 and info.value.code == "admin_disabled"


def test_admin_key_must_not_be_a_tenant_key() -> None:
    with pytest.raises(ValueError, match="differ"):
        AdminAuth("key-a", tenant_keys())


# --- routes ----------------------------------------------------------------------------


def test_each_tenant_shows_its_usage_today_and_what_is_left_of_its_rate_limits() -> None:
    raw = RawSnapshot(now=NOW, redis_now=NOW, usage_today={
        b"acme\tx\tinput_tokens": b"30", b"acme\tx\toutput_tokens": b"12", b"acme\tx\tinput_cached_tokens": b"10",
        b"acme\tx\tnum_model_requests": b"1", b"acme\ty\tnum_model_requests": b"2",
    }, rate_buckets={"acme": {b"rl": b"3.5", b"rt": repr(NOW - 6).encode(), b"tl": b"-100", b"tt": repr(NOW).encode()},
                     "initech": {}})
    limits = {"acme": RateLimits(60, 6000), "initech": RateLimits(0, 500)}
    rows = {t["name"]: t for t in build_dashboard(
        raw, tenants={"acme", "globex", "initech"}, worker_alive_s=10, model="x",
        limits=lambda tenant: limits.get(tenant, NO_LIMITS))["tenants"]}
    assert (rows["acme"]["tokens_today"], rows["acme"]["requests_today"]) == (42, 3)  # cached are input
    assert rows["acme"]["rate_limits"] == {"requests_per_minute": 60, "requests_left": 9,  # 3.5 + 6 s refill
                                           "tokens_per_minute": 6000, "tokens_left": 0}  # in debt: none left
    assert rows["initech"]["rate_limits"] == {"requests_per_minute": None, "requests_left": None,
                                              "tokens_per_minute": 500, "tokens_left": 500}  # untouched: full
    assert rows["globex"]["rate_limits"] is None and rows["globex"]["tokens_today"] == 0


@pytest.fixture
def client() -> TestClient:
    settings = Settings(api_keys="acme:key-a", admin_key=ADMIN, redis_url="redis://127.0.0.1:1/0")
    return TestClient(create_app(settings))


def test_page_and_assets_are_public_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "dashboard/app.js" in page.text and "admin-key" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    js = client.get("/dashboard/app.js")
    assert js.status_code == 200 and "fetch(\"dashboard/data\"" in js.text
    assert client.get("/dashboard/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer key-a"}, 403, "insufficient_permissions"),
    ],
)
def test_data_needs_the_admin_key(client: TestClient, headers, status, code) -> None:
    response = client.get("/dashboard/data", headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_data_without_redis_is_503(client: TestClient) -> None:
    response = client.get("/dashboard/data", headers=ADMIN_HEADER)
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"


async def test_data_endpoint_reads_redis_and_errors_are_logged(redis_client, redis_url) -> None:
    settings = Settings(api_keys="acme:key-a", admin_key=ADMIN, redis_url=redis_url,
                        model_name="test-model")  # fmt: skip
    app = create_app(settings)  # lifespan not started: no AMQP
    app.state.dashboard.snapshot_ttl_s = 0.0  # every poll reads Redis
    await redis_client.hset(keys.SCHED_SERVED, mapping={"acme": "42.0"})
    await redis_client.hset(keys.SCHED_COUNTERS, mapping={"acme": "17.5"})
    await redis_client.hset(keys.SCHED_QUEUED, "q1", m.encode(scored("q1", "acme")))
    await redis_client.hset(keys.WORKERS, "w1", heartbeat("w1", "cpu", 1, 0.0))
    await redis_client.zadd(keys.WORKERS_SEEN, {"w1": 1e12})  # seen "now" (clock-proof)
    await redis_client.zadd(keys.GATEWAYS_SEEN, {"gw:1": 1e12})
    await redis_client.hset(keys.gateway_slots("gw:1"), mapping={"r1": "acme", "r2": "acme"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        data = (await http.get("/dashboard/data", headers=ADMIN_HEADER)).json()
        assert data["tenants"] == [{"name": "acme", "served_tokens": 42.0, "vtc": 17.5,
                                    "queued": 1, "dispatched": 0, "background_responses": 0, **UNANSWERED}]  # fmt: skip
        assert [w["id"] for w in data["workers"]] == ["w1"] and data["workers"][0]["alive"]
        assert [(g["id"], g["alive"], g["in_flight"]) for g in data["gateways"]] == [("gw:1", True, 2)]
        assert data["queue"]["queued"] == 1 and data["batches"] == []
        # A batch in progress is listed with its progress.
        batches = app.state.gateway.batches
        static = {"endpoint": "/v1/completions", "input_file_id": "file-1", "completion_window": "24h",
                  "created_at": 100, "expires_at": 100 + 86400, "metadata": None, "model": "test-model"}
        batch = await batches.create("acme", static, b"x", [None, None, None], None)
        await batches.record(batch.batch_id, 0, {"custom_id": "a"}, ok=False)
        data = (await http.get("/dashboard/data", headers=ADMIN_HEADER)).json()
        assert data["batches"] == [{"id": batch.batch_id, "tenant": "acme", "status": "in_progress",
                                    "total": 3, "completed": 0, "failed": 1, "created_at": 100}]
        # Errors: one without a tenant (bad key), one with (unknown model).
        await http.post("/v1/completions", json={"model": "test-model", "prompt": "x"})
        await http.post("/v1/completions", json={"model": "other", "prompt": "x"},
                        headers={"Authorization": "Bearer key-a"})  # fmt: skip
        await app.state.dashboard.errors.flush()
        await redis_client.hset(keys.SCHED_SERVED, mapping={"acme": "50.0"})
        data = (await http.get("/dashboard/data", headers=ADMIN_HEADER)).json()
    errors = data["errors"]
    # Newest first; the polls themselves carried the admin key, so they logged nothing.
    assert [(e["status"], e["tenant"], e["path"]) for e in errors] == [
        (404, "acme", "/v1/completions"),
        (401, None, "/v1/completions"),
    ]
    assert errors[0]["code"] == "model_not_found" and errors[0]["request_id"] is None
    assert data["tenants"][0]["served_tokens"] == 50.0
    # An answered request's latency, as the gateway's metrics report it, reaches the table.
    app.state.gateway.metrics.on_answered("acme", 0.02, 0.4)
    await app.state.dashboard.latencies.flush()
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        acme = (await http.get("/dashboard/data", headers=ADMIN_HEADER)).json()["tenants"][0]
    assert (acme["answered"], acme["ttft_p50_ms"], acme["e2e_p90_ms"]) == (1, 20.0, 400.0)
    await app.state.dashboard.close()
    await app.state.gateway.backend.redis.aclose()
