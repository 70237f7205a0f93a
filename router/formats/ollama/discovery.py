"""Ollama's discovery routes: ``GET /api/tags`` (the models), ``POST /api/show`` (one model),
``GET /api/ps`` (the models loaded in process: the local ones) and ``GET /api/version``.

Models are the config's aliases (``/api/show`` also takes ``provider/model``); a model whose
first target is the local MLX model reports its family, context, weights' size and whether it
sees images, a cloud model its provider's type.
"""

from __future__ import annotations

from aiohttp import web

from ...backends import CONFIG, PROVIDERS
from ...errors import InvalidRequestError
from ...fallback import resolve_targets
from ..fields import decode_body, field
from .client import (
    OLLAMA_VERSION,
    ModelCard,
    render_running,
    render_show,
    render_tags,
)

# What a cloud model is assumed to take: the router passes tools and images through.
CLOUD_CAPABILITIES = ["completion", "tools", "vision"]


def setup_discovery(app: web.Application) -> None:
    """Add Ollama's discovery routes to an app being built.

    Args:
        app: The application.
    """
    app.router.add_get("/api/tags", _tags)
    app.router.add_post("/api/show", _show)
    app.router.add_get("/api/ps", _running)
    app.router.add_get("/api/version", _version)


def _card(app: web.Application, name: str) -> ModelCard:
    """Describe a model by its first target.

    Raises:
        NotFoundError: If the model is not served.
    """
    target = resolve_targets(app[CONFIG], name)[0]
    config = app[CONFIG].providers[target.provider]
    if config.type != "mlx":
        return ModelCard(name, config.type, capabilities=list(CLOUD_CAPABILITIES))
    # The local model's provider (`router.providers.mlx`), not imported: a cloud-only router
    # never loads MLX.
    local = app[PROVIDERS][target.provider]
    # Tools and JSON output by constrained decoding (`router.providers.mlx_structured`).
    capabilities = ["completion", "tools"] if local.text_only else ["completion", "tools", "vision"]
    return ModelCard(
        name, "smolvlm", True, local.weights_bytes, local.context_window(), capabilities
    )


def _cards(app: web.Application) -> list[ModelCard]:
    return [_card(app, name) for name in app[CONFIG].models]


async def _tags(request: web.Request) -> web.Response:
    return web.json_response(render_tags(_cards(request.app)))


async def _show(request: web.Request) -> web.Response:
    body = decode_body(await request.read())
    # ``name`` is the field's name before Ollama 0.3; clients still send it.
    name = field(body, "model", str, "") or field(body, "name", str, "")
    if not name:
        raise InvalidRequestError("model: field is required", param="model")
    return web.json_response(render_show(_card(request.app, name)))


async def _running(request: web.Request) -> web.Response:
    return web.json_response(render_running(_cards(request.app)))


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})
