"""OpenAI Chat Completions <-> IR, for clients and for OpenAI-compatible upstreams.

Reasoning has no official Chat Completions field. Following DeepSeek/vLLM, reasoning text
travels as ``reasoning_content`` on messages and deltas; following LiteLLM, the complete blocks
with their signatures travel as ``thinking_blocks`` (``{"type": "thinking", "thinking",
"signature"}`` or ``{"type": "redacted_thinking", "data"}``) so that a client can send them back.
In streams, ``reasoning_content`` deltas carry the text and one ``thinking_blocks`` delta carries
each finished block with its signature. Gemini's signature on a function call travels as
``extra_content.google.thought_signature`` on the tool call, as Google's OpenAI endpoint does.
"""

from __future__ import annotations

import base64
import time

from .. import ir
from ..errors import GatewayError, InvalidRequestError, UpstreamError
from ..sse import SSEEvent
from . import (
    append_tool_result,
    budget_to_effort,
    dump_json,
    field,
    new_id,
    objects,
    parse_data_url,
)

_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
_FINISH_TO_WIRE = {
    "stop": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}
_AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}
_ERROR_TYPES = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("authentication_error", "invalid_api_key"),
    "permission": ("permission_error", None),
    "not_found": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded": ("server_error", "overloaded"),
    "timeout": ("server_error", "timeout"),
}


# ---- requests: wire -> IR ----------------------------------------------------------------


