"""Ollama as an upstream (``POST /api/chat``): IR requests to Ollama's body, its answers and
NDJSON streams back to the IR.

Ollama takes images only as inline base64 (the provider inlines image URLs first) and names a
tool result's call by ``tool_call_id`` and ``tool_name``. It has no ``tool_choice``: ``none``
leaves the tools out, ``auto`` is its behaviour, and forcing a call is a 400.
"""

from __future__ import annotations

import time

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..base import UpstreamFormat
from ..fields import error_message, field, new_id, objects, refuse_options
from .content import parse_tool_call, render_tool_call


def render_request(request: ir.Request) -> dict:
    """Render an IR request as an ``/api/chat`` body.

    Args:
        request: The IR request.

    Raises:
        InvalidRequestError: For what Ollama cannot take (a forced tool call, media other than
            inline images, OpenAI-only options).
    """
    refuse_options(request, "Ollama", handled=("seed", "presence_penalty", "frequency_penalty"))
    body: dict = {
        "model": request.model,
        "messages": [
            m for i, message in enumerate(request.messages) for m in _render_message(message, i)
        ],
        "stream": request.stream,
    }
    choice = request.tool_choice.mode if request.tool_choice else "auto"
    if choice in ("required", "tool"):
        raise InvalidRequestError(
            "tool_choice: Ollama cannot be made to call a tool (use auto or none)",
            param="tool_choice",
        )
    if request.tools and choice != "none":
        body["tools"] = [_render_tool(tool) for tool in request.tools]
    options = _render_options(request)
    if options:
        body["options"] = options
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        body["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        body["format"] = fmt.schema or {"type": "object"}
    if request.reasoning is not None:
        effort = request.reasoning.effort
        thinking = effort if effort in ("low", "medium", "high") else request.reasoning.enabled
        body["think"] = thinking
    return body


def _render_options(request: ir.Request) -> dict:
    values = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "seed": request.seed,
        "num_predict": request.max_tokens,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stop": request.stop or None,
    }
    return {k: v for k, v in values.items() if v is not None}


def _render_tool(tool: ir.Tool) -> dict:
    function: dict = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _render_message(message: ir.Message, index: int) -> list[dict]:
    """One IR message as Ollama messages: its tool results each become a ``tool`` message."""
    out = []
    wire: dict = {"role": message.role, "content": ""}
    texts, images, thinking, calls = [], [], [], []
    for part in message.parts:
        if isinstance(part, ir.TextPart):
            texts.append(part.text)
        elif isinstance(part, ir.MediaPart):
            images.append(_image_data(part))
        elif isinstance(part, ir.ThinkingPart):
            thinking.append(part.text)
        elif isinstance(part, ir.ToolCallPart):
            calls.append(render_tool_call(part, len(calls), f"messages[{index}].tool_calls"))
        else:
            out.append(_render_tool_result(part))
    wire["content"] = "\n\n".join(texts)
    if images:
        wire["images"] = images
    if any(thinking):
        wire["thinking"] = "".join(thinking)
    if calls:
        wire["tool_calls"] = calls
    if texts or images or calls or not out:
        out.append(wire)
    return out


def _image_data(part: ir.MediaPart) -> str:
    if part.data is None or part.kind != "image":
        raise InvalidRequestError(
            f"Ollama takes inline images only, not {part.media_type!r} "
            f"{'data' if part.data is not None else 'URLs'}",
            param="messages",
        )
    return part.data


def _render_tool_result(part: ir.ToolResultPart) -> dict:
    text = "\n\n".join(p.text for p in part.content if isinstance(p, ir.TextPart))
    images = [_image_data(p) for p in part.content if isinstance(p, ir.MediaPart)]
    wire = {"role": "tool", "content": text, "tool_call_id": part.call_id}
    if part.name:
        wire["tool_name"] = part.name
    if images:
        wire["images"] = images
    return wire


def _finish(body: dict, has_calls: bool) -> ir.FinishReason:
    if field(body, "done_reason", str, "") == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _usage(body: dict) -> ir.Usage:
    return ir.Usage(
        input_tokens=field(body, "prompt_eval_count", int, "") or 0,
        output_tokens=field(body, "eval_count", int, "") or 0,
    )


