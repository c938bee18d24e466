"""The tenants file: parsed once for the gateway and the scheduler, watched for changes,
and read again into a live key store and the scheduler's weights."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from services.gateway.auth import AdminAuth, KeyStore, hash_key
from services.scheduler.service import SchedulerService, tenant_weights
from services.settings import Settings
from services.tenants import RateLimits, file_stamp, parse_tenants, read_tenants_file, watch_file


def write(path: Path, tenants: dict) -> None:
    """Replace the file as an editor or a Kubernetes volume does: a new file renamed over it."""
    fresh = path.with_suffix(".new")
    fresh.write_text(json.dumps({"tenants": tenants}))
    os.replace(fresh, path)


def test_a_tenant_entry_has_its_digests_weight_and_own_limits():
    parsed = parse_tenants({"tenants": {
        "acme": {"key_sha256": [hash_key("a").upper(), hash_key("b")], "weight": 3, "tokens_per_minute": 500},
        "globex": {"key_sha256": hash_key("g")},
    }}, RateLimits(requests_per_minute=60))
    assert parsed["acme"].key_digests == (hash_key("a"), hash_key("b"))  # lowercased
    assert parsed["acme"].weight == 3.0 and parsed["acme"].limits == RateLimits(60, 500)
    assert parsed["globex"].weight == 1.0 and parsed["globex"].limits is None


@pytest.mark.parametrize(("data", "match"), [
    ({"tenants": {"bad name": {"key_sha256": "0" * 64}}}, "invalid tenant name"),
    ({"tenants": {"a": {"key_sha256": "xyz"}}}, "64 hex characters"),
    ({"tenants": {"a": {"key_sha256": "0" * 64, "weight": -1}}}, "weight must be finite and > 0"),
    ({"tenants": {"a": {"key_sha256": "0" * 64, "tokens_per_minute": "many"}}}, "tokens_per_minute"),
    ({"tenants": []}, "expected"),
])
def test_a_bad_entry_says_what_is_wrong(data, match):
    with pytest.raises(ValueError, match=match):
        parse_tenants(data)


def test_a_file_that_is_not_json_is_a_value_error(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_tenants_file(path)


def test_a_replaced_file_has_a_new_stamp_and_a_missing_one_none(tmp_path):
    path = tmp_path / "keys.json"
    write(path, {})
    first = file_stamp(path)
    write(path, {})  # same size and maybe the same mtime: a new inode all the same
    assert file_stamp(path) != first
    path.unlink()
    assert file_stamp(path) is None


async def test_the_watch_reloads_on_each_change_and_keeps_going_after_a_bad_one(tmp_path):
    path = tmp_path / "keys.json"
    write(path, {"acme": {"key_sha256": hash_key("a")}})
    loaded, outcomes = [], []

    def reload() -> None:
        loaded.append(sorted(read_tenants_file(path)))

    watch = asyncio.create_task(watch_file(path, 0.02, reload, outcomes.append))

    async def settled(n: int) -> None:
        for _ in range(200):
            if len(outcomes) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"outcomes {outcomes}")

    try:
        await asyncio.sleep(0.05)
        assert outcomes == []  # nothing changed: nothing read
        write(path, {"acme": {"key_sha256": hash_key("a")}, "globex": {"key_sha256": hash_key("g")}})
        await settled(1)
        path.write_text("{half a file")
        await settled(2)
        write(path, {"initech": {"key_sha256": hash_key("i")}})
        await settled(3)
    finally:
        watch.cancel()
    assert outcomes == ["ok", "failed", "ok"]
    assert loaded == [["acme", "globex"], ["initech"]]


def test_a_live_store_takes_the_new_keys_and_limits_at_once(tmp_path):
    path = tmp_path / "keys.json"
    write(path, {"acme": {"key_sha256": hash_key("a1"), "requests_per_minute": 10}})
    store = KeyStore.from_config("dev:d", path)
    auth = AdminAuth("the-admin-key", store)
    write(path, {"acme": {"key_sha256": hash_key("a2")}, "globex": {"key_sha256": hash_key("g"), "weight": 2}})
    fresh = KeyStore.from_config("dev:d", path)
    auth.check_tenants(fresh)
    store.replace_with(fresh)
    assert (store.lookup("a1"), store.lookup("a2"), store.lookup("g"), store.lookup("d")) == (
        None, "acme", "globex", "dev")  # a1 rotated out
    assert store.limits_for("acme") == RateLimits() and store.weights["globex"] == 2.0
    write(path, {"sneaky": {"key_sha256": hash_key("the-admin-key")}})
    with pytest.raises(ValueError, match="must differ"):
        auth.check_tenants(KeyStore.from_config("dev:d", path))


def test_the_scheduler_weighs_tenants_by_the_file_and_the_env_overrides_it(tmp_path):
    path = tmp_path / "keys.json"
    write(path, {"acme": {"key_sha256": hash_key("a"), "weight": 3}, "globex": {"key_sha256": hash_key("g")}})
    settings = Settings(api_keys_file=path, tenant_weights="globex:0.5,other:2")
    assert tenant_weights(settings) == {"acme": 3.0, "globex": 0.5, "other": 2.0}
    service = SchedulerService(settings)
    weights = service.config.tenant_weights
    assert weights == {"acme": 3.0, "globex": 0.5, "other": 2.0}
    write(path, {"acme": {"key_sha256": hash_key("a"), "weight": 1.5}})
    service.reload_weights()
    assert service.config.tenant_weights is weights  # the dict the policy reads, changed in place
    assert weights == {"acme": 1.5, "globex": 0.5, "other": 2.0}
    path.write_text("[]")
    with pytest.raises(ValueError):
        service.reload_weights()
    assert weights == {"acme": 1.5, "globex": 0.5, "other": 2.0}


def test_a_scheduler_whose_file_is_unreadable_starts_with_the_envs_weights(tmp_path):
    service = SchedulerService(Settings(api_keys_file=tmp_path / "absent.json", tenant_weights="acme:2"))
    assert service.config.tenant_weights == {"acme": 2.0}
