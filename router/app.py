"""The aiohttp application: routes, the error middleware, model fallback and stream writing."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import TypeVar

import aiohttp
from aiohttp import web

from . import ir
from .adapters import anthropic, gemini, openai, openai_responses
from .admin import setup_admin
from .auth import auth_middleware
from .backends import CONFIG, PROVIDERS, SESSION
from .config import Config, Target, TimeoutsConfig
from .errors import (
    GatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
)
from .keys import (
    ACTIVE,
    KEY_POOLS,
    SHARED_STATE,
    KeyPool,
    Lease,
    classify_failure,
    exhausted_limit_reset,
)
from .keys.redis_store import SharedKeyState
from .logs import current_request
from .metrics import count_usage, record_attempt
from .observe import observe_middleware, setup_observe
from .providers import make_provider
from .providers.base import BaseProvider
from .reload import setup_reload
from .sse import SSEEvent, encode_comment, encode_event

logger = logging.getLogger(__name__)

T = TypeVar("T")
Call = Callable[[BaseProvider, ir.Request, Lease], Awaitable[T]]

# Headers naming a conversation, for key affinity (else the request's user / metadata.user_id).
AFFINITY_HEADERS = ("x-conversation-id", "x-session-affinity")

# The response headers of the current upstream attempt, filled by the session's trace hook:
# a provider's error carries its status and Retry-After, the rate-limit reset headers come
# from here.
_ATTEMPT_HEADERS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "attempt_headers", default=None
)


def create_app(cfg: Config) -> web.Application:
    """Build the router application.

    Args:
        cfg: The router configuration.
    """
    # The observer sees the final status; auth errors are rendered by the error middleware.
    middlewares = [observe_middleware, error_middleware, auth_middleware]
    app = web.Application(client_max_size=cfg.limits.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = cfg
    app.cleanup_ctx.append(_backends)
    setup_observe(app)
    setup_admin(app)
    setup_reload(app)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens_anthropic)
    app.router.add_get("/v1beta/models", _list_models)
    app.router.add_get("/v1beta/models/{model:.+}", _get_model)
    app.router.add_get("/v1/models/{model:.+}", _get_model)
    app.router.add_post("/v1beta/models/{target:.+}", _gemini)
    # google-genai 3.x defaults to API version v1.
    app.router.add_post("/v1/models/{target:.+}", _gemini)
    return app


async def _backends(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession, the providers and the key pools (and their link to the shared key
    state, when configured), for the app's lifetime."""
    cfg = app[CONFIG]
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_record_headers)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        app[SESSION] = session
        app[PROVIDERS] = {
            name: make_provider(p, session, cfg.limits) for name, p in cfg.providers.items()
        }
        shared = None
        if cfg.shared_state is not None:
            shared = app[SHARED_STATE] = SharedKeyState(cfg.shared_state)
        app[KEY_POOLS] = {name: KeyPool(p, shared=shared) for name, p in cfg.providers.items()}
        if shared is not None:
            await shared.start()
        try:
            yield
        finally:
            if shared is not None:
                await shared.close()
            for provider in app[PROVIDERS].values():
                await provider.close()


# ---- errors ---------------------------------------------------------------------------------


def adapter_for_path(path: str) -> ModuleType:
    """The client format of a URL path (also for paths that matched no route).

    Args:
        path: The request path.
    """
    if path.startswith("/v1beta/") or path.startswith("/v1/models/") and ":" in path:
        return gemini
    if path.startswith("/v1/messages"):
        return anthropic
    if path.startswith("/v1/responses"):
        return openai_responses
    return openai


