"""Structured logs: the per-request context (request id, what served it, its upstream
timeouts), a JSON or text formatter carrying the request id, and redaction of secrets from
every line.

The serving code gets the context from the request (`REQUEST_CONTEXT`) and passes it down;
the context variable behind `current_request` exists so that log lines carry the request id.

Library modules only log through ``logging.getLogger(__name__)``; `configure_logging` (called
by the command line, again after a config reload) installs the router's handler.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

import orjson
from aiohttp import web

from . import ir
from .config import Config, LogConfig, TimeoutsConfig

# Client-sent request ids are kept when they look like ids; anything else is replaced.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The attributes every LogRecord has; the others came from ``extra=`` and are logged as fields.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}
_HANDLER_NAME = "router"


@dataclass
class RequestContext:
    """What one client request did, filled in as it runs (for the access log and metrics), and
    the state its upstream attempts share: the timeouts in force and the current attempt's
    upstream headers. The serving code passes it down explicitly.

    Args:
        id: The request id (``x-request-id``).
        started: Monotonic start time.
    """

    id: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    client: str | None = None
    # Providers of the upstream attempts, in order.
    attempts: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    # The upstream timeouts in force when the request started.
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # The headers of the current attempt's upstream answer (lower-case names), for the key
    # pool's rate-limit reading.
    upstream_headers: dict[str, str] = field(default_factory=dict)

    @property
    def provider(self) -> str | None:
        """The provider of the last attempt (the one that answered, if any did)."""
        return self.attempts[-1] if self.attempts else None

    def count_usage(self, usage: ir.Usage) -> None:
        """Add an answer's token usage (for the request's metrics).

        Args:
            usage: The usage the upstream reported.
        """
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens


# Where the observe middleware puts the context for the handlers.
REQUEST_CONTEXT = web.RequestKey("request_context", RequestContext)


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "router_request", default=None
)


def start_request(header: str | None) -> RequestContext:
    """Open the context of a new request in the current task (tasks it starts inherit it).

    Args:
        header: The client's ``x-request-id``, kept when it looks like an id.
    """
    rid = header if header and _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex
    context = RequestContext(rid)
    _CURRENT.set(context)
    return context


def current_request() -> RequestContext | None:
    """The context of the request being served, or None outside of one."""
    return _CURRENT.get()


def secrets_of(cfg: Config) -> list[str]:
    """Every secret string a config holds: provider keys, router keys given in plain, and the
    password in the shared state's Redis URL.

    Args:
        cfg: The config.
    """
    found = [k.key for p in cfg.providers.values() for k in p.key_configs]
    found += [c.key for c in cfg.auth.clients if not c.key.startswith("sha256:")]
    if cfg.auth.admin_key and not cfg.auth.admin_key.startswith("sha256:"):
        found.append(cfg.auth.admin_key)
    if cfg.shared_state is not None and cfg.shared_state.redis_url:
        password = urllib.parse.urlsplit(cfg.shared_state.redis_url).password
        if password:
            found.append(password)
    return found


class Redactor:
    """Replaces known secrets in text with ``[redacted]``.

    Args:
        secrets: The strings to hide.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        """Replace the set of secrets (after a config reload).

        Args:
            secrets: The strings to hide.
        """
        # Longest first, so that a key containing another is hidden whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` without any secret.

        Args:
            text: Any text.
        """
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``request_id``, the
    record's ``extra=`` fields and ``exc`` (the traceback), all with secrets redacted.

    Args:
        redactor: Hides secrets.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        """See `logging.Formatter.format`."""
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = current_request()
        if context is not None:
            out["request_id"] = context.id
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redactor.scrub(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message``, with secrets redacted.

    Args:
        redactor: Hides secrets.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        """See `logging.Formatter.format`."""
        text = super().format(record)
        context = current_request()
        if context is not None:
            text = f"{text} request_id={context.id}"
        return self.redactor.scrub(text)


def configure_logging(cfg: LogConfig, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Install (or replace) the router's log handler on the root logger; a handler
    ``logging.basicConfig`` put there is replaced too, so lines are not written twice.

    Args:
        cfg: Format (json or text) and level.
        secrets: Strings no log line may contain (see `secrets_of`).
        stream: Where to write (default stderr).
    """
    root = logging.getLogger()
    # Ours from before, and a plain stderr handler (``logging.basicConfig``'s), are replaced.
    for handler in list(root.handlers):
        plain = type(handler) is logging.StreamHandler and handler.stream is sys.stderr
        if handler.get_name() == _HANDLER_NAME or plain:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    redactor = Redactor(secrets)
    handler.setFormatter(
        JSONFormatter(redactor) if cfg.format == "json" else TextFormatter(redactor)
    )
    root.addHandler(handler)
    root.setLevel(cfg.level)
