"""A client request's JSON body, decoded once per request: the auth middleware reads its
``model`` and the handler the rest."""

from __future__ import annotations

from aiohttp import web

from .formats.fields import decode_body

# The decoded body, once something read it.
JSON_BODY = web.RequestKey("json_body", dict)


async def read_body(request: web.Request) -> dict:
    """The request's JSON body, decoded and checked on the first call (`decode_body`).

    Args:
        request: The client's request.

    Raises:
        InvalidRequestError: If the body is not a valid JSON object (naming the field at fault).
    """
    body = request.get(JSON_BODY)
    if body is None:
        body = request[JSON_BODY] = decode_body(await request.read())
    return body
