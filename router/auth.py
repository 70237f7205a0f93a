"""Client authentication: router keys as each SDK sends them, their model scopes, the admin
key, and the rule that a router reachable beyond loopback must require keys.

Keys are stored as SHA-256 digests (`router.config.hash_key`); a presented key is hashed and
compared with every configured digest in constant time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .backends import CONFIG
from .body import read_body
from .config import AuthConfig, ClientKeyConfig, ConfigError, is_loopback
from .errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from .logs import REQUEST_CONTEXT

logger = logging.getLogger(__name__)

# Paths outside client auth: probes and metrics are open, /admin has its own key.
OPEN_PATHS = ("/health", "/metrics")
ADMIN_PREFIX = "/admin/"
# The web console checks its own session (router/console).
CONSOLE_PREFIX = "/ui"
KEY_FORMS = "Authorization: Bearer, x-api-key, x-goog-api-key or ?key="


def presented_key(request: web.Request) -> str | None:
    """The key a client sent, in whichever form its SDK uses.

    Args:
        request: The request (``Authorization: Bearer``, ``x-api-key``, ``x-goog-api-key``
            or the ``key`` query parameter, in that order).
    """
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for header in ("x-api-key", "x-goog-api-key"):
        if request.headers.get(header):
            return request.headers[header]
    return request.query.get("key") or None


def matches_digest(key: str, digest: bytes) -> bool:
    """Whether ``key`` hashes to ``digest`` (constant-time comparison).

    Args:
        key: The presented key.
        digest: A configured SHA-256 digest.
    """
    return hmac.compare_digest(hashlib.sha256(key.encode()).digest(), digest)


def find_client(clients: list[ClientKeyConfig], key: str) -> ClientKeyConfig | None:
    """The client whose key this is. Every digest is compared, so timing does not reveal
    which (or whether one) matched.

    Args:
        clients: The configured client keys.
        key: The presented key.
    """
    digest = hashlib.sha256(key.encode()).digest()
    found = None
    for client in clients:
        if hmac.compare_digest(digest, client.digest):
            found = client
    return found


def model_allowed(client: ClientKeyConfig, model: str) -> bool:
    """Whether a client may use a model (patterns as in ``fnmatch``: ``*``, ``gpt-*``).

    Args:
        client: The client.
        model: The model name the client asked for.
    """
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in client.models)


def check_bind(host: str, auth: AuthConfig) -> None:
    """Refuse to serve beyond loopback without client keys.

    Args:
        host: The listen host.
        auth: The auth config.

    Raises:
        ConfigError: If ``host`` is not loopback and ``auth.client_keys`` is empty.
    """
    if not auth.clients and not is_loopback(host):
        raise ConfigError(
            f"listen.host {host!r} is reachable beyond this machine but auth.client_keys is "
            "empty: add client keys (auth.client_keys, ROUTER_CLIENT_KEYS or --client-key; "
            "smolvlm-router hash-key makes one) or listen on 127.0.0.1"
        )


async def requested_model(request: web.Request) -> str | None:
    """The model a request asks for: from the Gemini-style path, else the JSON body's
    ``model`` (None when there is none, e.g. a body that is not JSON or nested too deep: the
    handler says why).

    Args:
        request: The request.
    """
    info = request.match_info
    if "target" in info:
        return info["target"].rpartition(":")[0] or None
    if "model" in info:
        return info["model"].removeprefix("models/")
    if request.method != "POST" or not request.can_read_body:
        return None
    try:
        body = await read_body(request)
    except InvalidRequestError:
        return None  # not a valid JSON object: the handler says why
    model = body.get("model")
    return model if isinstance(model, str) else None


# Checks a web console session (cookie, CSRF token), for admin calls made by the console: true
# when the request carries a valid one, false when it carries none; raises when it is invalid.
ADMIN_SESSION = web.AppKey("admin_session", Callable[[web.Request], bool])


def require_admin(request: web.Request) -> None:
    """Check the admin key of an admin API call, or the web console's session.

    Args:
        request: The request (key as ``Authorization: Bearer`` or ``x-api-key``, or the
            console's session cookie and CSRF token, see `ADMIN_SESSION`).

    Raises:
        PermissionDeniedError: If no admin key is configured (the admin API is off).
        AuthenticationError: If the key is missing or wrong.
    """
    digest = request.app[CONFIG].auth.admin_digest
    if digest is None:
        raise PermissionDeniedError("the admin API is disabled: set auth.admin_key")
    key = presented_key(request)
    session = request.app.get(ADMIN_SESSION)
    if key is None and session is not None and session(request):
        return
    if key is None or not matches_digest(key, digest):
        raise AuthenticationError("missing or invalid admin key")


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate clients and check the model against the key's scope (401 for a missing or
    wrong key, 403 for a model outside it; the error middleware renders both in the client's
    format). Without configured client keys every request passes.

    Args:
        request: The request.
        handler: The route handler.
    """
    if request.path in OPEN_PATHS or request.path.startswith((ADMIN_PREFIX, CONSOLE_PREFIX)):
        return await handler(request)
    context = request[REQUEST_CONTEXT]
    context.model = model = await requested_model(request)
    clients = request.app[CONFIG].auth.clients
    if not clients:
        return await handler(request)
    key = presented_key(request)
    if key is None:
        raise AuthenticationError(f"missing API key: send a router key as {KEY_FORMS}")
    client = find_client(clients, key)
    if client is None:
        raise AuthenticationError("invalid API key")
    context.client = client.name
    if model is not None and not model_allowed(client, model):
        raise PermissionDeniedError(f"this key may not use model {model!r}", param="model")
    return await handler(request)
