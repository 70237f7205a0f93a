"""The routing decision of each request and its guards, wired into the app: which rule and
targets serve it (`router.rules`, reordered by `router.spillover`), whether a target may be
tried now (its circuit breaker, `router.breaker`, and the budgets, `router.budgets`), and,
when the request ends, its spend and its provider's load. Also ``GET /admin/spend`` and the
routing metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter

from . import ir
from .auth import require_admin
from .backends import CONFIG, PROVIDERS
from .breaker import Breaker
from .budgets import Budgets, Reservation, write_in_background, writes_done
from .config import ClientKeyConfig, Config, Target
from .errors import OverloadedError
from .logs import RequestContext
from .metrics import METRICS
from .rules import RouteInput, choose_route
from .spend_store import SpendStore, SQLiteSpendStore
from .spillover import Load, Spillover


class CircuitOpenError(OverloadedError):
    """A provider's circuit is open: it is skipped without an attempt."""


@dataclass
class RoutingState:
    """The app's routing state: budgets and their store, and per provider its breaker and
    load, per rule its spill state, and the routing metrics."""

    budgets: Budgets
    decisions: Counter
    spend_usd: Counter
    spend_tokens: Counter
    breakers: dict[str, Breaker] = field(default_factory=dict)
    settling: set[asyncio.Task] = field(default_factory=set)
    loads: dict[str, Load] = field(default_factory=dict)
    spills: dict[str, Spillover] = field(default_factory=dict)

    def breaker(self, cfg: Config, provider: str) -> Breaker:
        """The provider's breaker (made on first use, with the config's settings)."""
        breaker = self.breakers.get(provider)
        if breaker is None or breaker.config != cfg.routing.breaker:
            breaker = self.breakers[provider] = Breaker(provider, cfg.routing.breaker)
        return breaker

    def settle_later(self, settlement: Coroutine[None, None, float]) -> None:
        """Write a request's spend in the background (its answer does not wait for the store).

        Args:
            settlement: `Budgets.settle` of the request.
        """
        write_in_background(self.settling, settlement)

    async def drain(self) -> None:
        """Write the spend of the requests that ended (before a report, and at exit)."""
        await writes_done(self.settling)
        await self.budgets.flush()

    def load(self, provider: str) -> Load:
        """The provider's load as this router sees it."""
        return self.loads.setdefault(provider, Load())


ROUTING = web.AppKey("routing", RoutingState)


def setup_routing(app: web.Application) -> None:
    """Add the routing state (with the spend store's lifetime), its metrics and
    ``GET /admin/spend`` to an app being built.

    Args:
        app: The application (after `setup_observe`, whose metrics registry this uses).
    """
    app.cleanup_ctx.append(_routing_state)
    app.router.add_get("/admin/spend", _spend)


