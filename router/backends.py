"""The app's backends: its config, the providers built from the config (each HTTP provider
with its own connection pool), the media fetcher (on a pool of its own) and the key pools
(linked to the shared key state when configured, or to the other workers' through their
supervisor), as typed app state filled by the
`backends` cleanup context for the app's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .config import Config
from .images import MediaFetcher
from .keys import KEY_POOLS, SHARED_STATE, KeyPool
from .keys.local_store import KEY_COORDINATOR, LocalKeyState
from .providers import make_provider
from .providers.base import BaseProvider

CONFIG = web.AppKey("config", Config)
MEDIA = web.AppKey("media", MediaFetcher)
PROVIDERS = web.AppKey("providers", dict[str, BaseProvider])


async def backends(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the media fetcher, the providers and the key pools.

    Args:
        app: The application; ``app[CONFIG]`` must be set.
    """
    cfg = app[CONFIG]
    media = app[MEDIA] = MediaFetcher(cfg)
    app[PROVIDERS] = {name: make_provider(p, media) for name, p in cfg.providers.items()}
    shared = None
    if cfg.shared_state is not None:
        # Imported here: a router without shared state never loads redis.
        from .keys.redis_store import SharedKeyState

        shared = app[SHARED_STATE] = SharedKeyState(cfg.shared_state)
    elif KEY_COORDINATOR in app:  # a worker of several, without Redis: its supervisor's
        shared = app[SHARED_STATE] = LocalKeyState(app[KEY_COORDINATOR])
    app[KEY_POOLS] = {name: KeyPool(p, shared=shared) for name, p in cfg.providers.items()}
    try:
        if shared is not None:
            await shared.start()
        yield
    finally:
        if shared is not None:
            await shared.close()
        for provider in app[PROVIDERS].values():
            await provider.close()
        await media.close()