def error_response(adapter: ModuleType, err: GatewayError) -> web.Response:
    """Render an error in the client's format, with ``Retry-After`` when known.

    Args:
        adapter: The client's adapter module.
        err: The error.
    """
    status, body = adapter.render_error(err)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every failure in the inbound client's error format; never a traceback.

    Args:
        request: The request.
        handler: The route handler.
    """
    adapter = adapter_for_path(request.path)
    try:
        return await handler(request)
    except GatewayError as err:
        logger.info("%s %s -> %d %s", request.method, request.path, err.status, err.message)
        return error_response(adapter, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(adapter, _from_http_exception(exc, request))
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(adapter, GatewayError("internal router error"))


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 413:
        limit = request.app[CONFIG].limits.max_body_bytes
        return PayloadTooLargeError(f"request body exceeds the {limit} byte limit")
    if exc.status == 404:
        return NotFoundError(f"no such endpoint: {request.method} {request.path}")
    if exc.status == 405:
        return InvalidRequestError(f"method {request.method} not allowed on {request.path}")
    return InvalidRequestError(exc.text or exc.reason)


async def _read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidRequestError(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


# ---- routing and fallback -------------------------------------------------------------------


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


async def run_with_fallback(
    app: web.Application, request: ir.Request, call: Call, affinity: str | None = None
) -> T:
    """Try the model's targets in order, each on as many of its keys as needed.

    Each failure is classified for its key (`classify_failure`): a rate-limited, exhausted or
    rejected key leaves the pool for its time and the request moves to another key; a 5xx,
    overload or timeout (the provider's trouble, not the key's) moves to the next target
    without blaming the key; any other error is the client's answer at once. Attempts
    and time are bounded by the config's ``retry``. ``call`` must not have sent anything to
    the client, and releases its lease when it succeeds.

    Args:
        app: The application.
        request: The IR request (``model`` is the client's name).
        call: What to run against one provider, request copy and key lease.
        affinity: A conversation id that keeps the conversation's requests on one key.

    Raises:
        GatewayError: The first non-retryable error, else the last upstream error (or, when
            no upstream was reached, why no key was available).
    """
    cfg = app[CONFIG]
    targets = resolve_targets(cfg, request.model)
    deadline = time.monotonic() + cfg.retry.max_time_s
    attempts = 0
    last: GatewayError | None = None
    for target in targets:
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
            headers: dict[str, str] = {}
            token = _ATTEMPT_HEADERS.set(headers)
            started = time.monotonic()
            try:
                result = await call(
                    provider, dataclasses.replace(request, model=target.model), lease
                )
            except GatewayError as err:
                verdict = classify_failure(err, headers, err.upstream_body)
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
                last = err
                if verdict.state == ACTIVE or lease.key_id is None:
                    break
                tried.append(lease.key_id)
                continue
            except BaseException:
                lease.release()
                raise
            finally:
                _ATTEMPT_HEADERS.reset(token)
            logger.info(
                "model=%s provider=%s key=%s upstream_model=%s stream=%s attempt=%d ms=%.1f",
                request.model,
                target.provider,
                lease.key_id,
                target.model,
                request.stream,
                attempts,
                (time.monotonic() - started) * 1000,
            )
            rest = exhausted_limit_reset(headers, time.time())
            if rest:
                # The upstream says this key's limit is used up: no more traffic until reset.
                lease.rest(rest, "rate limit used up (remaining 0)")
            return result
    raise last


async def _record_headers(
    session: aiohttp.ClientSession,
    context: object,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    """Trace hook: keep the upstream response's headers for the attempt in progress."""
    headers = _ATTEMPT_HEADERS.get()
    if headers is not None:
        headers.clear()
        headers.update((k.lower(), v) for k, v in params.response.headers.items())


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


@record_attempt
async def _open_stream(
    provider: BaseProvider, request: ir.Request, lease: Lease
) -> tuple[list[ir.StreamEvent], AsyncIterator[ir.StreamEvent]]:
    """Start an upstream stream and buffer it up to its first delta (or its end), so that a
    failure before any content (e.g. an overloaded error inside a 200, right after
    ``message_start`` and ``content_block_start``) can still fall back. The rest of the stream
    holds the key's lease until the stream ends."""
    events = _bounded(provider.stream(request, lease.key), provider.config.name)
    buffered: list[ir.StreamEvent] = []
    try:
        async for event in events:
            buffered.append(event)
            if isinstance(event, ir.PartDelta | ir.StreamEnd):
                break
    except BaseException:
        await events.aclose()
        raise
    return buffered, _LeasedStream(buffered, events, lease)


def _timeouts() -> TimeoutsConfig:
    context = current_request()
    return context.timeouts if context is not None else TimeoutsConfig()


async def _bounded(
    events: AsyncIterator[ir.StreamEvent], name: str
) -> AsyncIterator[ir.StreamEvent]:
    """An upstream stream under the first-byte and idle timeouts (each a retryable 504 while
    nothing was sent to the client); its final usage goes to the request's metrics."""
    timeouts = _timeouts()
    limit, waiting_for = timeouts.first_byte_s, "first byte"
    try:
        while True:
            try:
                event = await asyncio.wait_for(anext(events), limit)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError as err:
                raise GatewayTimeoutError(
                    f"{name}: no {waiting_for} from the upstream within {limit:g} s"
                ) from err
            if isinstance(event, ir.StreamEnd):
                count_usage(event.usage)
            yield event
            limit, waiting_for = timeouts.idle_s, "data"
    finally:
        await events.aclose()


async def _first_byte(call: Awaitable[T], name: str) -> T:
    """A non-streaming upstream call under the first-byte timeout (its answer is its first
    byte)."""
    limit = _timeouts().first_byte_s
    try:
        return await asyncio.wait_for(call, limit)
    except asyncio.TimeoutError as err:
        raise GatewayTimeoutError(
            f"{name}: no answer from the upstream within {limit:g} s"
        ) from err


class _LeasedStream:
    """The rest of a stream, holding its key's lease until the stream ends or is closed.

    A class rather than an async generator: ``aclose`` on a generator that never started
    skips its ``finally``, and a client that leaves before the first buffered event is written
    would leak the key's concurrency slot.
    """

    def __init__(
        self, buffered: list[ir.StreamEvent], events: AsyncIterator[ir.StreamEvent], lease: Lease
    ) -> None:
        ends = [e for e in buffered if isinstance(e, ir.StreamEnd)]
        self._tokens = ends[-1].usage.total_tokens if ends else 0
        self._events = events
        self._lease = lease

    def __aiter__(self) -> _LeasedStream:
        return self

    async def __anext__(self) -> ir.StreamEvent:
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except GatewayError as err:
            # Past the first delta there is no retry, but a rate limit still cools the key.
            self._lease.fail(classify_failure(err))
            err.message = self._lease.scrub(err.message)
            await self.aclose()
            raise
        if isinstance(event, ir.StreamEnd):
            self._tokens = event.usage.total_tokens
        return event

    async def aclose(self) -> None:
        """Release the key (with the usage the stream reported) and close the upstream."""
        self._lease.release(self._tokens)
        await self._events.aclose()

    def __del__(self) -> None:
        # A stream dropped without aclose (its handler cancelled as the stream opened) must
        # still give its key's slot back; asyncio finalizes the upstream generator itself.
        self._lease.release(self._tokens)


# ---- generation -----------------------------------------------------------------------------


async def _generate(
    request: web.Request, adapter: ModuleType, ir_request: ir.Request, *, sse: bool = True
) -> web.StreamResponse:
    app = request.app
    if not ir_request.stream:
        affinity = request_affinity(request, ir_request)
        response = await run_with_fallback(app, ir_request, _complete, affinity)
        return web.json_response(adapter.render_response(response, ir_request))
    renderer = adapter.StreamRenderer(ir_request)
    content_type = "text/event-stream" if sse else "application/json"
    out = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    writer = _SSEWriter(out) if sse else _ArrayWriter(out)
    keepalive = app[CONFIG].limits.keepalive_s if sse else 0
    try:
        started = await _first_events(request, ir_request, out, keepalive)
    except ConnectionResetError:
        logger.info("client left while model=%s was starting", ir_request.model)
        return out
    if isinstance(started, GatewayError):
        # Headers went out with keep-alives before every target failed.
        await writer.write(renderer.render_error(started))
        await writer.close()
        return out
    buffered, events = started
    try:
        if not out.prepared:
            await out.prepare(request)
        for event in buffered:
            await writer.write(renderer.render_stream_event(event))
        async for event in events:
            await writer.write(renderer.render_stream_event(event))
    except GatewayError as err:
        logger.warning(
            "stream for model=%s failed after it started: %s", ir_request.model, err.message
        )
        await writer.write(renderer.render_error(err))
    except ConnectionResetError:
        logger.info("client disconnected from a stream for model=%s", ir_request.model)
        return out
    except Exception:
        # The headers are sent, so the error middleware can no longer answer: end the stream
        # with the format's error event instead of corrupting it.
        logger.exception("stream for model=%s failed with a router bug", ir_request.model)
        await writer.write(renderer.render_error(GatewayError("internal router error")))
    finally:
        await events.aclose()
    await writer.close()
    return out


async def _first_events(
    request: web.Request, ir_request: ir.Request, out: web.StreamResponse, keepalive: float
) -> tuple[list[ir.StreamEvent], AsyncIterator[ir.StreamEvent]] | GatewayError:
    """Open the stream with fallback. While no target has produced content for ``keepalive``
    seconds, send the headers and a ping (`_keepalive_bytes`) every ``keepalive`` seconds, so
    proxies with idle timeouts keep the connection; fallback still works since no content was
    sent.

    Returns:
        The buffered first events and the rest of the stream, or the final error if the
        headers were already sent (before that, the error is raised).
    """
    affinity = request_affinity(request, ir_request)
    task = asyncio.ensure_future(run_with_fallback(request.app, ir_request, _open_stream, affinity))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=keepalive or None)
            if task.done():
                break
            if not out.prepared:
                await out.prepare(request)
            await out.write(_keepalive_bytes(request))
    finally:
        if not task.done():
            task.cancel()
    try:
        return task.result()
    except GatewayError as err:
        if not out.prepared:
            raise
        return err


