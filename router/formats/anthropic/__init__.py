"""Anthropic Messages: the client side (`client`), the upstream side (`upstream`) and the
content both share (`content`). The module-level codecs of both sides are named here."""

from .client import StreamRenderer, parse_request, render_error, render_response
from .content import UNSIGNED_SIGNATURE
from .upstream import StreamParser, parse_error, parse_response, render_request

__all__ = [
    "UNSIGNED_SIGNATURE",
    "StreamParser",
    "StreamRenderer",
    "parse_error",
    "parse_request",
    "parse_response",
    "render_error",
    "render_request",
    "render_response",
]
