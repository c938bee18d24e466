"""Tenant adapters: registry file, model names, ownership at the gateway and the scorer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from services import messages as m
from services.adapters import (
    AdapterCatalog,
    AdapterConfigError,
    AdapterSpec,
    ModelNotFound,
    load_adapters_file,
    read_peft_config,
    split_model,
)
from services.gateway.app import create_app
from services.scorer.service import RequestRejected, check_model
from services.settings import Settings
from services.tenants import NO_LIMITS, RateLimits

BASE = "test-model"
ADMIN = "sk-admin-adapters"
KEYS = {t: {"Authorization": f"Bearer key-{t}"} for t in ("acme", "beta", "gamma")}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def write_registry(tmp_path: Path) -> Path:
    path = tmp_path / "adapters.json"
    path.write_text(json.dumps({"adapters": [
        {"name": "acme-support", "path": "lora/acme", "owner": "acme", "shared_with": ["gamma"]},
        {"name": "public-sql", "path": "/abs/sql", "owner": "beta", "shared_with": "*"},
    ]}))  # fmt: skip
    return path


# --- registry and names ----------------------------------------------------------------


def test_registry_file_json_and_yaml(tmp_path: Path) -> None:
    specs = {s.name: s for s in load_adapters_file(write_registry(tmp_path))}
    acme = specs["acme-support"]
    assert acme.path == str(tmp_path / "lora/acme") and acme.owner == "acme"
    assert acme.may_use("acme") and acme.may_use("gamma") and not acme.may_use("beta")
    assert specs["public-sql"].may_use("anyone") and specs["public-sql"].path == "/abs/sql"

    yaml_file = tmp_path / "adapters.yaml"
    yaml_file.write_text("adapters:\n  acme-support: {path: /x, owner: acme}\n")
    (spec,) = load_adapters_file(yaml_file)
    assert spec == AdapterSpec("acme-support", "/x", "acme")


@pytest.mark.parametrize("entry", [
    {"name": "has:colon", "path": "/x", "owner": "acme"},
    {"name": "ok", "path": "", "owner": "acme"},
    {"name": "ok", "path": "/x", "owner": "bad owner"},
    {"name": "ok", "path": "/x", "owner": "acme", "shared_with": [3]},
    {"name": "ok", "path": "~fairway-no-such-user/x", "owner": "acme"},  # was a RuntimeError
    {"name": "ok", "path": "/x\ud800", "owner": "acme"},
    {"name": "ok", "path": "/x\u0000y", "owner": "acme"},
])  # fmt: skip
def test_registry_file_rejects_bad_entries(tmp_path: Path, entry: dict) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"adapters": [entry]}))
    with pytest.raises(ValueError):
        load_adapters_file(path)


def test_model_names_select_adapters_like_vllm() -> None:
    assert split_model(BASE, BASE) is None
    assert split_model(f"{BASE}:acme-support", BASE) == "acme-support"
    assert split_model("org/model:v1:sql", "org/model:v1") == "sql"  # a base with a colon
    for model in ("other", f"{BASE}:", f"{BASE}:a:b", f"{BASE}-x:y"):
        with pytest.raises(ModelNotFound):
            split_model(model, BASE)


def test_peft_config_checks(tmp_path: Path) -> None:
    def config(**fields) -> Path:
        (tmp_path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **fields}))
        return tmp_path

    assert read_peft_config(config())["r"] == 8
    for bad in ({"r": 0}, {"r": 256}, {"use_dora": True}, {"bias": "all"},
                {"modules_to_save": ["lm_head"]}, {"peft_type": "IA3"}):  # fmt: skip
        with pytest.raises(AdapterConfigError):
            read_peft_config(config(**bad))
    with pytest.raises(AdapterConfigError, match="no adapter_config"):
        read_peft_config(tmp_path / "missing")


# --- the scorer re-checks for AMQP producers -------------------------------------------


async def test_scorer_refuses_another_tenants_adapter(tmp_path: Path) -> None:
    catalog = AdapterCatalog(BASE, load_adapters_file(write_registry(tmp_path)))

    def request(tenant: str, model: str) -> m.CompletionRequest:
        return m.CompletionRequest(request_id="r", tenant=tenant, model=model, prompt="x")

    assert await check_model(catalog, request("acme", f"{BASE}:acme-support")) == "acme-support"
    assert await check_model(catalog, request("gamma", f"{BASE}:acme-support")) == "acme-support"
    assert await check_model(catalog, request("beta", BASE)) is None
    for tenant, model in [("beta", f"{BASE}:acme-support"), ("beta", f"{BASE}:nope"),
                          ("acme", "other-model")]:  # fmt: skip
        with pytest.raises(RequestRejected) as info:
            await check_model(catalog, request(tenant, model))
        assert info.value.status == 404 and info.value.code == "model_not_found"
        assert str(info.value) == f"The model `{model}` does not exist."


# --- the gateway, with a fake backend --------------------------------------------------


class FakeStream:
    def __init__(self, request_id: str) -> None:
        self.replies = [
            m.TokenChunk(request_id=request_id, token_offset=0, text_offset=0, text="hello",
                         token_ids=[1]),
            m.FinalAnswer(request_id=request_id, token_offset=1, text_offset=5, finish_reason="stop",
                          prompt_tokens=1, completion_tokens=1),
        ]  # fmt: skip

    async def next(self):
        return self.replies.pop(0)


class FakeSubmission:
    closed = True  # nothing to release
    rate = None  # not rate limited

    def __init__(self, request: m.CompletionRequest) -> None:
        self.request = request
        self.stream = FakeStream(request.request_id)


@pytest.fixture
async def gateway(tmp_path: Path, redis_url: str, redis_client):
    settings = Settings(
        model_name=BASE,
        api_keys="acme:key-acme,beta:key-beta,gamma:key-gamma",
        admin_key=ADMIN,
        adapters_file=write_registry(tmp_path),
        redis_url=redis_url,
    )
    app = create_app(settings)  # the lifespan (AMQP) never starts
    submitted: list[m.CompletionRequest] = []

    async def submit_all(requests: list[m.CompletionRequest], arrived_at: float,
                         limits: RateLimits = NO_LIMITS) -> list[FakeSubmission]:
        submitted.extend(requests)
        return [FakeSubmission(request) for request in requests]

    app.state.gateway.backend.submit_all = submit_all
    app.state.gateway.adapters.ttl_s = 0.0  # see every registration at once
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        client.submitted = submitted  # type: ignore[attr-defined]
        yield client
    await app.state.dashboard.close()
    await app.state.gateway.backend.redis.aclose()


async def complete(client: httpx.AsyncClient, tenant: str, model: str) -> httpx.Response:
    return await client.post("/v1/completions", headers=KEYS[tenant],
                             json={"model": model, "prompt": "hi", "max_tokens": 4})  # fmt: skip


async def model_ids(client: httpx.AsyncClient, tenant: str) -> list[str]:
    listing = await client.get("/v1/models", headers=KEYS[tenant])
    assert listing.status_code == 200, listing.text
    return [card["id"] for card in listing.json()["data"]]


async def test_gateway_only_the_owner_and_shared_tenants_use_an_adapter(gateway) -> None:
    model = f"{BASE}:acme-support"
    for tenant in ("acme", "gamma"):
        response = await complete(gateway, tenant, model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        assert (gateway.submitted[-1].tenant, gateway.submitted[-1].model) == (tenant, model)
    sent = len(gateway.submitted)
    denied = await complete(gateway, "beta", model)
    missing = await complete(gateway, "beta", f"{BASE}:no-such-adapter")
    assert denied.status_code == missing.status_code == 404
    error, other = denied.json()["error"], missing.json()["error"]
    assert error["code"] == other["code"] == "model_not_found"
    assert error["message"].replace("acme-support", "X") == other["message"].replace(
        "no-such-adapter", "X")
    assert len(gateway.submitted) == sent  # nothing reached the pipeline
    assert (await complete(gateway, "beta", BASE)).status_code == 200


async def test_gateway_lists_only_usable_adapters(gateway) -> None:
    assert await model_ids(gateway, "acme") == [BASE, f"{BASE}:acme-support", f"{BASE}:public-sql"]
    assert await model_ids(gateway, "beta") == [BASE, f"{BASE}:public-sql"]
    card = (await gateway.get(f"/v1/models/{BASE}:acme-support", headers=KEYS["gamma"])).json()
    assert card["parent"] == BASE and card["owned_by"] == "acme"
    denied = await gateway.get(f"/v1/models/{BASE}:acme-support", headers=KEYS["beta"])
    assert denied.status_code == 404


async def test_admin_endpoint_registers_and_revokes(gateway, tmp_path: Path) -> None:
    url = "/admin/adapters/beta-legal"
    body = {"path": str(tmp_path / "not-here"), "owner": "beta"}
    assert (await gateway.put(url, json=body)).status_code == 401
    assert (await gateway.put(url, json=body, headers=KEYS["beta"])).status_code == 403
    created = await gateway.put(url, json=body, headers=ADMIN_HEADERS)
    assert created.status_code == 201, created.text
    assert created.json()["model"] == f"{BASE}:beta-legal" and created.json()["checked"] is False
    assert f"{BASE}:beta-legal" in await model_ids(gateway, "beta")
    assert f"{BASE}:beta-legal" not in await model_ids(gateway, "acme")
    assert (await complete(gateway, "beta", f"{BASE}:beta-legal")).status_code == 200
    assert (await complete(gateway, "acme", f"{BASE}:beta-legal")).status_code == 404

    shared = await gateway.put(url, json={**body, "shared_with": ["acme"]}, headers=ADMIN_HEADERS)
    assert shared.status_code == 200
    assert (await complete(gateway, "acme", f"{BASE}:beta-legal")).status_code == 200
    listing = (await gateway.get("/admin/adapters", headers=ADMIN_HEADERS)).json()["data"]
    assert {a["name"]: a["source"] for a in listing} == {
        "acme-support": "file", "beta-legal": "admin", "public-sql": "file"}

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 999}')
    bad = await gateway.put(url, json={**body, "path": str(broken)}, headers=ADMIN_HEADERS)
    assert bad.status_code == 400
    clash = await gateway.put("/admin/adapters/acme-support", json=body, headers=ADMIN_HEADERS)
    assert clash.status_code == 409

    assert (await gateway.delete(url, headers=KEYS["beta"])).status_code == 403
    assert (await gateway.delete(url, headers=ADMIN_HEADERS)).status_code == 200
    assert (await gateway.delete(url, headers=ADMIN_HEADERS)).status_code == 404
    assert (await complete(gateway, "beta", f"{BASE}:beta-legal")).status_code == 404


# --- the worker runs the adapter the scorer checked, from its own registry ------------


async def test_worker_resolves_the_scored_adapter(tmp_path: Path) -> None:
    from services.engine import LoraRequest
    from services.worker import WorkerService

    service = WorkerService(Settings(model_name=BASE), "cpu", "cpu")
    service.adapters = AdapterCatalog(BASE, load_adapters_file(write_registry(tmp_path)))

    def item(tenant: str, adapter: str | None) -> m.WorkItem:
        model = f"{BASE}:{adapter}" if adapter else BASE
        request = m.CompletionRequest(request_id="r", tenant=tenant, model=model, prompt="x")
        scored = m.ScoredRequest(request_id="r", request=request, prompt_token_ids=[1],
                                 score=m.LengthScore(0.0, 1, 1, 1), adapter=adapter)  # fmt: skip
        return m.WorkItem(request_id="r", scored=scored, pool="cpu", dispatched_at=0.0)

    path = str(tmp_path / "lora/acme")
    assert await service._lora(item("acme", "acme-support")) == (LoraRequest("acme-support", path), None)
    assert await service._lora(item("acme", None)) == (None, None)
    # Revoked (or never allowed) by the time it runs: an error, not the adapter.
    for tenant, adapter in [("beta", "acme-support"), ("acme", "gone")]:
        lora, problem = await service._lora(item(tenant, adapter))
        assert lora is None and "does not exist" in problem
