"""Ollama's API for clients: ``POST /api/chat`` and ``POST /api/generate`` to the IR, IR answers
to Ollama's objects (one JSON object, or newline-delimited JSON objects when streaming, which
is Ollama's default), errors as ``{"error": "..."}``, and the bodies of the discovery routes
(``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``; `router.formats.ollama.discovery`
serves them).

Ollama reports durations in nanoseconds. In a stream, ``prompt_eval_duration`` is the time
from the request to the first output and ``eval_duration`` the time from there to the end; a
complete answer shows no such split, so its whole time is ``eval_duration``. ``load_duration``
is 0: the router's models are always loaded. Tool results (``role: "tool"``) name their call
by ``tool_call_id`` or, as older clients do, by ``tool_name`` alone: they then answer the
oldest unanswered call of that name in the preceding assistant turn.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime

from aiohttp import web

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError
from ...sse import SSEEvent
from ..base import ClientCall, ClientFormat, NDJSONWriter, StreamWriter
from ..fields import append_tool_result, dump_json, field, new_id, objects
from .content import parse_images, parse_options, parse_tool_call, parse_tools, render_tool_call

# The Ollama API version whose routes and fields this follows (clients check it for features).
OLLAMA_VERSION = "0.12.0"
# Models that never unload: ``/api/ps`` shows them expiring at the end of time, as Ollama does
# for ``keep_alive: -1``.
NEVER = "2318-01-01T00:00:00Z"
EPOCH = "1970-01-01T00:00:00Z"

_DONE_REASONS = {
    "stop": "stop",
    "stop_sequence": "stop",
    "tool_calls": "stop",
    "length": "length",
    "content_filter": "content_filter",
}


def _common(body: dict) -> dict:
    """The fields ``/api/chat`` and ``/api/generate`` share, as `ir.Request` arguments."""
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (
        isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float)
    ):
        # Accepted and unused (the router's models stay loaded), but a duration all the same.
        raise InvalidRequestError(
            "keep_alive: expected a duration string or a number of seconds", param="keep_alive"
        )
    stream = field(body, "stream", bool, "")
    return {
        "model": field(body, "model", str, "", required=True),
        "stream": True if stream is None else stream,
        "include_usage": True,
        "response_format": _parse_format(body.get("format")),
        "reasoning": _parse_think(body.get("think")),
        **parse_options(field(body, "options", dict, "")),
    }


def _parse_format(raw: object) -> ir.ResponseFormat | None:
    """``format``: ``"json"`` or a JSON schema."""
    if raw is None or raw == "":
        return None
    if raw == "json":
        return ir.ResponseFormat("json_object")
    if isinstance(raw, dict):
        return ir.ResponseFormat("json_schema", schema=raw, name="response")
    raise InvalidRequestError('format: expected "json" or a JSON schema object', param="format")


def _parse_think(raw: object) -> ir.Reasoning | None:
    """``think``: true, false, or an effort (``low``, ``medium``, ``high``)."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return ir.Reasoning(enabled=raw)
    if raw in ("low", "medium", "high"):
        return ir.Reasoning(effort=raw)
    raise InvalidRequestError(
        'think: expected true, false, "low", "medium" or "high"', param="think"
    )


