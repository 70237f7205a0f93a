"""The router's only internal representation: requests, responses and stream events.

The wire formats (`router.formats`) turn each format into these dataclasses and back;
providers consume and produce them. Conventions:

- Tool results live in ``user`` messages as `ToolResultPart` (Anthropic's and Gemini's model);
  OpenAI's ``tool`` role messages are folded into a user message by its format.
- System messages stay where the client put them (``role="system"``), so a format that allows
  several or mid-conversation system messages keeps them; formats that do not decide how to
  render them.
- Tool-call ``arguments`` are always the JSON text of an object.
- ``cache`` on a part or tool marks a prompt-cache breakpoint after it (Anthropic's
  ``cache_control``); its value is the cache TTL (``"5m"`` or ``"1h"``). Formats without
  explicit breakpoints ignore it.
- OpenAI-only request options (``n``, log probabilities, ``logit_bias``, ``service_tier``,
  ``store``, ``metadata``, ``prediction``) are carried so that an OpenAI upstream gets them
  unchanged; an upstream format that cannot honour one refuses the request with a 400 naming
  it, rather than dropping it.
- `Usage.input_tokens` counts *all* prompt tokens (cached ones included) and `output_tokens`
  counts all generated tokens (reasoning included), as OpenAI reports them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "stop_sequence"]


@dataclass
class TextPart:
    text: str
    # Gemini may sign a plain text part (``thoughtSignature``).
    signature: str | None = None
    cache: str | None = None


@dataclass
class MediaPart:
    """An image, audio clip or document: inline base64 ``data`` or a ``url``."""

    media_type: str
    data: str | None = None
    url: str | None = None
    filename: str | None = None
    cache: str | None = None

    @property
    def kind(self) -> str:
        """``image``, ``audio``, ``pdf`` or ``file``, from the media type."""
        major = self.media_type.split("/", 1)[0]
        if major in ("image", "audio"):
            return major
        return "pdf" if self.media_type == "application/pdf" else "file"


@dataclass
class ThinkingPart:
    """Reasoning text with its provider signature, or an opaque redacted block."""

    text: str = ""
    signature: str | None = None
    redacted_data: str | None = None


@dataclass
class ToolCallPart:
    id: str
    name: str
    arguments: str = "{}"
    # Gemini's ``thoughtSignature`` on a ``functionCall`` part.
    signature: str | None = None
    cache: str | None = None


@dataclass
class ToolResultPart:
    call_id: str
    name: str | None
    content: list[TextPart | MediaPart]
    is_error: bool = False
    cache: str | None = None


Part = TextPart | MediaPart | ThinkingPart | ToolCallPart | ToolResultPart


@dataclass
class Message:
    role: Role
    parts: list[Part]


@dataclass
class Tool:
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None
    cache: str | None = None


@dataclass
class ToolChoice:
    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None


@dataclass
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"]
    schema: dict | None = None
    name: str | None = None
    strict: bool | None = None


@dataclass
class Reasoning:
    """Requested reasoning: an OpenAI-style effort and/or a token budget.

    ``enabled=False`` asks for no reasoning at all.
    """

    enabled: bool = True
    effort: str | None = None
    budget_tokens: int | None = None


@dataclass
class TokenLogprob:
    """One output token's log probability, with the most likely alternatives (``top``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Request:
    model: str
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    # OpenAI ``stream_options.include_usage``: the client wants the usage chunk.
    include_usage: bool = False
    user: str | None = None
    # How many answers (OpenAI ``n``); None or 1: one.
    n: int | None = None
    # Log probabilities of the output tokens, with ``top_logprobs`` alternatives each.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # OpenAI ``logit_bias``: token id (as text) -> bias.
    logit_bias: dict[str, float] | None = None
    # OpenAI's tiers (``auto``, ``default``, ``flex``, ``priority``...).
    service_tier: str | None = None
    # OpenAI's stored completions and their tags.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # OpenAI Predicted Outputs: the text the answer is expected to resemble.
    prediction: str | None = None
    # Beta flags from an Anthropic client's ``anthropic-beta`` header; sent only to Anthropic.
    anthropic_beta: list[str] = field(default_factory=list)
    # When the router read the request (``time.monotonic()``), for formats that report
    # durations (Ollama's ``total_duration``).
    received: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Choice:
    """One more answer to the same request (OpenAI ``n`` > 1): the first is the `Response`
    itself."""

    parts: list[Part]
    finish_reason: FinishReason = "stop"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Response:
    id: str
    model: str
    parts: list[Part]
    finish_reason: FinishReason = "stop"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    created: int = 0
    # The upstream answer's HTTP headers (lower-case names), for the key pool's rate-limit
    # reading; never rendered to clients.
    upstream_headers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # The output tokens' log probabilities, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None
    # Answers 2..n of a request with ``n`` > 1.
    alternatives: list[Choice] = field(default_factory=list)


@dataclass
class TokenCount:
    input_tokens: int
    # As `Response.upstream_headers`.
    upstream_headers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


# Stream events. A stream is: StreamStart, then for each output part a PartStart followed by
# its PartDeltas (parts are numbered 0, 1, 2... in order; a PartStart ends the previous part),
# then exactly one StreamEnd.


@dataclass
class StreamStart:
    id: str
    model: str
    created: int = 0
    usage: Usage = field(default_factory=Usage)
    # As `Response.upstream_headers`: the headers the stream's HTTP answer began with.
    upstream_headers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class PartStart:
    """A new output part. ``part`` carries what is known up front (tool id and name)."""

    index: int
    part: TextPart | ThinkingPart | ToolCallPart


@dataclass
class PartDelta:
    index: int
    text: str = ""
    arguments: str = ""
    signature: str | None = None
    # Log probabilities of the tokens of ``text``, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamEnd:
    finish_reason: FinishReason = "stop"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)


StreamEvent = StreamStart | PartStart | PartDelta | StreamEnd


def collect_stream(events: list[StreamEvent]) -> Response:
    """Assemble a complete IR response from a full list of stream events.

    Args:
        events: A StreamStart, parts and a StreamEnd.
    """
    start = next(e for e in events if isinstance(e, StreamStart))
    end = next(e for e in events if isinstance(e, StreamEnd))
    parts: list = []
    logprobs: list[TokenLogprob] | None = None
    for event in events:
        if isinstance(event, PartDelta) and event.logprobs is not None:
            logprobs = (logprobs or []) + event.logprobs
        if isinstance(event, PartStart):
            parts.append(dataclasses.replace(event.part))  # the events stay unchanged
        elif isinstance(event, PartDelta):
            part = parts[event.index]
            if isinstance(part, ToolCallPart):
                part.arguments += event.arguments
            else:
                part.text += event.text
            if event.signature:
                part.signature = event.signature
    for part in parts:
        if isinstance(part, ToolCallPart) and not part.arguments:
            part.arguments = "{}"
    return Response(
        start.id,
        start.model,
        parts,
        end.finish_reason,
        end.stop_sequence,
        end.usage,
        start.created,
        logprobs=logprobs,
    )
