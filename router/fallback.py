"""Model fallback: a model's targets tried in order, each on as many of its keys as needed."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from . import ir
from .backends import CONFIG, PROVIDERS
from .budgets import BudgetExceededError
from .errors import GatewayError, credential_rejected
from .keys import ACTIVE, DISABLED, KEY_POOLS, Lease, classify_failure, exhausted_limit_reset
from .logs import RequestContext
from .providers.base import BaseProvider
from .routing import CircuitOpenError, admit_target, provider_failed, release_target, target_served
from .rules import resolve_targets

logger = logging.getLogger(__name__)

T = TypeVar("T")
# One attempt: a provider, the request for it, a key lease and the client request's context.
Call = Callable[[BaseProvider, ir.Request, Lease, RequestContext], Awaitable[T]]

# Headers naming a conversation, for key affinity (else the request's user / metadata.user_id).
AFFINITY_HEADERS = ("x-conversation-id", "x-session-affinity")


async def run_with_fallback(
    app: web.Application,
    context: RequestContext,
    request: ir.Request,
    call: Call,
    affinity: str | None = None,
) -> T:
    """Try the model's targets in order, each on as many of its keys as needed.

    Each failure is classified for its key (`classify_failure`): a rate-limited, exhausted or
    rejected key leaves the pool for its time and the request moves to another key (a
    rejected key's error becomes `credential_rejected`, a 502, should it be the last); a 5xx,
    overload or timeout (the provider's trouble, not the key's) moves to the next target
    without blaming the key; any other error is the client's answer at once. Attempts
    and time are bounded by the config's ``retry``. ``call`` must not have sent anything to
    the client, and releases its lease when it succeeds; it records its upstream answer's
    headers on ``context`` (a failure carries them on the error).

    Args:
        app: The application.
        context: The client request's context (attempts, timeouts, upstream headers).
        request: The IR request (``model`` is the client's name).
        call: What to run against one provider, request copy, key lease and the context.
        affinity: A conversation id that keeps the conversation's requests on one key.

    Targets come from the request's routing decision (``context.targets``, see
    `router.routing.route_request`), else the model's own list. Before a target is tried its
    circuit breaker and the budgets must let it (`admit_target`); a target skipped for either
    costs no time, and one skipped for its open circuit is still tried once all the others
    failed.

    Raises:
        GatewayError: The first non-retryable error, else the budget that stopped a target,
            else the last upstream error (or, when no upstream was reached, why no key was
            available).
    """
    cfg = app[CONFIG]
    targets = context.targets
    if targets is None:
        targets = resolve_targets(cfg, request.model)
    deadline = time.monotonic() + cfg.retry.max_time_s
    attempts = 0
    last: GatewayError | None = None
    over_budget: BudgetExceededError | None = None
    # Targets skipped for an open circuit are tried last, when nothing else answered.
    queue = [(target, False) for target in targets]
    for target, last_resort in queue:
        try:
            reservation = await admit_target(app, context, request, target, last_resort)
        except CircuitOpenError as err:
            logger.info("model=%s provider=%s skipped: %s", request.model, target.provider, err)
            queue.append((target, True))
            continue
        except BudgetExceededError as err:
            # On to the next target; should none answer, the budget is what the client hears
            # (it is why the others were not tried), not an upstream's passing error.
            logger.info("model=%s provider=%s skipped: %s", request.model, target.provider, err)
            over_budget = over_budget or err
            continue
        try:
            provider = app[PROVIDERS][target.provider]
            pool = app[KEY_POOLS][target.provider]
            tried: list[str] = []
            while attempts < cfg.retry.max_attempts and time.monotonic() < deadline:
                try:
                    lease = await pool.acquire(affinity, tried, deadline)
                except GatewayError as err:
                    logger.info("model=%s provider=%s: %s", request.model, target.provider, err)
                    last = last or err
                    break
                attempts += 1
                context.attempts.append(provider.config.name)
                context.upstream_headers = {}
                started = time.monotonic()
                try:
                    result = await call(
                        provider, dataclasses.replace(request, model=target.model), lease, context
                    )
                except GatewayError as err:
                    verdict = classify_failure(err, err.upstream_headers or {}, err.upstream_body)
                    lease.fail(verdict)
                    err.message = lease.scrub(err.message)
                    logger.warning(
                        "model=%s provider=%s key=%s upstream_model=%s failed: %s",
                        request.model,
                        target.provider,
                        lease.key_id,
                        target.model,
                        err.message,
                    )
                    if verdict.state == ACTIVE and not err.retryable:
                        raise
                    if verdict.state == ACTIVE:
                        provider_failed(app, target.provider)
                    last = err
                    if verdict.state == DISABLED:
                        # Not the client's fault: its SDK must not read a 401 as its own key's.
                        last = credential_rejected(target.provider, err.status)
                    if verdict.state == ACTIVE or lease.key_id is None:
                        break
                    tried.append(lease.key_id)
                    continue
                except BaseException:
                    lease.release()
                    raise
                # DEBUG: the access line already names the provider and the attempts; this
                # one, on the answer's path, adds the key and the attempt's own time.
                logger.debug(
                    "model=%s provider=%s key=%s upstream_model=%s stream=%s attempt=%d ms=%.1f",
                    request.model,
                    target.provider,
                    lease.key_id,
                    target.model,
                    request.stream,
                    attempts,
                    (time.monotonic() - started) * 1000,
                )
                rest = exhausted_limit_reset(context.upstream_headers, time.time())
                if rest:
                    # The upstream says this key's limit is used up: no more traffic until reset.
                    lease.rest(rest, "rate limit used up (remaining 0)")
                target_served(app, context, reservation)
                return result
        finally:
            if context.reservation is not reservation:
                await release_target(app, reservation)
    raise over_budget or last


def request_affinity(request: web.Request, ir_request: ir.Request) -> str | None:
    """The conversation a request belongs to, for key affinity.

    Args:
        request: The HTTP request (``x-conversation-id`` / ``x-session-affinity`` headers).
        ir_request: Its IR (``user``: OpenAI ``user``, Anthropic ``metadata.user_id``).
    """
    for name in AFFINITY_HEADERS:
        if request.headers.get(name):
            return request.headers[name]
    return ir_request.user or None
