"""The admin API behind its own key: list the keys of every provider with their states, and
disable or enable one (``POST /admin/reload`` lives with the reload, in `router.reload`)."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from .auth import require_admin
from .errors import InvalidRequestError, NotFoundError
from .keys import KEY_POOLS, SHARED_STATE, KeyPool

logger = logging.getLogger(__name__)


def setup_admin(app: web.Application) -> None:
    """Add the admin API's key routes to an app being built.

    Args:
        app: The application.
    """
    app.router.add_get("/admin/keys", _list_keys)
    app.router.add_post("/admin/keys/{id:.+}/disable", _disable_key)
    app.router.add_post("/admin/keys/{id:.+}/enable", _enable_key)


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
