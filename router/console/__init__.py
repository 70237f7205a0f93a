"""The web console at ``/ui``: static pages (plain HTML, CSS and JavaScript shipped in the
package, nothing fetched from elsewhere) over the admin API, behind a login with the admin key.

Routes: ``GET /ui`` (the page), ``/ui/static/*`` (its assets), ``POST /ui/login`` and
``/ui/logout``, ``GET /ui/api/session`` (the CSRF token of the current session),
``POST /ui/api/chat/completions`` (the playground: an OpenAI chat call as the ``console``
client) and the admin API's ``GET /admin/config`` (the configuration, redacted). The other
pages read and act through the admin API itself, which accepts the console's session
(`router.auth.ADMIN_SESSION`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from aiohttp import web

from ..auth import (
    ADMIN_SESSION,
    CONSOLE_PREFIX,
    matches_digest,
    requested_model,
    require_admin,
)
from ..backends import CONFIG
from ..config import Config
from ..errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from ..formats.registry import OPENAI
from ..handlers import serve_call
from ..keys import mask_key
from ..logs import REQUEST_CONTEXT, Redactor, secrets_of
from .session import COOKIE, LoginThrottle, Sessions, session_secret

STATIC = Path(__file__).parent / "static"
SESSIONS = web.AppKey("console_sessions", Sessions)
LOGIN_THROTTLE = web.AppKey("console_login_throttle", LoginThrottle)
CONSOLE_CLIENT = "console"
# The page may load only its own assets; images are the playground's attachments (data URLs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def setup_console(app: web.Application, sessions: Sessions | None = None) -> None:
    """Add the web console's routes to an app being built.

    Args:
        app: The application.
        sessions: The session signer (default: `session_secret`'s, 8 hour sessions).
    """
    app[SESSIONS] = sessions or Sessions(session_secret())
    app[ADMIN_SESSION] = app[SESSIONS].check
    app[LOGIN_THROTTLE] = LoginThrottle()
    app.router.add_get("/ui", _page)
    app.router.add_get("/ui/", _page)
    app.router.add_static("/ui/static", STATIC, append_version=True)
    app.router.add_post("/ui/login", _login)
    app.router.add_post("/ui/logout", _logout)
    app.router.add_get("/ui/api/session", _session)
    app.router.add_post("/ui/api/chat/completions", _playground)
    app.router.add_get("/admin/config", _config)
    app.on_response_prepare.append(_secure_headers)


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(CONSOLE_PREFIX):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def _admin_digest(request: web.Request) -> bytes:
    digest = request.app[CONFIG].auth.admin_digest
    if digest is None:
        raise PermissionDeniedError("the console is disabled: set auth.admin_key")
    return digest


async def _login(request: web.Request) -> web.Response:
    """``{"admin_key"}`` (JSON or a form) -> the session cookie and ``{"csrf", "expires"}``."""
    digest = _admin_digest(request)
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidRequestError(f"request body is not valid JSON: {err}") from err
        except RecursionError as err:
            raise InvalidRequestError("request body is nested too deeply") from err
        key = body.get("admin_key") if isinstance(body, dict) else None
    else:
        key = (await request.post()).get("admin_key")
    if not isinstance(key, str) or not key:
        raise InvalidRequestError("admin_key: enter the router's admin key", param="admin_key")
    throttle = request.app[LOGIN_THROTTLE]
    address = request.remote or ""
    throttle.check(address)
    if not matches_digest(key, digest):
        throttle.failed(address)
        raise AuthenticationError("wrong admin key")
    sessions = request.app[SESSIONS]
    cookie, session = sessions.issue(digest)
    response = web.json_response(session)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def _logout(request: web.Request) -> web.Response:
    require_admin(request)
    response = web.json_response({"status": "logged out"})
    response.del_cookie(COOKIE, path="/")
    return response


async def _session(request: web.Request) -> web.Response:
    """The current session's CSRF token and expiry (401 when not logged in)."""
    digest = _admin_digest(request)
    value = request.cookies.get(COOKIE)
    if value is None:
        raise AuthenticationError("not logged in")
    session = request.app[SESSIONS].read(value, digest)
    return web.json_response({"csrf": session["csrf"], "expires": session["exp"]})


async def _playground(request: web.Request) -> web.StreamResponse:
    """An OpenAI chat completion on behalf of the logged-in admin (the ``console`` client):
    any configured model, whatever the client keys allow."""
    require_admin(request)
    context = request[REQUEST_CONTEXT]
    context.client = CONSOLE_CLIENT
    # The client auth that fills in the model for other routes does not run here.
    context.model = await requested_model(request)
    return await serve_call(OPENAI, request)


async def _config(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response(redacted_config(request.app[CONFIG]))


def redacted_config(cfg: Config) -> dict:
    """The configuration as JSON, without any secret: provider keys masked, extra headers by
    name only, router keys by name and model scope only, the admin key as whether it is set,
    the Redis URL left out.

    Args:
        cfg: The config.
    """
    out = _public(cfg)
    for name, provider in cfg.providers.items():
        out["providers"][name]["keys"] = [mask_key(k.key) for k in provider.key_configs]
        # Extra headers may carry credentials of their own (a proxy's token): names only.
        out["providers"][name]["headers"] = dict.fromkeys(provider.headers, "[redacted]")
    out["auth"] = {
        "client_keys": [{"name": c.name, "models": c.models} for c in cfg.auth.clients],
        "admin_key": "set" if cfg.auth.admin_digest is not None else None,
    }
    # Whatever else may quote a secret (a Redis URL's password, a header value) is scrubbed.
    text = Redactor(secrets_of(cfg)).scrub(json.dumps(out, default=str))
    return json.loads(text)


def _public(value: object) -> object:
    """A config dataclass as plain data, without its fields hidden from ``repr`` (keys and
    what is derived from them)."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _public(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.repr and f.init
        }
    if isinstance(value, dict):
        return {str(k): _public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    return value
