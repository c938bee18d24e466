"""Tenant LoRA adapters: who owns which adapter, and which ``model`` names select one.

A request selects an adapter as vLLM does, with ``model: "<base-model>:<adapter>"``; the
plain base name selects none. An adapter is a directory in the PEFT format
(``adapter_config.json`` + ``adapter_model.safetensors``) that the workers can read, owned
by one tenant and optionally shared with others (``"*"``: every tenant). Anyone else
asking for it gets the same 404 as for a name that does not exist, so names do not leak.

Two sources, merged by :class:`AdapterCatalog`:

* a file (``FAIRWAY_ADAPTERS_FILE``, JSON or YAML), read at start; relative paths are
  relative to the file::

      adapters:
        - {name: acme-support, path: adapters/acme-support, owner: acme, shared_with: [globex]}

  (a mapping ``{name: {path, owner, shared_with}}`` works too);
* adapters registered at run time through the gateway's admin endpoint, kept in one Redis
  hash so every gateway, scorer and worker sees them. A file entry cannot be replaced
  or removed that way.

Everything here is torch-free: the gateway and scorer import it. The engine reads the
tensors (:mod:`services.engine.lora`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services import keys
from services.logs import get_logger
from services.messages import encodes_as_utf8

log = get_logger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Adapter names end up in model ids, heartbeats and logs: short and plain, no ':'.
Tenant names follow the same rule (``services.gateway.auth.TENANT_NAME``, not imported
here: workers do not load the gateway)."""
TENANT_NAME = ADAPTER_NAME
EVERY_TENANT = "*"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MIN_RANK, MAX_RANK = 1, 128
CACHE_TTL_S = 1.0
"""How long a gateway/scorer trusts its copy of the Redis registrations (revocation delay)."""


class ModelNotFound(LookupError):
    """The model name is unknown, or names an adapter the tenant may not use."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class CatalogUnavailable(RuntimeError):
    """Redis could not be read, so an adapter's owner cannot be checked (fail closed)."""


class AdapterSpecError(ValueError):
    """A registration entry is malformed; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterConfigError(ValueError):
    """An adapter directory or its ``adapter_config.json`` is not a usable LoRA adapter."""


@dataclass(frozen=True)
class AdapterSpec:
    """One registered adapter."""

    name: str
    path: str
    owner: str
    shared_with: tuple[str, ...] = ()
    source: str = "file"
    """``"file"`` or ``"admin"`` (registered through the gateway)."""

    def may_use(self, tenant: str) -> bool:
        return tenant == self.owner or tenant in self.shared_with or EVERY_TENANT in self.shared_with

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "owner": self.owner,
                "shared_with": list(self.shared_with), "source": self.source}


def parse_spec(
    data: Any, *, name: str | None = None, base_dir: Path | None = None, source: str = "file"
) -> AdapterSpec:
    """An :class:`AdapterSpec` from a parsed mapping; raises AdapterSpecError on a bad shape."""
    if not isinstance(data, dict):
        raise AdapterSpecError("an adapter entry must be a mapping with name, path and owner")
    name = name if name is not None else data.get("name")
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterSpecError(f"invalid adapter name {name!r}: use letters, digits, '_', '.', '-'", "name")
    path = data.get("path")
    if not isinstance(path, str) or not path.strip():
        raise AdapterSpecError(f"adapter {name!r}: path must be a non-empty string", "path")
    if "\0" in path or not encodes_as_utf8(path):
        raise AdapterSpecError(f"adapter {name!r}: path contains NUL or unpaired UTF-16 surrogates", "path")
    try:
        resolved = Path(path).expanduser()
    except RuntimeError:  # "~user/..." of a user unknown here
        raise AdapterSpecError(f"adapter {name!r}: path names the home of an unknown user", "path") from None
    if base_dir is not None and not resolved.is_absolute():
        resolved = base_dir / resolved
    owner = data.get("owner")
    if not isinstance(owner, str) or not TENANT_NAME.match(owner):
        raise AdapterSpecError(f"adapter {name!r}: owner must be a tenant name", "owner")
    shared = data.get("shared_with", [])
    if shared is None:
        shared = []
    if isinstance(shared, str):
        shared = [shared]
    if not isinstance(shared, list) or not all(
        isinstance(t, str) and (t == EVERY_TENANT or TENANT_NAME.match(t)) for t in shared
    ):
        raise AdapterSpecError(f"adapter {name!r}: shared_with must be a list of tenant names or '*'", "shared_with")
    return AdapterSpec(name, str(resolved), owner, tuple(sorted(set(shared) - {owner})), source)


def load_adapters_file(path: Path | str) -> list[AdapterSpec]:
    """The adapters of a JSON or YAML registry file (YAML needs PyYAML)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML; or write the file as JSON") from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    entries = data.get("adapters") if isinstance(data, dict) else None
    if entries is None:
        raise ValueError(f"{path}: expected {{\"adapters\": [...]}} or {{\"adapters\": {{name: ...}}}}")
    if isinstance(entries, dict):
        items = [(name, spec) for name, spec in entries.items()]
    elif isinstance(entries, list):
        items = [(None, spec) for spec in entries]
    else:
        raise ValueError(f"{path}: 'adapters' must be a list or a mapping")  # noqa: TRY004 - bad file
    specs: dict[str, AdapterSpec] = {}
    for name, entry in items:
        try:
            spec = parse_spec(entry, name=name, base_dir=path.parent)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if spec.name in specs:
            raise ValueError(f"{path}: adapter {spec.name!r} is listed twice")
        specs[spec.name] = spec
    return list(specs.values())


