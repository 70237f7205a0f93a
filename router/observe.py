"""Observability: the middleware that gives every request an id, an access-log line and its
metrics, the key pools' state changes sent to metrics, and the ``/health`` and ``/metrics``
probes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .backends import CONFIG, PROVIDERS
from .config import Config
from .keys import KEY_POOLS, SHARED_STATE
from .logs import REQUEST_CONTEXT, Redactor, RequestContext, secrets_of, start_request
from .metrics import METRICS, Metrics

access_logger = logging.getLogger("router.access")

QUIET_PATHS = ("/health", "/metrics")


def setup_observe(app: web.Application) -> None:
    """Add the metrics, the key-state hook and the probes to an app being built.

    Args:
        app: The application (its backends cleanup context must already be added, so that
            the key pools exist when this one starts).
    """
    app[METRICS] = Metrics(
        lambda: app[KEY_POOLS],
        lambda: {name: p.counters() for name, p in app.get(PROVIDERS, {}).items()},
    )
    app.cleanup_ctx.append(_hook_pools)
    app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)


async def _hook_pools(app: web.Application) -> AsyncIterator[None]:
    """Send the pools' state changes to metrics and logs."""
    for pool in app[KEY_POOLS].values():
        pool.on_change = app[METRICS].on_key_change
    yield


# ---- every request ---------------------------------------------------------------------------


@web.middleware
async def observe_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give the request an id (the client's ``x-request-id`` or a new one, echoed back), then
    log one access line and record its metrics. Error bodies are scrubbed of any secret.

    Args:
        request: The request.
        handler: The rest of the chain (the error middleware renders failures).
    """
    cfg = request.app[CONFIG]
    context = start_request(request.headers.get("x-request-id"))
    context.timeouts = cfg.timeouts
    request[REQUEST_CONTEXT] = context
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["x-request-id"] = context.id
            if isinstance(response, web.Response) and status >= 400 and response.body:
                response.body = Redactor(secrets_of(cfg)).scrub(response.text).encode()
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        seconds = time.monotonic() - context.started
        # Recorded once the response is written (aiohttp writes it when the handler returns,
        # before the loop runs this): the client does not wait for the books.
        asyncio.get_running_loop().call_soon(_record, request, cfg, context, status, seconds)


def _record(
    request: web.Request, cfg: Config, context: RequestContext, status: int, seconds: float
) -> None:
    """A finished request's metrics and access-log line."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    model = _model_label(cfg, context.model)
    request.app[METRICS].observe(context, route, model, status, seconds)
    level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
    access_logger.log(
        level,
        "%s %s %d %.1f ms",
        request.method,
        request.path,
        status,
        seconds * 1000,
        extra={
            "method": request.method,
            "path": request.path,
            "status": status,
            "ms": round(seconds * 1000, 1),
            "model": context.model,
            "provider": context.provider,
            "attempts": len(context.attempts),
            "client": context.client,
            "rule": context.rule,
            "targets": [f"{t.provider}/{t.model}" for t in context.targets or ()],
            "usd": round(context.spend_usd, 6),
            "remote": request.remote,
        },
    )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Give every response (streams are prepared inside the handler) the request id and the
    routing decision's headers."""
    context = request.get(REQUEST_CONTEXT)
    if context is None:
        return
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = context.id
    # The routing decision: which provider answered and which rule chose it.
    if context.provider is not None:
        response.headers["x-router-provider"] = context.provider
    if context.rule is not None:
        response.headers["x-router-rule"] = context.rule


def _model_label(cfg: Config, model: str | None) -> str:
    """A bounded metric label: a configured alias, or ``provider/model`` when the config names
    that target; another model of a configured provider is ``provider/other``, anything else
    ``other`` (so clients cannot create series at will)."""
    if model is None:
        return "none"
    if model in cfg.models or model == cfg.routing.auto_model:
        return model
    provider, sep, name = model.partition("/")
    if not sep or provider not in cfg.providers:
        return "other"
    targets = (t for ts in cfg.models.values() for t in ts)
    if any(t.provider == provider and t.model == name for t in targets):
        return model
    return f"{provider}/other"


# ---- probes ----------------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    """``{"status": "ok"|"degraded", "providers": {name: {"keys", "active"}}}``, plus
    ``shared_state`` (`SharedStore.status`) when configured; degraded when a provider with
    keys has none active or the shared state's Redis is unreachable (the router then serves on
    its local key state). Always 200 while the process serves."""
    providers = {}
    for name, pool in request.app[KEY_POOLS].items():
        keys = pool.snapshot()
        active = sum(k["state"] == "active" for k in keys)
        providers[name] = {"keys": len(keys), "active": active}
    degraded = any(p["keys"] and not p["active"] for p in providers.values())
    body = {"providers": providers}
    shared = request.app.get(SHARED_STATE)
    if shared is not None:
        body["shared_state"] = shared.status()
        degraded = degraded or not shared.available
    return web.json_response(
        {"status": "degraded" if degraded else "ok", **body},
        headers={"Cache-Control": "no-store"},
    )


async def _metrics(request: web.Request) -> web.Response:
    return request.app[METRICS].render()
