"""Which format a client request speaks, and which one a provider speaks.

Client formats are found by URL path (also for paths that matched no route, so that a 404
comes in the client's error shape); the model listing on the shared ``/v1/models`` path
answers in the shape of the SDK that asks. Upstream formats are found by provider type.
"""

from __future__ import annotations

from urllib.parse import urlparse

from aiohttp import web

from ..config import ProviderConfig
from .anthropic.client import AnthropicClient
from .anthropic.upstream import AnthropicUpstream
from .base import ClientFormat, UpstreamFormat
from .gemini.client import GeminiClient
from .gemini.upstream import GeminiUpstream
from .ollama.client import OllamaChatClient, OllamaGenerateClient
from .ollama.upstream import OllamaUpstream
from .openai.client import OpenAIChatClient
from .openai.upstream import OpenAIUpstream
from .openai_responses.client import OpenAIResponsesClient

OPENAI = OpenAIChatClient()
OPENAI_RESPONSES = OpenAIResponsesClient()
ANTHROPIC = AnthropicClient()
GEMINI = GeminiClient()
OLLAMA_CHAT = OllamaChatClient()
OLLAMA_GENERATE = OllamaGenerateClient()
CLIENT_FORMATS: tuple[ClientFormat, ...] = (
    OPENAI,
    OPENAI_RESPONSES,
    ANTHROPIC,
    GEMINI,
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
)

# The model listing and one model's description, in the asking client's format.
MODEL_LIST_PATHS = ("/v1/models", "/v1beta/models")
MODEL_PATHS = ("/v1beta/models/{model:.+}", "/v1/models/{model:.+}")

_UPSTREAM_FORMATS: dict[str, type[UpstreamFormat]] = {
    "anthropic": AnthropicUpstream,
    "gemini": GeminiUpstream,
    "ollama": OllamaUpstream,
}


def client_format_for_path(path: str) -> ClientFormat:
    """The client format of a URL path (also for paths that matched no route).

    Args:
        path: The request path.
    """
    if path.startswith("/v1beta/") or path.startswith("/v1/models/") and ":" in path:
        return GEMINI
    if path.startswith("/v1/messages"):
        return ANTHROPIC
    if path.startswith("/v1/responses"):
        return OPENAI_RESPONSES
    if path.startswith("/api/"):
        # Ollama's routes all answer errors alike (``{"error": "..."}``).
        return OLLAMA_GENERATE if path == "/api/generate" else OLLAMA_CHAT
    return OPENAI


def client_format_for_models(request: web.Request) -> ClientFormat:
    """The format a model listing answers in: Gemini under ``/v1beta/``; on the shared
    ``/v1/models`` path, the SDK that asks, by its auth and version headers.

    Args:
        request: The ``GET`` request.
    """
    gemini_key = "x-goog-api-key" in request.headers or "key" in request.query
    if request.path.startswith("/v1beta/") or gemini_key:
        return GEMINI
    return ANTHROPIC if "anthropic-version" in request.headers else OPENAI


def upstream_format(config: ProviderConfig) -> UpstreamFormat:
    """The format a provider speaks. An ``openai`` provider on a host other than
    api.openai.com is an OpenAI-compatible server (vLLM, Ollama, llama.cpp, mlx-lm).

    Args:
        config: The provider's config (its ``type``, and ``base_url`` for OpenAI).

    Raises:
        KeyError: If the type has no wire format (the local model speaks none).
    """
    if config.type == "openai":
        return OpenAIUpstream(compatible=urlparse(config.base_url).hostname != "api.openai.com")
    return _UPSTREAM_FORMATS[config.type]()
