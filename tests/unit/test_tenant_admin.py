"""``fairway tenants``: changes to the tenants file as pure functions, and the command
writing a file the gateway reads, with keys that work and keys that stop working."""

from __future__ import annotations

import json

import pytest

from services import cli
from services.gateway.auth import KeyStore
from services.tenant_admin import (
    TenantsError,
    add_key,
    add_tenant,
    describe,
    remove_tenant,
    revoke_key,
    set_fields,
)
from services.tenants import RateLimits, hash_key, read_tenants_file

A, B = "a" * 64, "b" * 64


def test_changes_leave_the_data_they_were_given_alone():
    empty = {"tenants": {}}
    one = add_tenant(empty, "acme", A, weight=2, limits={"requests_per_minute": 60, "tokens_per_minute": None})
    assert empty == {"tenants": {}}
    assert one["tenants"]["acme"] == {"key_sha256": [A], "weight": 2.0, "requests_per_minute": 60}
    two = add_key(one, "acme", B)
    assert one["tenants"]["acme"]["key_sha256"] == [A] and two["tenants"]["acme"]["key_sha256"] == [A, B]
    assert describe(two) == [{"tenant": "acme", "weight": 2.0, "requests_per_minute": 60,
                              "tokens_per_minute": None, "keys": [A[:12], B[:12]]}]


def test_a_revoke_takes_exactly_one_key_and_never_the_last():
    data = {"tenants": {"acme": {"key_sha256": [A, B], "team": "red"}}}
    left, gone = revoke_key(data, "acme", "BBBB")
    assert gone == B and left["tenants"]["acme"] == {"key_sha256": [A], "team": "red"}  # unknown fields kept
    with pytest.raises(TenantsError, match="only key"):
        revoke_key(left, "acme", A[:8])
    with pytest.raises(TenantsError, match="0 of"):
        revoke_key(data, "acme", "cccc")
    with pytest.raises(TenantsError, match="at least 4"):
        revoke_key(data, "acme", "aa")


def test_bad_changes_are_refused_by_name():
    data = add_tenant({}, "acme", A)
    with pytest.raises(TenantsError, match="exists"):
        add_tenant(data, "acme", B)
    with pytest.raises(TenantsError, match="invalid tenant name"):
        add_tenant(data, "a b", B)
    with pytest.raises(TenantsError, match="no tenant"):
        set_fields(data, "globex", weight=2)
    with pytest.raises(ValueError, match="weight must be finite"):
        set_fields(data, "acme", weight=0)
    with pytest.raises(ValueError, match="tokens-per-minute"):
        set_fields(data, "acme", limits={"tokens_per_minute": -5})
    assert remove_tenant(data, "acme") == {"tenants": {}}


def tenants(capsys, path, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["tenants", "--file", str(path), *argv])
    out = capsys.readouterr()
    return status, out.out.strip(), out.err


def test_the_command_writes_keys_the_gateway_accepts_and_revokes_them(tmp_path, capsys):
    path = tmp_path / "keys.json"
    status, first, err = tenants(capsys, path, "add", "acme", "--weight", "2", "--tokens-per-minute", "9000")
    assert status == 0 and first.startswith("sk-fw-") and "added" in err
    assert (path.stat().st_mode & 0o777) == 0o600  # digests only, but still the operator's
    status, second, _ = tenants(capsys, path, "rotate", "acme")
    assert status == 0 and second != first
    store = KeyStore.from_config("", path)
    assert store.lookup(first) == store.lookup(second) == "acme"
    assert store.limits_for("acme") == RateLimits(0, 9000) and store.weights["acme"] == 2.0

    status, listed, _ = tenants(capsys, path, "list")
    keys = json.loads(listed)[0]["keys"]
    assert keys == [hash_key(first)[:12], hash_key(second)[:12]]
    assert tenants(capsys, path, "revoke", "acme", "--digest", keys[0])[0] == 0
    store = KeyStore.from_config("", path)
    assert store.lookup(first) is None and store.lookup(second) == "acme"
    assert tenants(capsys, path, "revoke", "acme", "--key", second)[0] == 1  # the last one stays

    assert tenants(capsys, path, "set", "acme", "--requests-per-minute", "30")[0] == 0
    assert read_tenants_file(path)["acme"].limits == RateLimits(30, 9000)
    assert tenants(capsys, path, "remove", "acme")[0] == 0
    assert read_tenants_file(path) == {}


def test_a_file_it_cannot_read_is_left_as_it_was(tmp_path, capsys):
    path = tmp_path / "keys.json"
    path.write_text("{broken")
    status, out, err = tenants(capsys, path, "add", "acme")
    assert status == 1 and out == "" and "fairway tenants:" in err  # no key printed for nothing
    assert path.read_text() == "{broken"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"tenants": {"acme": {"key_sha256": "nothex"}}}))
    assert tenants(capsys, other, "rotate", "acme")[0] == 1  # the result would not parse: not written
    assert json.loads(other.read_text())["tenants"]["acme"]["key_sha256"] == "nothex"
