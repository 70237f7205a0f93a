"""Gemini ``generateContent``: the client side (`client`), the upstream side (`upstream`), the
content both share (`content`) and its schemas in both directions (`schema`). The
module-level codecs of both sides are named here."""

from .client import StreamRenderer, parse_request, render_error, render_response
from .upstream import SKIP_SIGNATURE, StreamParser, parse_error, parse_response, render_request

__all__ = [
    "SKIP_SIGNATURE",
    "StreamParser",
    "StreamRenderer",
    "parse_error",
    "parse_request",
    "parse_response",
    "render_error",
    "render_request",
    "render_response",
]
