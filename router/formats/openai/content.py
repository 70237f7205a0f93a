"""OpenAI Chat Completions content in both directions: message content parts, assistant
messages and tool calls, which the client side and the upstream side read and write alike."""

from __future__ import annotations

from ... import ir
from ...errors import InvalidRequestError
from ..fields import field, objects, parse_data_url

AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}


def parse_content(raw: dict, where: str, *, text_only: bool) -> list:
    """Parse a message's ``content`` (a string or an array of content parts).

    Args:
        raw: The message object.
        where: Its path in the request.
        text_only: Whether only text parts are allowed (system and assistant messages).

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported part.
    """
    content = field(raw, "content", (str, list), where)
    if content is None:
        return []
    if isinstance(content, str):
        return [ir.TextPart(content)]
    parts = []
    for j, item in enumerate(objects(content, f"{where}.content")):
        at = f"{where}.content[{j}]"
        kind = field(item, "type", str, at, required=True)
        if kind == "text":
            part = ir.TextPart(field(item, "text", str, at, required=True))
            # OpenRouter/LiteLLM-style cache breakpoints on OpenAI-format text parts.
            cache_control = field(item, "cache_control", dict, at)
            if cache_control is not None:
                part.cache = cache_control.get("ttl") or "5m"
            parts.append(part)
        elif text_only:
            raise InvalidRequestError(
                f"{at}.type: only text content is allowed here, got {kind!r}", param=f"{at}.type"
            )
        elif kind == "image_url":
            image = field(item, "image_url", dict, at, required=True)
            url = field(image, "url", str, f"{at}.image_url", required=True)
            parts.append(_parse_image_url(url, f"{at}.image_url.url"))
        elif kind == "input_audio":
            audio = field(item, "input_audio", dict, at, required=True)
            fmt = field(audio, "format", str, f"{at}.input_audio", required=True)
            data = field(audio, "data", str, f"{at}.input_audio", required=True)
            parts.append(ir.MediaPart(AUDIO_FORMATS.get(fmt, f"audio/{fmt}"), data=data))
        elif kind == "file":
            file = field(item, "file", dict, at, required=True)
            if "file_data" not in file:
                raise InvalidRequestError(
                    f"{at}.file: only inline file_data is supported (no file_id)",
                    param=f"{at}.file",
                )
            data_url = field(file, "file_data", str, f"{at}.file", required=True)
            media_type, data = parse_data_url(data_url, f"{at}.file.file_data")
            filename = field(file, "filename", str, f"{at}.file")
            parts.append(ir.MediaPart(media_type, data=data, filename=filename))
        else:
            raise InvalidRequestError(
                f"{at}.type: unsupported content type {kind!r}", param=f"{at}.type"
            )
    return parts


def _parse_image_url(url: str, where: str) -> ir.MediaPart:
    if url.startswith("data:"):
        media_type, data = parse_data_url(url, where)
        return ir.MediaPart(media_type, data=data)
    if not url.startswith(("https://", "http://")):
        raise InvalidRequestError(f"{where}: expected an http(s) or data URL", param=where)
    return ir.MediaPart("image/*", url=url)


def parse_assistant(raw: dict, where: str, tool_names: dict[str, str]) -> list:
    """Parse an assistant message: reasoning, text and tool calls (requests and responses).

    Args:
        raw: The message object.
        where: Its path in the request.
        tool_names: Filled with each tool call's id -> function name.

    Raises:
        InvalidRequestError: Naming the first invalid field.
    """
    parts: list = []
    blocks = objects(field(raw, "thinking_blocks", list, where) or [], f"{where}.thinking_blocks")
    for k, block in enumerate(blocks):
        at = f"{where}.thinking_blocks[{k}]"
        if field(block, "type", str, at, required=True) == "redacted_thinking":
            parts.append(
                ir.ThinkingPart(redacted_data=field(block, "data", str, at, required=True))
            )
        else:
            parts.append(
                ir.ThinkingPart(
                    field(block, "thinking", str, at) or "", field(block, "signature", str, at)
                )
            )
    reasoning = field(raw, "reasoning_content", str, where)
    if reasoning and not blocks:
        parts.append(ir.ThinkingPart(reasoning))
    parts.extend(parse_content(raw, where, text_only=True))
    calls = objects(field(raw, "tool_calls", list, where) or [], f"{where}.tool_calls")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        fn = field(call, "function", dict, at, required=True)
        call_id = field(call, "id", str, at, required=True)
        name = field(fn, "name", str, f"{at}.function", required=True)
        tool_names[call_id] = name
        extra = field(call, "extra_content", dict, at) or {}
        signature = (extra.get("google") or {}).get("thought_signature")
        arguments = field(fn, "arguments", str, f"{at}.function") or "{}"
        parts.append(ir.ToolCallPart(call_id, name, arguments, signature))
    return parts


def render_tool_call(call: ir.ToolCallPart, *, with_signature: bool = True) -> dict:
    """Render a tool call as a ``tool_calls`` item.

    Args:
        call: The IR tool call.
        with_signature: Whether to carry Gemini's signature in ``extra_content``.
    """
    wire = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if call.signature and with_signature:
        wire["extra_content"] = {"google": {"thought_signature": call.signature}}
    return wire