def _keepalive_bytes(request: web.Request) -> bytes:
    """``: ping`` (an SSE comment), or Anthropic's own ``ping`` event that its SDKs skip."""
    if adapter_for_path(request.path) is anthropic:
        return encode_event(SSEEvent('{"type": "ping"}', "ping"))
    return encode_comment("ping")


@record_attempt
async def _complete(provider: BaseProvider, request: ir.Request, lease: Lease) -> ir.Response:
    response = await _first_byte(provider.complete(request, lease.key), provider.config.name)
    lease.release(response.usage.total_tokens)
    return response


class _SSEWriter:
    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response

    async def write(self, events: list) -> None:
        if events:
            await self._response.write(b"".join(encode_event(e) for e in events))

    async def close(self) -> None:
        await self._response.write_eof()


class _ArrayWriter:
    """Gemini's stream without ``alt=sse``: one JSON array, written element by element."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._first = True

    async def write(self, events: list) -> None:
        for event in events:
            prefix = b"[" if self._first else b",\r\n"
            self._first = False
            await self._response.write(prefix + event.data.encode())

    async def close(self) -> None:
        await self._response.write(b"[]" if self._first else b"]")
        await self._response.write_eof()


# ---- handlers -------------------------------------------------------------------------------


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, openai, openai.parse_request(await _read_json(request)))


async def _responses(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    return await _generate(request, openai_responses, openai_responses.parse_request(body))


async def _parse_anthropic(request: web.Request) -> ir.Request:
    ir_request = anthropic.parse_request(await _read_json(request))
    beta = request.headers.get("anthropic-beta", "")
    ir_request.anthropic_beta = [flag.strip() for flag in beta.split(",") if flag.strip()]
    return ir_request


async def _messages(request: web.Request) -> web.StreamResponse:
    ir_request = await _parse_anthropic(request)
    if ir_request.max_tokens is None:
        raise InvalidRequestError("max_tokens: field is required", param="max_tokens")
    return await _generate(request, anthropic, ir_request)


@record_attempt
async def _count(provider: BaseProvider, request: ir.Request, lease: Lease) -> int:
    tokens = await _first_byte(provider.count_tokens(request, lease.key), provider.config.name)
    lease.release()
    return tokens


async def _count_tokens_anthropic(request: web.Request) -> web.Response:
    ir_request = await _parse_anthropic(request)
    affinity = request_affinity(request, ir_request)
    tokens = await run_with_fallback(request.app, ir_request, _count, affinity)
    return web.json_response({"input_tokens": tokens})


async def _gemini(request: web.Request) -> web.StreamResponse:
    model, sep, method = request.match_info["target"].rpartition(":")
    if not sep or not model:
        raise NotFoundError(f"no such endpoint: POST {request.path}")
    body = await _read_json(request)
    if method == "generateContent":
        return await _generate(request, gemini, gemini.parse_request(body, model))
    if method == "streamGenerateContent":
        ir_request = dataclasses.replace(gemini.parse_request(body, model), stream=True)
        sse = request.query.get("alt") == "sse"
        return await _generate(request, gemini, ir_request, sse=sse)
    if method == "countTokens":
        inner = body.get("generateContentRequest")
        if isinstance(inner, dict):
            body = inner
        elif "contents" not in body:
            raise InvalidRequestError("contents: field is required", param="contents")
        ir_request = gemini.parse_request(body, model)
        affinity = request_affinity(request, ir_request)
        tokens = await run_with_fallback(request.app, ir_request, _count, affinity)
        return web.json_response({"totalTokens": tokens})
    raise NotFoundError(f"unsupported Gemini method {method!r}")


def _client_kind(request: web.Request) -> str:
    """Which SDK is asking on a shared path (``/v1/models``): by its auth/version headers."""
    if "x-goog-api-key" in request.headers or "key" in request.query:
        return "gemini"
    return "anthropic" if "anthropic-version" in request.headers else "openai"


def _model_info(kind: str, name: str) -> dict:
    if kind == "gemini":
        methods = ["generateContent", "streamGenerateContent", "countTokens"]
        return {
            "name": f"models/{name}",
            "displayName": name,
            "supportedGenerationMethods": methods,
        }
    if kind == "anthropic":
        return {
            "type": "model",
            "id": name,
            "display_name": name,
            "created_at": "1970-01-01T00:00:00Z",
        }
    return {"id": name, "object": "model", "created": 0, "owned_by": "router"}


async def _list_models(request: web.Request) -> web.Response:
    kind = "gemini" if request.path.startswith("/v1beta/") else _client_kind(request)
    names = list(request.app[CONFIG].models)
    data = [_model_info(kind, n) for n in names]
    if kind == "gemini":
        return web.json_response({"models": data})
    if kind == "anthropic":
        first, last = (names[0], names[-1]) if names else (None, None)
        return web.json_response(
            {"data": data, "has_more": False, "first_id": first, "last_id": last}
        )
    return web.json_response({"object": "list", "data": data})


async def _get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"].removeprefix("models/")
    resolve_targets(request.app[CONFIG], name)
    kind = "gemini" if request.path.startswith("/v1beta/") else _client_kind(request)
    return web.json_response(_model_info(kind, name))
