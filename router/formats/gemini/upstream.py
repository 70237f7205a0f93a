"""Gemini ``generateContent`` for the Gemini upstream: IR requests to the wire, the upstream's
responses, streams and errors to the IR.

Signatures: ``thoughtSignature`` on text and function-call parts is kept on the IR part. For
Gemini 3 models, a function call in the history without a signature (written by another
provider or a client that dropped it) gets Google's documented placeholder
``skip_thought_signature_validator``. Thought parts are not sent back to Gemini.

OpenAI-only options: ``seed`` and the penalties go into ``generationConfig``, ``logprobs`` and
``top_logprobs`` become ``responseLogprobs`` and ``logprobs`` (the answer's ``logprobsResult``
comes back as IR token log probabilities); the others (``n``, ``logit_bias``, a
``service_tier``, ``store``, ``metadata``, ``prediction``, ``parallel_tool_calls: false``) are a
400.
"""

from __future__ import annotations

import dataclasses
import json
import time

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..base import UpstreamFormat
from ..fields import (
    dump_json,
    effort_to_budget,
    new_id,
    parse_arguments,
    refuse_options,
    split_system,
)
from .content import parse_logprobs_result, with_signature
from .schema import to_gemini_schema

SKIP_SIGNATURE = "skip_thought_signature_validator"


_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def render_request(request: ir.Request) -> dict:
    """Render an IR request as a ``generateContent`` body (the model goes in the URL).

    Remote images must already be inlined (see `router.images`); only non-http URIs (Files
    API, ``gs://``) are sent as ``fileData``.

    Args:
        request: The IR request.

    Raises:
        InvalidRequestError: If a part or option cannot be expressed for Gemini, or no message
            is left to send, naming it.
    """
    refuse_options(
        request,
        "Gemini",
        handled=("seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs"),
    )
    if request.parallel_tool_calls is False and request.tools:
        raise InvalidRequestError(
            "parallel_tool_calls: Gemini cannot be told to call one tool at a time",
            param="parallel_tool_calls",
        )
    system, messages = split_system(request.messages)
    body: dict = {}
    if system:
        body["systemInstruction"] = {"parts": [{"text": p.text} for p in system]}
    names = {p.id: p.name for m in messages for p in m.parts if isinstance(p, ir.ToolCallPart)}
    needs_signature = request.model.startswith("gemini-3")
    contents = []
    for i, message in enumerate(messages):
        parts = _render_parts(message, f"messages[{i}]", names)
        if message.role == "assistant" and needs_signature:
            calls = [p for p in parts if "functionCall" in p]
            if calls and not any("thoughtSignature" in p for p in calls):
                calls[0]["thoughtSignature"] = SKIP_SIGNATURE
        if parts:
            contents.append(
                {"role": "model" if message.role == "assistant" else "user", "parts": parts}
            )
    if not contents:
        raise InvalidRequestError(
            "messages: the conversation has no user or model content (Gemini needs at least "
            "one non-empty turn)",
            param="messages",
        )
    body["contents"] = contents
    if request.tools:
        body["tools"] = [
            {"functionDeclarations": [_render_tool(t, i) for i, t in enumerate(request.tools)]}
        ]
    if request.tool_choice is not None:
        choice = request.tool_choice
        config: dict = {
            "mode": {"auto": "AUTO", "none": "NONE", "required": "ANY", "tool": "ANY"}[choice.mode]
        }
        if choice.mode == "tool":
            config["allowedFunctionNames"] = [choice.name]
        body["toolConfig"] = {"functionCallingConfig": config}
    generation = _render_generation_config(request)
    if generation:
        body["generationConfig"] = generation
    return body


def _render_generation_config(request: ir.Request) -> dict:
    config: dict = {}
    for key, value in (
        ("maxOutputTokens", request.max_tokens),
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("topK", request.top_k),
        ("seed", request.seed),
        ("presencePenalty", request.presence_penalty),
        ("frequencyPenalty", request.frequency_penalty),
    ):
        if value is not None:
            config[key] = value
    if request.stop:
        config["stopSequences"] = request.stop
    if request.logprobs:
        config["responseLogprobs"] = True
        if request.top_logprobs is not None:
            config["logprobs"] = request.top_logprobs
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        config["responseMimeType"] = "application/json"
        if fmt.schema is not None:
            config["responseSchema"] = to_gemini_schema(fmt.schema, "response_format.schema")
    reasoning = request.reasoning
    if reasoning is not None:
        if not reasoning.enabled:
            # Only a Gemini client's own budget 0 is sent: models that cannot turn thinking
            # off (2.5 Pro, 3) reject it, and their default is always valid.
            if reasoning.budget_tokens == 0:
                config["thinkingConfig"] = {"thinkingBudget": 0}
        else:
            budget = reasoning.budget_tokens or effort_to_budget(reasoning.effort or "")
            config["thinkingConfig"] = {"includeThoughts": True, "thinkingBudget": budget}
    return config


