"""Per-provider circuit breakers: a provider that failed ``failures`` times in a row is skipped
at once (no connection attempt, no timeout to wait out) for ``cooldown_s``; then one request
probes it (half-open): its success closes the circuit, its failure opens it again.

Only the provider's own trouble counts (5xx, overload, timeouts, broken connections): a rate
limit or a rejected key is the key pool's business, and a bad request is the client's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import BreakerConfig

logger = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Breaker:
    """The circuit of one provider.

    Args:
        provider: The provider's name (for logs).
        config: Failures before opening and the cool-down.
    """

    provider: str
    config: BreakerConfig
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (cool-down over, a probe may go)."""
        if self.opened_at is None:
            return CLOSED
        if self.clock() - self.opened_at < self.config.cooldown_s:
            return OPEN
        return HALF_OPEN

    def allow(self) -> bool:
        """Whether a request may try the provider now; in half-open state only one (the probe)
        goes until it has an outcome."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN or self.probing:
            return False
        self.probing = True
        logger.info("provider %s: circuit half-open, one probe goes", self.provider)
        return True

    def succeeded(self) -> None:
        """A request was served: the circuit closes."""
        if self.opened_at is not None:
            logger.info("provider %s: circuit closed", self.provider)
        self.failures, self.opened_at, self.probing = 0, None, False

    def failed(self) -> None:
        """The provider failed a request: past ``failures`` in a row (or a failed probe) the
        circuit opens for ``cooldown_s``."""
        self.failures += 1
        if self.probing or self.failures >= self.config.failures:
            if self.opened_at is None or self.probing:
                logger.warning(
                    "provider %s: circuit open for %g s after %d failure(s) in a row",
                    self.provider,
                    self.config.cooldown_s,
                    self.failures,
                )
            self.opened_at = self.clock()
        self.probing = False

    def abandoned(self) -> None:
        """A probe ended without an outcome (the client left, a key was missing): another
        request may probe."""
        self.probing = False
