"""Prometheus metrics of one app (its own registry, no process globals), and the hooks that
feed them: the per-request middleware and the key pools' state changes."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from .keys import KeyPool
from .logs import RequestContext

logger = logging.getLogger(__name__)

KEY_STATES = ("active", "cooling", "parked", "disabled")
# Where prometheus_client's multiprocess mode keeps the workers' files (`router.workers` sets it).
MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"
# Generation requests last from milliseconds (errors) to minutes (long streams).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The router's metrics, in a registry of their own.

    Args:
        pools: Returns the current key pools (read at every scrape, so reloads show).
        counters: Returns each provider's own counters (`BaseProvider.counters`), read at
            every scrape.
    """

    def __init__(
        self,
        pools: Callable[[], dict[str, KeyPool]],
        counters: Callable[[], dict[str, dict[str, float]]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "router_requests",
            "Client requests by route, model, provider that answered and HTTP status.",
            ["route", "model", "provider", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "router_request_duration_seconds",
            "Client request latency, streams until their last byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "router_tokens",
            "Tokens reported by upstream usage, by model, provider and direction (in/out).",
            ["model", "provider", "direction"],
            registry=self.registry,
        )
        self.retries = Counter(
            "router_retries",
            "Upstream attempts beyond a request's first (another key or provider).",
            ["model"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "router_fallbacks",
            "Requests that moved on to another provider of their model's fallback list.",
            ["model"],
            registry=self.registry,
        )
        # With several workers: the sum over the live ones (see `render`).
        self.in_flight = Gauge(
            "router_requests_in_flight",
            "Client requests being served.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.key_changes = Counter(
            "router_key_state_changes",
            "Key state changes, by key id and new state.",
            ["provider", "key", "state"],
            registry=self.registry,
        )
        self._key_states = _KeyStates(pools)
        self._provider_counters = _ProviderCounters(counters)
        self.registry.register(self._key_states)
        self.registry.register(self._provider_counters)

    def on_key_change(
        self, provider: str, key_id: str, old_state: str, new_state: str, reason: str
    ) -> None:
        """The key pools' state-change hook: count it and log it (ids only, never the key).

        Args:
            provider: The provider's name.
            key_id: ``{provider}/{index}``.
            old_state: The state before.
            new_state: The state now.
            reason: Why.
        """
        self.key_changes.labels(provider, key_id, new_state).inc()
        level = logging.WARNING if new_state in ("disabled", "parked") else logging.INFO
        logger.log(
            level,
            "key %s: %s -> %s (%s)",
            key_id,
            old_state,
            new_state,
            reason,
            extra={"key_id": key_id, "key_state": new_state},
        )

    def observe(
        self, context: RequestContext, route: str, model: str, status: int, seconds: float
    ) -> None:
        """Record one finished client request.

        Args:
            context: The request's context (provider, attempts, tokens).
            route: The matched route pattern.
            model: The model label, bounded by the config (``other``, ``provider/other``).
            status: The HTTP status sent.
            seconds: How long it took.
        """
        provider = context.provider or "none"
        self.requests.labels(route, model, provider, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if not context.attempts:
            return
        if len(context.attempts) > 1:
            self.retries.labels(model).inc(len(context.attempts) - 1)
        if len(set(context.attempts)) > 1:
            self.fallbacks.labels(model).inc()
        if context.input_tokens:
            self.tokens.labels(model, provider, "in").inc(context.input_tokens)
        if context.output_tokens:
            self.tokens.labels(model, provider, "out").inc(context.output_tokens)

    def render(self) -> web.Response:
        """The Prometheus text exposition. In a worker of several (prometheus_client's
        multiprocess mode, set up by `router.workers`) the requests, latencies, tokens,
        retries, fallbacks and key changes are summed over all workers, dead ones included,
        and ``router_requests_in_flight`` over the live ones; key states are this worker's
        mirror of the shared ones."""
        registry = self.registry
        if MULTIPROC_VAR in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self._key_states)
            registry.register(self._provider_counters)
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


# The app's metrics (set up with the observe middleware, see `router.observe`).
METRICS = web.AppKey("metrics", Metrics)


class _KeyStates:
    """``router_key_state{provider,key,state}``: 1 for each key's current state, else 0, read
    from the pools' snapshots at scrape time (so expired cool-downs show as active)."""

    def __init__(self, pools: Callable[[], dict[str, KeyPool]]) -> None:
        self._pools = pools

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> list[GaugeMetricFamily]:
        family = self._family()
        for name, pool in self._pools().items():
            for key in pool.snapshot():
                for state in KEY_STATES:
                    family.add_metric([name, key["id"], state], float(key["state"] == state))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "router_key_state",
            "Each provider key's state (1 for the current one), by key id.",
            labels=["provider", "key", "state"],
        )


class _ProviderCounters:
    """``router_provider_<name>{provider}``: the counters providers keep themselves (the local
    model's prompt cache hits, misses, reused tokens and bytes), read at scrape time."""

    def __init__(self, counters: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._counters = counters

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> list[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for provider, counters in self._counters().items():
            for name, value in counters.items():
                if name not in families:
                    families[name] = GaugeMetricFamily(
                        f"router_provider_{name}", f"A provider's own {name}.", labels=["provider"]
                    )
                families[name].add_metric([provider], value)
        return list(families.values())
