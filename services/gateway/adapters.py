"""Tenant adapters at the gateway: ``model`` resolution, model cards, admin registry routes.

* :func:`resolve_adapter` turns a request's ``model`` into the adapter it selects, with the
  same 404 ``model_not_found`` for an unknown name and for another tenant's adapter.
* ``/v1/models`` lists the base model plus the adapters the caller may use (built here).
* ``/admin/adapters`` (admin key, :class:`services.gateway.auth.AdminAuth`):
  ``GET`` lists every adapter; ``PUT /admin/adapters/{name}`` with
  ``{"path": ..., "owner": ..., "shared_with": [...]}`` registers or replaces one;
  ``DELETE /admin/adapters/{name}`` removes it. Registrations live in Redis, so every
  gateway, scorer and worker sees them within :data:`services.adapters.CACHE_TTL_S`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from services.adapters import (
    ADAPTER_NAME,
    WEIGHTS_FILE,
    AdapterCatalog,
    AdapterConfigError,
    AdapterSpec,
    AdapterSpecError,
    CatalogUnavailable,
    ModelNotFound,
    parse_spec,
    read_peft_config,
)
from services.gateway.auth import ADMIN_ERRORS, AdminAuth
from services.gateway.errors import (
    ApiError,
    documented_errors,
    invalid,
    model_not_found,
    unavailable,
)
from services.logs import get_logger

log = get_logger(__name__)

MAX_ADMIN_BODY = 64 * 1024
_NAMES = {"type": "string", "pattern": ADAPTER_NAME.pattern}
REGISTRATION_SCHEMA = {
    "type": "object",
    "required": ["path", "owner"],
    "properties": {
        "name": {**_NAMES, "description": "Optional; must equal the URL's name"},
        "path": {"type": "string", "minLength": 1},
        "owner": _NAMES,
        "shared_with": {"type": "array", "items": {"anyOf": [_NAMES, {"const": "*"}]}},
    },
}
"""The body of ``PUT /admin/adapters/{name}`` (checked by :func:`parse_spec`), for OpenAPI."""


async def resolve_adapter(catalog: AdapterCatalog, model: str, tenant: str) -> AdapterSpec | None:
    """The adapter ``model`` selects for ``tenant``; 404 if none it may use, 503 without Redis."""
    try:
        return await catalog.resolve(model, tenant)
    except ModelNotFound:
        raise model_not_found(model) from None
    except CatalogUnavailable:
        raise unavailable("Redis is not reachable; retry later.") from None


async def usable_adapters(catalog: AdapterCatalog, tenant: str) -> list[AdapterSpec]:
    """The adapters ``tenant`` may use; without Redis, those of the adapters file (a
    listing shows nothing the tenant may not use, so it degrades instead of failing)."""
    try:
        return await catalog.usable(tenant)
    except CatalogUnavailable:
        specs = catalog.file_specs
        return [specs[name] for name in sorted(specs) if specs[name].may_use(tenant)]


def adapter_card(base_card: dict[str, Any], catalog: AdapterCatalog, spec: AdapterSpec) -> dict[str, Any]:
    """The OpenAI model object of an adapter (vLLM lists LoRA modules the same way)."""
    return {**base_card, "id": catalog.model_id(spec), "parent": catalog.base_model,
            "root": catalog.model_id(spec), "owned_by": spec.owner}


def check_adapter_files(spec: AdapterSpec) -> dict[str, Any] | None:
    """The adapter's checked PEFT config if its directory is readable here, else None
    (workers may mount adapters where the gateway cannot see them); 400 if it is broken
    or ``path`` cannot name a directory here (a name too long)."""
    directory = Path(spec.path)
    try:
        if not directory.exists():
            return None
    except PermissionError:  # hidden from the gateway, like a path that does not exist here
        return None
    except OSError as exc:  # ENAMETOOLONG, ...
        raise invalid(f"path: {exc.strerror}.", param="path") from None
    try:
        config = read_peft_config(directory)
    except AdapterConfigError as exc:
        raise invalid(str(exc), param="path") from None
    if not (directory / WEIGHTS_FILE).is_file():
        raise invalid(f"{directory}: no {WEIGHTS_FILE}", param="path")
    return config


# --- admin routes ----------------------------------------------------------------------


def _catalog(request: Request) -> AdapterCatalog:
    auth: AdminAuth = request.app.state.admin_auth
    auth.check(request.headers.get("authorization"))
    return request.app.state.adapters


async def list_adapters(request: Request) -> Response:
    catalog = _catalog(request)
    try:
        specs = await catalog.registered()
    except CatalogUnavailable:
        raise unavailable("Redis is not reachable; retry later.") from None
    data = [{**specs[n].to_json(), "model": catalog.model_id(specs[n])} for n in sorted(specs)]
    return JSONResponse({"object": "list", "data": data})


async def put_adapter(request: Request, name: str) -> Response:
    catalog = _catalog(request)
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise invalid("The request body is too large.")
    try:
        body = json.loads(raw)
    except ValueError:
        raise invalid("The body is not valid JSON.") from None
    if isinstance(body, dict) and body.get("name", name) != name:
        raise invalid("The body's name differs from the URL's.", param="name")
    try:
        spec = parse_spec(body, name=name, source="admin")
    except AdapterSpecError as exc:
        raise invalid(str(exc), param=exc.param) from None
    config = check_adapter_files(spec)
    try:
        existed = await catalog.get(name) is not None
        await catalog.put(spec)
    except CatalogUnavailable:
        raise unavailable("Redis is not reachable; retry later.") from None
    except ValueError as exc:
        raise ApiError(409, str(exc), reason="conflict", code="conflict") from None
    log.info("adapter_registered", adapter=name, owner=spec.owner, shared_with=list(spec.shared_with),
             replaced=existed, checked=config is not None)
    answer = {**spec.to_json(), "source": "admin", "model": catalog.model_id(spec),
              "checked": config is not None}
    if config is not None:
        answer["rank"] = config["r"]
    return JSONResponse(answer, status_code=200 if existed else 201)


async def delete_adapter(request: Request, name: str) -> Response:
    catalog = _catalog(request)
    try:
        removed = await catalog.delete(name)
    except CatalogUnavailable:
        raise unavailable("Redis is not reachable; retry later.") from None
    except ValueError as exc:
        raise ApiError(409, str(exc), reason="conflict", code="conflict") from None
    if not removed:
        raise ApiError(404, f"No adapter `{name}` was registered through this endpoint.",
                       reason="not_found", code="adapter_not_found")
    log.info("adapter_removed", adapter=name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


def install(app: FastAPI, catalog: AdapterCatalog, auth: AdminAuth) -> None:
    """Add the admin adapter routes; ``app.state.adapters`` holds the catalog."""
    app.state.adapters = catalog
    app.state.admin_auth = auth
    security = {"security": [{"bearerAuth": []}]}
    body = {"content": {"application/json": {"schema": REGISTRATION_SCHEMA}}, "required": True}
    conflict = {409: "The adapter comes from the adapters file"}
    app.add_api_route("/admin/adapters", list_adapters, methods=["GET"],
                      summary="List adapters (admin key)", openapi_extra=security,
                      responses=documented_errors(ADMIN_ERRORS))
    app.add_api_route("/admin/adapters/{name}", put_adapter, methods=["PUT"],
                      summary="Register an adapter (admin key)",
                      openapi_extra={**security, "requestBody": body},
                      responses={201: {"description": "Registered (200: replaced)"},
                                 **documented_errors({**ADMIN_ERRORS, **conflict,
                                                      400: "Invalid name or registration"})})
    app.add_api_route("/admin/adapters/{name}", delete_adapter, methods=["DELETE"],
                      summary="Remove an adapter (admin key)", openapi_extra=security,
                      responses=documented_errors({**ADMIN_ERRORS, **conflict,
                                                   404: "No such adapter registered here"}))
