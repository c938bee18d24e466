"""Token usage per tenant and model: the buckets as pure functions, and the usage API
reading them from a real Redis, for the admin and for each tenant's own key."""

from __future__ import annotations

import httpx
import pytest

from services import keys
from services.gateway.app import create_app
from services.settings import Settings
from services.usage import Usage, bucket_start, bucket_starts, record_commands, summarize

ADMIN = "adm-0123456789abcdef"
KEYS = "acme:key-a,globex:key-g"
T0 = 1_700_000_000 - 1_700_000_000 % 86_400  # a UTC midnight
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_ACME = {"Authorization": "Bearer key-a"}
PATH = "/v1/organization/usage/completions"


def test_buckets_start_on_their_width():
    at = T0 + 3 * 3600 + 25 * 60 + 7
    assert bucket_start(at, "1m") == T0 + 3 * 3600 + 25 * 60
    assert bucket_start(at, "1h") == T0 + 3 * 3600
    assert bucket_start(at, "1d") == T0
    assert bucket_starts(T0 + 30, T0 + 150, "1m") == [T0, T0 + 60, T0 + 120]
    assert bucket_starts(T0, T0 + 60, "1m") == [T0]


def test_a_request_is_added_to_each_width_with_its_retention():
    commands = record_commands("acme", "m", Usage(40, 0, 7), T0 + 90, retention_days=30)
    incrs = [c for c in commands if c[0] == "HINCRBY"]
    assert ["HINCRBY", keys.usage_bucket("1m", T0 + 60), "acme\tm\tinput_tokens", 40] in incrs
    assert not any("input_cached_tokens" in c[2] for c in incrs)  # nothing to add
    assert len(incrs) == 3 * 3  # three widths, three measures that are not 0
    expiries = {c[1]: c[2] for c in commands if c[0] == "EXPIRE"}
    assert expiries == {keys.usage_bucket("1m", T0 + 60): 2 * 86_400, keys.usage_bucket("1h", T0): 32 * 86_400,
                        keys.usage_bucket("1d", T0): 30 * 86_400}


def fields(*rows: tuple[str, str, int, int, int, int]) -> dict[str, int]:
    out = {}
    for tenant, model, tokens_in, cached, tokens_out, requests in rows:
        for measure, value in (("input_tokens", tokens_in), ("input_cached_tokens", cached),
                               ("output_tokens", tokens_out), ("num_model_requests", requests)):
            out[f"{tenant}\t{model}\t{measure}"] = value
    return out


def test_a_bucket_sums_its_groups_and_keeps_to_the_tenants_and_models_asked():
    found = fields(("acme", "a", 10, 2, 5, 1), ("acme", "b", 20, 0, 6, 2), ("globex", "a", 7, 7, 1, 1))
    whole = summarize(T0, "1h", found, [], None, None)
    assert whole["start_time"] == T0 and whole["end_time"] == T0 + 3600
    assert whole["results"] == [{"object": "organization.usage.completions.result", "input_tokens": 37,
                                 "input_cached_tokens": 9, "output_tokens": 12, "num_model_requests": 4,
                                 "tenant": None, "model": None}]
    by_tenant = summarize(T0, "1h", found, ["tenant"], None, None)["results"]
    assert [(r["tenant"], r["input_tokens"], r["model"]) for r in by_tenant] == [("acme", 30, None),
                                                                               ("globex", 7, None)]
    both = summarize(T0, "1h", found, ["model", "tenant"], {"acme"}, {"a"})["results"]
    assert [(r["tenant"], r["model"], r["output_tokens"]) for r in both] == [("acme", "a", 5)]
    assert summarize(T0, "1h", {}, ["tenant"], None, None)["results"] == []


@pytest.fixture
async def usage(redis_client, redis_url: str):
    """A client of the gateway app on the test Redis, with two hours of recorded usage."""
    for tenant, model, used, at in (("acme", "m1", Usage(100, 40, 10), T0 + 60),
                                    ("acme", "m2", Usage(50, 0, 5), T0 + 125),
                                    ("globex", "m1", Usage(30, 0, 3), T0 + 3600 + 5),
                                    ("acme", "m1", Usage(8, 8, 2), T0 + 3600 + 70)):
        for command in record_commands(tenant, model, used, at, retention_days=400):
            await redis_client.execute_command(*command)
    yield client(redis_url)


