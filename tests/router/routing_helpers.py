"""A config with routing rules in front of the scriptable fake upstream (`FakeUpstream`), for
the routing, budget and spillover tests: cloud providers marked ``local: false`` (the fake
listens on loopback) and "local" ones marked ``local: true``."""

from __future__ import annotations

from router.config import Config
from tests.router.helpers import LOOPBACK_FIXTURES, Seen

ADMIN_KEY = "routing-admin-key"
CLIENT_KEYS = {"ci": "sk-router-ci", "ops": "sk-router-ops", "dev": "sk-router-dev"}
GROUPS = {"ci": "team", "ops": "infra", "dev": "team"}


def providers(base_url: str) -> dict:
    """Two cloud providers and two local ones, all at the fake."""
    return {
        "cloud": {"type": "openai", "base_url": f"{base_url}/v1", "keys": ["sk-1"], "local": False},
        "claude": {"type": "anthropic", "base_url": base_url, "keys": ["ak-1"], "local": False},
        "edge": {"type": "openai", "base_url": f"{base_url}/v1", "local": True},
        "gemlocal": {"type": "gemini", "base_url": base_url, "local": True},
    }


def routing_config(base_url: str, rules: list[dict], **sections: object) -> Config:
    """The providers, aliases ``gpt`` (cloud) and ``small`` (edge), three client keys in two
    groups, an admin key, and ``rules``.

    Args:
        base_url: The fake upstream's root.
        rules: ``routing.rules``.
        sections: More top-level sections (``budgets``, ``pricing``, ...), or ``routing_extra``
            for more keys of ``routing``.
    """
    extra = sections.pop("routing_extra", {})
    clients = [
        {"key": key, "name": name, "group": GROUPS[name]} for name, key in CLIENT_KEYS.items()
    ]
    return Config.from_dict(
        {
            "providers": sections.pop("providers", None) or providers(base_url),
            "models": {
                "gpt": [{"provider": "cloud", "model": "gpt-4o-mini"}],
                "small": [{"provider": "edge", "model": "small-up"}],
            },
            "auth": {"client_keys": clients, "admin_key": ADMIN_KEY},
            "media": {"allow": [LOOPBACK_FIXTURES]},
            "routing": {"rules": rules, **extra},
            **sections,
        }
    )


def auth(name: str = "ci") -> dict[str, str]:
    """The Authorization header of a client key."""
    return {"Authorization": f"Bearer {CLIENT_KEYS[name]}"}


def upstream_model(seen: Seen) -> str:
    """The model an upstream request asked for (Gemini names it in the path)."""
    if "model" in seen.body:
        return seen.body["model"]
    return seen.path.rsplit("/", 1)[-1].split(":")[0]


def chat(text: str = "hi", model: str = "auto", **extra: object) -> dict:
    """An OpenAI Chat Completions body."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
