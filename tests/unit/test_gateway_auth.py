"""API keys -> tenants: hashing, config parsing, constant-time lookup."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.gateway import auth
from services.gateway.auth import KeyStore, bearer_token, hash_key, load_keys_file, parse_api_keys


def test_hash_key_is_hex_sha256() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()


def test_env_keys_map_to_tenants_and_are_stored_hashed() -> None:
    store = KeyStore.from_config("acme:key-a, beta:key:with:colons")
    assert store.lookup("key-a") == "acme"
    assert store.lookup("key:with:colons") == "beta"
    assert store.lookup("key-b") is None
    assert store.lookup("") is None
    assert all(entry.digest != b"key-a" and len(entry.digest) == 32 for entry in store._entries)


@pytest.mark.parametrize("spec", ["acme", "acme:", ":key", "bad name:key", "x" * 70 + ":key"])
def test_bad_env_entries_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        KeyStore.from_config(spec)


def test_same_key_for_two_tenants_is_rejected() -> None:
    with pytest.raises(ValueError, match="one API key"):
        KeyStore.from_config("a:shared,b:shared")


def test_parse_api_keys_skips_blanks() -> None:
    assert parse_api_keys(" a:k1 ,, b:k2 ,") == [("a", "k1"), ("b", "k2")]


def test_keys_file_with_weights_and_rotation(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "tenants": {
                    "acme": {"key_sha256": hash_key("a1"), "weight": 2.5},
                    "beta": {"key_sha256": [hash_key("b1"), hash_key("b2").upper()]},
                }
            }
        )
    )
    store = KeyStore.from_config("dev:d1", path)
    assert [store.lookup(k) for k in ("a1", "b1", "b2", "d1", "zz")] == [
        "acme",
        "beta",
        "beta",
        "dev",
        None,
    ]
    assert store.weights == {"dev": 1.0, "acme": 2.5, "beta": 1.0}
    assert store.tenants == {"dev", "acme", "beta"}


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"tenant": {}},
        {"tenants": {"a": "digest"}},
        {"tenants": {"a": {}}},
        {"tenants": {"a": {"key_sha256": "abc"}}},
        {"tenants": {"a": {"key_sha256": "0" * 64, "weight": 0}}},
        {"tenants": {"a": {"key_sha256": "0" * 64, "weight": float("nan")}}},
        {"tenants": {"a": {"key_sha256": "0" * 64, "weight": True}}},
        {"tenants": {"a b": {"key_sha256": "0" * 64}}},
    ],
)
def test_bad_keys_files_are_rejected(data: object) -> None:
    with pytest.raises(ValueError):
        load_keys_file(KeyStore(), data)


@pytest.mark.parametrize("key", ["k0", "k7", "missing"])
def test_lookup_compares_every_entry(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """The time of a lookup must not depend on where (or whether) the key matches."""
    store = KeyStore.from_config(",".join(f"t{i}:k{i}" for i in range(8)))
    calls = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    store.lookup(key)
    assert len(calls) == 8


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
