"""OpenAI Chat Completions for OpenAI and OpenAI-compatible upstreams (vLLM, Ollama, llama.cpp,
mlx-lm): IR requests to the wire, the upstream's responses, streams and errors to the IR.

Reasoning travels as described in `router.formats.openai.client`; OpenAI-compatible servers
also get it back as ``reasoning_content``, api.openai.com gets no reasoning fields.
"""

from __future__ import annotations

import base64
import time

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..base import UpstreamFormat
from ..fields import budget_to_effort, dump_json, error_message, new_id
from .content import AUDIO_FORMATS, parse_assistant, render_tool_call

_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


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
    for key in ("n", "logprobs", "top_logprobs", "logit_bias", "service_tier", "store", "metadata"):
        if getattr(request, key) is not None:
            body[key] = getattr(request, key)
    if request.prediction is not None:
        body["prediction"] = {"type": "content", "content": request.prediction}
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
            formats = {v: k for k, v in AUDIO_FORMATS.items()}
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
        message["tool_calls"] = [render_tool_call(c, with_signature=compatible) for c in calls]
    for j, part in enumerate(parts):
        if isinstance(part, ir.MediaPart | ir.ToolResultPart):
            raise InvalidRequestError(
                f"{where}.content[{j}]: OpenAI assistant messages cannot carry "
                f"{type(part).__name__}",
                param=f"{where}.content",
            )
    return message


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


def parse_response(body: dict) -> ir.Response:
    """Parse a Chat Completions response from an upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        GatewayError: For an error object inside the 200 (mapped by its type: a rate limit is
            a 429, a server error a 5xx), so that the key pool and fallback see it.
        InvalidRequestError: If ``choices`` or a message is missing or malformed (the provider
            turns this into a 502).
    """
    if body.get("error"):
        raise parse_error(body, 500)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidRequestError("the response has no choices")
    parsed = [_parse_choice(choice, f"choices[{i}]") for i, choice in enumerate(choices)]
    first = parsed[0]
    return ir.Response(
        id=body.get("id") or new_id("chatcmpl"),
        model=body.get("model") or "",
        parts=first.parts,
        finish_reason=first.finish_reason,
        usage=parse_usage(body.get("usage") or {}),
        created=body.get("created") or int(time.time()),
        logprobs=first.logprobs,
        alternatives=parsed[1:],
    )


def _parse_choice(choice: object, where: str) -> ir.Choice:
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise InvalidRequestError(f"{where}: a choice must hold a message object")
    message = choice["message"]
    parts = parse_assistant(
        {k: v for k, v in message.items() if k != "role" and v is not None}, f"{where}.message", {}
    )
    if message.get("reasoning") and not any(isinstance(p, ir.ThinkingPart) for p in parts):
        parts.insert(0, ir.ThinkingPart(message["reasoning"]))
    finish = _FINISH_FROM_WIRE.get(choice.get("finish_reason") or "stop", "stop")
    if finish == "stop" and any(isinstance(p, ir.ToolCallPart) for p in parts):
        finish = "tool_calls"
    return ir.Choice(parts, finish, parse_logprobs(choice.get("logprobs")))


def parse_logprobs(raw: object) -> list[ir.TokenLogprob] | None:
    """Read a choice's ``logprobs`` (``{"content": [{"token", "logprob", "bytes",
    "top_logprobs"}]}``); None when the upstream sent none.

    Args:
        raw: The ``logprobs`` value.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    return [_parse_token(t) for t in raw["content"]]


def _parse_token(raw: dict) -> ir.TokenLogprob:
    return ir.TokenLogprob(
        token=raw["token"],
        logprob=float(raw["logprob"]),
        bytes=raw.get("bytes"),
        top=[_parse_token(t) for t in raw.get("top_logprobs") or []],
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
            tokens = parse_logprobs(choice.get("logprobs"))
            if tokens:
                events += self._logprobs(events, tokens)
            for position, call in enumerate(delta.get("tool_calls") or []):
                events += self._tool_call(call, position)
            if choice.get("finish_reason"):
                self._finish = _FINISH_FROM_WIRE.get(choice["finish_reason"], "stop")
        return self._route(events)

    def feed(self, data: dict, event: str | None = None) -> list[ir.StreamEvent]:
        """See `UpstreamStreamParser.feed` (chunks carry no event name)."""
        return self.parse_stream_event(data)

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

    def _logprobs(
        self, events: list[ir.StreamEvent], tokens: list[ir.TokenLogprob]
    ) -> list[ir.StreamEvent]:
        """Put a chunk's token log probabilities on its text delta (or a delta of their own)."""
        last = events[-1] if events else None
        if isinstance(last, ir.PartDelta) and last.text and self._open == ("text", last.index):
            last.logprobs = tokens
            return []
        opened = self._text("text", "")
        return [*opened, ir.PartDelta(self._parts - 1, logprobs=tokens)]

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


# Error ``type``/``code`` strings of OpenAI and compatible servers, for an error inside a 200.
_ERRORS_FROM_WIRE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "tokens": 429,
    "server_error": 500,
    "api_error": 500,
    "overloaded_error": 503,
    "service_unavailable": 503,
    "timeout": 504,
}


def parse_error(data: dict, default_status: int, source: str = "openai") -> GatewayError:
    """Turn an ``{"error": {...}}`` object (a body or chunk inside a 200) into a router error;
    its ``code``, when a number, is the status, else its ``code`` or ``type`` name one.

    Args:
        data: The error object.
        default_status: Status to assume when neither names one.
        source: Who sent it, named at the start of the message.
    """
    error = data["error"] if isinstance(data.get("error"), dict) else {}
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        status = code
    else:
        status = _ERRORS_FROM_WIRE.get(
            code if isinstance(code, str) else "",
            _ERRORS_FROM_WIRE.get(error.get("type") if isinstance(error.get("type"), str) else ""),
        )
        status = status or default_status
    return error_for_status(status, f"{source}: {error_message(data)}", upstream_body=data)


class OpenAIUpstream(UpstreamFormat):
    """Chat Completions as an upstream speaks it.

    Args:
        compatible: True for OpenAI-compatible servers, False for api.openai.com (see
            `render_request`).
    """

    name = "openai"

    def __init__(self, *, compatible: bool) -> None:
        self.compatible = compatible

    def render_request(self, request: ir.Request) -> dict:
        """See `UpstreamFormat.render_request`."""
        return render_request(request, compatible=self.compatible)

    parse_response = staticmethod(parse_response)
    stream_parser = staticmethod(StreamParser)
    parse_error = staticmethod(parse_error)
