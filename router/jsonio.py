"""JSON answers rendered with orjson: bytes straight into the response, no str in between."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


def json_response(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer (what ``web.json_response`` gives, about ten times faster to render).

    Args:
        data: A JSON-serialisable value.
        status: The HTTP status.
        headers: Extra headers.
    """
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )
