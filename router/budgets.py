"""Budgets: spend limits per client key, group of keys and provider, in tokens and USD per UTC
day and month, checked before a request is forwarded.

Before each target is tried, the request reserves its estimate (prompt tokens plus its
``max_tokens``, at the target's price) on every counter it will spend on, in one atomic
check-and-reserve of the spend store, refused when a counter with a limit has spent plus
reserved at or past it. When the request ends, the reservation becomes the tokens and USD it
really used. So a budget is never exceeded by more than what the requests already in flight
when it ran out use beyond their estimates. A local target costs no USD, so USD limits never
stop it: over a USD budget, a rule's local fallback still serves.

The spend of a request no budget applies to reserves nothing and is only recorded: it is
summed per set of counters and written every `RECORD_EVERY_S` seconds (a write per request
costs more than the rest of the request), before any reservation of this router, and
before a spend report.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial

from . import ir
from .config import BudgetConfig, ClientKeyConfig, Config, Target
from .errors import OverloadedError, RateLimitError
from .pricing import FREE, cost_usd, price_of
from .providers.base import estimate_tokens
from .spend_store import Counter, SpendStore, SpendStoreUnavailable

logger = logging.getLogger(__name__)

PERIODS = ("day", "month")
# How long the spend of requests without a budget waits to be written with the others'.
RECORD_EVERY_S = 0.5


class BudgetExceededError(RateLimitError):
    """A budget is used up (429 in the client's format, naming the budget)."""


@dataclass
class Reservation:
    """What one request reserved on its counters for one target."""

    keys: list[str]
    tokens: int
    usd: float
    provider: str
    model: str
    client: str | None
    # Whether the store holds it (only when a budget applies; else spend is just recorded).
    held: bool = False
    settled: bool = field(default=False, repr=False)
    # Names a held reservation in the spend store (each is settled once).
    id: str = ""


def period_keys(now: float) -> dict[str, str]:
    """The current period of each kind, as counter key suffixes (UTC).

    Args:
        now: Epoch seconds.
    """
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    return {"day": f"day:{day}", "month": f"month:{day[:7]}"}


def seconds_to_reset(period: str, now: float) -> float:
    """Seconds until the period (``day`` or ``month``) that holds ``now`` ends (UTC).

    Args:
        period: ``day`` or ``month``.
        now: Epoch seconds.
    """
    t = time.gmtime(now)
    if period == "day":
        end = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400
    else:
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
    return max(1.0, end - now)


def scopes_of(client: ClientKeyConfig | None, provider: str) -> list[str]:
    """The budget scopes a request spends on: its client key, the key's group, the provider.

    Args:
        client: The client key (None without client auth).
        provider: The target's provider.
    """
    scopes = []
    if client is not None:
        scopes.append(f"client:{client.name}")
        if client.group:
            scopes.append(f"group:{client.group}")
    scopes.append(f"provider:{provider}")
    return scopes


def write_in_background(writes: set[asyncio.Task], write: Coroutine[None, None, object]) -> None:
    """Run a spend write as a task held in ``writes`` until it ends; a failure is logged.

    Args:
        writes: The owner's writes under way (``writes_done`` waits for them).
        write: The write.
    """
    task = asyncio.get_running_loop().create_task(write)
    writes.add(task)
    task.add_done_callback(partial(_written, writes))


def _written(writes: set[asyncio.Task], task: asyncio.Task) -> None:
    writes.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("spend not recorded", exc_info=task.exception())


async def writes_done(writes: set[asyncio.Task]) -> None:
    """Wait for the writes under way, and for any they start meanwhile.

    Args:
        writes: A set ``write_in_background`` fills.
    """
    while writes:
        await asyncio.wait(list(writes))


class Budgets:
    """Checks, reserves and settles spend against the config's budgets.

    Args:
        store: Where the counters live.
        clock: Epoch seconds (tests move it).
    """

    def __init__(self, store: SpendStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._unpriced: set[str] = set()
        # Spend not written yet, of requests without a budget: counter keys -> [tokens, usd].
        self._unwritten: dict[tuple[str, ...], list] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task] = set()

    async def reserve(
        self,
        cfg: Config,
        client: ClientKeyConfig | None,
        target: Target,
        request: ir.Request,
    ) -> Reservation:
        """Reserve a request's estimate for one target.

        Args:
            cfg: The config (budgets, prices).
            client: The client key.
            target: The target about to be tried.
            request: The IR request.

        Raises:
            BudgetExceededError: A budget that applies is used up; the message names it.
        """
        price = price_of(cfg, target.provider, target.model)
        if price is None and target.model not in self._unpriced:
            self._unpriced.add(target.model)
            logger.warning(
                "no price for model %s of provider %s: its spend counts 0 USD (add it under "
                "pricing)",
                target.model,
                target.provider,
            )
        now = self.clock()
        counters, owners = self._counters(cfg, client, target.provider, now, price is FREE)
        keys, name = [c.key for c in counters], client and client.name
        if not any(c.max_tokens is not None or c.max_usd is not None for c in counters):
            # Nothing to enforce, so no estimate: spend is only recorded when settled.
            return Reservation(keys, 0, 0.0, target.provider, target.model, name)
        # A budget counts on every counter's total: first the spend recorded so far.
        await self.flush()
        prompt = estimate_tokens(request)
        tokens = prompt + (request.max_tokens or 0)
        usd = cost_usd(price, prompt, request.max_tokens or 0)
        reservation = Reservation(
            keys, tokens, usd, target.provider, target.model, name, id=uuid.uuid4().hex
        )
        try:
            refused = await self.store.reserve(reservation.id, counters, tokens, usd)
        except SpendStoreUnavailable as err:
            raise OverloadedError(
                f"budgets cannot be checked, the spend store is unreachable ({err})",
                retry_after=1.0,
            ) from err
        if refused is None:
            reservation.held = True
            return reservation
        budget, period = owners[refused]
        limit = counters[refused]
        which = [
            f"{kind}_per_{period} {value:g}"
            for kind, value in (("tokens", limit.max_tokens), ("usd", limit.max_usd))
            if value is not None
        ]
        raise BudgetExceededError(
            f"budget exceeded: {budget.scope} has used up its {' / '.join(which)} budget "
            f"(this {period} resets at 00:00 UTC)",
            retry_after=seconds_to_reset(period, now),
        )

    def _counters(
        self,
        cfg: Config,
        client: ClientKeyConfig | None,
        provider: str,
        now: float,
        free: bool,
    ) -> tuple[list[Counter], list[tuple[BudgetConfig | None, str]]]:
        """The request's counters (each scope in each period) with their limits, and which
        budget and period each limit comes from."""
        budgets = {b.scope: b for b in cfg.budgets}
        periods = period_keys(now)
        counters, owners = [], []
        for scope in scopes_of(client, provider):
            budget = budgets.get(scope)
            limits = budget.limits() if budget is not None else {}
            for period, suffix in periods.items():
                max_usd = None if free else limits.get(f"usd_per_{period}")
                counters.append(
                    Counter(f"{scope}|{suffix}", limits.get(f"tokens_per_{period}"), max_usd)
                )
                owners.append((budget, period))
        return counters, owners

    @staticmethod
    def cost(reservation: Reservation, usage: ir.Usage | None, cfg: Config) -> float:
        """The USD a reservation's request used.

        Args:
            reservation: The reservation (its provider and model).
            usage: The tokens used (None: none).
            cfg: The config (prices).
        """
        if usage is None:
            return 0.0
        price = price_of(cfg, reservation.provider, reservation.model)
        return cost_usd(price, usage.input_tokens, usage.output_tokens)

    async def settle(self, reservation: Reservation, usage: ir.Usage | None, cfg: Config) -> float:
        """Turn a reservation into what the request used (nothing, for a failed attempt).

        Args:
            reservation: The reservation.
            usage: The tokens used (None: the attempt failed and used none).
            cfg: The config (prices).

        Returns:
            The USD spent.
        """
        if not reservation.held:
            return self.record(reservation, usage, cfg)
        spent = self._settle_once(reservation, usage, cfg)
        if spent is None:
            return 0.0
        tokens, usd = spent
        await self.store.settle(
            reservation.id, reservation.keys, reservation.tokens, reservation.usd, tokens, usd
        )
        return usd

    def record(self, reservation: Reservation, usage: ir.Usage | None, cfg: Config) -> float:
        """Settle a reservation the store does not hold (no budget applies): its spend joins
        the next write (`RECORD_EVERY_S`), so nothing waits for the store.

        Args:
            reservation: The reservation.
            usage: The tokens used (None: the attempt failed and used none).
            cfg: The config (prices).

        Returns:
            The USD spent.
        """
        spent = self._settle_once(reservation, usage, cfg)
        if spent is None:
            return 0.0
        tokens, usd = spent
        if not tokens and not usd:
            return usd
        total = self._unwritten.setdefault(tuple(reservation.keys), [0, 0.0])
        total[0] += tokens
        total[1] += usd
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RECORD_EVERY_S, self._write_due)
        return usd

    def _settle_once(
        self, reservation: Reservation, usage: ir.Usage | None, cfg: Config
    ) -> tuple[int, float] | None:
        """Mark the reservation settled and return its ``(tokens, USD)``, or None if it already
        was (a request's spend counts once)."""
        if reservation.settled:
            return None
        reservation.settled = True
        tokens = usage.total_tokens if usage is not None else 0
        return tokens, self.cost(reservation, usage, cfg)

    def _write_due(self) -> None:
        self._timer = None
        write_in_background(self._writes, self._write(self._take()))

    def _take(self) -> dict[tuple[str, ...], list]:
        taken, self._unwritten = self._unwritten, {}
        return taken

    async def _write(self, spend: dict[tuple[str, ...], list]) -> None:
        for keys, (tokens, usd) in spend.items():
            await self.store.settle(uuid.uuid4().hex, list(keys), 0, 0.0, tokens, usd)

    async def flush(self) -> None:
        """Write the recorded spend of requests without a budget now, and wait for the writes
        under way."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._write(self._take())
        await writes_done(self._writes)

    async def report(self, cfg: Config, clients: list[str]) -> dict:
        """Spend per client key (and group, and provider) today and this month, with the
        budgets that apply and what remains of them, for ``GET /admin/spend``.

        Args:
            cfg: The config.
            clients: The client keys' names.
        """
        scopes = [f"client:{name}" for name in clients]
        scopes += sorted({f"group:{c.group}" for c in cfg.auth.clients if c.group})
        scopes += [f"provider:{name}" for name in cfg.providers]
        periods = period_keys(self.clock())
        keys = [f"{scope}|{suffix}" for scope in scopes for suffix in periods.values()]
        try:
            totals = await self.store.read(keys)
        except SpendStoreUnavailable as err:
            raise OverloadedError(f"the spend store is unreachable ({err})") from err
        budgets = {b.scope: b for b in cfg.budgets}
        out: dict[str, dict] = {"clients": {}, "groups": {}, "providers": {}}
        section = {"client": "clients", "group": "groups", "provider": "providers"}
        for scope in scopes:
            kind, name = scope.split(":", 1)
            entry: dict = {}
            limits = budgets[scope].limits() if scope in budgets else {}
            for period, suffix in periods.items():
                t = totals[f"{scope}|{suffix}"]
                spent = {"tokens": t.tokens, "usd": round(t.usd, 9)}
                spent["in_flight"] = {"tokens": t.reserved_tokens, "usd": round(t.reserved_usd, 9)}
                for unit in ("tokens", "usd"):
                    limit = limits.get(f"{unit}_per_{period}")
                    if limit is not None:
                        spent.setdefault("budget", {})[unit] = limit
                        spent.setdefault("remaining", {})[unit] = max(0, limit - spent[unit])
                entry["today" if period == "day" else "this_month"] = spent
            out[section[kind]][name] = entry
        return out
