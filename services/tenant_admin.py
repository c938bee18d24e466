"""``fairway tenants``: manage the tenants file (:mod:`services.tenants`) without hashing keys by hand.

    fairway tenants add acme --weight 2 --requests-per-minute 600   # prints acme's new key
    fairway tenants rotate acme                                      # a second key; both work
    fairway tenants revoke acme --digest 3f2a                        # the old one stops
    fairway tenants set acme --tokens-per-minute 200000
    fairway tenants list
    fairway tenants remove acme

The file is ``--file`` or ``FAIRWAY_API_KEYS_FILE``. A new key is printed once, on
stdout, and only its SHA-256 digest is written. Each change is checked as the gateway
would read it, then written to a new file renamed over the old one (so a gateway never
reads half a file), under a lock so two changes at once do not lose one; running
gateways and schedulers read it again within ``FAIRWAY_TENANTS_RELOAD_S``. Fields this
command does not know are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.tenants import TENANT_NAME, check_weight, hash_key, parse_limit, parse_tenants

KEY_PREFIX = "sk-fw-"
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute")


class TenantsError(ValueError):
    """A change that cannot be made (a tenant that exists or does not, a bad value)."""


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _tenants(data: dict[str, Any]) -> dict[str, Any]:
    return data.setdefault("tenants", {})


def _digests(spec: dict[str, Any]) -> list[str]:
    found = spec.get("key_sha256", [])
    return [found] if isinstance(found, str) else list(found)


def _apply_fields(spec: dict[str, Any], tenant: str, weight: float | None,
              limits: dict[str, int | None]) -> None:
    if weight is not None:
        spec["weight"] = check_weight(tenant, weight)
    for name, value in limits.items():
        if value is not None:
            spec[name] = parse_limit(value, name.replace("_", "-"))


def add_tenant(data: dict[str, Any], tenant: str, key_digest: str, weight: float | None = None,
               limits: dict[str, int | None] | None = None) -> dict[str, Any]:
    """``data`` with a new tenant holding one key."""
    if not TENANT_NAME.match(tenant):
        raise TenantsError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
    data = copy.deepcopy(data)
    if tenant in _tenants(data):
        raise TenantsError(f"tenant {tenant!r} exists; rotate its key or set its fields")
    spec: dict[str, Any] = {"key_sha256": [key_digest]}
    _apply_fields(spec, tenant, weight, limits or {})
    _tenants(data)[tenant] = spec
    return data


def _existing(data: dict[str, Any], tenant: str) -> dict[str, Any]:
    spec = _tenants(data).get(tenant)
    if not isinstance(spec, dict):
        raise TenantsError(f"no tenant {tenant!r}")
    return spec


def set_fields(data: dict[str, Any], tenant: str, weight: float | None = None,
               limits: dict[str, int | None] | None = None) -> dict[str, Any]:
    """``data`` with a tenant's weight and rate limits changed where given."""
    data = copy.deepcopy(data)
    _apply_fields(_existing(data, tenant), tenant, weight, limits or {})
    return data


def add_key(data: dict[str, Any], tenant: str, key_digest: str) -> dict[str, Any]:
    """``data`` with one more key for a tenant (its others still work)."""
    data = copy.deepcopy(data)
    spec = _existing(data, tenant)
    spec["key_sha256"] = [*_digests(spec), key_digest]
    return data


def revoke_key(data: dict[str, Any], tenant: str, digest_prefix: str) -> tuple[dict[str, Any], str]:
    """``data`` without the one key of a tenant whose digest starts with ``digest_prefix``
    (at least 4 hex characters), and that digest. A tenant keeps at least one key."""
    data = copy.deepcopy(data)
    spec = _existing(data, tenant)
    prefix = digest_prefix.lower()
    if len(prefix) < 4:
        raise TenantsError("give at least 4 characters of the key's digest")
    matches = [d for d in _digests(spec) if d.lower().startswith(prefix)]
    if len(matches) != 1:
        raise TenantsError(f"{len(matches)} of {tenant!r}'s keys have a digest starting {prefix!r}; "
                           "give exactly one (see `fairway tenants list`)")
    left = [d for d in _digests(spec) if d != matches[0]]
    if not left:
        raise TenantsError(f"that is {tenant!r}'s only key: rotate first, or remove the tenant")
    spec["key_sha256"] = left
    return data, matches[0]


