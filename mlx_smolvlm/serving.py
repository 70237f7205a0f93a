"""Load a model to serve: a checkpoint directory, a Hub id, or random weights as a last resort.

The router's local provider calls `load_for_serving` and hands the result to an `Engine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from .load import HUB_PATTERNS, load_model, resolve_model_path
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


def load_for_serving(
    model: str, *, random_weights_fallback: bool = False, dtype: str | None = None
) -> ServedModel:
    """Load the model to serve: a directory, a Hub id, or random weights as a last resort.

    With ``random_weights_fallback``, a Hub id is looked up in the Hugging Face cache only
    (nothing is downloaded), and when it is not there a random-weight checkpoint of the
    SmolVLM2-256M architecture is served, with a WARNING. Without it, a Hub id not in the
    cache is downloaded.

    Args:
        model: A checkpoint directory or a Hugging Face Hub id.
        random_weights_fallback: Serve random weights when ``model`` is not on this machine.
        dtype: Cast the weights to this dtype name (e.g. ``float32``); None keeps them.

    Raises:
        FileNotFoundError, ConfigError, WeightsError: As `load_model`, when the model cannot
            be loaded (and random weights are not allowed).
        ValueError: If ``dtype`` is not a floating-point dtype name.
    """
    path = Path(model).expanduser()
    random_weights = False
    if not path.is_dir():
        if random_weights_fallback:
            try:
                path = Path(
                    snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=True)
                )
            except (LocalEntryNotFoundError, HFValidationError):
                path = random_checkpoint("256m", dtype or "float32")
                random_weights = True
                logger.warning(
                    "%s is not on this machine: serving a RANDOM-WEIGHT checkpoint of the "
                    "SmolVLM2-256M architecture (%s). Its answers are meaningless; put the "
                    "model in the Hugging Face cache or configure a checkpoint directory.",
                    model,
                    path,
                )
        else:
            path = resolve_model_path(model)
    loaded, path = load_model(str(path), dtype)
    return ServedModel(loaded, Processor.from_pretrained(path), path, random_weights)
