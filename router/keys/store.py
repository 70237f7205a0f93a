"""The key state that pools share with other router instances, behind a protocol.

Without a shared store each pool's own state is the whole truth. With one (`SharedStore`,
implemented on Redis by `redis_store.SharedKeyState`), each pool stays the first gate and the
local mirror: it asks the store before it hands out a key, reports each request's end to it
(by the lease id the store gave), and mirrors the states the store reports back through
`KeyMirror`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from aiohttp import web

from .state import PooledKey


class KeyMirror(Protocol):
    """What a shared store needs of a pool (`KeyPool`): its keys, a way to mirror their shared
    states, and a way to wake the requests waiting for a key."""

    provider: str

    @property
    def keys(self) -> list[PooledKey]:
        """The pool's keys."""
        ...

    def apply_shared(self, key: PooledKey, state: str, until: float | None, reason: str) -> None:
        """Mirror a key's state as the store has it."""
        ...

    def wake(self) -> None:
        """Let waiting requests look for a key again."""
        ...


class SharedStore(Protocol):
    """Key state shared by several router instances: admission across all of them, and the
    outcomes and state changes of their requests."""

    # False while the store cannot be reached: the pools then serve on their own state.
    available: bool

    async def start(self) -> None:
        """Connect and start whatever keeps the link alive."""
        ...

    async def close(self) -> None:
        """Send what is pending and disconnect."""
        ...

    def status(self) -> dict[str, Any]:
        """The link's state for ``/health`` and the admin API."""
        ...

    def attach(self, pool: KeyMirror) -> None:
        """Share a pool's keys (replacing those of an older pool of the same provider)."""
        ...

    async def acquire(self, candidates: list[PooledKey]) -> tuple[PooledKey | None, str, float]:
        """Admit the first candidate that is active and has room across all instances.

        Returns:
            The admitted key, its lease id (for `finish`) and 0; or None, '' and how long to
            wait before asking again.
        """
        ...

    def admit_locally(self, key: PooledKey) -> str:
        """A lease id for a request the pool admitted on its own state while the store is
        unavailable (the store counts it once it is reachable again)."""
        ...

    def finish(
        self,
        key: PooledKey,
        *,
        lease: str = "",
        tokens: int = 0,
        state: str = "",
        seconds: float | None = None,
        reason: str = "",
        force: bool = False,
    ) -> None:
        """Report a request's end (``lease``: its lease id) and/or a key's new state."""
        ...


def shared_id(key_id: str, key: str) -> str:
    """A key's id in the shared store: ``{provider}/{index}:{hash}``, where the hash is 8 hex digits of a
    digest of the key string (so a replaced key at the same index starts afresh).

    Args:
        key_id: The pool's id, ``{provider}/{index}``.
        key: The API key string.
    """
    return f"{key_id}:{hashlib.blake2b(key.encode(), digest_size=4).hexdigest()}"


# The app's shared key state (set when ``shared_state`` is configured, or by the workers'
# coordinator, `local_store`).
SHARED_STATE = web.AppKey("shared_state", SharedStore)
