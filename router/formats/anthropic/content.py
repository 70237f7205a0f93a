"""Anthropic Messages content blocks in both directions, which the client side and the
upstream side read and write alike.

Reasoning without a signature (``reasoning_content`` from OpenAI-compatible upstreams) reaches
Anthropic clients as a ``thinking`` block whose signature is the marker `UNSIGNED_SIGNATURE`:
clients such as Claude Code discard a turn whose thinking block has no signature. The marker
is recognised when the client sends the block back, and such blocks are never forwarded to
Anthropic (which would reject the signature); other providers get the reasoning text where
they take it. Gemini's signatures on function calls and text parts have no Anthropic field and
are dropped. Audio is a 400; empty text blocks are dropped (Anthropic rejects them).
"""

from __future__ import annotations

import base64
import re

from ... import ir
from ...errors import InvalidRequestError
from ..fields import check_base64, dump_json, field, objects, parse_arguments

_UNSAFE_ID = re.compile(r"[^a-zA-Z0-9_-]")


# base64("router:unsigned-reasoning"): marks reasoning that no provider signed.
UNSIGNED_SIGNATURE = base64.b64encode(b"router:unsigned-reasoning").decode()


ASSISTANT_BLOCKS = ("text", "thinking", "redacted_thinking", "tool_use")


def parse_block(block: dict, where: str, allowed: tuple[str, ...]) -> ir.Part:
    """Parse one content block (with its ``cache_control``).

    Args:
        block: The block object.
        where: Its path in the request.
        allowed: The block types allowed here.

    Raises:
        InvalidRequestError: Naming the first invalid field or a block type not allowed.
    """
    part = _parse_block_body(block, where, allowed)
    cache = parse_cache(block, where)
    if cache is not None and not isinstance(part, ir.ThinkingPart):
        part.cache = cache
    return part


def parse_cache(obj: dict, where: str) -> str | None:
    """The cache TTL of a ``cache_control`` breakpoint on a block or tool (None: none).

    Args:
        obj: The block or tool.
        where: Its path in the request.
    """
    cache_control = field(obj, "cache_control", dict, where)
    if cache_control is None:
        return None
    return field(cache_control, "ttl", str, f"{where}.cache_control") or "5m"


def render_cache(wire: dict, cache: str | None) -> dict:
    """Add a ``cache_control`` breakpoint to a wire block or tool when the IR marks one.

    Args:
        wire: The block or tool being rendered (changed in place and returned).
        cache: The IR cache TTL, or None.
    """
    if cache is not None:
        wire["cache_control"] = {"type": "ephemeral"}
        if cache != "5m":
            wire["cache_control"]["ttl"] = cache
    return wire


def _parse_block_body(block: dict, where: str, allowed: tuple[str, ...]) -> ir.Part:
    kind = field(block, "type", str, where, required=True)
    if kind not in allowed:
        raise InvalidRequestError(
            f"{where}.type: unsupported content block {kind!r} here (supported: "
            f"{', '.join(allowed)})",
            param=f"{where}.type",
        )
    if kind == "text":
        return ir.TextPart(field(block, "text", str, where, required=True))
    if kind in ("image", "document"):
        return _parse_source(block, where)
    if kind == "thinking":
        signature = field(block, "signature", str, where)
        return ir.ThinkingPart(
            field(block, "thinking", str, where, required=True),
            None if signature == UNSIGNED_SIGNATURE else signature,
        )
    if kind == "redacted_thinking":
        return ir.ThinkingPart(redacted_data=field(block, "data", str, where, required=True))
    if kind == "tool_use":
        tool_input = field(block, "input", dict, where, required=True)
        return ir.ToolCallPart(
            field(block, "id", str, where, required=True),
            field(block, "name", str, where, required=True),
            dump_json(tool_input),
        )
    content = field(block, "content", (str, list), where)
    if isinstance(content, str):
        inner = [ir.TextPart(content)]
    else:
        inner = [
            parse_block(b, f"{where}.content[{k}]", ("text", "image", "document"))
            for k, b in enumerate(objects(content or [], f"{where}.content"))
        ]
    return ir.ToolResultPart(
        field(block, "tool_use_id", str, where, required=True),
        None,
        inner,
        bool(field(block, "is_error", bool, where)),
    )


def _parse_source(block: dict, where: str) -> ir.MediaPart:
    source = field(block, "source", dict, where, required=True)
    at = f"{where}.source"
    kind = field(source, "type", str, at, required=True)
    if kind == "base64":
        data = field(source, "data", str, at, required=True)
        check_base64(data, f"{at}.data")
        return ir.MediaPart(field(source, "media_type", str, at, required=True), data=data)
    if kind == "url":
        default = "application/pdf" if block["type"] == "document" else "image/*"
        return ir.MediaPart(default, url=field(source, "url", str, at, required=True))
    if kind == "text":
        data = field(source, "data", str, at, required=True)
        return ir.MediaPart("text/plain", data=base64.b64encode(data.encode()).decode())
    raise InvalidRequestError(f"{at}.type: unsupported source type {kind!r}", param=f"{at}.type")


def render_block(part: ir.Part, where: str, unsigned: str | None = None) -> dict | None:
    """Render one content block.

    Args:
        part: The IR part.
        where: Its path, for error messages.
        unsigned: The signature unsigned thinking gets (None: such thinking is dropped).

    Raises:
        InvalidRequestError: If the part cannot be expressed for Anthropic.
    """
    block = _render_block_body(part, where, unsigned)
    if block is not None and not isinstance(part, ir.ThinkingPart):
        render_cache(block, part.cache)
    return block


def _render_block_body(part: ir.Part, where: str, unsigned: str | None) -> dict | None:
    if isinstance(part, ir.TextPart):
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, ir.MediaPart):
        return _render_media(part, where)
    if isinstance(part, ir.ThinkingPart):
        if part.redacted_data is not None:
            return {"type": "redacted_thinking", "data": part.redacted_data}
        signature = part.signature or unsigned
        if not signature:
            return None
        return {"type": "thinking", "thinking": part.text, "signature": signature}
    if isinstance(part, ir.ToolCallPart):
        return {
            "type": "tool_use",
            "id": _safe_id(part.id),
            "name": part.name,
            "input": parse_arguments(part.arguments, where),
        }
    content = [
        b
        for b in (render_block(p, f"{where}.content[{k}]") for k, p in enumerate(part.content))
        if b is not None
    ]
    block: dict = {"type": "tool_result", "tool_use_id": _safe_id(part.call_id)}
    if content:
        block["content"] = content
    if part.is_error:
        block["is_error"] = True
    return block


# The block that carries each kind of media Anthropic takes by URL or base64.
_MEDIA_BLOCKS = {"image": "image", "pdf": "document"}


def _render_media(part: ir.MediaPart, where: str) -> dict:
    block_type = _MEDIA_BLOCKS.get(part.kind)
    if block_type is not None:
        if part.url is not None:
            return {"type": block_type, "source": {"type": "url", "url": part.url}}
        return {
            "type": block_type,
            "source": {"type": "base64", "media_type": part.media_type, "data": part.data},
        }
    if part.media_type == "text/plain" and part.data is not None:
        text = base64.b64decode(part.data).decode("utf-8", "replace")
        return {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": text},
        }
    raise InvalidRequestError(
        f"{where}: Anthropic does not accept {part.media_type} input", param=where
    )


def _safe_id(call_id: str) -> str:
    """Anthropic ids must match ``^[a-zA-Z0-9_-]+$``; map others deterministically."""
    return _UNSAFE_ID.sub("_", call_id) or "call"
