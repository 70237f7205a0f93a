"""Backends. Each module ``router.providers.<type>`` exports a ``Provider`` class.

The config's provider ``type`` names the module, so a new backend is one new file (the local
MLX model is ``router/providers/mlx.py``) and there is no registry to edit.
"""

from __future__ import annotations

import importlib

from ..config import ProviderConfig
from ..images import MediaFetcher
from .base import BaseProvider


def make_provider(config: ProviderConfig, media: MediaFetcher) -> BaseProvider:
    """Instantiate the provider class for ``config.type``.

    Args:
        config: The provider's config.
        media: The app's media fetcher (it reads the config's limits at each fetch).
    """
    module = importlib.import_module(f"{__name__}.{config.type}")
    return module.Provider(config, media)
