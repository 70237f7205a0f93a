"""Random-weight checkpoints in the real SmolVLM2 architectures, for benchmarks and demos."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .blas import cache_dir
from .config import ModelConfig
from .load import WEIGHTS_FILE
from .model import Model

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHAPES = ("256m", "500m", "2.2b")
SHAPE_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
# The 2.2B tokenizer allows longer prompts than the 256M/500M one shipped in assets/tokenizer.
MODEL_MAX_LENGTH = {"2.2b": 16384}
INIT_STD = 0.02
EMBED_STD = 1.0


def init_random(model: Model, seed: int = 0) -> None:
    """Give ``model`` random weights that keep activations in a sane range.

    Norm scales are 1 and biases 0. Token embeddings have std 1, so that each position's own
    token shapes its output and greedy decoding wanders over many tokens; every other tensor
    has std 0.02. Values are uniform rather than normal: about 3x faster to draw on the CPU,
    which dominates the time for the larger shapes. The arrays stay lazy until evaluated or
    saved.

    Args:
        model: The model to overwrite in place.
        seed: Random seed.
    """
    key = mx.random.key(seed)
    fixed = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            fixed[f"{path}.weight"] = mx.ones_like(module.weight)
        if isinstance(module, (nn.LayerNorm, nn.Linear, nn.Conv2d)) and "bias" in module:
            fixed[f"{path}.bias"] = mx.zeros_like(module.bias)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, v), k in zip(params, keys, strict=True):
        if name not in fixed:
            std = EMBED_STD if name.endswith("embed_tokens.weight") else INIT_STD
            bound = std * math.sqrt(3.0)  # U(-b, b) has std b / sqrt(3)
            fixed[name] = mx.random.uniform(-bound, bound, v.shape, key=k)
        new.append((name, fixed[name]))
    model.update(tree_unflatten(new))


def write_assets(shape: str, path: str | Path, dtype: str = "float32") -> ModelConfig:
    """Write every file of a ``shape`` checkpoint except the weights.

    That is ``config.json`` (with ``torch_dtype`` set to ``dtype``), ``preprocessor_config.json``
    and ``processor_config.json`` from ``assets/shapes/<shape>/``, and the tokenizer files from
    ``assets/tokenizer/`` (``model_max_length`` raised for 2.2B).

    Args:
        shape: One of ``256m``, ``500m``, ``2.2b``.
        path: Output directory (created if needed).
        dtype: The weight dtype name recorded in ``config.json``.

    Returns:
        The model config.

    Raises:
        ValueError: If ``shape`` is unknown.
    """
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shape_dir = ASSETS / "shapes" / shape
    config_dict = json.loads((shape_dir / "config.json").read_text(encoding="utf-8"))
    config_dict["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
    for name in SHAPE_FILES[1:]:
        shutil.copyfile(shape_dir / name, out / name)
    for src in sorted((ASSETS / "tokenizer").iterdir()):
        shutil.copyfile(src, out / src.name)
    if shape in MODEL_MAX_LENGTH:
        tok_path = out / "tokenizer_config.json"
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        tok["model_max_length"] = MODEL_MAX_LENGTH[shape]
        tok_path.write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
    return ModelConfig.from_dict(config_dict)


def make_random_checkpoint(
    shape: str, path: str | Path, dtype: str = "float32", seed: int = 0
) -> Path:
    """Write a complete Hugging Face-layout checkpoint with random weights.

    The directory gets the files of ``write_assets`` plus ``model.safetensors`` with Hugging
    Face tensor names and layouts.

    Args:
        shape: One of ``256m``, ``500m``, ``2.2b``.
        path: Output directory (created if needed).
        dtype: Weight dtype name, e.g. ``float32`` or ``bfloat16``.
        seed: Random seed.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: If ``shape`` or ``dtype`` is unknown.
    """
    mx_dtype = getattr(mx, dtype, None)
    if not isinstance(mx_dtype, mx.Dtype) or not mx.issubdtype(mx_dtype, mx.floating):
        raise ValueError(f"dtype must name a floating-point dtype, got {dtype!r}")
    out = Path(path)
    model = Model(write_assets(shape, out, dtype))
    init_random(model, seed)
    weights = {k: v.astype(mx_dtype) for k, v in model.hf_weights().items()}
    mx.save_safetensors(str(out / WEIGHTS_FILE), weights, metadata={"format": "pt"})
    logger.debug("Wrote random %s checkpoint (%s) to %s", shape, dtype, out)
    return out


def random_checkpoint(shape: str = "256m", dtype: str = "float32") -> Path:
    """The cached random-weight checkpoint of ``shape`` in ``dtype``, made on first use.

    Every user (the serving fallback, the benchmarks, the tests) shares one cache layout:
    ``<cache_dir>/random-<shape>-<dtype>``.

    Args:
        shape: One of ``256m``, ``500m``, ``2.2b``.
        dtype: Weight dtype name, e.g. ``float32`` or ``bfloat16``.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: If ``shape`` or ``dtype`` is unknown.
    """
    path = cache_dir() / f"random-{shape}-{dtype}"
    if not (path / WEIGHTS_FILE).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info(
            "Making a random-weight %s checkpoint (%s) in %s, once (first use)",
            shape,
            dtype,
            path,
        )
        start = time.perf_counter()
        # Written beside and renamed into place, so a crash never leaves half a checkpoint.
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            make_random_checkpoint(shape, scratch, dtype)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(scratch, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        logger.info("Made the random %s checkpoint in %.1f s", shape, time.perf_counter() - start)
    return path
