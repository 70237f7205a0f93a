"""Typed application state keys (one module, so every component agrees on them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from .config import Config
from .keys import KeyPool
from .keys.redis_store import SharedKeyState
from .metrics import Metrics
from .providers.base import BaseProvider

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROVIDERS = web.AppKey("providers", dict[str, BaseProvider])
KEY_POOLS = web.AppKey("key_pools", dict[str, KeyPool])
METRICS = web.AppKey("metrics", Metrics)
# Re-reads the config for a reload (SIGHUP, POST /admin/reload); absent: nothing to reload.
CONFIG_LOADER = web.AppKey("config_loader", Callable[[], Config])
# Called with the config after each successful reload (the command line's logging setup).
RELOAD_HOOKS = web.AppKey("reload_hooks", list[Callable[[Config], None]])
# Replaced providers, closed once their in-flight requests had time to finish.
RETIRING = web.AppKey("retiring", set[asyncio.Task])
# Redis-backed key state shared with other instances (set when ``shared_state`` is configured).
SHARED_STATE = web.AppKey("shared_state", SharedKeyState)
