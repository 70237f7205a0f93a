"""A minimal per-provider key pool: round robin, skipping keys cooling down after a 429."""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import RateLimitError

# Cool-down for a 429 that came without a Retry-After header.
DEFAULT_COOLDOWN_S = 10.0


class KeyPool:
    """Round-robin over a provider's API keys.

    A provider with no keys (a local server, an in-process model) yields ``None``.

    Args:
        provider: The provider's name, for error messages.
        keys: Its API keys.
        clock: Monotonic time source (injectable for tests).
    """

    def __init__(
        self, provider: str, keys: list[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.provider = provider
        self._keys = list(keys)
        self._next = 0
        self._cooling_until: dict[str, float] = {}
        self._clock = clock

    def __len__(self) -> int:
        return max(1, len(self._keys))

    def acquire(self) -> str | None:
        """Return the next usable key.

        Raises:
            RateLimitError: If every key is cooling down; ``retry_after`` is the shortest wait.
        """
        if not self._keys:
            return None
        now = self._clock()
        for step in range(len(self._keys)):
            i = (self._next + step) % len(self._keys)
            key = self._keys[i]
            if self._cooling_until.get(key, 0.0) <= now:
                self._next = i + 1
                return key
        wait = min(self._cooling_until.values()) - now
        raise RateLimitError(
            f"all API keys of provider {self.provider!r} are rate limited",
            retry_after=max(0.0, wait),
        )

    def cool_down(self, key: str | None, seconds: float | None) -> None:
        """Skip ``key`` for ``seconds`` (after a 429).

        Args:
            key: The key that was rate limited (None is ignored).
            seconds: The upstream's Retry-After, or None for the default cool-down.
        """
        if key is None:
            return
        wait = DEFAULT_COOLDOWN_S if seconds is None else seconds
        self._cooling_until[key] = self._clock() + wait
