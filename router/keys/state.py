"""One API key as its pool tracks it: its state, counters and rolling rpm/tpm windows.

A key is in one of four states; only ``active`` keys get traffic:

- ``active``: usable (it may still be at its ``max_concurrent``, ``rpm`` or ``tpm`` for a while).
- ``cooling``: rate limited (429); back by itself at ``until``, taken from the upstream's
  ``Retry-After`` or reset headers, else exponential backoff with jitter.
- ``parked``: quota or credit exhausted; back at the quota's reset, else after ``park_s``.
- ``disabled``: rejected by the provider (401/403, an invalid key); back only by `KeyPool.enable`.

Overloads, 5xx and timeouts are not the key's fault and leave it active.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import KeyConfig

ACTIVE, COOLING, PARKED, DISABLED = "active", "cooling", "parked", "disabled"
# A later, milder verdict never overrides a harsher state (a late 429 cannot un-park a key).
SEVERITY = {ACTIVE: 0, COOLING: 1, PARKED: 2, DISABLED: 3}

# Rate-limit windows of the rpm/tpm budgets.
WINDOW_S = 60.0


def mask_key(key: str) -> str:
    """A key as logs and the admin API may show it (``sk-...a1b2``).

    Args:
        key: The API key.
    """
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else f"...{key[-2:]}"


@dataclass
class PooledKey:
    """One API key of a pool: its config, state and the use it had within `WINDOW_S`.

    Args:
        index: Its position in the provider's key list.
        id: Its stable id, ``{provider}/{index}``.
        config: Its config (the key string and its limits).
        masked: The key as logs may show it (`mask_key`).
    """

    index: int
    id: str
    config: KeyConfig
    masked: str
    state: str = ACTIVE
    until: float | None = None  # monotonic clock
    reason: str = ""
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    # Consecutive 429s without a hint (backoff exponent); reset by a success.
    strikes: int = 0
    # Smooth weighted round robin's running weight.
    current: float = 0.0
    # Request start times and (time, tokens) spent, within the last WINDOW_S.
    starts: deque[float] = field(default_factory=deque)
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    spent_total: int = 0
    # The key's id in the shared state (set when the pool shares its keys).
    shared_id: str = ""

    def start_request(self, now: float) -> None:
        """A request took the key at ``now``."""
        self.in_flight += 1
        self.requests += 1
        self.starts.append(now)

    def end_request(self, now: float, tokens: int) -> None:
        """A request on the key ended at ``now`` having spent ``tokens``."""
        self.in_flight -= 1
        if tokens > 0:
            self.spent.append((now, tokens))
            self.spent_total += tokens

    def has_room(self, now: float) -> bool:
        """Whether the key is below its ``max_concurrent``, ``rpm`` and ``tpm`` at ``now``
        (forgetting the window's entries older than `WINDOW_S`)."""
        cfg = self.config
        while self.starts and self.starts[0] <= now - WINDOW_S:
            self.starts.popleft()
        while self.spent and self.spent[0][0] <= now - WINDOW_S:
            self.spent_total -= self.spent.popleft()[1]
        if cfg.max_concurrent is not None and self.in_flight >= cfg.max_concurrent:
            return False
        if cfg.rpm is not None and len(self.starts) >= cfg.rpm:
            return False
        return cfg.tpm is None or self.spent_total < cfg.tpm

    def window_frees(self) -> list[float]:
        """When the key's full rpm window, and its tpm window, next free some budget."""
        times = []
        if self.config.rpm is not None and len(self.starts) >= self.config.rpm:
            times.append(self.starts[0] + WINDOW_S)
        if self.config.tpm is not None and self.spent:
            times.append(self.spent[0][0] + WINDOW_S)
        return times
