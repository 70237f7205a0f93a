"""Load a model to serve: a checkpoint directory, a Hub id, or random weights as a last resort.

The router's local provider calls `load_for_serving` and hands the result to an `Engine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .gguf import is_gguf
from .load import load, load_model, resolve_model_path
from .model import Model
from .processing import Processor
from .random_weights import random_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A model loaded for serving, and whether its weights are random."""

    model: Model
    processor: Processor
    path: Path
    random_weights: bool

    @property
    def text_only(self) -> bool:
        """Whether the model has no vision tower (a GGUF without its mmproj)."""
        return self.model.config.vision_config is None


def load_for_serving(
    model: str, *, random_weights_fallback: bool = False, dtype: str | None = None
) -> ServedModel:
    """Load the model to serve: a directory, a Hub id, a GGUF, or random weights as a last resort.

    A Hub id is downloaded on first use (with huggingface_hub's progress bars) and then read
    from the Hugging Face cache; offline (``HF_HUB_OFFLINE``, ``--offline`` or a Hub that
    cannot be reached within seconds) only the cache is looked at. With
    ``random_weights_fallback``, a model that cannot be had is replaced by a random-weight
    checkpoint of the SmolVLM2-256M architecture, with a WARNING.

    A GGUF (a ``.gguf`` file, or a directory with the text GGUF and its ``mmproj*.gguf``)
    loads through `mlx_smolvlm.gguf`; a text GGUF alone is a text-only model.

    Args:
        model: A checkpoint directory, a Hugging Face Hub id or a GGUF.
        random_weights_fallback: Serve random weights when ``model`` cannot be had.
        dtype: Cast the weights to this dtype name (e.g. ``float32``); None keeps them.

    Raises:
        FileNotFoundError, ConfigError, WeightsError, GGUFError: As `load_model`, when the
            model cannot be loaded (and random weights are not allowed).
        ValueError: If ``dtype`` is not a floating-point dtype name.
    """
    path = Path(model).expanduser()
    if is_gguf(path):
        loaded, processor = load(str(path), dtype)
        return ServedModel(loaded, processor, path, random_weights=False)
    random_weights = False
    try:
        path = resolve_model_path(model)
    except FileNotFoundError as err:
        if not random_weights_fallback:
            raise
        path = random_checkpoint("256m", dtype or "float32")
        random_weights = True
        logger.warning(
            "%s: serving a RANDOM-WEIGHT checkpoint of the SmolVLM2-256M architecture instead "
            "(%s): its answers are meaningless. Connect to the network once (the model is "
            "then cached) or configure a checkpoint directory.",
            err,
            path,
        )
    loaded, path = load_model(str(path), dtype)
    return ServedModel(loaded, Processor.from_pretrained(path), path, random_weights)