def parse_request(body: dict) -> ir.Request:
    """Parse a Chat Completions request body.

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    model = field(body, "model", str, "", required=True)
    raw_messages = objects(field(body, "messages", list, "", required=True), "messages")
    if not raw_messages:
        raise InvalidRequestError("messages: must not be empty", param="messages")
    if field(body, "n", int, "") not in (None, 1):
        raise InvalidRequestError("n: only n=1 is supported", param="n")
    messages: list[ir.Message] = []
    tool_names: dict[str, str] = {}
    for i, raw in enumerate(raw_messages):
        _parse_message(raw, f"messages[{i}]", messages, tool_names)
    stop = field(body, "stop", (str, list), "")
    max_tokens = field(body, "max_completion_tokens", int, "")
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, "")
    options = field(body, "stream_options", dict, "") or {}
    effort = field(body, "reasoning_effort", str, "")
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(field(body, "tools", list, "") or []),
        tool_choice=_parse_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=field(body, "parallel_tool_calls", bool, ""),
        max_tokens=max_tokens,
        temperature=field(body, "temperature", float, ""),
        top_p=field(body, "top_p", float, ""),
        top_k=field(body, "top_k", int, ""),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=field(body, "seed", int, ""),
        presence_penalty=field(body, "presence_penalty", float, ""),
        frequency_penalty=field(body, "frequency_penalty", float, ""),
        response_format=_parse_response_format(field(body, "response_format", dict, "")),
        reasoning=_parse_effort(effort),
        stream=bool(field(body, "stream", bool, "")),
        include_usage=bool(field(options, "include_usage", bool, "stream_options")),
        user=field(body, "user", str, ""),
    )


def _parse_effort(effort: str | None) -> ir.Reasoning | None:
    if effort is None:
        return None
    return ir.Reasoning(enabled=effort != "none", effort=effort)


def _parse_message(
    raw: dict, where: str, out: list[ir.Message], tool_names: dict[str, str]
) -> None:
    role = field(raw, "role", str, where, required=True)
    if role in ("system", "developer"):
        out.append(ir.Message("system", _parse_content(raw, where, text_only=True)))
    elif role == "user":
        out.append(ir.Message("user", _parse_content(raw, where, text_only=False)))
    elif role == "assistant":
        out.append(ir.Message("assistant", _parse_assistant(raw, where, tool_names)))
    elif role == "tool":
        call_id = field(raw, "tool_call_id", str, where, required=True)
        result = ir.ToolResultPart(
            call_id, tool_names.get(call_id), _parse_content(raw, where, text_only=False)
        )
        append_tool_result(out, result)
    else:
        raise InvalidRequestError(f"{where}.role: unsupported role {role!r}", param=f"{where}.role")


def _parse_content(raw: dict, where: str, *, text_only: bool) -> list:
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
            parts.append(ir.MediaPart(_AUDIO_FORMATS.get(fmt, f"audio/{fmt}"), data=data))
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


def _parse_assistant(raw: dict, where: str, tool_names: dict[str, str]) -> list:
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
    parts.extend(_parse_content(raw, where, text_only=True))
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


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        if field(tool, "type", str, at, required=True) != "function":
            raise InvalidRequestError(
                f"{at}.type: only function tools are supported", param=f"{at}.type"
            )
        fn = field(tool, "function", dict, at, required=True)
        tools.append(
            ir.Tool(
                name=field(fn, "name", str, f"{at}.function", required=True),
                description=field(fn, "description", str, f"{at}.function"),
                parameters=field(fn, "parameters", dict, f"{at}.function"),
                strict=field(fn, "strict", bool, f"{at}.function"),
            )
        )
    return tools


def _parse_tool_choice(raw: object) -> ir.ToolChoice | None:
    if raw is None:
        return None
    if raw in ("auto", "none", "required"):
        return ir.ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = field(raw, "function", dict, "tool_choice", required=True)
        return ir.ToolChoice("tool", field(fn, "name", str, "tool_choice.function", required=True))
    raise InvalidRequestError(
        "tool_choice: expected 'auto', 'none', 'required' or a function", param="tool_choice"
    )


def _parse_response_format(raw: dict | None) -> ir.ResponseFormat | None:
    if raw is None:
        return None
    kind = field(raw, "type", str, "response_format", required=True)
    if kind in ("text", "json_object"):
        return ir.ResponseFormat(kind)
    if kind == "json_schema":
        spec = field(raw, "json_schema", dict, "response_format", required=True)
        where = "response_format.json_schema"
        return ir.ResponseFormat(
            "json_schema",
            schema=field(spec, "schema", dict, where),
            name=field(spec, "name", str, where),
            strict=field(spec, "strict", bool, where),
        )
    raise InvalidRequestError(
        f"response_format.type: unsupported {kind!r}", param="response_format.type"
    )


# ---- requests: IR -> wire (for OpenAI-compatible upstreams) --------------------------------


def render_request(request: ir.Request, *, compatible: bool) -> dict:
    """Render an IR request as a Chat Completions body.

    Args:
        request: The IR request (its ``model`` is the upstream model name).
        compatible: True for OpenAI-compatible servers (vLLM, Ollama, llama.cpp, mlx-lm):
            send ``max_tokens`` and replay reasoning as ``reasoning_content``; False for
            api.openai.com: ``max_completion_tokens`` and no reasoning fields.
    """
    body: dict = {"model": request.model, "messages": _render_messages(request, compatible)}
    if request.tools:
        body["tools"] = [_render_tool(t) for t in request.tools]
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if choice.mode == "tool"
            else choice.mode
        )
    if request.parallel_tool_calls is not None and request.tools:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.max_tokens is not None:
        body["max_tokens" if compatible else "max_completion_tokens"] = request.max_tokens
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user"):
        if getattr(request, key) is not None:
            body[key] = getattr(request, key)
    if request.top_k is not None and compatible:
        body["top_k"] = request.top_k
    if request.stop:
        body["stop"] = request.stop
    if request.response_format is not None:
        body["response_format"] = _render_response_format(request.response_format)
    if request.reasoning is not None:
        effort = _render_effort(request.reasoning)
        if effort is not None:
            body["reasoning_effort"] = effort
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _render_effort(reasoning: ir.Reasoning) -> str | None:
    """The client's own effort, or one derived from a budget. "Thinking off" from another
    format sends nothing: only some OpenAI models accept ``"none"``, and every model's
    default is valid."""
    if reasoning.effort is not None:
        return reasoning.effort
    if not reasoning.enabled:
        return None
    return budget_to_effort(reasoning.budget_tokens) if reasoning.budget_tokens else "medium"


def _render_messages(request: ir.Request, compatible: bool) -> list[dict]:
    out = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role == "system":
            out.append({"role": "system", "content": _join_text(message.parts, where)})
        elif message.role == "assistant":
            out.append(_render_assistant(message.parts, compatible, where))
        else:
            results = [p for p in message.parts if isinstance(p, ir.ToolResultPart)]
            # Tool messages carry only text: media a tool returned follows in a user message.
            media = [m for r in results for m in r.content if isinstance(m, ir.MediaPart)]
            for result in results:
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": result.call_id,
                        "content": _render_tool_result(result),
                    }
                )
            rest = media + [p for p in message.parts if not isinstance(p, ir.ToolResultPart)]
            if rest or not results:
                out.append({"role": "user", "content": _render_user_content(rest, where)})
    return out


def _join_text(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, ir.TextPart):
            raise InvalidRequestError(
                f"{where}.content[{j}]: only text is allowed here", param=f"{where}.content"
            )
        texts.append(part.text)
    return "\n\n".join(texts)


def _render_tool_result(result: ir.ToolResultPart) -> str:
    text = "".join(p.text for p in result.content if isinstance(p, ir.TextPart))
    count = sum(isinstance(p, ir.MediaPart) for p in result.content)
    if count:
        text += f"{chr(10) if text else ''}[{count} attachment(s) in the next message]"
    return text


def _render_user_content(parts: list, where: str) -> str | list[dict]:
    if len(parts) == 1 and isinstance(parts[0], ir.TextPart):
        return parts[0].text
    return [_render_user_part(p, f"{where}.content[{j}]") for j, p in enumerate(parts)]


def _render_user_part(part: ir.Part, where: str) -> dict:
    if isinstance(part, ir.TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ir.MediaPart):
        if part.kind == "image":
            url = part.url or f"data:{part.media_type};base64,{part.data}"
            return {"type": "image_url", "image_url": {"url": url}}
        if part.media_type == "text/plain" and part.data is not None:
            return {"type": "text", "text": base64.b64decode(part.data).decode("utf-8", "replace")}
        if part.kind == "audio" and part.data is not None:
            formats = {v: k for k, v in _AUDIO_FORMATS.items()}
            if part.media_type in formats:
                return {
                    "type": "input_audio",
                    "input_audio": {"data": part.data, "format": formats[part.media_type]},
                }
        if part.kind == "pdf" and part.data is not None:
            file = {"file_data": f"data:{part.media_type};base64,{part.data}"}
            if part.filename:
                file["filename"] = part.filename
            return {"type": "file", "file": file}
        raise InvalidRequestError(
            f"{where}: OpenAI cannot take {part.media_type} content"
            + (" by URL" if part.url else ""),
            param=where,
        )
    raise InvalidRequestError(
        f"{where}: unexpected {type(part).__name__} in a user message", param=where
    )


def _render_assistant(parts: list, compatible: bool, where: str) -> dict:
    message: dict = {"role": "assistant"}
    texts = [p.text for p in parts if isinstance(p, ir.TextPart)]
    calls = [p for p in parts if isinstance(p, ir.ToolCallPart)]
    message["content"] = "".join(texts) if texts or not calls else None
    reasoning = "".join(p.text for p in parts if isinstance(p, ir.ThinkingPart))
    if compatible and reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        # Gemini's signature rides in extra_content, which only Google's endpoint knows.
        message["tool_calls"] = [_render_tool_call(c, with_signature=compatible) for c in calls]
    for j, part in enumerate(parts):
        if isinstance(part, ir.MediaPart | ir.ToolResultPart):
            raise InvalidRequestError(
                f"{where}.content[{j}]: OpenAI assistant messages cannot carry "
                f"{type(part).__name__}",
                param=f"{where}.content",
            )
    return message


def _render_tool_call(call: ir.ToolCallPart, *, with_signature: bool = True) -> dict:
    wire = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if call.signature and with_signature:
        wire["extra_content"] = {"google": {"thought_signature": call.signature}}
    return wire


def _render_tool(tool: ir.Tool) -> dict:
    fn: dict = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    if tool.parameters is not None:
        fn["parameters"] = tool.parameters
    if tool.strict is not None:
        fn["strict"] = tool.strict
    return {"type": "function", "function": fn}


def _render_response_format(fmt: ir.ResponseFormat) -> dict:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec: dict = {"name": fmt.name or "response"}
    if fmt.schema is not None:
        spec["schema"] = fmt.schema
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


# ---- responses ------------------------------------------------------------------------------


def parse_response(body: dict) -> ir.Response:
    """Parse a Chat Completions response from an upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        InvalidRequestError: If a message field has the wrong type (the provider turns this
            into a 502).
    """
    choices = body.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    parts = (
        _parse_assistant(
            {k: v for k, v in message.items() if k != "role" and v is not None}, "message", {}
        )
        if message
        else []
    )
    if message.get("reasoning") and not any(isinstance(p, ir.ThinkingPart) for p in parts):
        parts.insert(0, ir.ThinkingPart(message["reasoning"]))
    finish = _FINISH_FROM_WIRE.get(choice.get("finish_reason") or "stop", "stop")
    if finish == "stop" and any(isinstance(p, ir.ToolCallPart) for p in parts):
        finish = "tool_calls"
    return ir.Response(
        id=body.get("id") or new_id("chatcmpl"),
        model=body.get("model") or "",
        parts=parts,
        finish_reason=finish,
        usage=parse_usage(body.get("usage") or {}),
        created=body.get("created") or int(time.time()),
    )


def parse_usage(raw: dict) -> ir.Usage:
    """Read an OpenAI ``usage`` object.

    Args:
        raw: The usage object (may be empty).
    """
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return ir.Usage(
        input_tokens=raw.get("prompt_tokens") or 0,
        output_tokens=raw.get("completion_tokens") or 0,
        cache_read_tokens=prompt_details.get("cached_tokens") or 0,
        reasoning_tokens=completion_details.get("reasoning_tokens") or 0,
    )


def render_usage(usage: ir.Usage) -> dict:
    """Render IR usage as an OpenAI ``usage`` object.

    Args:
        usage: The IR usage.
    """
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a ``chat.completion`` object.

    Args:
        response: The IR response.
        request: The client's request (unused by this format; kept for a uniform signature).
    """
    message: dict = {"role": "assistant"}
    texts = [p.text for p in response.parts if isinstance(p, ir.TextPart)]
    calls = [p for p in response.parts if isinstance(p, ir.ToolCallPart)]
    message["content"] = "".join(texts) if texts or not calls else None
    thinking = [p for p in response.parts if isinstance(p, ir.ThinkingPart)]
    if thinking:
        message["reasoning_content"] = "".join(p.text for p in thinking)
        message["thinking_blocks"] = [_render_thinking_block(p) for p in thinking]
    if calls:
        message["tool_calls"] = [_render_tool_call(c) for c in calls]
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_TO_WIRE[response.finish_reason],
            }
        ],
        "usage": render_usage(response.usage),
    }


