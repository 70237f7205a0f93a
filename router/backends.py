"""The app's backends as typed app state: its config, its one ``ClientSession`` and the
providers built from the config (the app's backends cleanup context fills them)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Config
from .providers.base import BaseProvider

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROVIDERS = web.AppKey("providers", dict[str, BaseProvider])
