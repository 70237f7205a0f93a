"""Operations: ``/health``, ``/metrics``, the admin API behind its own key, configuration
reload without dropping requests, and the middleware that gives every request an id, an
access-log line and its metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .appkeys import (
    CONFIG,
    CONFIG_LOADER,
    KEY_POOLS,
    METRICS,
    PROVIDERS,
    RELOAD_HOOKS,
    RETIRING,
    SESSION,
    SHARED_STATE,
)
from .auth import check_bind, require_admin
from .config import Config, ConfigError
from .errors import InvalidRequestError, NotFoundError
from .keys import KeyPool
from .logs import REQUEST_CONTEXT, Redactor, current_request, secrets_of, start_request
from .metrics import Metrics
from .providers import make_provider
from .providers.base import BaseProvider

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("router.access")

QUIET_PATHS = ("/health", "/metrics")


def setup_ops(app: web.Application) -> None:
    """Add the operations routes, metrics and key-state hooks to an app being built.

    Args:
        app: The application (its `_backends`-style cleanup context must already be added,
            so that the key pools exist when this one starts).
    """
    app[METRICS] = Metrics(lambda: app[KEY_POOLS])
    app[RELOAD_HOOKS] = []
    app[RETIRING] = set()
    app.cleanup_ctx.append(_hook_pools)
    app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/keys", _list_keys)
    app.router.add_post("/admin/keys/{id:.+}/disable", _disable_key)
    app.router.add_post("/admin/keys/{id:.+}/enable", _enable_key)
    app.router.add_post("/admin/reload", _reload)


async def _hook_pools(app: web.Application) -> AsyncIterator[None]:
    """Send the pools' state changes to metrics and logs; at exit, close retired providers."""
    for pool in app[KEY_POOLS].values():
        pool.on_change = app[METRICS].on_key_change
    yield
    tasks = list(app[RETIRING])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        model = _model_label(cfg, context.model)
        request.app[METRICS].observe(route, model, status, seconds)
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
                "remote": request.remote,
            },
        )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Streams are prepared inside the handler: give them the request id there."""
    context = current_request()
    if context is not None and "x-request-id" not in response.headers:
        response.headers["x-request-id"] = context.id


def _model_label(cfg: Config, model: str | None) -> str:
    """A bounded metric label: configured aliases and ``provider/model`` names, else other."""
    if model is None:
        return "none"
    if model in cfg.models or model.partition("/")[0] in cfg.providers:
        return model
    return "other"


# ---- probes ----------------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    """``{"status": "ok"|"degraded", "providers": {name: {"keys", "active"}}}``, plus
    ``shared_state`` (`SharedKeyState.status`) when configured; degraded when a provider with
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


# ---- admin API -------------------------------------------------------------------------------


async def _list_keys(request: web.Request) -> web.Response:
    require_admin(request)
    keys = [
        {"provider": name, **key}
        for name, pool in request.app[KEY_POOLS].items()
        for key in pool.snapshot()
    ]
    body: dict = {"keys": keys}
    shared = request.app.get(SHARED_STATE)
    if shared is not None:
        body["shared_state"] = shared.status()
    return web.json_response(body)


def _pool_of(request: web.Request) -> tuple[KeyPool, str]:
    key_id = request.match_info["id"]
    provider = key_id.rpartition("/")[0]
    pools = request.app[KEY_POOLS]
    if provider not in pools:
        raise NotFoundError(f"no key {key_id!r}: keys are named provider/index")
    return pools[provider], key_id


def _key_state(pool: KeyPool, key_id: str) -> web.Response:
    key = next(k for k in pool.snapshot() if k["id"] == key_id)
    return web.json_response({"provider": pool.provider, **key})