def remove_tenant(data: dict[str, Any], tenant: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    _existing(data, tenant)
    del _tenants(data)[tenant]
    return data


def describe(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each tenant's weight, rate limits and key digests (first 12 characters)."""
    rows = []
    for tenant, spec in sorted(_tenants(data).items()):
        rows.append({"tenant": tenant, "weight": spec.get("weight", 1.0),
                     **{name: spec.get(name) for name in LIMIT_FIELDS},
                     "keys": [d[:12] for d in _digests(spec)]})
    return rows


# --- I/O ---------------------------------------------------------------------------------


def read(path: Path) -> dict[str, Any]:
    """The file's JSON; an empty tenants file where there is none yet."""
    if not path.exists():
        return {"tenants": {}}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TenantsError(f"{path}: expected a JSON object")
    return data


def write(path: Path, data: dict[str, Any]) -> None:
    """Check ``data`` as the gateway reads it, then replace the file at once (owner-only)."""
    parse_tenants(data)
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(fresh, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the file's lock (a ``.lock`` beside it) while reading and writing it."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, default=None,
                        help="the tenants file (default: FAIRWAY_API_KEYS_FILE)")
    sub = parser.add_subparsers(dest="tenants_command", required=True)
    sub.add_parser("list", help="each tenant's weight, rate limits and key digests")

    def fields(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weight", type=float, default=None, help="VTC weight (default 1)")
        p.add_argument("--requests-per-minute", type=int, default=None, help="rate limit (0: none)")
        p.add_argument("--tokens-per-minute", type=int, default=None, help="rate limit (0: none)")

    add = sub.add_parser("add", help="a new tenant with a new key (printed once)")
    add.add_argument("tenant")
    fields(add)
    change = sub.add_parser("set", help="change a tenant's weight or rate limits")
    change.add_argument("tenant")
    fields(change)
    rotate = sub.add_parser("rotate", help="one more key for a tenant (printed once); the others still work")
    rotate.add_argument("tenant")
    revoke = sub.add_parser("revoke", help="take one of a tenant's keys away")
    revoke.add_argument("tenant")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--digest", help="the start of its SHA-256 digest, as `list` shows it")
    which.add_argument("--key", help="the key itself")
    remove = sub.add_parser("remove", help="a tenant and all its keys")
    remove.add_argument("tenant")


def run(args: argparse.Namespace) -> int:
    path = args.file
    if path is None:
        from services.settings import Settings

        path = Settings().api_keys_file
    if path is None:
        print("fairway tenants: give --file or set FAIRWAY_API_KEYS_FILE", file=sys.stderr)
        return 2
    path = Path(path)
    command = args.tenants_command
    limits = {name: getattr(args, name, None) for name in LIMIT_FIELDS}
    key = new_key() if command in ("add", "rotate") else None
    try:
        with locked(path):
            data = read(path)
            if command == "list":
                json.dump(describe(data), sys.stdout, indent=2)
                sys.stdout.write("\n")
                return 0
            done = ""
            if command == "add":
                data = add_tenant(data, args.tenant, hash_key(key), args.weight, limits)
                done = "added"
            elif command == "set":
                data = set_fields(data, args.tenant, args.weight, limits)
                done = "changed"
            elif command == "rotate":
                data = add_key(data, args.tenant, hash_key(key))
                done = "given a new key"
            elif command == "revoke":
                data, gone = revoke_key(data, args.tenant, args.digest or hash_key(args.key))
                done = f"no longer has the key {gone[:12]}..."
            elif command == "remove":
                data = remove_tenant(data, args.tenant)
                done = "removed"
            write(path, data)
    except (TenantsError, ValueError, OSError) as exc:
        print(f"fairway tenants: {exc}", file=sys.stderr)
        return 1
    if key is not None:
        print(key)
    print(f"fairway tenants: {args.tenant!r} {done} in {path}; running services read it again "
          "within FAIRWAY_TENANTS_RELOAD_S", file=sys.stderr)
    return 0
