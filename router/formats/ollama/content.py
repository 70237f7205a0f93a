"""Ollama's content pieces: base64 images (no media type on the wire: it is read from the
image's first bytes), tool definitions, tool calls (arguments as a JSON object, not text) and
``options`` (Ollama's sampling parameters)."""

from __future__ import annotations

import json

from ... import ir
from ...errors import InvalidRequestError
from ..fields import check_base64, check_range, dump_json, field, objects, parse_arguments

# An image's first bytes -> its media type (the formats every client format can carry).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def parse_images(raw: list, where: str) -> list[ir.MediaPart]:
    """Read a message's ``images``: base64 PNG, JPEG, GIF or WebP data.

    Args:
        raw: The ``images`` array.
        where: Its path in the request (``messages[0].images``).

    Raises:
        InvalidRequestError: Naming the first item that is not a base64 string of an image in
            one of these formats.
    """
    parts = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"{at}: expected a base64 string, got {type(item).__name__}", param=at
            )
        parts.append(ir.MediaPart(_media_type(check_base64(item, at), at), data=item))
    return parts


def _media_type(data: bytes, where: str) -> str:
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise InvalidRequestError(f"{where}: not a PNG, JPEG, GIF or WebP image", param=where)


def parse_tools(raw: list) -> list[ir.Tool]:
    """Read ``tools``: ``{"type": "function", "function": {"name", "description",
    "parameters"}}`` items.

    Args:
        raw: The ``tools`` array.

    Raises:
        InvalidRequestError: Naming the first invalid tool.
    """
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        if (field(tool, "type", str, at) or "function") != "function":
            raise InvalidRequestError(
                f"{at}.type: only function tools are supported", param=f"{at}.type"
            )
        fn = field(tool, "function", dict, at, required=True)
        where = f"{at}.function"
        tools.append(
            ir.Tool(
                name=field(fn, "name", str, where, required=True),
                description=field(fn, "description", str, where),
                parameters=field(fn, "parameters", dict, where),
            )
        )
    return tools


def parse_tool_call(raw: dict, where: str, call_id: str) -> ir.ToolCallPart:
    """Read one of an assistant message's ``tool_calls``.

    Args:
        raw: The call: ``{"id"?, "function": {"name", "arguments"}}``; ``arguments`` is an
            object (JSON text of one is read too, as some clients send it).
        where: Its path in the request.
        call_id: The id to give a call that has none.

    Raises:
        InvalidRequestError: Naming the invalid field.
    """
    fn = field(raw, "function", dict, where, required=True)
    at = f"{where}.function"
    name = field(fn, "name", str, at, required=True)
    arguments = field(fn, "arguments", (dict, str), at)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as err:
            raise InvalidRequestError(
                f"{at}.arguments: not a JSON object", param=f"{at}.arguments"
            ) from err
        if not isinstance(arguments, dict):
            raise InvalidRequestError(f"{at}.arguments: not a JSON object", param=f"{at}.arguments")
    return ir.ToolCallPart(
        field(raw, "id", str, where) or call_id, name, dump_json(arguments or {})
    )


def render_tool_call(call: ir.ToolCallPart, index: int, where: str) -> dict:
    """Render a tool call as Ollama does: arguments as an object.

    Args:
        call: The IR tool call (its arguments should be the JSON text of an object).
        index: Its position among the message's calls.
        where: Its path, for the error message.

    Raises:
        InvalidRequestError: If the arguments are not a JSON object.
    """
    arguments = parse_arguments(call.arguments, where)
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


# Ollama's sampling options the IR carries: option -> (IR field, type, minimum, maximum).
_OPTIONS: dict[str, tuple[str, type, float | None, float | None]] = {
    "temperature": ("temperature", float, 0, 2),
    "top_p": ("top_p", float, 0, 1),
    "top_k": ("top_k", int, 0, None),
    "seed": ("seed", int, None, None),
    "presence_penalty": ("presence_penalty", float, -2, 2),
    "frequency_penalty": ("frequency_penalty", float, -2, 2),
}


def parse_options(raw: dict | None) -> dict:
    """Map ``options`` onto IR request fields.

    ``num_predict`` is the token limit (-1 and -2, Ollama's "no limit" and "fill the context",
    mean none); ``stop`` is a list of strings; a ``top_k`` of 0 means every token. The
    options the IR has no field for (the runner's ``num_ctx``, ``num_gpu``, ``num_thread``...,
    and samplers such as ``repeat_penalty``, ``min_p`` or ``mirostat``) are accepted and
    ignored, as Ollama itself ignores options a model does not use and as the router's other
    formats ignore fields they do not know.

    Args:
        raw: The ``options`` object, or None.

    Returns:
        Keyword arguments for `ir.Request`.

    Raises:
        InvalidRequestError: Naming an option of the wrong type or out of range.
    """
    if raw is None:
        return {}
    out: dict = {}
    for name, (target, kind, low, high) in _OPTIONS.items():
        value = field(raw, name, kind, "options", minimum=low, maximum=high)
        if value is not None:
            out[target] = value
    if out.get("top_k") == 0:
        del out["top_k"]
    limit = field(raw, "num_predict", int, "options")
    if limit is not None and limit not in (-1, -2):
        check_range(limit, "options.num_predict", minimum=1)
        out["max_tokens"] = limit
    stop = field(raw, "stop", list, "options")
    for i, item in enumerate(stop or []):
        if not isinstance(item, str):
            where = f"options.stop[{i}]"
            raise InvalidRequestError(f"{where}: expected a string", param=where)
    if stop:
        out["stop"] = list(stop)
    return out