def split_model(model: str, base: str) -> str | None:
    """``base`` -> None, ``base:adapter`` -> ``adapter``; anything else: ModelNotFound."""
    if model == base:
        return None
    prefix = base + ":"
    if model.startswith(prefix):
        name = model[len(prefix):]
        if ADAPTER_NAME.match(name):
            return name
    raise ModelNotFound(model)


def adapter_of(model: str, base: str) -> str | None:
    """The adapter a (validated) request's ``model`` selects, None for the base model or
    a name that is not of this base (no exception: for code past the checks)."""
    try:
        return split_model(model, base)
    except ModelNotFound:
        return None


def read_peft_config(directory: Path | str) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of a PEFT LoRA adapter directory.

    Refuses what the engine cannot serve: another PEFT type, DoRA, biases, extra
    trained modules (``modules_to_save``), ranks outside 1..128.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterConfigError(f"{directory}: no {CONFIG_FILE}") from None
    except (OSError, ValueError) as exc:
        raise AdapterConfigError(f"{config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{config_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterConfigError(f"{config_path}: peft_type {peft_type} is not LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not MIN_RANK <= rank <= MAX_RANK:
        raise AdapterConfigError(f"{config_path}: r must be an integer in [{MIN_RANK}, {MAX_RANK}]")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterConfigError(f"{config_path}: lora_alpha must be a number")
    if config.get("use_dora"):
        raise AdapterConfigError(f"{config_path}: DoRA adapters are not supported")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterConfigError(f"{config_path}: LoRA biases are not supported (bias must be 'none')")
    if config.get("modules_to_save"):
        raise AdapterConfigError(f"{config_path}: modules_to_save is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterConfigError(f"{config_path}: fan_in_fan_out adapters are not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        value = config.get(pattern) or {}
        if not isinstance(value, dict):
            raise AdapterConfigError(f"{config_path}: {pattern} must be an object")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterConfigError(f"{config_path}: target_modules must be a list of names")
    return config


@dataclass
class _Cached:
    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    at: float = -math.inf


class AdapterCatalog:
    """The adapters of the file plus those registered in Redis, with ownership checks.

    Redis registrations are read at most once per ``ttl_s`` (all of them, one ``HGETALL``),
    so a registration or revocation takes effect everywhere within that time.
    """

    def __init__(
        self,
        base_model: str,
        file_specs: Iterable[AdapterSpec] = (),
        redis: aioredis.Redis | None = None,
        ttl_s: float = CACHE_TTL_S,
    ) -> None:
        self.base_model = base_model
        self.file_specs = {spec.name: spec for spec in file_specs}
        self.redis = redis
        self.ttl_s = ttl_s
        self._cache = _Cached()

    @classmethod
    def from_settings(cls, settings: Any, redis: aioredis.Redis | None) -> AdapterCatalog:
        specs = load_adapters_file(settings.adapters_file) if settings.adapters_file else []
        if specs:
            log.info("adapters_loaded", file=str(settings.adapters_file), n=len(specs))
        return cls(settings.model_name, specs, redis)

    # --- reading -----------------------------------------------------------------------

    async def registered(self) -> dict[str, AdapterSpec]:
        """Every adapter, by name (file entries win over Redis ones of the same name)."""
        return {**await self._redis_specs(), **self.file_specs}

    async def get(self, name: str) -> AdapterSpec | None:
        spec = self.file_specs.get(name)
        if spec is not None:
            return spec
        return (await self._redis_specs()).get(name)

    async def resolve(self, model: str, tenant: str) -> AdapterSpec | None:
        """The adapter ``model`` selects for ``tenant`` (None: the base model).

        Raises ModelNotFound for an unknown base, an unknown adapter and an adapter the
        tenant may not use alike; CatalogUnavailable when Redis cannot be read.
        """
        name = split_model(model, self.base_model)
        if name is None:
            return None
        spec = await self.get(name)
        if spec is None or not spec.may_use(tenant):
            raise ModelNotFound(model)
        return spec

    async def usable(self, tenant: str) -> list[AdapterSpec]:
        """The adapters ``tenant`` may use, by name."""
        specs = await self.registered()
        return [specs[name] for name in sorted(specs) if specs[name].may_use(tenant)]

    def model_id(self, spec: AdapterSpec) -> str:
        return f"{self.base_model}:{spec.name}"

    # --- writing (admin) ---------------------------------------------------------------

    async def put(self, spec: AdapterSpec) -> None:
        """Register or replace a run-time adapter; a file entry of that name is refused."""
        if spec.name in self.file_specs:
            raise ValueError(f"adapter {spec.name!r} comes from the adapters file; edit the file")
        if self.redis is None:
            raise CatalogUnavailable("no Redis to register adapters in")
        stored = AdapterSpec(spec.name, spec.path, spec.owner, spec.shared_with, "admin")
        try:
            await self.redis.hset(keys.ADAPTERS, spec.name, json.dumps(stored.to_json()))
        except (RedisError, OSError) as exc:
            raise CatalogUnavailable(repr(exc)) from None
        self._cache = _Cached()

    async def delete(self, name: str) -> bool:
        """Remove a run-time adapter; False when there was none of that name."""
        if name in self.file_specs:
            raise ValueError(f"adapter {name!r} comes from the adapters file; edit the file")
        if self.redis is None:
            return False
        try:
            removed = await self.redis.hdel(keys.ADAPTERS, name)
        except (RedisError, OSError) as exc:
            raise CatalogUnavailable(repr(exc)) from None
        self._cache = _Cached()
        return bool(removed)

    async def _redis_specs(self) -> dict[str, AdapterSpec]:
        if self.redis is None:
            return {}
        now = time.monotonic()
        if now - self._cache.at < self.ttl_s:
            return self._cache.specs
        try:
            raw = await self.redis.hgetall(keys.ADAPTERS)
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", op="adapters", error=repr(exc))
            raise CatalogUnavailable(repr(exc)) from None
        specs: dict[str, AdapterSpec] = {}
        for name, blob in raw.items():
            name = name.decode() if isinstance(name, bytes) else name
            try:
                specs[name] = parse_spec(json.loads(blob), name=name, source="admin")
            except (ValueError, TypeError) as exc:
                log.warning("bad_adapter_entry", adapter=name, error=str(exc))
        self._cache = _Cached(specs, now)
        return specs
