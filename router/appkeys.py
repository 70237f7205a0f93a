"""Typed application state keys (one module, so every component agrees on them)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Config
from .keys import KeyPool
from .providers.base import BaseProvider

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROVIDERS = web.AppKey("providers", dict[str, BaseProvider])
KEY_POOLS = web.AppKey("key_pools", dict[str, KeyPool])