def _calls(message: dict) -> list[ir.ToolCallPart]:
    raw = field(message, "tool_calls", list, "message") or []
    return [
        parse_tool_call(call, f"message.tool_calls[{k}]", new_id("call"))
        for k, call in enumerate(objects(raw, "message.tool_calls"))
    ]


def parse_response(body: dict) -> ir.Response:
    """Parse a complete ``/api/chat`` answer.

    Args:
        body: The decoded JSON answer.

    Raises:
        InvalidRequestError: If a field has the wrong type (the provider makes it a 502).
    """
    message = field(body, "message", dict, "", required=True)
    parts: list[ir.Part] = []
    thinking = field(message, "thinking", str, "message")
    if thinking:
        parts.append(ir.ThinkingPart(thinking))
    text = field(message, "content", str, "message") or ""
    calls = _calls(message)
    if text or not calls:
        parts.append(ir.TextPart(text))
    parts.extend(calls)
    return ir.Response(
        id=new_id("ollama"),
        model=field(body, "model", str, "") or "",
        parts=parts,
        finish_reason=_finish(body, bool(calls)),
        usage=_usage(body),
        created=int(time.time()),
    )


class StreamParser:
    """Turns Ollama's NDJSON stream objects into IR events: thinking and text as parts that
    grow, each tool call as a part of its own, and the ``done`` object's counts at the end."""

    def __init__(self) -> None:
        self._started = False
        self._index = -1
        self._kind: type | None = None
        self._calls = False
        self._end: ir.StreamEnd | None = None

    def feed(self, data: dict, event: str | None = None) -> list[ir.StreamEvent]:
        """Translate one stream object.

        Args:
            data: The decoded object.
            event: Unused (NDJSON has no event names).
        """
        out: list[ir.StreamEvent] = []
        if not self._started:
            self._started = True
            model = field(data, "model", str, "") or ""
            out.append(ir.StreamStart(new_id("ollama"), model, int(time.time())))
        message = field(data, "message", dict, "") or {}
        out += self._text(ir.ThinkingPart, field(message, "thinking", str, "message") or "")
        out += self._text(ir.TextPart, field(message, "content", str, "message") or "")
        for call in _calls(message):
            self._calls = True
            self._index += 1
            self._kind = ir.ToolCallPart
            arguments, call.arguments = call.arguments, ""
            out += [ir.PartStart(self._index, call), ir.PartDelta(self._index, arguments=arguments)]
        if field(data, "done", bool, ""):
            self._end = ir.StreamEnd(_finish(data, self._calls), usage=_usage(data))
        return out

    def _text(self, kind: type, text: str) -> list[ir.StreamEvent]:
        if not text:
            return []
        if self._kind is kind:
            return [ir.PartDelta(self._index, text=text)]
        self._index += 1
        self._kind = kind
        return [ir.PartStart(self._index, kind(text="")), ir.PartDelta(self._index, text=text)]

    def finish(self) -> list[ir.StreamEvent]:
        """The stream's `ir.StreamEnd`.

        Raises:
            UpstreamError: If the stream ended without its ``done`` object.
        """
        if self._end is None:
            raise UpstreamError("Ollama's stream ended before its done object")
        return [self._end]


def parse_error(data: dict, default_status: int, source: str) -> GatewayError:
    """Turn Ollama's ``{"error": "..."}`` into a router error.

    Args:
        data: The decoded error object.
        default_status: The HTTP status (Ollama's body names none).
        source: The provider's name.
    """
    return error_for_status(default_status, f"{source}: {error_message(data)}", upstream_body=data)


class OllamaUpstream(UpstreamFormat):
    """``/api/chat`` as the router speaks it to an Ollama server."""

    name = "ollama"
    render_request = staticmethod(render_request)
    parse_response = staticmethod(parse_response)
    stream_parser = staticmethod(StreamParser)
    parse_error = staticmethod(parse_error)
