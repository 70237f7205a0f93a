"""The aiohttp application: `create_app` wires the middlewares, the routes and the backends'
lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .admin import observe_middleware, setup_ops
from .appkeys import CONFIG, KEY_POOLS, PROVIDERS, SESSION, SHARED_STATE
from .auth import auth_middleware
from .config import Config
from .handlers import setup_routes
from .keys import KeyPool
from .middleware import error_middleware
from .providers import make_provider
from .shared_keys import SharedKeyState


def create_app(cfg: Config) -> web.Application:
    """Build the router application.

    Args:
        cfg: The router configuration.
    """
    # The observer sees the final status; auth errors are rendered by the error middleware.
    middlewares = [observe_middleware, error_middleware, auth_middleware]
    app = web.Application(client_max_size=cfg.limits.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = cfg
    app.cleanup_ctx.append(_backends)
    setup_ops(app)
    setup_routes(app)
    return app


async def _backends(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession, the providers and the key pools (and their link to the shared key
    state, when configured), for the app's lifetime."""
    cfg = app[CONFIG]
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        app[PROVIDERS] = {
            name: make_provider(p, session, cfg.limits) for name, p in cfg.providers.items()
        }
        shared = None
        if cfg.shared_state is not None:
            shared = app[SHARED_STATE] = SharedKeyState(cfg.shared_state)
        app[KEY_POOLS] = {name: KeyPool(p, shared=shared) for name, p in cfg.providers.items()}
        if shared is not None:
            await shared.start()
        try:
            yield
        finally:
            if shared is not None:
                await shared.close()
            for provider in app[PROVIDERS].values():
                await provider.close()