def _render_thinking_block(part: ir.ThinkingPart) -> dict:
    if part.redacted_data is not None:
        return {"type": "redacted_thinking", "data": part.redacted_data}
    block = {"type": "thinking", "thinking": part.text}
    if part.signature is not None:
        block["signature"] = part.signature
    return block


# ---- streams --------------------------------------------------------------------------------


class StreamParser:
    """Turns an upstream's ``chat.completion.chunk`` objects into IR stream events.

    Robust to what OpenAI-compatible servers really send: a call's ``id``/``name`` only on its
    first delta, ``arguments`` as an object instead of a string, every call at ``index`` 0
    (a new ``id`` then starts a new call), ``finish_reason: "stop"`` after tool calls, the
    usage in a trailing chunk with empty ``choices``, and argument deltas of parallel calls
    interleaved (index 0, 1, 0, 1...). For the last: the IR stream is strictly sequential, so
    the first call streams live and every part after it is held and emitted, in order, when
    the upstream stream ends (a late delta for the first call still has its part open).
    """

    def __init__(self) -> None:
        self._started = False
        self._parts = 0
        self._open: tuple[str, object] | None = None
        self._calls: dict[object, tuple[int, str]] = {}
        self._had_calls = False
        self._finish: ir.FinishReason | None = None
        self._usage = ir.Usage()
        self._live_call: int | None = None
        self._held: list[ir.StreamEvent] = []

    def parse_stream_event(self, chunk: dict) -> list[ir.StreamEvent]:
        """Translate one chunk.

        Args:
            chunk: A decoded ``chat.completion.chunk``.
        """
        events: list[ir.StreamEvent] = []
        if not self._started:
            self._started = True
            events.append(
                ir.StreamStart(
                    chunk.get("id") or new_id("chatcmpl"),
                    chunk.get("model") or "",
                    chunk.get("created") or int(time.time()),
                )
            )
        if chunk.get("usage"):
            self._usage = parse_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                events += self._text("thinking", reasoning)
            for block in delta.get("thinking_blocks") or []:
                if block.get("signature"):
                    if self._open is None or self._open[0] != "thinking":
                        events += self._text("thinking", "")
                    events.append(ir.PartDelta(self._parts - 1, signature=block["signature"]))
            if delta.get("content"):
                events += self._text("text", delta["content"])
            for position, call in enumerate(delta.get("tool_calls") or []):
                events += self._tool_call(call, position)
            if choice.get("finish_reason"):
                self._finish = _FINISH_FROM_WIRE.get(choice["finish_reason"], "stop")
        return self._route(events)

    def _route(self, events: list[ir.StreamEvent]) -> list[ir.StreamEvent]:
        """Pass events through, holding those of parts after the first tool call."""
        out = []
        for event in events:
            index = getattr(event, "index", None)
            if self._live_call is None or index is None or index == self._live_call:
                out.append(event)
                if isinstance(event, ir.PartStart) and isinstance(event.part, ir.ToolCallPart):
                    self._live_call = event.index
            else:
                self._held.append(event)
        return out

    def finish(self) -> list[ir.StreamEvent]:
        """Events at the end of the upstream stream (the single StreamEnd).

        Raises:
            UpstreamError: If the stream ended before any ``finish_reason`` (truncated).
        """
        finish = self._finish
        if finish is None:
            raise UpstreamError("upstream stream ended without a finish_reason")
        if finish == "stop" and self._had_calls:
            finish = "tool_calls"
        # A stable sort: each held part's start and deltas keep their order.
        held = sorted(self._held, key=lambda e: e.index)
        return [*held, ir.StreamEnd(finish, usage=self._usage)]

    def _text(self, kind: str, text: str) -> list[ir.StreamEvent]:
        events: list[ir.StreamEvent] = []
        if self._open is None or self._open[0] != kind:
            part = ir.TextPart("") if kind == "text" else ir.ThinkingPart("")
            events.append(ir.PartStart(self._parts, part))
            self._open = (kind, self._parts)
            self._parts += 1
        if text:
            events.append(ir.PartDelta(self._parts - 1, text=text))
        return events

    def _tool_call(self, call: dict, position: int) -> list[ir.StreamEvent]:
        events: list[ir.StreamEvent] = []
        fn = call.get("function") or {}
        key = call.get("index", position)
        known = self._calls.get(key)
        if known is not None and call.get("id") and call["id"] != known[1]:
            # Ollama-style: every call at index 0; a new id means a new call.
            key = (key, call["id"])
            known = self._calls.get(key)
        if known is None:
            call_id = call.get("id") or new_id("call")
            signature = ((call.get("extra_content") or {}).get("google") or {}).get(
                "thought_signature"
            )
            part = ir.ToolCallPart(call_id, fn.get("name") or "", "", signature)
            events.append(ir.PartStart(self._parts, part))
            known = self._calls[key] = (self._parts, call_id)
            self._calls[call.get("index", position)] = known
            self._open = ("tool", key)
            self._parts += 1
            self._had_calls = True
        arguments = fn.get("arguments")
        if isinstance(arguments, dict):
            arguments = dump_json(arguments)
        if arguments:
            events.append(ir.PartDelta(known[0], arguments=arguments))
        return events


