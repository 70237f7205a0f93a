"""The app's backends: its config, its one ``ClientSession``, the providers built from the
config and their key pools (linked to the shared key state when configured), as typed app
state filled by the `backends` cleanup context for the app's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .config import Config
from .keys import KEY_POOLS, SHARED_STATE, KeyPool
from .providers import make_provider
from .providers.base import BaseProvider

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROVIDERS = web.AppKey("providers", dict[str, BaseProvider])


async def backends(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: one ClientSession, the providers and the key pools.

    Args:
        app: The application; ``app[CONFIG]`` must be set.
    """
    cfg = app[CONFIG]
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        app[PROVIDERS] = {
            name: make_provider(p, session, cfg.limits) for name, p in cfg.providers.items()
        }
        shared = None
        if cfg.shared_state is not None:
            # Imported here: a router without shared state never loads redis.
            from .keys.redis_store import SharedKeyState

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
