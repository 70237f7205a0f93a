"""Anthropic Messages <-> IR, for clients and for the Anthropic upstream.

Notes on what Anthropic cannot express and how it is rendered:

- Reasoning without a signature (``reasoning_content`` from OpenAI-compatible upstreams)
  reaches Anthropic clients as a ``thinking`` block whose signature is the marker
  `UNSIGNED_SIGNATURE`: clients such as Claude Code discard a turn whose thinking block has no
  signature. The marker is recognised when the client sends the block back, and such blocks
  are never forwarded to Anthropic (which would reject the signature); other providers get
  the reasoning text where they take it.
- Gemini's signatures on function calls and text parts have no Anthropic field and are dropped.
- JSON output: ``json_schema`` maps to ``output_config.format``; ``json_object`` (JSON without
  a schema) has no Anthropic equivalent and is a 400.
- Audio input is a 400; empty text blocks are dropped (Anthropic rejects them).
- Sampling: the current Messages API takes no ``temperature``/``top_p``/``top_k`` (they are
  absent from the anthropic SDK 2.x request types and rejected as unknown fields), so they are
  not forwarded; the client's ``max_tokens`` and stop sequences are.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import time

from .. import ir
from ..errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..sse import SSEEvent
from . import (
    check_base64,
    dump_json,
    effort_to_budget,
    field,
    new_id,
    objects,
    parse_arguments,
    split_system,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 8192
_MIN_THINKING_BUDGET = 1024
_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "end_turn": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_TO_WIRE = {
    "stop": "end_turn",
    "length": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "api_error": "api_error",
    "overloaded": "overloaded_error",
    "timeout": "timeout_error",
}
_ERRORS_FROM_WIRE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
    "timeout_error": 504,
}
_UNSAFE_ID = re.compile(r"[^a-zA-Z0-9_-]")
# base64("router:unsigned-reasoning"): marks reasoning that no provider signed.
UNSIGNED_SIGNATURE = base64.b64encode(b"router:unsigned-reasoning").decode()


# ---- requests: wire -> IR ----------------------------------------------------------------


def parse_request(body: dict) -> ir.Request:
    """Parse a Messages request body (also used for ``count_tokens``, where max_tokens is absent).

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    model = field(body, "model", str, "", required=True)
    raw_messages = objects(field(body, "messages", list, "", required=True), "messages")
    messages: list[ir.Message] = []
    system = field(body, "system", (str, list), "")
    if isinstance(system, str):
        messages.append(ir.Message("system", [ir.TextPart(system)]))
    elif system:
        parts = [
            _parse_block(b, f"system[{i}]", ("text",))
            for i, b in enumerate(objects(system, "system"))
        ]
        messages.append(ir.Message("system", parts))
    for i, raw in enumerate(raw_messages):
        where = f"messages[{i}]"
        role = field(raw, "role", str, where, required=True)
        if role not in ("user", "assistant"):
            raise InvalidRequestError(
                f"{where}.role: expected 'user' or 'assistant'", param=f"{where}.role"
            )
        content = field(raw, "content", (str, list), where, required=True)
        if isinstance(content, str):
            parts = [ir.TextPart(content)]
        else:
            allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
            parts = [
                _parse_block(b, f"{where}.content[{j}]", allowed)
                for j, b in enumerate(objects(content, f"{where}.content"))
            ]
        messages.append(ir.Message(role, parts))
    tool_choice, parallel = _parse_tool_choice(field(body, "tool_choice", dict, ""))
    metadata = field(body, "metadata", dict, "") or {}
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(field(body, "tools", list, "") or []),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        max_tokens=field(body, "max_tokens", int, ""),
        temperature=field(body, "temperature", float, ""),
        top_p=field(body, "top_p", float, ""),
        top_k=field(body, "top_k", int, ""),
        stop=list(field(body, "stop_sequences", list, "") or []),
        response_format=_parse_output_format(body),
        reasoning=_parse_thinking(field(body, "thinking", dict, "")),
        stream=bool(field(body, "stream", bool, "")),
        include_usage=True,
        user=field(metadata, "user_id", str, "metadata"),
    )


