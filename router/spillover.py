"""Load-aware order of a rule's targets: local first, and the cloud once the local provider is
loaded, back to local once it has drained.

A provider's load is what the router sees of it: its requests in flight through this router,
the backend's own queue where it has one (the in-process engine's waiting requests) and the
wait that queue means at the provider's recent service time. Past any of the rule's limits
the provider spills: its targets go to the end of the list. It stops spilling only when every
load figure is below ``resume_below`` of its limit, so that the decision does not flap at the
threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import SpilloverConfig, Target

logger = logging.getLogger(__name__)

# Weight of the newest request in a provider's average service time.
_EWMA_WEIGHT = 0.2


@dataclass
class Load:
    """A provider's load as the router sees it."""

    in_flight: int = 0
    queued: int = 0
    # Exponentially weighted average seconds a request took to be served.
    service_s: float = 0.0

    @property
    def expected_wait_s(self) -> float:
        """How long a new request may wait behind the queue."""
        return self.queued * self.service_s

    def served(self, seconds: float) -> None:
        """Fold one served request's duration into the average.

        Args:
            seconds: How long it took.
        """
        if self.service_s == 0.0:
            self.service_s = seconds
        else:
            self.service_s += _EWMA_WEIGHT * (seconds - self.service_s)


@dataclass
class Spillover:
    """The spill state of one rule's local provider.

    Args:
        rule: The rule's name (for logs).
        config: Its limits.
    """

    rule: str
    config: SpilloverConfig
    spilling: bool = False

    def order(self, targets: list[Target], load: Load) -> list[Target]:
        """The rule's targets in the order to try them under the provider's current load.

        Args:
            targets: The rule's targets.
            load: The spill provider's load.
        """
        was = self.spilling
        self.spilling = self._over(load, self.config.resume_below if was else 1.0)
        if self.spilling != was:
            logger.info(
                "rule %s: %s %s (in flight %d, queued %d, expected wait %.2f s)",
                self.rule,
                "spilling over from" if self.spilling else "back to",
                self.config.provider,
                load.in_flight,
                load.queued,
                load.expected_wait_s,
            )
        if not self.spilling:
            return targets
        local = [t for t in targets if t.provider == self.config.provider]
        return [t for t in targets if t.provider != self.config.provider] + local

    def _over(self, load: Load, share: float) -> bool:
        """Whether any load figure is at or past ``share`` of its limit (at ``share`` 1: past
        the limit itself; below it, at the resume threshold)."""
        limits = self.config
        figures = [
            (load.in_flight, limits.max_in_flight),
            (load.queued, limits.max_queue),
            (load.expected_wait_s, limits.max_wait_s),
        ]
        return any(limit is not None and value >= limit * share for value, limit in figures)
