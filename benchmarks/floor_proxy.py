"""The floor under the router's overhead: an aiohttp server that forwards each chat request's
body to the fake's OpenAI endpoint through the router's own upstream client and relays the
answer (a stream piece by piece), with no auth, routing, translation, limits, logs or metrics.

`benchmarks.router_overhead` measures it as the system ``floor``: what the router adds beyond
it is the cost of the router's own logic; what it adds itself is the cost of one more
HTTP hop through aiohttp's server on this machine.

Usage: ``python -m benchmarks.floor_proxy UPSTREAM_ROOT PORT``
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from router.upstream_client import UpstreamPool
from router.workers import run_event_loop

POOL = web.AppKey("pool", UpstreamPool)
UPSTREAM = web.AppKey("upstream", str)
JSON = {"Content-Type": "application/json"}


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the body on to the fake; relay its status, type and body as they arrive."""
    body = await request.read()
    url = request.app[UPSTREAM] + "/v1/chat/completions"
    async with request.app[POOL].post(url, body, JSON) as answer:
        content_type = answer.headers.get("content-type", "application/json")
        if "text/event-stream" not in content_type:
            raw = await answer.read()
            return web.Response(status=answer.status, body=raw, content_type="application/json")
        response = web.StreamResponse(status=answer.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in answer.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app(upstream: str) -> web.Application:
    """The floor proxy's app, forwarding to ``upstream`` (the fake's root URL)."""
    app = web.Application()
    app[POOL] = UpstreamPool(max_connections=1000, connect_timeout_s=10, read_timeout_s=60)
    app[UPSTREAM] = upstream
    app.router.add_post("/v1/chat/completions", forward)
    return app


async def serve(upstream: str, port: int) -> None:
    """Serve until killed."""
    runner = web.AppRunner(await make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    run_event_loop(serve(sys.argv[1], int(sys.argv[2])))
