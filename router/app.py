"""The aiohttp application: `create_app` wires the middlewares, the routes and the backends'
lifetime."""

from __future__ import annotations

from aiohttp import web

from .admin import setup_admin
from .auth import auth_middleware
from .backends import CONFIG, backends
from .config import Config
from .console import setup_console
from .error_middleware import error_middleware
from .handlers import setup_routes
from .observe import observe_middleware, setup_observe
from .reload import setup_reload
from .request_log import request_log_middleware, setup_request_log


def create_app(cfg: Config) -> web.Application:
    """Build the router application.

    Args:
        cfg: The router configuration.
    """
    # The observer sees the final status; auth errors are rendered by the error middleware.
    middlewares = [observe_middleware, request_log_middleware, error_middleware, auth_middleware]
    app = web.Application(client_max_size=cfg.limits.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = cfg
    # The backends start first, so the key pools exist when the observer hooks them.
    app.cleanup_ctx.append(backends)
    setup_observe(app)
    setup_admin(app)
    setup_reload(app)
    setup_request_log(app)
    setup_console(app)
    setup_routes(app)
    return app
