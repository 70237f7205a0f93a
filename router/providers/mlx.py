"""The local SmolVLM2 model on MLX, served in process by a continuous-batching `Engine`.

Images from every client format (OpenAI image parts, Anthropic image blocks, Gemini
``inline_data``; http(s) URLs are fetched first) and one video per request reach the processor
as raw bytes; the prompt is the checkpoint's chat template over the conversation, system
messages included (the template renders any role as ``Role: text``). Usage is the real token count: the prompt's
tokens, image tokens included, and every generated token. Structured output and tool calls go
through constrained decoding (`mlx_structured`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from mlx.utils import tree_flatten

from mlx_smolvlm.engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineOutput,
    QueueFullError,
    SamplingParams,
)
from mlx_smolvlm.serving import load_for_serving

from .. import ir
from ..config import MLXConfig, ProviderConfig
from ..errors import InvalidRequestError, OverloadedError, RateLimitError, UpstreamError
from ..formats.fields import new_id, refuse_options
from ..images import MediaFetcher, is_http
from . import mlx_structured
from .base import BaseProvider

RANDOM_WEIGHTS_SUFFIX = "-RANDOM-WEIGHTS"
TEXT_ONLY_SUFFIX = "-TEXT-ONLY"


@dataclasses.dataclass
class _Inputs:
    """A request as the processor takes it: HF-style messages and the media in order."""

    messages: list[dict]
    images: list[bytes]
    video: bytes | None


class Provider(BaseProvider):
    """The local model. It loads when the app starts and needs no keys.

    Args:
        config: This provider's config; ``config.mlx`` holds the model and its limits.
        media: The app's media fetcher (for image URLs).

    Raises:
        FileNotFoundError, ValueError: The model cannot be loaded (see `load_for_serving`).
    """

    def __init__(self, config: ProviderConfig, media: MediaFetcher) -> None:
        super().__init__(config, media)
        self.options = config.mlx or MLXConfig()
        served = load_for_serving(
            self.options.model,
            random_weights_fallback=self.options.random_weights_fallback,
            dtype=self.options.dtype,
        )
        self.random_weights = served.random_weights
        self.text_only = served.text_only
        self.engine = Engine(served.model, served.processor, self.options.engine)
        # What the weights take in memory (the Ollama API's model size).
        self.weights_bytes = sum(a.nbytes for _, a in tree_flatten(served.model.parameters()))

    async def close(self) -> None:
        """Stop the engine (unfinished requests fail with 503)."""
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    def context_window(self) -> int:
        """See `BaseProvider.context_window`."""
        return self.engine.max_context

    def queue_depth(self) -> int:
        """See `BaseProvider.queue_depth`: requests waiting for a slot in the batch."""
        return self.engine.stats().waiting

    def counters(self) -> dict[str, float]:
        """The engine's prompt cache: hits, misses, reused tokens and bytes held."""
        stats = self.engine.stats().prompt_cache
        return {
            "prompt_cache_hits": stats.hits,
            "prompt_cache_misses": stats.misses,
            "prompt_cache_reused_tokens": stats.reused_tokens,
            "prompt_cache_bytes": stats.bytes,
        }

    def served_name(self, model: str) -> str:
        """The model name in responses; it says so when the weights are random or the model
        is text only (a GGUF without its mmproj).

        Args:
            model: The name the router's config gives this model.
        """
        if self.text_only:
            model += TEXT_ONLY_SUFFIX
        return model + RANDOM_WEIGHTS_SUFFIX if self.random_weights else model

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        events = [event async for event in self._events(request, incremental_calls=False)]
        return ir.collect_stream(events)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`. Nothing is yielded before the first token, so admission
        and input errors reach the client as HTTP errors."""
        async with aclosing(self._events(request, incremental_calls=True)) as events:
            async for event in events:
                yield event

    async def _events(
        self, request: ir.Request, incremental_calls: bool
    ) -> AsyncIterator[ir.StreamEvent]:
        """The answer as IR events; a tool call's arguments stream if `incremental_calls`."""
        request = self.with_defaults(request)
        inputs = await self._inputs(request)
        params = self._params(request)
        calls_tools = bool(mlx_structured.active_tools(request))
        started = text_started = False
        call: mlx_structured.ToolCallStream | None = None
        async with aclosing(self._generate(inputs, params)) as outputs:
            async for output in outputs:
                usage = ir.Usage(output.prompt_tokens, output.generation_tokens)
                if not started:
                    started = True
                    model = self.served_name(request.model)
                    yield ir.StreamStart(new_id("local"), model, int(time.time()), usage)
                piece = output.text
                if piece and not text_started and calls_tools and piece.startswith("{"):
                    # The grammar's text choice never starts with "{": this is a call.
                    call = call or mlx_structured.ToolCallStream(incremental_calls)
                if call is not None:
                    for event in call.add(piece):
                        yield event
                elif piece or (output.finish_reason is not None and not text_started):
                    if not text_started:
                        text_started = True
                        yield ir.PartStart(0, ir.TextPart(""))
                    if piece:
                        yield ir.PartDelta(0, text=piece)
                if output.finish_reason is not None:
                    finish = "stop_sequence" if output.stop_sequence is not None else None
                    if call is not None:
                        events, whole = call.finish()
                        for event in events:
                            yield event
                        finish = "tool_calls" if whole else None
                    yield ir.StreamEnd(finish or output.finish_reason, output.stop_sequence, usage)

    async def count_tokens(self, request: ir.Request, key: str | None) -> ir.TokenCount:
        """The prompt's real token count, image tokens included.

        Args:
            request: The IR request.
            key: Unused.
        """
        inputs = await self._inputs(request)
        loop = asyncio.get_running_loop()
        try:
            prompt = await loop.run_in_executor(
                None, self.engine.prepare, inputs.messages, inputs.images, inputs.video
            )
        except ValueError as err:
            raise InvalidRequestError(f"{self.config.name}: {err}") from err
        return ir.TokenCount(len(prompt.input_ids))

    async def _generate(
        self, inputs: _Inputs, params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        """The engine's outputs, its errors as router errors."""
        name = self.config.name
        try:
            async with aclosing(
                self.engine.generate(inputs.messages, inputs.images, inputs.video, params)
            ) as outputs:
                async for output in outputs:
                    yield output
        except QueueFullError as err:
            raise RateLimitError(f"{name}: {err}", retry_after=err.retry_after) from err
        except EngineClosedError as err:
            raise OverloadedError(
                f"{name}: {err}", retry_after=self.options.engine.retry_after_s
            ) from err
        except ContextLengthError as err:
            raise InvalidRequestError(f"{name}: {err}", param="messages") from err
        except ValueError as err:
            raise InvalidRequestError(f"{name}: {err}") from err
        except (RuntimeError, MemoryError) as err:
            raise UpstreamError(f"{name}: the local model failed: {err}") from err

    def _params(self, request: ir.Request) -> SamplingParams:
        refuse_options(request, f"the local model {request.model!r}", handled=("seed",))
        context = self.engine.max_context
        return SamplingParams(
            grammar=mlx_structured.grammar_for(request),
            max_tokens=request.max_tokens or context,
            temperature=(
                self.options.default_temperature
                if request.temperature is None
                else request.temperature
            ),
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            seed=request.seed,
            stop=list(request.stop),
        )

    async def _inputs(self, request: ir.Request) -> _Inputs:
        """The conversation as HF-style messages plus decoded media.

        Tool calls and results become text, and the callable tools a first system message.

        Raises:
            InvalidRequestError: Media the model cannot take; the message names the part.
        """
        if self.text_only:
            for i, message in enumerate(request.messages):
                for j, part in enumerate(message.parts):
                    if isinstance(part, ir.MediaPart):
                        where = f"messages[{i}].content[{j}]"
                        raise InvalidRequestError(
                            f"{where}: the local model {request.model!r} is text only (a GGUF "
                            "without its vision mmproj) and takes no images or video",
                            param=where,
                        )
        # URLs download concurrently, before anything else is checked.
        remote = [
            part
            for message in request.messages
            for part in message.parts
            if isinstance(part, ir.MediaPart) and is_http(part.url)
        ]
        downloads = iter(await self.media.fetch(remote) if remote else [])
        tools = mlx_structured.tools_message(request)
        messages, images, video = [] if tools is None else [tools], [], None
        for i, message in enumerate(request.messages):
            content = []
            for j, part in enumerate(message.parts):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, ir.TextPart):
                    content.append({"type": "text", "text": part.text})
                elif isinstance(part, ir.ThinkingPart):
                    continue  # earlier reasoning from another model: SmolVLM2 has none
                elif isinstance(part, ir.ToolCallPart):
                    content.append(
                        {"type": "text", "text": mlx_structured.render_call(part, where)}
                    )
                elif isinstance(part, ir.ToolResultPart):
                    content.append(
                        {"type": "text", "text": mlx_structured.render_result(part, where)}
                    )
                elif isinstance(part, ir.MediaPart):
                    if is_http(part.url):
                        data, media_type = next(downloads)
                    else:
                        data, media_type = _inline_bytes(part, where), part.media_type
                    if media_type.startswith("image/"):
                        images.append(data)
                        content.append({"type": "image"})
                    elif media_type.startswith("video/") and video is None:
                        video = data
                        content.append({"type": "video"})
                    else:
                        raise InvalidRequestError(
                            f"{where}: the local model takes images and one video, "
                            f"not {media_type!r}",
                            param=where,
                        )
            if content:
                messages.append({"role": message.role, "content": content})
        if not messages:
            raise InvalidRequestError("the request has no text or media", param="messages")
        return _Inputs(messages, images, video)


def _inline_bytes(part: ir.MediaPart, where: str) -> bytes:
    """The raw bytes of a part's inline data (base64 in every client format)."""
    if part.data is None:
        raise InvalidRequestError(
            f"{where}: the local model needs inline data or an http(s) URL, got {part.url!r}",
            param=where,
        )
    try:
        return base64.b64decode(part.data, validate=True)
    except binascii.Error as err:
        raise InvalidRequestError(
            f"{where}: the data is not valid base64: {err}", param=where
        ) from err