def _render_parts(message: ir.Message, where: str, names: dict[str, str]) -> list[dict]:
    parts = []
    # Thought parts are not sent back; a signature on one belongs on the part after it,
    # where Gemini put it (see StreamParser).
    carried: str | None = None
    for j, part in enumerate(message.parts):
        at = f"{where}.content[{j}]"
        if isinstance(part, ir.ThinkingPart):
            carried = part.signature or carried
            continue
        if isinstance(part, ir.TextPart) and not part.text and not part.signature:
            continue
        if isinstance(part, ir.TextPart | ir.ToolCallPart) and carried and not part.signature:
            part = dataclasses.replace(part, signature=carried)
        carried = None
        if isinstance(part, ir.TextPart):
            if part.text or part.signature:
                parts.append(with_signature({"text": part.text}, part.signature))
        elif isinstance(part, ir.MediaPart):
            parts.append(_render_media(part, at))
        elif isinstance(part, ir.ToolCallPart):
            call = {"id": part.id, "name": part.name, "args": parse_arguments(part.arguments, at)}
            parts.append(with_signature({"functionCall": call}, part.signature))
        elif isinstance(part, ir.ToolResultPart):
            parts.extend(_render_tool_result(part, at, names))
    return parts


def _render_tool_result(part: ir.ToolResultPart, where: str, names: dict[str, str]) -> list:
    name = part.name or names.get(part.call_id)
    if name is None:
        raise InvalidRequestError(
            f"{where}: tool result for unknown call id {part.call_id!r} (Gemini needs the "
            "function name)",
            param=where,
        )
    text = "".join(p.text for p in part.content if isinstance(p, ir.TextPart))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, dict) and not part.is_error:
        response = value
    else:
        response = {"error" if part.is_error else "output": value}
    out = [{"functionResponse": {"id": part.call_id, "name": name, "response": response}}]
    # Images a tool returned travel as parts of the same user turn.
    out += [_render_media(p, where) for p in part.content if isinstance(p, ir.MediaPart)]
    return out


def _render_media(part: ir.MediaPart, where: str) -> dict:
    if part.data is not None:
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    if part.url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"{where}: remote URL was not inlined for Gemini", param=where)
    return {"fileData": {"mimeType": part.media_type, "fileUri": part.url}}


def _render_tool(tool: ir.Tool, index: int) -> dict:
    decl: dict = {"name": tool.name}
    if tool.description is not None:
        decl["description"] = tool.description
    if tool.parameters and tool.parameters.get("properties"):
        decl["parameters"] = to_gemini_schema(tool.parameters, f"tools[{index}].parameters")
    return decl


def parse_response(body: dict) -> ir.Response:
    """Parse a ``GenerateContentResponse`` from the upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        GatewayError: For an error object inside the 200 (mapped by its code or status).
        InvalidRequestError: If a part is malformed, or there is no candidate and no block
            reason (the provider turns this into a 502).
    """
    if "error" not in body and not body.get("candidates"):
        if not (body.get("promptFeedback") or {}).get("blockReason"):
            raise InvalidRequestError("the response has no candidates")
    parser = StreamParser()
    events = parser.parse_stream_event(body) + parser.finish()
    return ir.collect_stream(events)


def parse_usage(raw: dict) -> ir.Usage:
    """Read ``usageMetadata`` (Gemini counts thoughts apart from candidates).

    Args:
        raw: The usage metadata.
    """
    thoughts = raw.get("thoughtsTokenCount") or 0
    return ir.Usage(
        input_tokens=(raw.get("promptTokenCount") or 0) + (raw.get("toolUsePromptTokenCount") or 0),
        output_tokens=(raw.get("candidatesTokenCount") or 0) + thoughts,
        cache_read_tokens=raw.get("cachedContentTokenCount") or 0,
        reasoning_tokens=thoughts,
    )


