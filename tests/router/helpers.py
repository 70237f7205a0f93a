"""A small scriptable fake upstream for the router's own server tests.

One aiohttp app answers as OpenAI (``/v1/chat/completions``), Anthropic (``/v1/messages``)
and Gemini (``/v1beta/models/{model}:...``). Each test queues the answers it wants with
`FakeUpstream.queue` (a status plus a JSON body or a list of SSE events); with nothing queued,
a plain text answer in the right format is returned. Every request is recorded.

`running_router` serves the router app on a loopback test server for tests whose clients are
the official SDKs or plain aiohttp sessions (the `client` fixture covers the rest), and
`RouterProcess` runs the router as a real process (``python -m router``) for the tests of
signals and of several instances.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.gateways import free_port
from router.app import create_app
from router.config import Config
from tests.router.fakes import KINDS, sse


@dataclass
class Answer:
    status: int = 200
    body: dict | None = None
    events: list[tuple[str | None, object]] | None = None  # (event name, data) pairs
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict
    query: dict[str, str]


class FakeUpstream:
    def __init__(self) -> None:
        self.base_url = ""  # set by the `fake` fixture once the app listens
        self.seen: list[Seen] = []
        self._queues: dict[str, list[Answer]] = {"openai": [], "anthropic": [], "gemini": []}
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._handle("openai"))
        self.app.router.add_post("/v1/messages", self._handle("anthropic"))
        self.app.router.add_post("/v1/messages/count_tokens", self._count_anthropic)
        self.app.router.add_post("/v1beta/models/{target}", self._handle("gemini"))
        self.app.router.add_get("/hang.png", self._hang)
        self.app.router.add_get("/image.png", self._image)
        self.app.router.add_get("/missing.png", self._missing)

    def queue(self, kind: str, *answers: Answer) -> None:
        self._queues[kind].extend(answers)

    def _handle(self, kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.append(Seen(request.path, dict(request.headers), body, dict(request.query)))
            answer = self._queues[kind].pop(0) if self._queues[kind] else _default(kind, body)
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            if answer.events is None:
                return web.json_response(answer.body, status=answer.status, headers=answer.headers)
            response = web.StreamResponse(
                status=answer.status, headers={"Content-Type": "text/event-stream"}
            )
            await response.prepare(request)
            for name, data in answer.events:
                await response.write(sse(data, name))
            await response.write_eof()
            return response

        return handler

    async def _count_anthropic(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body, dict(request.query)))
        return web.json_response({"input_tokens": 42})

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(body=b"")

    async def _image(self, request: web.Request) -> web.Response:
        return web.Response(body=PNG_BYTES, content_type="image/png")

    async def _missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")


# A 1x1 PNG.
PNG_BYTES = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _default(kind: str, body: dict) -> Answer:
    stream = body.get("stream") or False
    if kind == "openai":
        return (
            Answer(events=openai_text_stream("hello"))
            if stream
            else Answer(body=openai_text("hello"))
        )
    if kind == "anthropic":
        return (
            Answer(events=anthropic_text_stream("hello"))
            if stream
            else Answer(body=anthropic_text("hello"))
        )
    return Answer(body=gemini_text("hello"))


def openai_text(text: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "up-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def openai_chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def openai_tool_chunk(
    index: int, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict:
    """A stream chunk with one piece of a tool call; the call's first piece names it.

    Args:
        index: The call's index.
        arguments: This piece of the JSON arguments.
        call_id: The call's id (first piece only).
        name: The function's name (first piece only).
    """
    if call_id is None:
        call = {"index": index, "function": {"arguments": arguments}}
    else:
        function = {"name": name, "arguments": arguments}
        call = {"index": index, "id": call_id, "type": "function", "function": function}
    return openai_chunk({"tool_calls": [call]})


def openai_text_stream(text: str) -> list:
    return [
        (None, openai_chunk({"role": "assistant", "content": ""})),
        (None, openai_chunk({"content": text})),
        (None, openai_chunk({}, "stop")),
        (
            None,
            {
                **openai_chunk({}),
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            },
        ),
        (None, "[DONE]"),
    ]


def anthropic_text(text: str) -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }


def anthropic_events(*blocks: tuple[dict, list[dict]], stop_reason: str = "end_turn") -> list:
    start = {
        "type": "message_start",
        "message": {
            **anthropic_text(""),
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        },
    }
    events = [("message_start", start), ("ping", {"type": "ping"})]
    for i, (block, deltas) in enumerate(blocks):
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": block},
            )
        )
        for delta in deltas:
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def anthropic_text_stream(text: str) -> list:
    return anthropic_events(({"type": "text", "text": ""}, [{"type": "text_delta", "text": text}]))


def gemini_text(text: str) -> dict:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7},
        "modelVersion": "up-model",
        "responseId": "resp-1",
    }


# Minimal requests, one per client format, for the models `make_config` names (shared: never
# mutate them).
OPENAI_BODY = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {
    "model": "claude",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


# The address of the loopback fixtures that serve images (media URLs are public-only by default).
LOOPBACK_FIXTURES = "127.0.0.1/32"


def fake_models() -> dict:
    """The model aliases of the fake's providers ``oai``, ``claude`` and ``gem`` (a new dict
    each call, for a config's ``models``)."""
    return {
        "gpt": [{"provider": "oai", "model": "gpt-up"}],
        "claude": [{"provider": "claude", "model": "claude-up"}],
        "gemini": [{"provider": "gem", "model": "gemini-up"}],
        "fallback": [
            {"provider": "oai", "model": "gpt-up"},
            {"provider": "claude", "model": "claude-up"},
        ],
    }


def make_config(base_url: str, **limits: object) -> Config:
    """Providers of all three types pointing at the fake, and a few model aliases."""
    return Config.from_dict(
        {
            "providers": {
                "oai": {"type": "openai", "base_url": f"{base_url}/v1", "keys": ["sk-1"]},
                "claude": {"type": "anthropic", "base_url": base_url, "keys": ["ak-1", "ak-2"]},
                "gem": {"type": "gemini", "base_url": base_url, "keys": ["gk-1"]},
            },
            "models": fake_models(),
            "limits": {"max_body_bytes": 1024 * 1024, "image_timeout_s": 0.5, **limits},
            # The test-only allow-list: the loopback fake serves the images.
            "media": {"allow": [LOOPBACK_FIXTURES]},
        }
    )


@asynccontextmanager
async def running_router(cfg: Config) -> AsyncIterator[TestServer]:
    """The router app serving ``cfg`` on a loopback test server, closed on exit.

    Args:
        cfg: The router's config.
    """
    server = TestServer(create_app(cfg), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def client_roots(server: TestServer) -> dict[str, str]:
    """The server's root URL for each client kind (the ``roots`` that `make_clients` takes).

    Args:
        server: A started test server.
    """
    root = str(server.make_url("")).rstrip("/")
    return {kind: root for kind in KINDS}


class RouterProcess:
    """``python -m router --config --workers N`` in a subprocess, logs in a file."""

    def __init__(self, config: Path, log: Path, workers: int = 1) -> None:
        self.config, self.log, self.port = config, log, free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("w") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                stderr=out,
                cwd=Path(__file__).parents[2],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                assert self.proc.returncode is None, self.log.read_text()
                assert time.monotonic() < deadline, self.log.read_text()
                await asyncio.sleep(0.1)

    async def wait_log(self, text: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log.read_text()}"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
