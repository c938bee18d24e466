"""API keys -> tenants. Keys are kept only as SHA-256 digests and compared in constant time.

Two sources, merged: ``settings.api_keys`` (``tenant:key,tenant2:key2``, plain keys for
development, hashed at load) and ``settings.api_keys_file`` (:mod:`services.tenants`:
key digests, weights and rate limits), which the gateway reads again when it changes
(``FAIRWAY_TENANTS_RELOAD_S``). The tenant of a request comes only
from its key; nothing a client writes in the body can change it.

:class:`AdminAuth` guards the admin endpoints (dashboard data, adapter registry) with
``settings.admin_key``, a key no tenant holds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.gateway.errors import ApiError, unauthorized
from services.tenants import (
    NO_LIMITS,
    TENANT_NAME,
    RateLimits,
    TenantEntry,
    check_weight,
    hash_key,
    parse_tenants,
    read_tenants_file,
)

_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def authenticate(keys: KeyStore, authorization: str | None) -> str:
    """Tenant of the request's API key; 401 when missing or unknown."""
    token = bearer_token(authorization)
    if token is None:
        raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    tenant = keys.lookup(token)
    if tenant is None:
        raise unauthorized("Invalid API key.")
    return tenant


@dataclass(slots=True)
class _Entry:
    digest: bytes
    tenant: str


@dataclass
class KeyStore:
    """Digest -> tenant table with a lookup whose time does not depend on which key matched."""

    _entries: list[_Entry] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    """Tenant weights from the keys file (1.0 for tenants from the env string)."""
    default_limits: RateLimits = NO_LIMITS
    """Rate limits of a tenant that has none of its own."""
    limits: dict[str, RateLimits] = field(default_factory=dict)
    """Tenants' own rate limits, from the keys file."""

    def limits_for(self, tenant: str) -> RateLimits:
        return self.limits.get(tenant, self.default_limits)

    def add(self, tenant: str, key_sha256: str, weight: float = 1.0) -> None:
        if not TENANT_NAME.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
        digest_hex = key_sha256.lower()
        if not _HEX_DIGEST.match(digest_hex):
            raise ValueError(f"tenant {tenant!r}: key_sha256 must be 64 hex characters")
        weight = check_weight(tenant, weight)
        digest = bytes.fromhex(digest_hex)
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest) and entry.tenant != tenant:
                raise ValueError(
                    f"one API key is configured for tenants {entry.tenant!r} and {tenant!r}"
                )
        self._entries.append(_Entry(digest, tenant))
        self.weights[tenant] = weight

    def add_tenants(self, tenants: dict[str, TenantEntry]) -> None:
        """Add the tenants of a keys file, with their weights and own rate limits."""
        for tenant, entry in tenants.items():
            for digest in entry.key_digests:
                self.add(tenant, digest, entry.weight)
            if entry.limits is not None:
                self.limits[tenant] = entry.limits

    def replace_with(self, other: KeyStore) -> None:
        """Take ``other``'s keys, weights and limits at once (a reloaded keys file): every
        holder of this store sees the new ones from the next request on."""
        self._entries, self.weights, self.limits = other._entries, other.weights, other.limits
        self.default_limits = other.default_limits

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {entry.tenant for entry in self._entries}

    def lookup(self, key: str) -> str | None:
        """Tenant of ``key``, or None. Compares against every entry, without early exit."""
        candidate = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, candidate):
                found = entry.tenant
        return found

    @classmethod
    def from_config(cls, api_keys: str = "", api_keys_file: Path | None = None,
                    default_limits: RateLimits = NO_LIMITS) -> KeyStore:
        store = cls(default_limits=default_limits)
        for tenant, key in parse_api_keys(api_keys):
            store.add(tenant, hash_key(key))
        if api_keys_file is not None:
            store.add_tenants(read_tenants_file(api_keys_file, default_limits))
        return store


def parse_api_keys(spec: str) -> list[tuple[str, str]]:
    """``"a:key1, b:key2"`` -> ``[("a", "key1"), ("b", "key2")]``; a key may contain ':'."""
    pairs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise ValueError(f"api_keys entry {item.split(':')[0]!r}...: expected 'tenant:key'")
        pairs.append((tenant, key))
    return pairs


def load_keys_file(store: KeyStore, data: Any) -> None:
    """Add the tenants of a parsed keys file to ``store``; raises ValueError on a bad shape."""
    store.add_tenants(parse_tenants(data, store.default_limits))


ADMIN_ERRORS = {
    401: "Missing or invalid admin key",
    403: "Admin endpoints disabled, or a tenant's key",
    503: "Redis unavailable (Retry-After)",
}
"""Statuses of every admin route, for its OpenAPI ``responses``."""


def forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, reason="forbidden", code=code)


class AdminAuth:
    """Checks the admin key (``FAIRWAY_ADMIN_KEY``); only its SHA-256 digest is kept.

    No admin key configured: 403 ``admin_disabled``. Missing or wrong key: 401. A tenant's
    key: 403 ``insufficient_permissions``.
    """

    def __init__(self, admin_key: str, tenants: KeyStore) -> None:
        self._digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._admin_key = admin_key
        self._tenants = tenants
        self.check_tenants(tenants)

    def check_tenants(self, tenants: KeyStore) -> None:
        """ValueError when a tenant holds the admin key."""
        if self._admin_key and tenants.lookup(self._admin_key) is not None:
            raise ValueError("FAIRWAY_ADMIN_KEY must differ from every tenant's API key")

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> None:
        """Return if ``authorization`` carries the admin key; else raise 401 or 403."""
        if self._digest is None:
            raise forbidden(
                "Admin endpoints are disabled: set FAIRWAY_ADMIN_KEY on the gateway.",
                "admin_disabled",
            )
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("Missing admin key: send 'Authorization: Bearer <admin key>'.")
        candidate = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        if hmac.compare_digest(candidate, self._digest):
            return
        if self._tenants.lookup(token) is not None:
            raise forbidden("A tenant API key cannot use admin endpoints.", "insufficient_permissions")
        raise unauthorized("Invalid admin key.")