_USER_BLOCKS = ("text", "image", "document", "tool_result")
_ASSISTANT_BLOCKS = ("text", "thinking", "redacted_thinking", "tool_use")


def _parse_block(block: dict, where: str, allowed: tuple[str, ...]) -> ir.Part:
    part = _parse_block_body(block, where, allowed)
    cache = _parse_cache(block, where)
    if cache is not None and not isinstance(part, ir.ThinkingPart):
        part.cache = cache
    return part


def _parse_cache(obj: dict, where: str) -> str | None:
    cache_control = field(obj, "cache_control", dict, where)
    if cache_control is None:
        return None
    return field(cache_control, "ttl", str, f"{where}.cache_control") or "5m"


def _render_cache(wire: dict, cache: str | None) -> dict:
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
            _parse_block(b, f"{where}.content[{k}]", ("text", "image", "document"))
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


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        kind = field(tool, "type", str, at)
        if kind not in (None, "custom"):
            raise InvalidRequestError(
                f"{at}.type: server tool {kind!r} is not supported by the router",
                param=f"{at}.type",
            )
        tools.append(
            ir.Tool(
                name=field(tool, "name", str, at, required=True),
                description=field(tool, "description", str, at),
                parameters=field(tool, "input_schema", dict, at, required=True),
                strict=field(tool, "strict", bool, at),
                cache=_parse_cache(tool, at),
            )
        )
    return tools


def _parse_tool_choice(raw: dict | None) -> tuple[ir.ToolChoice | None, bool | None]:
    if raw is None:
        return None, None
    kind = field(raw, "type", str, "tool_choice", required=True)
    disable = field(raw, "disable_parallel_tool_use", bool, "tool_choice")
    parallel = None if disable is None else not disable
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind in modes:
        return ir.ToolChoice(modes[kind]), parallel
    if kind == "tool":
        return ir.ToolChoice(
            "tool", field(raw, "name", str, "tool_choice", required=True)
        ), parallel
    raise InvalidRequestError(f"tool_choice.type: unsupported {kind!r}", param="tool_choice.type")


def _parse_thinking(raw: dict | None) -> ir.Reasoning | None:
    if raw is None:
        return None
    kind = field(raw, "type", str, "thinking", required=True)
    if kind == "disabled":
        return ir.Reasoning(enabled=False)
    if kind == "enabled":
        return ir.Reasoning(
            budget_tokens=field(raw, "budget_tokens", int, "thinking", required=True)
        )
    if kind == "adaptive":
        return ir.Reasoning()
    raise InvalidRequestError(f"thinking.type: unsupported {kind!r}", param="thinking.type")


def _parse_output_format(body: dict) -> ir.ResponseFormat | None:
    config = field(body, "output_config", dict, "") or {}
    fmt = field(config, "format", dict, "output_config") or field(body, "output_format", dict, "")
    if fmt is None:
        return None
    where = "output_config.format" if "format" in config else "output_format"
    if field(fmt, "type", str, where, required=True) != "json_schema":
        raise InvalidRequestError(f"{where}.type: expected 'json_schema'", param=f"{where}.type")
    return ir.ResponseFormat("json_schema", schema=field(fmt, "schema", dict, where, required=True))


# ---- requests: IR -> wire (for the Anthropic upstream) ---------------------------------------


