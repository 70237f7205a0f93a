"""The client routes: each format's endpoints, answered through the fallback loop, the
model listings in the asking client's format, and ``GET /``, which lists what is served."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from .attempts import complete, count_tokens
from .backends import CONFIG
from .body import read_body
from .fallback import request_affinity, resolve_targets, run_with_fallback
from .formats.base import ClientFormat
from .formats.ollama.discovery import setup_discovery
from .formats.registry import (
    CLIENT_FORMATS,
    MODEL_LIST_PATHS,
    MODEL_PATHS,
    client_format_for_models,
)
from .jsonio import json_response
from .logs import REQUEST_CONTEXT
from .streaming import stream_answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup_routes(app: web.Application) -> None:
    """Add every client format's endpoints and the model listings to an app being built.

    Args:
        app: The application.
    """
    for fmt in CLIENT_FORMATS:
        handler: Handler = partial(serve_call, fmt)
        for path in fmt.paths:
            app.router.add_post(path, handler)
    for path in MODEL_LIST_PATHS:
        app.router.add_get(path, _list_models)
    for path in MODEL_PATHS:
        app.router.add_get(path, _get_model)
    setup_discovery(app)
    app.router.add_get("/", _index)


def list_endpoints(app: web.Application) -> list[str]:
    """Every route of an app as ``METHOD /path``, in the order they were added.

    Args:
        app: The application.
    """
    endpoints = {
        f"{route.method} {route.resource.canonical}": None
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    return list(endpoints)


async def _index(request: web.Request) -> web.Response:
    """What this router serves: its models and endpoints, as JSON, or HTML for browsers."""
    models = list(request.app[CONFIG].models)
    endpoints = list_endpoints(request.app)
    if "text/html" not in request.headers.get("Accept", ""):
        return json_response(
            {"service": "smolvlm-router", "models": models, "endpoints": endpoints}
        )
    items = "".join(f"<li><code>{html.escape(m)}</code></li>" for m in models)
    routes = "".join(f"<li><code>{html.escape(e)}</code></li>" for e in endpoints)
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>smolvlm-router</title>'
        "</head><body><h1>smolvlm-router</h1><p>OpenAI, Anthropic, Gemini and Ollama clients, one "
        "gateway. Models (also <code>provider/model</code>):</p>"
        f"<ul>{items}</ul><p>Endpoints:</p><ul>{routes}</ul></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def serve_call(fmt: ClientFormat, request: web.Request) -> web.StreamResponse:
    """Answer one client call in its format: a complete answer, a stream or a token count."""
    context = request[REQUEST_CONTEXT]
    call = fmt.parse_call(await read_body(request), request)
    ir_request = call.request
    affinity = request_affinity(request, ir_request)
    if call.count_tokens:
        tokens = await run_with_fallback(request.app, context, ir_request, count_tokens, affinity)
        return json_response(fmt.render_token_count(tokens))
    if ir_request.stream:
        return await stream_answer(request, fmt, call, context, affinity)
    response = await run_with_fallback(request.app, context, ir_request, complete, affinity)
    return json_response(fmt.render_response(response, ir_request))


async def _list_models(request: web.Request) -> web.Response:
    names = list(request.app[CONFIG].models)
    return json_response(client_format_for_models(request).render_models(names))


async def _get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"].removeprefix("models/")
    resolve_targets(request.app[CONFIG], name)
    return json_response(client_format_for_models(request).render_model(name))
