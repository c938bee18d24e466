"""The tenants file (``FAIRWAY_API_KEYS_FILE``): each tenant's API keys, weight and limits.

::

    {"tenants": {"acme": {"key_sha256": "<64 hex>", "weight": 2.0,
                          "requests_per_minute": 600, "tokens_per_minute": 200000}}}

``key_sha256`` may be a list, for key rotation. ``weight`` (1 by default) is the
tenant's VTC weight: the scheduler serves backlogged tenants in proportion to it
(``FAIRWAY_TENANT_WEIGHTS`` overrides it). The rate limits are optional (0: none); a
tenant without one has the gateway's (``FAIRWAY_TENANT_REQUESTS_PER_MINUTE``,
``FAIRWAY_TENANT_TOKENS_PER_MINUTE``).

The gateway reads the keys and limits, the scheduler the weights, and both read the
file again when it changes (:func:`watch_file`), so tenants are added, keys rotated and
limits changed without a restart. A file that does not parse is logged and the one
read before stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.logs import get_logger

log = get_logger(__name__)

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Tenant names end up in Redis keys and metric labels, so they stay short and plain."""
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key, the only form in which keys are stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A tenant's limits per minute; 0 is no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def active(self) -> bool:
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0


NO_LIMITS = RateLimits()


@dataclass(frozen=True, slots=True)
class TenantEntry:
    """One tenant of the file."""

    key_digests: tuple[str, ...]
    """Hex SHA-256 of each of its API keys (lowercase)."""
    weight: float = 1.0
    limits: RateLimits | None = None
    """Its own rate limits; None: the gateway's."""


def parse_limit(value: object, what: str) -> int:
    """A per-minute limit from config: a whole number >= 0 (0: no limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0 (0: no limit)")
    return value


def check_weight(tenant: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"tenant {tenant!r}: weight must be a number")  # noqa: TRY004 - bad config
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"tenant {tenant!r}: weight must be finite and > 0")
    return float(weight)


def parse_tenants(data: Any, default_limits: RateLimits = NO_LIMITS) -> dict[str, TenantEntry]:
    """The tenants of a parsed file; raises ValueError on a bad shape or value. A tenant
    that sets one rate limit has the other from ``default_limits``."""
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict):
        # A bad file shape is the ValueError this function promises, wrong types included.
        raise ValueError('api keys file: expected {"tenants": {name: {"key_sha256": ...}}}')  # noqa: TRY004
    parsed: dict[str, TenantEntry] = {}
    for tenant, spec in tenants.items():
        if not TENANT_NAME.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
        if not isinstance(spec, dict):
            raise ValueError(f"api keys file: tenant {tenant!r} must map to an object")  # noqa: TRY004 - ditto
        digests = spec.get("key_sha256")
        if isinstance(digests, str):
            digests = [digests]
        if not isinstance(digests, list) or not digests or not all(isinstance(d, str) for d in digests):
            raise ValueError(f"api keys file: tenant {tenant!r} needs key_sha256 (a hex string or a list)")
        for digest in digests:
            if not _HEX_DIGEST.match(digest):
                raise ValueError(f"tenant {tenant!r}: key_sha256 must be 64 hex characters")
        limits = None
        if "requests_per_minute" in spec or "tokens_per_minute" in spec:
            limits = RateLimits(
                parse_limit(spec.get("requests_per_minute", default_limits.requests_per_minute),
                            f"api keys file: tenant {tenant!r}: requests_per_minute"),
                parse_limit(spec.get("tokens_per_minute", default_limits.tokens_per_minute),
                            f"api keys file: tenant {tenant!r}: tokens_per_minute"),
            )
        parsed[tenant] = TenantEntry(tuple(d.lower() for d in digests),
                                     check_weight(tenant, spec.get("weight", 1.0)), limits)
    return parsed


def read_tenants_file(path: Path, default_limits: RateLimits = NO_LIMITS) -> dict[str, TenantEntry]:
    """:func:`parse_tenants` of the JSON file at ``path``; ValueError (or OSError) when it
    cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"api keys file {path}: not JSON ({exc})") from None
    return parse_tenants(data, default_limits)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells that a file changed (modification time, size, inode: a file replaced by
    a rename, as a Kubernetes volume or an editor writes it, is a new inode); None when
    it cannot be read."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def watch_file(path: Path, interval_s: float, reload: Callable[[], None],
                     on_outcome: Callable[[str], None] = lambda _: None) -> None:
    """Call ``reload`` whenever the file at ``path`` changes, checking every
    ``interval_s``; a ``reload`` that raises (the file does not parse, or is gone) is
    logged and leaves what was read before in force. ``on_outcome`` hears ``ok`` or
    ``failed`` for each."""
    seen = file_stamp(path)
    while True:
        await asyncio.sleep(interval_s)
        stamp = file_stamp(path)
        if stamp == seen:
            continue
        seen = stamp
        try:
            reload()
        except (ValueError, OSError) as exc:
            log.error("tenants_file_reload_failed", path=str(path), error=str(exc),
                      detail="the tenants read before stay in force")
            on_outcome("failed")
        else:
            log.info("tenants_file_reloaded", path=str(path))
            on_outcome("ok")