async def _disable_key(request: web.Request) -> web.Response:
    require_admin(request)
    pool, key_id = _pool_of(request)
    reason = "disabled by an admin"
    if request.can_read_body:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidRequestError(f"request body is not valid JSON: {err}") from err
        if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
            raise InvalidRequestError("reason: expected a string", param="reason")
        reason = body.get("reason") or reason
    pool.disable(key_id, reason)
    logger.warning("admin disabled key %s: %s", key_id, reason)
    return _key_state(pool, key_id)


async def _enable_key(request: web.Request) -> web.Response:
    require_admin(request)
    pool, key_id = _pool_of(request)
    pool.enable(key_id)
    logger.info("admin enabled key %s", key_id)
    return _key_state(pool, key_id)


async def _reload(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        changed = reload_config(request.app)
    except ConfigError as err:
        raise InvalidRequestError(f"reload failed, the running config is kept: {err}") from err
    return web.json_response({"status": "reloaded", "providers_changed": changed})


# ---- reload ----------------------------------------------------------------------------------


def reload_config(app: web.Application) -> list[str]:
    """Re-read the config (`CONFIG_LOADER`) and apply it; see `apply_config`.

    Args:
        app: The running application.

    Returns:
        The providers that were added or rebuilt.

    Raises:
        ConfigError: If there is no config to reload or the new one is invalid; the running
            config stays in force.
    """
    loader = app.get(CONFIG_LOADER)
    if loader is None:
        raise ConfigError("this router was started without a config file to reload")
    return apply_config(app, loader())


def apply_config(app: web.Application, new: Config) -> list[str]:
    """Switch a running app to a new config without dropping requests.

    Providers whose config (and the limits) did not change keep their provider object and
    key pool, with its key states. Changed and new providers get fresh ones; replaced
    providers serve their in-flight requests and are closed after ``shutdown_grace_s``.
    ``listen`` and ``shared_state`` changes need a restart and are ignored; new pools share
    their keys' state like the others.

    Args:
        app: The running application.
        new: The validated new config.

    Raises:
        ConfigError: If the new config would leave the router open beyond loopback without
            client keys, or a changed provider cannot be built; nothing is changed then.
    """
    old = app[CONFIG]
    if new.listen != old.listen:
        logger.warning("reload: listen changes take effect only after a restart")
    new.listen = old.listen
    if new.shared_state != old.shared_state:
        logger.warning("reload: shared_state changes take effect only after a restart")
    new.shared_state = old.shared_state
    check_bind(old.listen.host, new.auth)
    changed = [
        name
        for name, p in new.providers.items()
        if name not in old.providers or p != old.providers[name] or new.limits != old.limits
    ]
    try:
        built = {
            name: make_provider(new.providers[name], app[SESSION], new.limits) for name in changed
        }
    except (ValueError, OSError) as err:  # e.g. a local model that cannot load
        raise ConfigError(f"reload: cannot start a provider: {err}") from err
    metrics = app[METRICS]
    shared = app.get(SHARED_STATE)
    pools = {
        name: KeyPool(new.providers[name], on_change=metrics.on_key_change, shared=shared)
        for name in changed
    }
    providers = app[PROVIDERS]
    retired = [p for name, p in providers.items() if name not in new.providers or name in changed]
    for field in dataclasses.fields(Config):
        setattr(old, field.name, getattr(new, field.name))
    for name in [n for n in providers if n not in new.providers]:
        del providers[name]
        del app[KEY_POOLS][name]
    providers.update(built)
    app[KEY_POOLS].update(pools)
    if retired:
        task = asyncio.get_running_loop().create_task(_retire(retired, old.shutdown_grace_s))
        app[RETIRING].add(task)
        task.add_done_callback(app[RETIRING].discard)
    for hook in app[RELOAD_HOOKS]:
        hook(old)
    logger.info("config reloaded; providers added or rebuilt: %s", ", ".join(changed) or "none")
    return changed


async def _retire(providers: list[BaseProvider], grace: float) -> None:
    """Close replaced providers once their in-flight requests had ``grace`` seconds."""
    try:
        await asyncio.sleep(grace)
    finally:
        for provider in providers:
            await provider.close()