class StreamParser:
    """Turns the upstream's stream of ``GenerateContentResponse`` chunks into IR events.

    Text in each chunk is a delta; a function call always arrives whole in one part.
    """

    def __init__(self) -> None:
        self._started = False
        self._parts = 0
        self._open: str | None = None
        self._had_calls = False
        self._finish: ir.FinishReason | None = None
        self._usage = ir.Usage()

    def parse_stream_event(self, chunk: dict) -> list[ir.StreamEvent]:
        """Translate one chunk.

        Args:
            chunk: A decoded ``GenerateContentResponse``.

        Raises:
            GatewayError: If the chunk is an error object.
        """
        if "error" in chunk:
            raise parse_error(chunk, 500)
        events: list[ir.StreamEvent] = []
        if chunk.get("usageMetadata"):
            self._usage = parse_usage(chunk["usageMetadata"])
        if not self._started:
            # Gemini reports the prompt's tokens on every chunk, so the start carries them.
            self._started = True
            events.append(
                ir.StreamStart(
                    chunk.get("responseId") or new_id("resp"),
                    chunk.get("modelVersion") or "",
                    int(time.time()),
                    dataclasses.replace(self._usage, output_tokens=0, reasoning_tokens=0),
                )
            )
        if not chunk.get("candidates") and (chunk.get("promptFeedback") or {}).get("blockReason"):
            self._finish = "content_filter"
        for candidate in chunk.get("candidates") or []:
            if candidate.get("index", 0) != 0:
                continue
            for j, part in enumerate((candidate.get("content") or {}).get("parts") or []):
                events += self._part(part, j)
            tokens = parse_logprobs_result(candidate.get("logprobsResult"))
            if tokens:
                events += self._logprobs(events, tokens)
            reason = candidate.get("finishReason")
            if reason and reason != "FINISH_REASON_UNSPECIFIED":
                self._finish = _FINISH_FROM_WIRE.get(reason, "stop")
        return events

    def feed(self, data: dict, event: str | None = None) -> list[ir.StreamEvent]:
        """See `UpstreamStreamParser.feed` (chunks carry no event name)."""
        return self.parse_stream_event(data)

    def finish(self) -> list[ir.StreamEvent]:
        """Events at the end of the upstream stream (the single StreamEnd).

        Raises:
            UpstreamError: If no chunk carried a ``finishReason`` (a truncated stream).
        """
        finish = self._finish
        if finish is None:
            raise UpstreamError("upstream stream ended without a finishReason")
        if finish == "stop" and self._had_calls:
            finish = "tool_calls"
        return [ir.StreamEnd(finish, usage=self._usage)]

    def _logprobs(
        self, events: list[ir.StreamEvent], tokens: list[ir.TokenLogprob]
    ) -> list[ir.StreamEvent]:
        """Put a chunk's token log probabilities on its text delta (or a delta of their own)."""
        last = events[-1] if events else None
        if isinstance(last, ir.PartDelta) and last.text and self._open == "text":
            last.logprobs = tokens
            return []
        if self._open != "text":
            self._open = "text"
            self._parts += 1
            return [
                ir.PartStart(self._parts - 1, ir.TextPart("")),
                ir.PartDelta(self._parts - 1, logprobs=tokens),
            ]
        return [ir.PartDelta(self._parts - 1, logprobs=tokens)]

    def _part(self, part: dict, position: int) -> list[ir.StreamEvent]:
        signature = part.get("thoughtSignature")
        events: list[ir.StreamEvent] = []
        if signature and self._open == "thinking" and not part.get("thought"):
            # Gemini signs the part after its thoughts (text or function call); most client
            # formats carry a signature only on the reasoning block, so it moves there (and
            # back onto the following part when rendered for Gemini).
            events.append(ir.PartDelta(self._parts - 1, signature=signature))
            signature = None
        if "functionCall" in part:
            call = part["functionCall"]
            index = self._parts
            self._parts += 1
            self._open = None
            self._had_calls = True
            tool = ir.ToolCallPart(
                call.get("id") or new_id("call"), call.get("name") or "", "", signature
            )
            return events + [
                ir.PartStart(index, tool),
                ir.PartDelta(index, arguments=dump_json(call.get("args") or {})),
            ]
        if "text" not in part:
            where = f"candidates[0].content.parts[{position}]"
            raise InvalidRequestError(f"{where}: unsupported Gemini output part {sorted(part)}")
        kind = "thinking" if part.get("thought") else "text"
        if self._open != kind:
            start = ir.ThinkingPart("") if kind == "thinking" else ir.TextPart("")
            events.append(ir.PartStart(self._parts, start))
            self._parts += 1
            self._open = kind
        if part["text"] or signature:
            events.append(ir.PartDelta(self._parts - 1, text=part["text"], signature=signature))
        return events


def parse_error(data: dict, default_status: int, source: str = "gemini") -> GatewayError:
    """Turn a Google error object into a router error.

    Args:
        data: ``{"error": {"code", "message", "status"}}``.
        default_status: Status to assume if the object has no code.
        source: Who sent it, named at the start of the message.
    """
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        status = code
    else:
        name = error.get("status")
        status = (
            _STATUS_CODES.get(name, default_status) if isinstance(name, str) else default_status
        )
    message = error.get("message") or json.dumps(data)
    return error_for_status(status, f"{source}: {message}", upstream_body=data)


# Google's status names, for an error object without a numeric code.
_STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class GeminiUpstream(UpstreamFormat):
    """``generateContent`` as the Gemini upstream speaks it."""

    name = "gemini"

    render_request = staticmethod(render_request)
    parse_response = staticmethod(parse_response)
    stream_parser = staticmethod(StreamParser)
    parse_error = staticmethod(parse_error)
