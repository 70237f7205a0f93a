"""The request log: one row per client request (when, which client key by name, model,
provider, attempts, status, latency, tokens, cost, error) in SQLite, bodies only when
``request_log.bodies`` is on, every configured secret redacted before it is stored.

Serving a request only appends its row to an in-memory buffer; a background task writes the
buffer in batches on a thread of its own, so the event loop never waits for the disk. When the
store cannot be written (a missing directory, a full disk), the rows stay buffered and are
retried at every flush; the admin API then answers 503 saying so, and requests are served as
usual. ``GET /admin/requests`` searches the log and ``GET /admin/stats`` summarises a window.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from aiohttp import web

from .auth import ADMIN_PREFIX, CONSOLE_PREFIX, OPEN_PATHS, require_admin
from .backends import CONFIG
from .config import RequestLogConfig
from .errors import GatewayError, InvalidRequestError, NotFoundError
from .logs import REQUEST_CONTEXT, Redactor, RequestContext, secrets_of
from .reload import RELOAD_HOOKS

logger = logging.getLogger(__name__)

# Stored bodies are cut at this many characters (an inline image is megabytes of base64).
BODY_MAX_CHARS = 64 * 1024
# Rows kept in memory while the store is unavailable; past it the oldest are dropped (and
# counted), so a long outage cannot exhaust the router's memory.
MAX_PENDING = 100_000
# How often old rows are deleted and the size bound enforced.
RETENTION_EVERY_S = 60.0
# Paths that are not client requests: probes, the admin API and the console (its playground
# excepted, whose chats are client requests like any other).
UNLOGGED_PREFIXES = (ADMIN_PREFIX, CONSOLE_PREFIX)
UNLOGGED_PATHS = OPEN_PATHS
PLAYGROUND_PATH = "/ui/api/chat/completions"
PAGE_MAX = 500
# Rows per write transaction: a backlog after an outage goes in several flushes.
FLUSH_ROWS = 5000


@dataclass
class LoggedRequest:
    """One row of the log (the columns of the ``requests`` table, in order)."""

    ts: float  # epoch seconds at the start
    request_id: str
    method: str
    path: str
    client: str | None
    model: str | None
    provider: str | None
    attempts: str  # the providers tried, comma-separated
    rule: str | None
    status: int
    latency_ms: float
    input_tokens: int
    output_tokens: int
    cost: float | None
    error: str | None
    request_body: str | None
    response_body: str | None


COLUMNS = [f.name for f in fields(LoggedRequest)]
# Columns of a listing (bodies only in a single row's view).
LIST_COLUMNS = ["id"] + [c for c in COLUMNS if not c.endswith("_body")]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL, request_id TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
    client TEXT, model TEXT, provider TEXT, attempts TEXT NOT NULL, rule TEXT,
    status INTEGER NOT NULL, latency_ms REAL NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cost REAL, error TEXT, request_body TEXT, response_body TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
"""
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# Text columns that may quote a secret (the request id too: it may be the client's own).
_SCRUBBED = ("request_id", "path", "client", "model", "error", "request_body", "response_body")
# Text search looks in these columns.
_SEARCHED = ("request_id", "path", "client", "model", "provider", "error", "request_body")


class StoreUnavailableError(GatewayError):
    """The request log's store cannot be read or written."""

    status = 503


@dataclass
class Query:
    """Filters of ``GET /admin/requests``; None matches everything.

    Args:
        text: Substring of the request id, path, client, model, provider, error or body.
        status: ``200``, ``4xx``, ``5xx`` or ``error`` (any status >= 400).
    """

    text: str | None = None
    model: str | None = None
    provider: str | None = None
    client: str | None = None
    status: str | None = None
    request_id: str | None = None
    limit: int = 50
    offset: int = 0

    def where(self) -> tuple[str, list]:
        """The SQL condition and its parameters."""
        terms, args = ["1"], []
        for column in ("model", "provider", "client", "request_id"):
            value = getattr(self, column)
            if value:
                terms.append(f"{column} = ?")
                args.append(value)
        if self.text:
            like = "%" + self.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like += "%"
            terms.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in _SEARCHED) + ")")
            args += [like] * len(_SEARCHED)
        if self.status:
            terms.append(_status_term(self.status))
        return " AND ".join(terms), args


def _status_term(status: str) -> str:
    if status == "error":
        return "status >= 400"
    if len(status) == 3 and status[0] in "12345" and status[1:] == "xx":
        low = int(status[0]) * 100
        return f"status >= {low} AND status < {low + 100}"
    if status.isdigit() and len(status) == 3:
        return f"status = {int(status)}"
    raise InvalidRequestError(
        f"status: {status!r} is not a status (200), a class (4xx) or 'error'", param="status"
    )


