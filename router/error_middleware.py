"""The error middleware: every failure answered in the inbound client's error format."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from .backends import CONFIG
from .errors import GatewayError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from .formats.base import ClientFormat
from .formats.registry import client_format_for_path
from .jsonio import json_response

logger = logging.getLogger(__name__)


def error_response(fmt: ClientFormat, err: GatewayError) -> web.Response:
    """Render an error in the client's format, with ``Retry-After`` when known.

    Args:
        fmt: The client's format.
        err: The error.
    """
    status, body = fmt.render_error(err)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every failure in the inbound client's error format; never a traceback.

    Args:
        request: The request.
        handler: The route handler.
    """
    fmt = client_format_for_path(request.path)
    try:
        return await handler(request)
    except GatewayError as err:
        logger.info("%s %s -> %d %s", request.method, request.path, err.status, err.message)
        return error_response(fmt, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(fmt, _from_http_exception(exc, request))
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(fmt, GatewayError("internal router error"))


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 413:
        limit = request.app[CONFIG].limits.max_body_bytes
        return PayloadTooLargeError(f"request body exceeds the {limit} byte limit")
    if exc.status == 404:
        return NotFoundError(f"no such endpoint: {request.method} {request.path}")
    if exc.status == 405:
        return InvalidRequestError(f"method {request.method} not allowed on {request.path}")
    return InvalidRequestError(exc.text or exc.reason)