async def _routing_state(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the spend store (Redis with ``shared_state``, else SQLite)."""
    cfg = app[CONFIG]
    store: SpendStore
    if cfg.shared_state is not None:
        # Imported here like the key state's: a router without shared state never loads redis.
        from .spend_store import RedisSpendStore

        store = RedisSpendStore(cfg.shared_state)
    else:
        # Imported here: router.workers imports the console, which imports this module.
        from .workers import worker_role

        # A worker's supervisor prepared the file and cleared its reservations once.
        store = SQLiteSpendStore(str(cfg.spend.path()), clear_reservations=worker_role() is None)
    registry = app[METRICS].registry
    app[ROUTING] = RoutingState(
        Budgets(store),
        Counter(
            "router_route_decisions",
            "Requests by the rule that routed them (none: the model's own list), the provider "
            "that answered and the outcome (served, budget_exceeded, failed).",
            ["rule", "provider", "outcome"],
            registry=registry,
        ),
        Counter("router_spend_usd", "USD spent, by client key.", ["client"], registry=registry),
        Counter(
            "router_spend_tokens", "Tokens spent, by client key.", ["client"], registry=registry
        ),
    )
    try:
        yield
    finally:
        await app[ROUTING].drain()
        await store.close()


def client_of(cfg: Config, name: str | None) -> ClientKeyConfig | None:
    """The client key of a request (by the name auth gave it)."""
    return next((c for c in cfg.auth.clients if c.name == name), None)


def route_request(request: web.Request, ir_request: ir.Request, context: RequestContext) -> None:
    """Decide the request's rule and targets (recorded on ``context`` for the fallback loop,
    the response headers and the log line).

    Args:
        request: The HTTP request (headers).
        ir_request: Its IR.
        context: The request's context.

    Raises:
        GatewayError: No rule takes an ``auto`` request, an unknown model, or a local-only
            request without a local target.
    """
    app = request.app
    cfg = app[CONFIG]
    providers = app[PROVIDERS]
    facts = RouteInput(ir_request, request.headers, client_of(cfg, context.client))
    route = choose_route(cfg, facts, lambda name: providers[name].context_window())
    if route.spill is not None and route.rule is not None:
        state = app[ROUTING]
        spill = state.spills.get(route.rule)
        if spill is None or spill.config != route.spill:
            spill = state.spills[route.rule] = Spillover(route.rule, route.spill)
        load = state.load(route.spill.provider)
        load.queued = providers[route.spill.provider].queue_depth()
        route.targets = spill.order(route.targets, load)
    context.rule = route.rule
    context.targets = route.targets


async def admit_target(
    app: web.Application,
    context: RequestContext,
    request: ir.Request,
    target: Target,
    last_resort: bool = False,
) -> Reservation:
    """Let a target be tried: its circuit must not be open, and the budgets that apply must
    allow the request's estimate, which is reserved.

    Args:
        app: The application.
        context: The request's context.
        request: The IR request.
        target: The target.
        last_resort: Every other target failed: an open circuit does not stop this one.

    Raises:
        CircuitOpenError: The provider's circuit is open.
        BudgetExceededError: A budget is used up.
    """
    cfg = app[CONFIG]
    state = app[ROUTING]
    breaker = state.breaker(cfg, target.provider)
    if not breaker.allow() and not last_resort:
        raise CircuitOpenError(
            f"{target.provider}: skipped, its circuit is open after "
            f"{breaker.failures} failure(s) in a row",
            retry_after=cfg.routing.breaker.cooldown_s,
        )
    try:
        reservation = await state.budgets.reserve(
            cfg, client_of(cfg, context.client), target, request
        )
    except BaseException:
        breaker.abandoned()
        raise
    state.load(target.provider).in_flight += 1
    return reservation


def target_served(app: web.Application, context: RequestContext, reservation: Reservation) -> None:
    """The target answered: its circuit closes and the reservation waits for the request's
    end (`finish_request`).

    Args:
        app: The application.
        context: The request's context.
        reservation: The target's reservation.
    """
    app[ROUTING].breaker(app[CONFIG], reservation.provider).succeeded()
    context.reservation = reservation


def provider_failed(app: web.Application, provider: str) -> None:
    """The provider itself failed an attempt (5xx, overload, timeout, connection): its
    breaker counts it.

    Args:
        app: The application.
        provider: The provider's name.
    """
    app[ROUTING].breaker(app[CONFIG], provider).failed()


async def release_target(app: web.Application, reservation: Reservation) -> None:
    """A target that did not answer gives its reservation and load back.

    Args:
        app: The application.
        reservation: The target's reservation.
    """
    state = app[ROUTING]
    state.breaker(app[CONFIG], reservation.provider).abandoned()
    state.load(reservation.provider).in_flight -= 1
    await state.budgets.settle(reservation, None, app[CONFIG])


async def finish_request(app: web.Application, context: RequestContext, outcome: str) -> None:
    """At the request's end: settle the spend of the target that answered, update its
    provider's load, and count the decision.

    Args:
        app: The application.
        context: The request's context (its usage is complete now).
        outcome: ``served``, ``budget_exceeded`` or ``failed``.
    """
    state = app[ROUTING]
    reservation = context.reservation
    state.decisions.labels(context.rule or "none", context.provider or "none", outcome).inc()
    if reservation is None:
        return
    context.reservation = None
    load = state.load(reservation.provider)
    load.in_flight -= 1
    load.served(time.monotonic() - context.started)
    usage = ir.Usage(context.input_tokens, context.output_tokens)
    context.spend_usd = state.budgets.cost(reservation, usage, app[CONFIG])
    if reservation.held:
        # Written after the answer: the reservation counts meanwhile, so budgets stay enforced.
        state.settle_later(state.budgets.settle(reservation, usage, app[CONFIG]))
    else:
        state.budgets.record(reservation, usage, app[CONFIG])
    client = reservation.client or "none"
    state.spend_usd.labels(client).inc(context.spend_usd)
    state.spend_tokens.labels(client).inc(usage.total_tokens)


async def _spend(request: web.Request) -> web.Response:
    """``GET /admin/spend``: spend and budgets per client key, group and provider."""
    require_admin(request)
    cfg = request.app[CONFIG]
    names = [c.name for c in cfg.auth.clients]
    await request.app[ROUTING].drain()
    report = await request.app[ROUTING].budgets.report(cfg, names)
    return web.json_response(report)