class RequestLog:
    """The buffered SQLite store of the request log.

    Args:
        cfg: Where the file is and how long rows are kept.
        secrets: Strings no stored field may contain.
    """

    def __init__(self, cfg: RequestLogConfig, secrets: list[str]) -> None:
        self.cfg = cfg
        self.redactor = Redactor(secrets)
        # Rows as tuples (made on the loop), so the writer thread runs SQLite's C code only
        # and holds the GIL as little as possible.
        self.pending: deque[tuple] = deque()
        self.dropped = 0
        # Why the store failed last (None while it works).
        self.error: str | None = None
        self._db: sqlite3.Connection | None = None
        # One thread owns the connection: every read and write runs there, in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-log")
        self._last_retention = -math.inf  # due at the first flush

    # ---- writing ------------------------------------------------------------------------------

    def record(self, entry: LoggedRequest) -> None:
        """Buffer one finished request (its text fields redacted); never blocks or raises.

        Args:
            entry: The request's row.
        """
        for name in _SCRUBBED:
            value = getattr(entry, name)
            if value:
                setattr(entry, name, self.redactor.scrub(value))
        self.pending.append(tuple(vars(entry).values()))
        if len(self.pending) > MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            if self.dropped == 1:
                logger.error("request log buffer full (%d rows): dropping the oldest", MAX_PENDING)

    async def flush(self) -> bool:
        """Write the buffered rows (and apply retention when it is due).

        Returns:
            Whether the store took them; if not, they stay buffered for the next flush.
        """
        batch = list(itertools.islice(self.pending, FLUSH_ROWS))
        dropped = self.dropped
        try:
            if batch:
                await self._call(self._write, batch)
                # Rows dropped meanwhile (a full buffer) were the oldest: this batch's first.
                for _ in range(max(0, len(batch) - (self.dropped - dropped))):
                    self.pending.popleft()
            if time.monotonic() - self._last_retention >= RETENTION_EVERY_S:
                await self._call(self.apply_retention)
                self._last_retention = time.monotonic()
        except (sqlite3.Error, OSError) as err:
            if self.error is None:
                logger.error("request log store unavailable, rows stay buffered: %s", err)
            self.error = str(err)
            self._close()
            return False
        if self.error is not None:
            logger.info("request log store is back; buffered rows written")
        self.error = None
        return True

    def _write(self, batch: list[tuple]) -> None:
        db = self._connection()
        with db:
            db.executemany(_INSERT, batch)

    def apply_retention(self, now: float | None = None) -> int:
        """Delete rows older than ``max_age_s``, then the oldest until the store is under
        ``max_bytes`` (runs on the store's thread).

        Args:
            now: Epoch seconds (default: now).

        Returns:
            How many rows were deleted.
        """
        db = self._connection()
        now = time.time() if now is None else now
        with db:
            deleted = db.execute(
                "DELETE FROM requests WHERE ts < ?", (now - self.cfg.max_age_s,)
            ).rowcount
        while self._size(db) > self.cfg.max_bytes:
            (rows,) = db.execute("SELECT COUNT(*) FROM requests").fetchone()
            if not rows:
                break
            # A tenth of the rows at a time: the size shrinks in a few steps.
            with db:
                deleted += db.execute(
                    "DELETE FROM requests WHERE id IN "
                    "(SELECT id FROM requests ORDER BY id LIMIT ?)",
                    (max(1, rows // 10),),
                ).rowcount
            # Gives the freed pages back to the file system (at the next checkpoint in WAL
            # mode). executescript runs it to completion; execute() leaves it unstepped.
            db.executescript("PRAGMA incremental_vacuum;")
        return deleted

    @staticmethod
    def _size(db: sqlite3.Connection) -> int:
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        return (pages - free) * page_size

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.cfg.path)
            # Set before the table exists, so deleted rows can give their pages back.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            self._thread.submit(db.close)

    async def _call(self, fn: Callable, *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def close(self) -> None:
        """Write what is buffered (if the store takes it) and close the store."""
        while await self.flush() and self.pending:
            pass
        self._close()
        self._thread.shutdown(wait=True)

    # ---- reading ------------------------------------------------------------------------------

    def status(self) -> dict:
        """The store's health: ``available``, ``error``, ``pending`` rows, ``dropped`` rows."""
        return {
            "available": self.error is None,
            "error": self.error,
            "pending": len(self.pending),
            "dropped": self.dropped,
        }

    async def search(self, query: Query) -> dict:
        """One page of rows, newest first: ``{"requests": [...], "total": n}``.

        Raises:
            StoreUnavailableError: If the store cannot be read.
        """
        return await self._read(self._search, query)

    async def get(self, row_id: int) -> dict | None:
        """One row with its bodies, or None.

        Raises:
            StoreUnavailableError: If the store cannot be read.
        """
        return await self._read(self._get, row_id)

    async def stats(self, window_s: float, buckets: int = 30) -> dict:
        """Totals, latency percentiles, a time series and per-client and per-model breakdowns
        of the last ``window_s`` seconds.

        Raises:
            StoreUnavailableError: If the store cannot be read.
        """
        return await self._read(self._stats, window_s, buckets)

    async def _read(self, fn: Callable, *args: object) -> dict:
        if self.error is not None:
            raise StoreUnavailableError(self._unavailable(self.error))
        try:
            return await self._call(fn, *args)
        except (sqlite3.Error, OSError) as err:
            raise StoreUnavailableError(self._unavailable(str(err))) from err

    def _unavailable(self, reason: str) -> str:
        n = len(self.pending)
        buffered = f"{n} requests are" if n != 1 else "1 request is"
        return (
            f"the request log store is unavailable ({reason}); {buffered} buffered and will "
            "be written when it is back"
        )

    def _rows(self, sql: str, args: list | tuple = ()) -> list[dict]:
        cursor = self._connection().execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _search(self, query: Query) -> dict:
        where, args = query.where()
        db = self._connection()
        (total,) = db.execute(f"SELECT COUNT(*) FROM requests WHERE {where}", args).fetchone()
        rows = self._rows(
            f"SELECT {', '.join(LIST_COLUMNS)} FROM requests WHERE {where} "
            "ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, query.limit, query.offset],
        )
        return {"requests": rows, "total": total}

    def _get(self, row_id: int) -> dict | None:
        rows = self._rows(f"SELECT id, {', '.join(COLUMNS)} FROM requests WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def _stats(self, window_s: float, buckets: int) -> dict:
        now = time.time()
        start = now - window_s
        width = window_s / buckets
        db = self._connection()
        (count, errors, tokens_in, tokens_out, cost) = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status >= 400), 0), COALESCE(SUM(input_tokens), 0), "
            "COALESCE(SUM(output_tokens), 0), SUM(cost) FROM requests WHERE ts >= ?",
            (start,),
        ).fetchone()
        series = [
            {"t": start + i * width, "requests": 0, "errors": 0, "latency_ms": None, "tokens": 0}
            for i in range(buckets)
        ]
        for row in self._rows(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS bucket, COUNT(*) AS requests, "
            "SUM(status >= 400) AS errors, AVG(latency_ms) AS latency_ms, "
            "SUM(input_tokens + output_tokens) AS tokens FROM requests WHERE ts >= ? "
            "GROUP BY bucket",
            (start, width, start),
        ):
            bucket = min(row.pop("bucket"), buckets - 1)
            series[bucket].update(row)
        by = "COUNT(*) AS requests, SUM(status >= 400) AS errors, SUM(input_tokens) AS "
        by += "input_tokens, SUM(output_tokens) AS output_tokens, SUM(cost) AS cost, "
        by += "MAX(ts) AS last_ts FROM requests WHERE ts >= ?"
        return {
            "window_s": window_s,
            "requests": count,
            "rps": count / window_s,
            "errors": errors,
            "latency_ms": {
                "p50": self._percentile(db, start, count, 0.5),
                "p95": self._percentile(db, start, count, 0.95),
            },
            "tokens": {"input": tokens_in, "output": tokens_out},
            "cost": cost,
            "series": series,
            "clients": self._rows(
                f"SELECT client, {by} GROUP BY client ORDER BY requests DESC", (start,)
            ),
            "models": self._rows(
                f"SELECT model, provider, {by} GROUP BY model, provider ORDER BY requests DESC",
                (start,),
            ),
        }

    @staticmethod
    def _percentile(db: sqlite3.Connection, start: float, count: int, q: float) -> float | None:
        """The nearest-rank ``q`` quantile of the window's latencies."""
        if not count:
            return None
        rank = max(0, min(count - 1, int(q * count + 0.5) - 1))
        (value,) = db.execute(
            "SELECT latency_ms FROM requests WHERE ts >= ? ORDER BY latency_ms LIMIT 1 OFFSET ?",
            (start, rank),
        ).fetchone()
        return value