class StreamRenderer:
    """Renders IR stream events as ``chat.completion.chunk`` SSE events.

    Args:
        request: The client's request (``include_usage`` decides the usage chunk).
    """

    def __init__(self, request: ir.Request) -> None:
        self._include_usage = request.include_usage
        self._head: dict = {}
        self._tool_index: dict[int, int] = {}
        self._thinking: dict[int, ir.ThinkingPart] = {}

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            self._head = {
                "id": event.id,
                "object": "chat.completion.chunk",
                "created": event.created,
                "model": event.model,
            }
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, ir.PartStart):
            out = self._flush_thinking()
            part = event.part
            if isinstance(part, ir.ToolCallPart):
                index = self._tool_index[event.index] = len(self._tool_index)
                call = _render_tool_call(part)
                call["index"] = index
                call["function"]["arguments"] = part.arguments
                out.append(self._chunk({"tool_calls": [call]}))
            elif isinstance(part, ir.ThinkingPart):
                self._thinking[event.index] = ir.ThinkingPart(
                    part.text, part.signature, part.redacted_data
                )
                if part.text:
                    out.append(self._chunk({"reasoning_content": part.text}))
            elif part.text:
                out.append(self._chunk({"content": part.text}))
            return out
        if isinstance(event, ir.PartDelta):
            if event.index in self._tool_index:
                if not event.arguments:
                    return []
                call = {
                    "index": self._tool_index[event.index],
                    "function": {"arguments": event.arguments},
                }
                return [self._chunk({"tool_calls": [call]})]
            if event.index in self._thinking:
                block = self._thinking[event.index]
                block.text += event.text
                block.signature = event.signature or block.signature
                return [self._chunk({"reasoning_content": event.text})] if event.text else []
            return [self._chunk({"content": event.text})] if event.text else []
        out = self._flush_thinking()
        out.append(self._chunk({}, finish_reason=_FINISH_TO_WIRE[event.finish_reason]))
        if self._include_usage:
            out.append(
                SSEEvent(
                    dump_json({**self._head, "choices": [], "usage": render_usage(event.usage)})
                )
            )
        out.append(SSEEvent("[DONE]"))
        return out

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream error event (the OpenAI SDK raises ``APIError`` on it).

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]))]

    def _flush_thinking(self) -> list[SSEEvent]:
        out = []
        for part in self._thinking.values():
            out.append(self._chunk({"thinking_blocks": [_render_thinking_block(part)]}))
        self._thinking.clear()
        return out

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> SSEEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return SSEEvent(dump_json(chunk))


# ---- errors ---------------------------------------------------------------------------------


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        err: The error.

    Returns:
        The HTTP status and the JSON body.
    """
    kind, code = _ERROR_TYPES[err.kind]
    if err.kind == "not_found" and err.param == "model":
        code = "model_not_found"
    return err.status, {
        "error": {"message": err.message, "type": kind, "param": err.param, "code": code}
    }