def render_request(request: ir.Request) -> dict:
    """Render an IR request as a Messages body.

    Args:
        request: The IR request (its ``model`` is the upstream model name).

    Raises:
        InvalidRequestError: If the request holds something Anthropic cannot express (audio,
            JSON mode without a schema), naming the field.
    """
    system, messages = split_system(request.messages)
    body: dict = {"model": request.model, "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS}
    if system:
        body["system"] = [
            _render_cache({"type": "text", "text": p.text}, p.cache) for p in system if p.text
        ]
    body["messages"] = [
        m
        for m in (_render_message(m, f"messages[{i}]") for i, m in enumerate(messages))
        if m["content"]
    ]
    if request.tools:
        body["tools"] = [_render_tool(t) for t in request.tools]
    choice = _render_tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    if request.stop:
        body["stop_sequences"] = request.stop
    thinking = request.reasoning is not None and request.reasoning.enabled
    if thinking:
        budget = request.reasoning.budget_tokens or effort_to_budget(request.reasoning.effort or "")
        budget = max(budget, _MIN_THINKING_BUDGET)
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if body["max_tokens"] <= budget:
            body["max_tokens"] = budget + body["max_tokens"]
    elif request.reasoning is not None:
        body["thinking"] = {"type": "disabled"}
    # The Messages API (anthropic SDK 2.x request types) has no sampling parameters: a
    # client's temperature/top_p/top_k are not forwarded (see the module notes).
    dropped = [k for k in ("temperature", "top_p", "top_k") if getattr(request, k) is not None]
    if dropped:
        logger.debug("not forwarding %s to Anthropic", ", ".join(dropped))
    if request.response_format is not None and request.response_format.type != "text":
        fmt = request.response_format
        if fmt.type == "json_object" or fmt.schema is None:
            raise InvalidRequestError(
                "response_format: Anthropic supports JSON output only with a JSON schema "
                "(json_schema), not json_object",
                param="response_format",
            )
        body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.schema}}
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.stream:
        body["stream"] = True
    return body


def _render_tool_choice(request: ir.Request) -> dict | None:
    choice = request.tool_choice
    if choice is None and request.parallel_tool_calls is not False:
        return None
    if not request.tools and (choice is None or choice.mode == "none"):
        return None
    mode = choice.mode if choice is not None else "auto"
    wire: dict = {"type": {"auto": "auto", "required": "any", "none": "none", "tool": "tool"}[mode]}
    if mode == "tool":
        wire["name"] = choice.name
    if request.parallel_tool_calls is False and mode != "none":
        wire["disable_parallel_tool_use"] = True
    return wire


def _render_message(message: ir.Message, where: str) -> dict:
    if message.role == "user":
        # Anthropic wants every tool_result before any other block of the turn.
        ordered = sorted(message.parts, key=lambda p: not isinstance(p, ir.ToolResultPart))
    else:
        ordered = message.parts
    blocks = []
    for j, part in enumerate(ordered):
        block = _render_block(part, f"{where}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return {"role": message.role, "content": blocks}


def _render_block(part: ir.Part, where: str, unsigned: str | None = None) -> dict | None:
    """One content block; unsigned thinking gets the signature ``unsigned`` (None: dropped)."""
    block = _render_block_body(part, where, unsigned)
    if block is not None and not isinstance(part, ir.ThinkingPart):
        _render_cache(block, part.cache)
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
        for b in (_render_block(p, f"{where}.content[{k}]") for k, p in enumerate(part.content))
        if b is not None
    ]
    block: dict = {"type": "tool_result", "tool_use_id": _safe_id(part.call_id)}
    if content:
        block["content"] = content
    if part.is_error:
        block["is_error"] = True
    return block