def client(redis_url: str) -> httpx.AsyncClient:
    """The gateway app (lifespan not started: no AMQP) on ``redis_url``."""
    app = create_app(Settings(api_keys=KEYS, admin_key=ADMIN, redis_url=redis_url))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_the_admin_reads_every_tenants_usage_by_hour(usage):
    page = await usage.get(PATH, params={"start_time": T0, "end_time": T0 + 3 * 3600, "bucket_width": "1h",
                                   "group_by": "tenant"}, headers=AS_ADMIN)
    assert page.status_code == 200
    body = page.json()
    assert body["object"] == "page" and body["has_more"] is False and body["next_page"] is None
    assert [b["start_time"] for b in body["data"]] == [T0, T0 + 3600, T0 + 7200]
    first, second, third = (b["results"] for b in body["data"])
    assert [(r["tenant"], r["input_tokens"], r["input_cached_tokens"], r["output_tokens"],
             r["num_model_requests"]) for r in first] == [("acme", 150, 40, 15, 2)]
    assert [(r["tenant"], r["input_tokens"]) for r in second] == [("acme", 8), ("globex", 30)]
    assert third == []  # every bucket of the range is listed


async def test_filters_and_groups_follow_openais_list_parameters(usage):
    both = (await usage.get(f"{PATH}?start_time={T0}&end_time={T0 + 86_400}&group_by[]=model&group_by[]=tenant"
                     "&models=m1", headers=AS_ADMIN)).json()
    [day] = both["data"]
    assert [(r["tenant"], r["model"], r["input_tokens"]) for r in day["results"]] == [
        ("acme", "m1", 108), ("globex", "m1", 30)]
    only = (await usage.get(f"{PATH}?start_time={T0}&end_time={T0 + 86_400}&tenants=globex,acme&group_by=model",
                     headers=AS_ADMIN)).json()
    assert [(r["model"], r["tenant"], r["num_model_requests"]) for r in only["data"][0]["results"]] == [
        ("m1", None, 3), ("m2", None, 1)]


async def test_a_tenant_reads_its_own_usage_and_no_one_elses(usage):
    mine = (await usage.get(PATH, params={"start_time": T0, "end_time": T0 + 86_400}, headers=AS_ACME)).json()
    [result] = mine["data"][0]["results"]
    assert (result["input_tokens"], result["num_model_requests"]) == (158, 3)  # globex's not counted
    other = await usage.get(PATH, params={"start_time": T0, "tenants": "globex"}, headers=AS_ACME)
    assert other.status_code == 403 and other.json()["error"]["code"] == "insufficient_permissions"
    assert (await usage.get(PATH, params={"start_time": T0})).status_code == 401
    assert (await usage.get(PATH, params={"start_time": T0},
                            headers={"Authorization": "Bearer nope"})).status_code == 401


async def test_pages_go_on_from_next_page(usage):
    query = {"start_time": T0, "end_time": T0 + 300, "bucket_width": "1m", "limit": 2}
    seen, page = [], None
    while True:
        body = (await usage.get(PATH, params={**query, **({"page": page} if page else {})}, headers=AS_ADMIN)).json()
        seen += [(b["start_time"], sum(r["num_model_requests"] for r in b["results"])) for b in body["data"]]
        if not body["has_more"]:
            break
        page = body["next_page"]
    assert seen == [(T0, 0), (T0 + 60, 1), (T0 + 120, 1), (T0 + 180, 0), (T0 + 240, 0)]


@pytest.mark.parametrize(("query", "param"), [
    ({"start_time": T0, "group_by": "project_id"}, "group_by"),
    ({"start_time": T0, "bucket_width": "1d", "limit": 32}, "limit"),
    ({"start_time": T0, "end_time": T0}, "end_time"),
    ({"start_time": T0, "end_time": T0 + 600, "bucket_width": "1m", "page": "12"}, "page"),
    ({"start_time": T0, "bucket_width": "1w"}, "bucket_width"),
    ({}, "start_time"),
])
async def test_a_bad_query_is_a_400_naming_its_parameter(usage, query, param):
    answer = await usage.get(PATH, params=query, headers=AS_ADMIN)
    assert answer.status_code == 400
    assert param in (answer.json()["error"]["param"] or answer.json()["error"]["message"])


async def test_redis_down_is_503():
    answer = await client("redis://127.0.0.1:1/0").get(PATH, params={"start_time": T0}, headers=AS_ADMIN)
    assert answer.status_code == 503 and answer.headers["Retry-After"]