# The app's request log (see `setup_request_log`).
REQUEST_LOG = web.AppKey("request_log", RequestLog)


def setup_request_log(app: web.Application) -> None:
    """Add the request log, its flusher and its admin routes to an app being built.

    Args:
        app: The application (`router.reload.setup_reload` already called: a reload updates
            the secrets to redact).
    """
    cfg = app[CONFIG]
    log = RequestLog(cfg.request_log, secrets_of(cfg))
    app[REQUEST_LOG] = log
    app[RELOAD_HOOKS].append(lambda new: log.redactor.update(secrets_of(new)))
    app.cleanup_ctx.append(_flusher)
    app.router.add_get("/admin/requests", _list_requests)
    app.router.add_get("/admin/requests/{id:[0-9]+}", _get_request)
    app.router.add_get("/admin/stats", _stats)


async def _flusher(app: web.Application) -> AsyncIterator[None]:
    log = app[REQUEST_LOG]
    await log.flush()  # opens the store now, so a bad path shows in the log at start

    async def run() -> None:
        while True:
            await asyncio.sleep(log.cfg.flush_s)
            await log.flush()

    task = asyncio.get_running_loop().create_task(run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await log.close()


# ---- every client request ----------------------------------------------------------------------


def is_logged(path: str) -> bool:
    """Whether requests to ``path`` are client requests the log records.

    Args:
        path: The request path.
    """
    if path == PLAYGROUND_PATH:
        return True
    return path not in UNLOGGED_PATHS and not path.startswith(UNLOGGED_PREFIXES)


@web.middleware
async def request_log_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record every client request in the request log (inside the observe middleware, which
    gives it its context; outside the error middleware, so failures have their status).

    Args:
        request: The request.
        handler: The rest of the chain.
    """
    if not is_logged(request.path):
        return await handler(request)
    response: web.StreamResponse | None = None
    status = 500
    request_body = None
    try:
        response = await handler(request)
        status = response.status
        # The handler has read the body: this returns its bytes (unless it was too large).
        if request.app[CONFIG].request_log.bodies and status != 413:
            request_body = (await request.read()).decode("utf-8", "replace")
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        entry = _entry(request, request[REQUEST_CONTEXT], status, response)
        if request.app[CONFIG].request_log.bodies:
            entry.request_body = _cut(request_body)
            entry.response_body = _cut(_text_of(response))
        # Buffered once the response is written (as the observe middleware's metrics).
        asyncio.get_running_loop().call_soon(request.app[REQUEST_LOG].record, entry)


def _entry(
    request: web.Request,
    context: RequestContext,
    status: int,
    response: web.StreamResponse | None,
) -> LoggedRequest:
    seconds = time.monotonic() - context.started
    return LoggedRequest(
        ts=time.time() - seconds,
        request_id=context.id,
        method=request.method,
        path=request.path,
        client=context.client,
        model=context.model,
        provider=context.provider,
        attempts=",".join(context.attempts),
        rule=context.rule,
        status=status,
        latency_ms=round(seconds * 1000, 2),
        input_tokens=context.input_tokens,
        output_tokens=context.output_tokens,
        # What the answering target cost (router/routing.py); None when no upstream answered.
        cost=context.spend_usd if context.attempts else None,
        error=_error_message(response) if status >= 400 else None,
        request_body=None,
        response_body=None,
    )


def _text_of(response: web.StreamResponse | None) -> str | None:
    """A complete response's body (a stream's events are not kept)."""
    if isinstance(response, web.Response) and response.body is not None:
        return response.text
    return None


def _error_message(response: web.StreamResponse | None) -> str | None:
    """The ``error.message`` of an error body (every client format has one)."""
    text = _text_of(response)
    if text is None:
        return None
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500]
    return error.get("message") if isinstance(error, dict) else str(error)


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= BODY_MAX_CHARS:
        return text
    return text[:BODY_MAX_CHARS] + f"... [{len(text) - BODY_MAX_CHARS} more characters]"


# ---- admin API ---------------------------------------------------------------------------------


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequestError(f"{name}: expected an integer from {low} to {high}", param=name)
    return int(raw)


async def _list_requests(request: web.Request) -> web.Response:
    require_admin(request)
    params = request.query
    query = Query(
        text=params.get("q") or None,
        model=params.get("model") or None,
        provider=params.get("provider") or None,
        client=params.get("client") or None,
        status=params.get("status") or None,
        request_id=params.get("request_id") or None,
        limit=_int_param(request, "limit", 50, 1, PAGE_MAX),
        offset=_int_param(request, "offset", 0, 0, 10**9),
    )
    log = request.app[REQUEST_LOG]
    page = await log.search(query)
    return web.json_response(
        {**page, "limit": query.limit, "offset": query.offset, "store": log.status()}
    )


async def _get_request(request: web.Request) -> web.Response:
    require_admin(request)
    row = await request.app[REQUEST_LOG].get(int(request.match_info["id"]))
    if row is None:
        raise NotFoundError(f"no request {request.match_info['id']} in the request log")
    return web.json_response(row)


async def _stats(request: web.Request) -> web.Response:
    require_admin(request)
    window = _int_param(request, "window_s", 300, 10, 7 * 24 * 3600)
    log = request.app[REQUEST_LOG]
    stats = await log.stats(float(window))
    return web.json_response({**stats, "store": log.status()})
