"""Backends. Each module ``router.providers.<type>`` exports a ``Provider`` class.

The config's provider ``type`` names the module, so a new backend is one new file (the local
MLX model is ``router/providers/mlx.py``) and there is no registry to edit.
"""

from __future__ import annotations

import importlib

import aiohttp

from ..config import LimitsConfig, ProviderConfig
from .base import BaseProvider


def make_provider(
    config: ProviderConfig, session: aiohttp.ClientSession, limits: LimitsConfig
) -> BaseProvider:
    """Instantiate the provider class for ``config.type``.

    Args:
        config: The provider's config.
        session: The app's shared HTTP session.
        limits: The router's limits (image fetching, etc.).
    """
    module = importlib.import_module(f"{__name__}.{config.type}")
    return module.Provider(config, session, limits)