def _render_media(part: ir.MediaPart, where: str) -> dict:
    if part.kind == "image":
        if part.url is not None:
            return {"type": "image", "source": {"type": "url", "url": part.url}}
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": part.media_type, "data": part.data},
        }
    if part.kind == "pdf":
        if part.url is not None:
            return {"type": "document", "source": {"type": "url", "url": part.url}}
        return {
            "type": "document",
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


def _render_tool(tool: ir.Tool) -> dict:
    wire: dict = {"name": tool.name, "input_schema": tool.parameters or {"type": "object"}}
    if tool.description is not None:
        wire["description"] = tool.description
    if tool.strict is not None:
        wire["strict"] = tool.strict
    return _render_cache(wire, tool.cache)


def _safe_id(call_id: str) -> str:
    """Anthropic ids must match ``^[a-zA-Z0-9_-]+$``; map others deterministically."""
    return _UNSAFE_ID.sub("_", call_id) or "call"


# ---- responses ------------------------------------------------------------------------------


def parse_response(body: dict) -> ir.Response:
    """Parse a Messages response from the upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        InvalidRequestError: If a content block is malformed.
    """
    parts = [
        _parse_block(b, f"content[{i}]", _ASSISTANT_BLOCKS)
        for i, b in enumerate(body.get("content") or [])
        if b.get("type") in _ASSISTANT_BLOCKS
    ]
    return ir.Response(
        id=body.get("id") or new_id("msg"),
        model=body.get("model") or "",
        parts=parts,
        finish_reason=_FINISH_FROM_WIRE.get(body.get("stop_reason") or "end_turn", "stop"),
        stop_sequence=body.get("stop_sequence"),
        usage=parse_usage(body.get("usage") or {}),
        created=int(time.time()),
    )


def parse_usage(raw: dict, into: ir.Usage | None = None) -> ir.Usage:
    """Read an Anthropic ``usage`` object (whose input_tokens exclude cached tokens).

    Args:
        raw: The usage object.
        into: Usage to update (stream events report usage piecewise).
    """
    usage = into or ir.Usage()
    read = raw.get("cache_read_input_tokens")
    created = raw.get("cache_creation_input_tokens")
    if read is not None:
        usage.cache_read_tokens = read
    if created is not None:
        usage.cache_creation_tokens = created
    if raw.get("input_tokens") is not None:
        usage.input_tokens = (
            raw["input_tokens"] + usage.cache_read_tokens + usage.cache_creation_tokens
        )
    if raw.get("output_tokens") is not None:
        usage.output_tokens = raw["output_tokens"]
    return usage


def render_usage(usage: ir.Usage) -> dict:
    """Render IR usage the Anthropic way (input_tokens exclude cache reads and writes).

    Args:
        usage: The IR usage.
    """
    return {
        "input_tokens": max(
            0, usage.input_tokens - usage.cache_read_tokens - usage.cache_creation_tokens
        ),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a Messages ``message`` object.

    Args:
        response: The IR response.
        request: The client's request (unused; uniform signature).

    Raises:
        UpstreamError: If a tool call's arguments are not a JSON object.
    """
    content = []
    for i, part in enumerate(response.parts):
        if isinstance(part, ir.ToolCallPart):
            content.append(
                {
                    "type": "tool_use",
                    "id": part.id,
                    "name": part.name,
                    "input": _upstream_arguments(part, i),
                }
            )
        else:
            block = _render_block(part, f"content[{i}]", UNSIGNED_SIGNATURE)
            if block is not None:
                content.append(block)
    return {
        "id": response.id,
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content,
        "stop_reason": _FINISH_TO_WIRE[response.finish_reason],
        "stop_sequence": response.stop_sequence,
        "usage": render_usage(response.usage),
    }


def _upstream_arguments(part: ir.ToolCallPart, index: int) -> dict:
    try:
        return parse_arguments(part.arguments, f"content[{index}]")
    except InvalidRequestError as err:
        raise UpstreamError(f"upstream sent tool call {part.name!r} with {err.message}") from err


# ---- streams --------------------------------------------------------------------------------


class StreamParser:
    """Turns the upstream's Messages stream events into IR stream events."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self._usage = ir.Usage()
        self._finish: ir.FinishReason = "stop"
        self._stop_sequence: str | None = None
        self._stopped = False

    def parse_stream_event(self, name: str | None, data: dict) -> list[ir.StreamEvent]:
        """Translate one SSE event.

        Args:
            name: The SSE event name (Anthropic repeats it as ``data["type"]``).
            data: The decoded event data.

        Raises:
            GatewayError: For an ``error`` event (e.g. ``overloaded_error`` inside a 200).
        """
        kind = data.get("type") or name
        if kind == "message_start":
            message = data.get("message") or {}
            parse_usage(message.get("usage") or {}, self._usage)
            return [
                ir.StreamStart(
                    message.get("id") or new_id("msg"),
                    message.get("model") or "",
                    int(time.time()),
                    dataclasses.replace(self._usage),
                )
            ]
        if kind == "content_block_start":
            return self._start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            index = self._index.get(data.get("index", 0))
            delta = data.get("delta") or {}
            if index is None:
                return []
            kinds = {"text_delta": "text", "thinking_delta": "thinking"}
            if delta.get("type") in kinds:
                return [ir.PartDelta(index, text=delta.get(kinds[delta["type"]]) or "")]
            if delta.get("type") == "signature_delta":
                return [ir.PartDelta(index, signature=delta.get("signature"))]
            if delta.get("type") == "input_json_delta":
                return [ir.PartDelta(index, arguments=delta.get("partial_json") or "")]
            return []
        if kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._finish = _FINISH_FROM_WIRE.get(delta["stop_reason"], "stop")
                self._stop_sequence = delta.get("stop_sequence")
            parse_usage(data.get("usage") or {}, self._usage)
            return []
        if kind == "message_stop":
            self._stopped = True
        elif kind == "error":
            raise parse_error(data, 500)
        return []

    def finish(self) -> list[ir.StreamEvent]:
        """Events at the end of the upstream stream (the single StreamEnd).

        Raises:
            UpstreamError: If the stream ended before ``message_stop`` (truncated).
        """
        if not self._stopped:
            raise UpstreamError("upstream stream ended before message_stop")
        return [ir.StreamEnd(self._finish, self._stop_sequence, self._usage)]

    def _start(self, wire_index: int, block: dict) -> list[ir.StreamEvent]:
        kind = block.get("type")
        index = len(self._index)
        if kind == "text":
            part: ir.TextPart | ir.ThinkingPart | ir.ToolCallPart = ir.TextPart("")
        elif kind == "thinking":
            # signature "" = a signature_delta will follow.
            part = ir.ThinkingPart("", "")
        elif kind == "redacted_thinking":
            part = ir.ThinkingPart(redacted_data=block.get("data") or "")
        elif kind == "tool_use":
            part = ir.ToolCallPart(block.get("id") or new_id("toolu"), block.get("name") or "", "")
        else:
            logger.warning("dropping unsupported Anthropic content block %r", kind)
            return []
        self._index[wire_index] = index
        events: list[ir.StreamEvent] = [ir.PartStart(index, part)]
        if kind == "text" and block.get("text"):
            events.append(ir.PartDelta(index, text=block["text"]))
        return events


class StreamRenderer:
    """Renders IR stream events as the Messages SSE grammar.

    Blocks open and close strictly in index order. Text blocks open lazily on their first
    non-empty delta (an empty text block would be rejected when the client sends it back);
    a thinking block that got no signature is closed with `UNSIGNED_SIGNATURE`.

    Args:
        request: The client's request.
    """

    def __init__(self, request: ir.Request) -> None:
        self._blocks = 0
        self._open: int | None = None  # IR index of the open block
        self._block_of: dict[int, int] = {}
        self._kind: dict[int, str] = {}
        self._signed: dict[int, bool] = {}

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            message = {
                "id": event.id,
                "type": "message",
                "role": "assistant",
                "model": event.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": render_usage(event.usage),
            }
            return [_event("message_start", {"message": message})]
        if isinstance(event, ir.PartStart):
            out = self._close()
            part = event.part
            if isinstance(part, ir.ToolCallPart):
                self._kind[event.index] = "tool"
                out += self._open_block(
                    event.index, {"type": "tool_use", "id": part.id, "name": part.name, "input": {}}
                )
                if part.arguments:
                    out += self._delta(
                        event.index, {"type": "input_json_delta", "partial_json": part.arguments}
                    )
            elif isinstance(part, ir.ThinkingPart):
                self._kind[event.index] = "thinking"
                if part.redacted_data is not None:
                    out += self._open_block(
                        event.index, {"type": "redacted_thinking", "data": part.redacted_data}
                    )
                else:
                    self._signed[event.index] = False
                    out += self._open_block(
                        event.index, {"type": "thinking", "thinking": "", "signature": ""}
                    )
                    out += self._thinking_delta(event.index, part.text, part.signature)
            else:
                self._kind[event.index] = "text"
                out += self._text(event.index, part.text)
            return out
        if isinstance(event, ir.PartDelta):
            kind = self._kind.get(event.index)
            if kind == "tool":
                if not event.arguments:
                    return []
                return self._delta(
                    event.index, {"type": "input_json_delta", "partial_json": event.arguments}
                )
            if kind == "thinking":
                return self._thinking_delta(event.index, event.text, event.signature)
            return self._text(event.index, event.text)
        out = self._close()
        usage = render_usage(event.usage)
        delta = {
            "stop_reason": _FINISH_TO_WIRE[event.finish_reason],
            "stop_sequence": event.stop_sequence,
        }
        out.append(_event("message_delta", {"delta": delta, "usage": usage}))
        out.append(_event("message_stop", {}))
        return out

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream ``error`` event.

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]), "error")]

    def _text(self, index: int, text: str) -> list[SSEEvent]:
        if not text:
            return []
        out = []
        if index not in self._block_of:
            out += self._open_block(index, {"type": "text", "text": ""})
        return out + self._delta(index, {"type": "text_delta", "text": text})

    def _thinking_delta(self, index: int, text: str, signature: str | None) -> list[SSEEvent]:
        out = []
        if text:
            out += self._delta(index, {"type": "thinking_delta", "thinking": text})
        if signature:
            out += self._delta(index, {"type": "signature_delta", "signature": signature})
            self._signed[index] = True
        return out

    def _open_block(self, index: int, block: dict) -> list[SSEEvent]:
        self._block_of[index] = self._blocks
        self._open = index
        self._blocks += 1
        return [
            _event("content_block_start", {"index": self._block_of[index], "content_block": block})
        ]

    def _delta(self, index: int, delta: dict) -> list[SSEEvent]:
        if index != self._open:
            # Upstream interleaved parts; the block is closed, so the data cannot be placed.
            logger.warning("dropping a delta for closed content part %d", index)
            return []
        return [_event("content_block_delta", {"index": self._block_of[index], "delta": delta})]

    def _close(self) -> list[SSEEvent]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        out = []
        if self._signed.get(index) is False:
            delta = {"type": "signature_delta", "signature": UNSIGNED_SIGNATURE}
            out.append(
                _event("content_block_delta", {"index": self._block_of[index], "delta": delta})
            )
        out.append(_event("content_block_stop", {"index": self._block_of[index]}))
        return out


def _event(name: str, data: dict) -> SSEEvent:
    return SSEEvent(dump_json({"type": name, **data}), name)


# ---- errors ---------------------------------------------------------------------------------


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as Anthropic does: ``{"type": "error", "error": {"type", "message"}}``.

    Args:
        err: The error.

    Returns:
        The HTTP status (529 for overload, as Anthropic uses) and the JSON body.
    """
    status = 529 if err.kind == "overloaded" else err.status
    return status, {
        "type": "error",
        "error": {"type": _ERROR_TYPES[err.kind], "message": err.message},
    }


def parse_error(data: dict, default_status: int) -> GatewayError:
    """Turn an Anthropic error object (body or stream event) into a router error.

    Args:
        data: ``{"type": "error", "error": {"type", "message"}}``.
        default_status: Status to assume for an unknown error type.
    """
    error = data.get("error") or {}
    status = _ERRORS_FROM_WIRE.get(error.get("type"), default_status)
    return error_for_status(status, f"anthropic: {error.get('message') or json.dumps(data)}")
