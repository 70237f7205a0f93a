"""Configuration reload without dropping requests: ``POST /admin/reload`` and SIGHUP re-read
the config (`reload_config`), and `apply_config` switches the running app to it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .auth import check_bind, require_admin
from .backends import CONFIG, MEDIA, PROVIDERS
from .config import Config, ConfigError
from .errors import InvalidRequestError
from .keys import KEY_POOLS, SHARED_STATE, KeyPool
from .metrics import METRICS
from .providers import make_provider
from .providers.base import BaseProvider

logger = logging.getLogger(__name__)

# Re-reads the config for a reload (SIGHUP, POST /admin/reload); absent: nothing to reload.
CONFIG_LOADER = web.AppKey("config_loader", Callable[[], Config])
# Called with the config after each successful reload (the command line's logging setup).
RELOAD_HOOKS = web.AppKey("reload_hooks", list[Callable[[Config], None]])
# Called after a successful ``POST /admin/reload`` so that the other worker processes reload too
# (set in workers, see `router.workers`); absent: this process is the only one.
RELOAD_OTHERS = web.AppKey("reload_others", Callable[[], None])
# Replaced providers, closed once their in-flight requests had time to finish.
RETIRING = web.AppKey("retiring", set[asyncio.Task])


def setup_reload(app: web.Application) -> None:
    """Add the reload state and ``POST /admin/reload`` to an app being built.

    Args:
        app: The application (its backends cleanup context must already be added, so that
            retired providers are closed before the session they use).
    """
    app[RELOAD_HOOKS] = []
    app[RETIRING] = set()
    app.cleanup_ctx.append(_close_retired)
    app.router.add_post("/admin/reload", _reload)


async def _close_retired(app: web.Application) -> AsyncIterator[None]:
    """At exit, close the retired providers still waiting for their grace period."""
    yield
    tasks = list(app[RETIRING])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _reload(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        changed = reload_config(request.app)
    except ConfigError as err:
        raise InvalidRequestError(f"reload failed, the running config is kept: {err}") from err
    if (others := request.app.get(RELOAD_OTHERS)) is not None:
        others()
    return web.json_response({"status": "reloaded", "providers_changed": changed})


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


def reload_on_signal(app: web.Application) -> None:
    """SIGHUP: apply the config file again; an invalid one is logged and the running config
    stays.

    Args:
        app: The running application.
    """
    try:
        reload_config(app)
    except ConfigError as err:
        logger.error("reload failed, the running config is kept: %s", err)


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
        built = {name: make_provider(new.providers[name], app[MEDIA]) for name in changed}
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
