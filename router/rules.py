"""Routing rules: which targets serve a request, decided on its IR (never on a raw body).

The config's ``routing.rules`` are evaluated in order and the first whose condition holds
gives the targets (then its ``fallback``). A request that no rule takes goes to its model's
own list (an alias or ``provider/model``); the ``auto`` model is decided by rules alone.
Whatever decided, a request carrying the local-only header keeps only local targets.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

from . import ir
from .config import (
    ClientKeyConfig,
    ConditionConfig,
    Config,
    RuleConfig,
    SpilloverConfig,
    Target,
    is_local_provider,
)
from .errors import InvalidRequestError, NotFoundError
from .providers.base import estimate_tokens

# Values of the local-only header that do not ask for it.
_OFF = ("", "0", "false", "no", "off")
# The context window of a provider, when the router knows it (`BaseProvider.context_window`).
ContextWindow = Callable[[str], "int | None"]


@dataclass
class RouteInput:
    """What conditions look at besides the IR request.

    Args:
        request: The IR request (``model`` is the client's name).
        headers: The HTTP request's headers (case-insensitive mapping).
        client: The client key that authenticated it (None without client auth).
    """

    request: ir.Request
    headers: Mapping[str, str]
    client: ClientKeyConfig | None = None

    @cached_property
    def prompt_tokens(self) -> int:
        """The request's estimated prompt tokens, walked once however many rules read it."""
        return estimate_tokens(self.request)


@dataclass
class Route:
    """The decision: the rule that matched (None: the model's own list), the targets in order
    and the rule's spillover policy."""

    rule: str | None
    targets: list[Target]
    spill: SpilloverConfig | None = None


def resolve_targets(cfg: Config, model: str) -> list[Target]:
    """The fallback list for a requested model: an alias, or ``provider/model``.

    Args:
        cfg: The config.
        model: The model the client asked for.

    Raises:
        NotFoundError: If the model is neither.
    """
    if model in cfg.models:
        return cfg.models[model]
    provider, sep, name = model.partition("/")
    if sep and name and provider in cfg.providers:
        return [Target(provider, name)]
    raise NotFoundError(f"model {model!r} is not configured on this router", param="model")


def choose_route(cfg: Config, facts: RouteInput, context_window: ContextWindow) -> Route:
    """The first rule whose condition holds, else the requested model's own targets; local
    targets only for a local-only request.

    Args:
        cfg: The config.
        facts: The request and what else conditions read.
        context_window: A provider's context window by name (for ``exceeds_context_of``).

    Raises:
        NotFoundError: No rule took an ``auto`` request, or the model is not configured.
        InvalidRequestError: A local-only request whose targets are all cloud.
    """
    routing = cfg.routing
    route = None
    for rule in routing.rules:
        if condition_holds(rule.condition, facts, routing.local_only_header, context_window):
            route = Route(rule.name, rule_targets(rule), rule.spill)
            break
    if route is None:
        if facts.request.model == routing.auto_model:
            raise NotFoundError(
                f"no routing rule matched this request for model {routing.auto_model!r}",
                param="model",
            )
        route = Route(None, resolve_targets(cfg, facts.request.model))
    if is_local_only(facts.headers, routing.local_only_header):
        local = [t for t in route.targets if is_local_provider(cfg.providers[t.provider])]
        if not local:
            raise InvalidRequestError(
                f"{routing.local_only_header}: model {facts.request.model!r} has no local "
                "target, and this request may not leave the machine",
                param=routing.local_only_header,
            )
        route.targets = local
    return route


def rule_targets(rule: RuleConfig) -> list[Target]:
    """A rule's targets then its fallback, each once.

    Args:
        rule: The rule.
    """
    seen: list[Target] = []
    for target in rule.target_list + rule.fallback_list:
        if target not in seen:
            seen.append(target)
    return seen


def condition_holds(
    when: ConditionConfig,
    facts: RouteInput,
    local_only_header: str,
    context_window: ContextWindow,
) -> bool:
    """Whether every part of a rule's condition holds for a request.

    Args:
        when: The condition.
        facts: The request and what else conditions read.
        local_only_header: The header that keeps a request local.
        context_window: A provider's context window by name.
    """
    request = facts.request
    checks: list[Callable[[], bool]] = []
    if when.media is not None:
        checks.append(lambda: bool(media_kinds(request) & set(when.media)))
    if when.tools is not None:
        checks.append(lambda: bool(request.tools) == when.tools)
    if when.json_output is not None:
        checks.append(lambda: wants_json(request) == when.json_output)
    if when.stream is not None:
        checks.append(lambda: request.stream == when.stream)
    if when.local_only is not None:
        checks.append(lambda: is_local_only(facts.headers, local_only_header) == when.local_only)
    for name, value in when.headers.items():
        checks.append(lambda n=name, v=value: _header_matches(facts.headers, n, v))
    if when.clients is not None:
        checks.append(lambda: facts.client is not None and facts.client.name in when.clients)
    if when.groups is not None:
        checks.append(lambda: facts.client is not None and facts.client.group in when.groups)
    if when.models is not None:
        checks.append(lambda: any(fnmatch.fnmatchcase(request.model, m) for m in when.models))
    if when.prompt_tokens_above is not None:
        checks.append(lambda: facts.prompt_tokens > when.prompt_tokens_above)
    if when.exceeds_context_of is not None:
        checks.append(lambda: _exceeds_context(facts, context_window(when.exceeds_context_of)))
    # Cheap checks first; the token estimate walks the whole conversation.
    return all(check() for check in checks)


def media_kinds(request: ir.Request) -> set[str]:
    """The kinds of media a request holds (``image``, ``video``, ``audio``, ``pdf``, ``file``),
    tool results included.

    Args:
        request: The IR request.
    """
    kinds = set()
    for message in request.messages:
        for part in message.parts:
            inner = part.content if isinstance(part, ir.ToolResultPart) else [part]
            for item in inner:
                if isinstance(item, ir.MediaPart):
                    major = item.media_type.split("/", 1)[0]
                    kinds.add("video" if major == "video" else item.kind)
    return kinds


def wants_json(request: ir.Request) -> bool:
    """Whether the request asks for JSON output (``json_object`` or ``json_schema``).

    Args:
        request: The IR request.
    """
    return request.response_format is not None and request.response_format.type != "text"


def is_local_only(headers: Mapping[str, str], header: str) -> bool:
    """Whether a request carries the local-only header (any value but 0/false/no/off).

    Args:
        headers: The request's headers (case-insensitive mapping).
        header: The header's name.
    """
    return header in headers and headers[header].strip().lower() not in _OFF


def _header_matches(headers: Mapping[str, str], name: str, value: str) -> bool:
    if name not in headers:
        return False
    return value == "*" or headers[name].strip().lower() == value.lower()


def _exceeds_context(facts: RouteInput, window: int | None) -> bool:
    """The prompt estimate plus the output asked for does not fit the window."""
    if window is None:
        return False
    return facts.prompt_tokens + (facts.request.max_tokens or 0) > window