def parse_chat(body: dict) -> ir.Request:
    """Parse an ``/api/chat`` request body.

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    raw_messages = objects(field(body, "messages", list, "", required=True), "messages")
    if not raw_messages:
        raise InvalidRequestError("messages: must not be empty", param="messages")
    messages: list[ir.Message] = []
    pending: list[ir.ToolCallPart] = []
    for i, raw in enumerate(raw_messages):
        pending = _parse_message(raw, f"messages[{i}]", messages, pending)
    return ir.Request(
        messages=messages, tools=parse_tools(field(body, "tools", list, "") or []), **_common(body)
    )


def _parse_message(
    raw: dict, where: str, out: list[ir.Message], pending: list[ir.ToolCallPart]
) -> list[ir.ToolCallPart]:
    """Add one message to ``out``; returns the tool calls still waiting for their results."""
    role = field(raw, "role", str, where, required=True)
    text = field(raw, "content", str, where) or ""
    images = parse_images(field(raw, "images", list, where) or [], f"{where}.images")
    if images and role != "user":
        raise InvalidRequestError(
            f"{where}.images: only user messages take images, not {role!r} ones",
            param=f"{where}.images",
        )
    if role == "system":
        out.append(ir.Message("system", [ir.TextPart(text)]))
    elif role == "user":
        out.append(ir.Message("user", _user_parts(images, text)))
    elif role == "assistant":
        parts: list[ir.Part] = []
        thinking = field(raw, "thinking", str, where)
        if thinking:
            parts.append(ir.ThinkingPart(thinking))
        calls = objects(field(raw, "tool_calls", list, where) or [], f"{where}.tool_calls")
        pending = [
            parse_tool_call(call, f"{where}.tool_calls[{k}]", new_id("call"))
            for k, call in enumerate(calls)
        ]
        if text or not pending:
            parts.append(ir.TextPart(text))
        out.append(ir.Message("assistant", parts + pending))
        return list(pending)
    elif role == "tool":
        call = _answered_call(raw, where, pending)
        pending.remove(call)
        append_tool_result(out, ir.ToolResultPart(call.id, call.name, [ir.TextPart(text)]))
    else:
        raise InvalidRequestError(f"{where}.role: unsupported role {role!r}", param=f"{where}.role")
    return pending


def _user_parts(images: list[ir.MediaPart], text: str) -> list[ir.Part]:
    """A user turn: its images, then its text (kept even when empty, unless there are images)."""
    return [*images, ir.TextPart(text)] if text or not images else list(images)


def _answered_call(raw: dict, where: str, pending: list[ir.ToolCallPart]) -> ir.ToolCallPart:
    """The tool call a ``tool`` message answers: by ``tool_call_id``, else by ``tool_name``
    (the oldest unanswered call of that name), else the oldest unanswered call."""
    call_id = field(raw, "tool_call_id", str, where)
    name = field(raw, "tool_name", str, where) or field(raw, "name", str, where)
    for call in pending:
        if call_id and call.id == call_id or not call_id and name in (None, call.name):
            return call
    wanted = f"call {call_id!r}" if call_id else f"call of {name!r}" if name else "call"
    raise InvalidRequestError(
        f"{where}: no unanswered assistant tool {wanted} precedes this tool result",
        param=where,
    )


_REFUSED_GENERATE = {
    "suffix": "fill-in-the-middle prompts",
    "template": "prompt templates",
    "context": "token contexts of earlier answers",
}


def parse_generate(body: dict) -> ir.Request:
    """Parse an ``/api/generate`` request body: ``system`` and ``prompt`` (with ``images``)
    become a system and a user message.

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field (``suffix``,
            ``template``, ``context`` and ``raw``: the router sends conversations, not token
            streams or templated text).
    """
    for name, what in _REFUSED_GENERATE.items():
        if body.get(name):
            raise InvalidRequestError(
                f"{name}: the router does not support {what}; send a prompt or use /api/chat",
                param=name,
            )
    if field(body, "raw", bool, ""):
        raise InvalidRequestError(
            "raw: the router applies each model's own template; raw prompts are not supported",
            param="raw",
        )
    prompt = field(body, "prompt", str, "") or ""
    images = parse_images(field(body, "images", list, "") or [], "images")
    if not prompt and not images:
        raise InvalidRequestError("prompt: field is required", param="prompt")
    messages = []
    system = field(body, "system", str, "")
    if system:
        messages.append(ir.Message("system", [ir.TextPart(system)]))
    messages.append(ir.Message("user", _user_parts(images, prompt)))
    return ir.Request(messages=messages, **_common(body))


def now_iso() -> str:
    """The current UTC time as Ollama writes ``created_at`` (RFC 3339, microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _metrics(usage: ir.Usage, total_s: float, prompt_s: float) -> dict:
    """Ollama's counts and durations (nanoseconds) for the final object."""
    return {
        "total_duration": _nanoseconds(total_s),
        "load_duration": 0,
        "prompt_eval_count": usage.input_tokens,
        "prompt_eval_duration": _nanoseconds(prompt_s),
        "eval_count": usage.output_tokens,
        "eval_duration": _nanoseconds(total_s - prompt_s),
    }


def _texts(parts: list[ir.Part], kind: type) -> str:
    return "".join(p.text for p in parts if isinstance(p, kind))


def render_chat_message(parts: list[ir.Part]) -> dict:
    """An assistant message: ``content``, and ``thinking`` and ``tool_calls`` when present.

    Args:
        parts: The answer's parts.
    """
    message: dict = {"role": "assistant", "content": _texts(parts, ir.TextPart)}
    thinking = _texts(parts, ir.ThinkingPart)
    if thinking:
        message["thinking"] = thinking
    calls = [p for p in parts if isinstance(p, ir.ToolCallPart)]
    if calls:
        message["tool_calls"] = [_answer_call(c, i) for i, c in enumerate(calls)]
    return message


def _answer_call(call: ir.ToolCallPart, index: int) -> dict:
    """An answer's tool call; arguments that are not a JSON object are the upstream's error."""
    try:
        return render_tool_call(call, index, f"tool_calls[{index}]")
    except InvalidRequestError as err:
        raise UpstreamError(f"upstream sent tool call {call.name!r} with {err.message}") from err


def _render_final(response: ir.Response, request: ir.Request, body: dict) -> dict:
    """A complete answer: ``body`` (the message or the response text) between the head and
    the final fields."""
    return {
        "model": request.model,
        "created_at": now_iso(),
        **body,
        "done": True,
        "done_reason": _DONE_REASONS[response.finish_reason],
        **_metrics(response.usage, time.monotonic() - request.received, 0.0),
    }


def render_chat(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as an ``/api/chat`` answer.

    Args:
        response: The IR response.
        request: The client's request (its model name is echoed, as Ollama does).
    """
    return _render_final(response, request, {"message": render_chat_message(response.parts)})


def render_generate(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as an ``/api/generate`` answer.

    Args:
        response: The IR response.
        request: The client's request.
    """
    body = {"response": _texts(response.parts, ir.TextPart)}
    thinking = _texts(response.parts, ir.ThinkingPart)
    if thinking:
        body["thinking"] = thinking
    return _render_final(response, request, body)


class StreamRenderer:
    """Renders IR stream events as Ollama's stream objects, one per line: text and thinking
    as they come, each tool call whole once its arguments are complete (as Ollama sends
    them), and a last object with ``done: true`` and the counts.

    Args:
        request: The client's request.
        chat: ``/api/chat`` (a ``message`` per object) rather than ``/api/generate``
            (``response`` text).
    """

    def __init__(self, request: ir.Request, chat: bool) -> None:
        self._request = request
        self._chat = chat
        self._first_output: float | None = None
        self._kinds: dict[int, type] = {}
        self._call: ir.ToolCallPart | None = None
        self._calls = 0

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            return []
        if isinstance(event, ir.PartStart):
            out = self._flush_call()
            part = event.part
            self._kinds[event.index] = type(part)
            if isinstance(part, ir.ToolCallPart):
                self._call = ir.ToolCallPart(part.id, part.name, part.arguments)
                return out
            return out + self._text(type(part), part.text)
        if isinstance(event, ir.PartDelta):
            kind = self._kinds.get(event.index)
            if kind is ir.ToolCallPart and self._call is not None:
                self._call.arguments += event.arguments
                return []
            return self._text(kind, event.text)
        out = self._flush_call()
        now = time.monotonic()
        first = self._first_output or now
        total, prompt = now - self._request.received, first - self._request.received
        last = self._head({"content": ""} if self._chat else {"response": ""})
        last["done"] = True
        last["done_reason"] = _DONE_REASONS[event.finish_reason]
        last.update(_metrics(event.usage, total, prompt))
        return [*out, SSEEvent(dump_json(last))]

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream error object (the ollama SDK raises ``ResponseError`` on it).

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]))]

    def _text(self, kind: type | None, text: str) -> list[SSEEvent]:
        if not text or kind not in (ir.TextPart, ir.ThinkingPart):
            return []
        self._first_output = self._first_output or time.monotonic()
        if kind is ir.ThinkingPart:
            piece = {"content" if self._chat else "response": "", "thinking": text}
        else:
            piece = {"content": text} if self._chat else {"response": text}
        return [self._chunk(piece)]

    def _flush_call(self) -> list[SSEEvent]:
        if self._call is None:
            return []
        self._first_output = self._first_output or time.monotonic()
        call, self._call = self._call, None
        self._calls += 1
        return [self._chunk({"content": "", "tool_calls": [_answer_call(call, self._calls - 1)]})]

    def _head(self, piece: dict) -> dict:
        head = {"model": self._request.model, "created_at": now_iso()}
        if self._chat:
            head["message"] = {"role": "assistant", **piece}
        else:
            head.update(piece)
        return head

    def _chunk(self, piece: dict) -> SSEEvent:
        return SSEEvent(dump_json({**self._head(piece), "done": False}))


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as Ollama does: ``{"error": "..."}`` with the HTTP status.

    Args:
        err: The error.

    Returns:
        The HTTP status and the JSON body.
    """
    return err.status, {"error": err.message}


@dataclass
class ModelCard:
    """What the discovery routes tell about one model.

    Args:
        name: The model's name on this router.
        family: ``smolvlm`` for the local model, else its provider's type.
        local: Whether the router runs it in process (``/api/ps`` lists those).
        size: The weights' bytes (0 for a cloud model).
        context_length: Its context in tokens, when known.
        capabilities: Ollama's capability names (``completion``, ``vision``, ``tools``...).
    """

    name: str
    family: str
    local: bool = False
    size: int = 0
    context_length: int | None = None
    capabilities: list[str] = dataclass_field(default_factory=lambda: ["completion"])


def _details(card: ModelCard) -> dict:
    return {
        "parent_model": "",
        "format": "mlx" if card.local else "remote",
        "family": card.family,
        "families": [card.family],
        "parameter_size": "",
        "quantization_level": "",
    }


def render_tag(card: ModelCard) -> dict:
    """One ``/api/tags`` entry.

    Args:
        card: The model.
    """
    return {
        "name": card.name,
        "model": card.name,
        "modified_at": EPOCH,
        "size": card.size,
        # Ollama's digest names a model's manifest; here the name's, stable across restarts.
        "digest": hashlib.sha256(card.name.encode()).hexdigest(),
        "details": _details(card),
    }


def render_tags(cards: list[ModelCard]) -> dict:
    """The ``/api/tags`` body.

    Args:
        cards: The models served.
    """
    return {"models": [render_tag(c) for c in cards]}


def render_show(card: ModelCard) -> dict:
    """The ``/api/show`` body.

    Args:
        card: The model.
    """
    info: dict = {"general.architecture": card.family}
    if card.context_length is not None:
        info[f"{card.family}.context_length"] = card.context_length
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(card),
        "model_info": info,
        "capabilities": card.capabilities,
        "modified_at": EPOCH,
    }


def render_running(cards: list[ModelCard]) -> dict:
    """The ``/api/ps`` body: the models the router runs in process (always loaded).

    Args:
        cards: The models served; only the local ones are listed.
    """
    models = []
    for card in cards:
        if card.local:
            entry = render_tag(card)
            del entry["modified_at"]
            entry.update(expires_at=NEVER, size_vram=0, context_length=card.context_length)
            models.append(entry)
    return {"models": models}


class _OllamaClient(ClientFormat):
    """What Ollama's two generation routes share: errors, streams as NDJSON, listings."""

    render_error = staticmethod(render_error)

    def stream_writer(self, call: ClientCall) -> StreamWriter:
        """See `ClientFormat.stream_writer`: newline-delimited JSON, without keep-alives."""
        return NDJSONWriter()

    def render_model(self, name: str) -> dict:
        """See `ClientFormat.render_model`."""
        return render_show(ModelCard(name, "remote"))

    def render_models(self, names: list[str]) -> dict:
        """See `ClientFormat.render_models`."""
        return render_tags([ModelCard(n, "remote") for n in names])


class OllamaChatClient(_OllamaClient):
    """``POST /api/chat``."""

    name = "ollama"
    paths = ("/api/chat",)

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`."""
        return ClientCall(parse_chat(body))

    render_response = staticmethod(render_chat)

    def stream_renderer(self, request: ir.Request) -> StreamRenderer:
        """See `ClientFormat.stream_renderer`."""
        return StreamRenderer(request, chat=True)


class OllamaGenerateClient(_OllamaClient):
    """``POST /api/generate``."""

    name = "ollama-generate"
    paths = ("/api/generate",)

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`."""
        return ClientCall(parse_generate(body))

    render_response = staticmethod(render_generate)

    def stream_renderer(self, request: ir.Request) -> StreamRenderer:
        """See `ClientFormat.stream_renderer`."""
        return StreamRenderer(request, chat=False)
