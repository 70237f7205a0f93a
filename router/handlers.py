"""The client routes: each format's endpoints, answered through the fallback loop, and the
model listings in the asking client's format."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from .attempts import complete, count_tokens
from .backends import CONFIG
from .fallback import request_affinity, resolve_targets, run_with_fallback
from .formats.base import ClientFormat
from .formats.fields import decode_body
from .formats.registry import (
    CLIENT_FORMATS,
    MODEL_LIST_PATHS,
    MODEL_PATHS,
    client_format_for_models,
)
from .logs import REQUEST_CONTEXT
from .streaming import stream_answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup_routes(app: web.Application) -> None:
    """Add every client format's endpoints and the model listings to an app being built.

    Args:
        app: The application.
    """
    for fmt in CLIENT_FORMATS:
        handler: Handler = partial(_serve, fmt)
        for path in fmt.paths:
            app.router.add_post(path, handler)
    for path in MODEL_LIST_PATHS:
        app.router.add_get(path, _list_models)
    for path in MODEL_PATHS:
        app.router.add_get(path, _get_model)


async def _serve(fmt: ClientFormat, request: web.Request) -> web.StreamResponse:
    """Answer one client call in its format: a complete answer, a stream or a token count."""
    context = request[REQUEST_CONTEXT]
    call = fmt.parse_call(decode_body(await request.read()), request)
    ir_request = call.request
    affinity = request_affinity(request, ir_request)
    if call.count_tokens:
        tokens = await run_with_fallback(request.app, context, ir_request, count_tokens, affinity)
        return web.json_response(fmt.render_token_count(tokens))
    if ir_request.stream:
        return await stream_answer(request, fmt, call, context, affinity)
    response = await run_with_fallback(request.app, context, ir_request, complete, affinity)
    return web.json_response(fmt.render_response(response, ir_request))


async def _list_models(request: web.Request) -> web.Response:
    names = list(request.app[CONFIG].models)
    return web.json_response(client_format_for_models(request).render_models(names))


async def _get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"].removeprefix("models/")
    resolve_targets(request.app[CONFIG], name)
    return web.json_response(client_format_for_models(request).render_model(name))
