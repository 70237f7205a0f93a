"""What a request costs: USD per million input and output tokens, from the table shipped in
``router/data/prices.json``, overridden or extended by the config's ``pricing`` section (keyed
``model`` or ``provider/model``). Local providers cost nothing."""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import resources

from .config import Config, PriceConfig, is_local_provider

logger = logging.getLogger(__name__)

FREE = PriceConfig(0.0, 0.0)


@cache
def shipped_prices() -> dict[str, PriceConfig]:
    """The shipped table (read once per process)."""
    raw = json.loads(resources.files("router").joinpath("data/prices.json").read_text())
    return {name: PriceConfig(**p) for name, p in raw.items() if not name.startswith("_")}


def price_of(cfg: Config, provider: str, model: str) -> PriceConfig | None:
    """The price of a model at a provider; None when no table knows it.

    A dated model name (``claude-sonnet-4-5-20250929``) takes the price of its longest known
    prefix.

    Args:
        cfg: The config (``pricing`` overrides, the providers).
        provider: The provider's name.
        model: The upstream model name.
    """
    if is_local_provider(cfg.providers[provider]):
        return FREE
    for key in (f"{provider}/{model}", model):
        if key in cfg.pricing:
            return cfg.pricing[key]
    table = shipped_prices()
    known = [name for name in table if model == name or model.startswith(name + "-")]
    return table[max(known, key=len)] if known else None


def cost_usd(price: PriceConfig | None, input_tokens: int, output_tokens: int) -> float:
    """USD for a request's tokens (0 when the price is unknown).

    Args:
        price: The model's price.
        input_tokens: Prompt tokens.
        output_tokens: Generated tokens.
    """
    if price is None:
        return 0.0
    return (input_tokens * price.input + output_tokens * price.output) / 1e6
