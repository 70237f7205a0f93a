"""Affine weight quantization of the vision tower, the connector and the decoder.

Quantization is ``nn.quantize`` with a class predicate on the one ``Model`` class; the
returned ``quantization`` block is what ``config.json`` records, in the format that mlx-vlm
and MLX Swift read: ``{"group_size", "bits", "mode", "<module path>": {"group_size", "bits"}}``
with module paths in the exported (mlx-vlm / MLX Swift) naming, e.g.
``language_model.layers.0.mlp.down_proj``.

Rules (see ``layer_quantization``):

- Linear layers and token embeddings of the vision tower, the connector, the decoder and
  ``lm_head`` are quantized.
- The patch-embedding convolution, all norms and the vision position embedding stay in the
  export dtype. The position embedding is added to every patch with no norm in between, so
  its error would reach every image token, and it is small (1024 x 768 for 256M/500M,
  729 x 1152 for 2.2B: under 1 % of the vision tower).
- A layer whose input size the requested group size does not divide uses the largest
  supported group size (128, 64, 32) that does, recorded as a per-layer override; if none
  divides it (the 2.2B vision ``fc2``, 4304 = 16 x 269 inputs: MLX's CPU backend rejects
  group 16), it stays in the export dtype.
- Recipe ``uniform``: every quantized layer at ``bits``. Recipe ``mixed``: ``bits`` with
  8 bits for the parts that measurement on the 256M architecture found most sensitive
  (``is_sensitive``: the vision tower, the connector, the token embeddings and ``lm_head``).

On load, a module is quantized iff ``<path>.scales`` is among the weights (as in mlx-vlm and
MLX Swift), with its bits and group size from the config's ``quantization`` block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .weight_names import from_export_path, to_export_path

logger = logging.getLogger(__name__)

MODE = "affine"
SUPPORTED_BITS = (4, 8)
# Largest first: the fallback for layers the requested size does not divide.
SUPPORTED_GROUP_SIZES = (128, 64, 32)
RECIPES = ("uniform", "mixed")
HIGH_BITS = 8
# Kept unquantized whatever the recipe (the patch conv and norms have no `to_quantized`).
KEEP_MODULES = ("vision_model.embeddings.position_embedding",)
# The `mixed` recipe's 8-bit layers: the vision tower, the connector, the token embeddings and
# `lm_head`. Measured on the 256M architecture (benchmarks/export_sizes.py agreement): keeping
# the vision tower in full precision halves the 4-bit KL, lm_head / embed_tokens / connector
# each cut it by 7-15 %, all decoder v_proj or all down_proj (what llama.cpp and mlx-vlm favour)
# by 2-3 %, the whole first or last decoder layer by under 1 %.
SENSITIVE_PREFIXES = ("vision_model.",)
SENSITIVE_MODULES = ("lm_head", "text_model.embed_tokens", "connector.modality_projection.proj")


class QuantizationError(ValueError):
    """Unsupported quantization settings, or a quantization block that does not fit a model."""


@dataclass(frozen=True)
class QuantizationSpec:
    """What to quantize and how.

    Args:
        bits: Bits per weight (4 or 8).
        group_size: Weights sharing one scale and bias (32, 64 or 128).
        recipe: ``uniform`` or ``mixed``.
        quantize_vision: Also quantize the vision tower (the connector is always quantized).

    Raises:
        QuantizationError: On unsupported bits, group size or recipe.
    """

    bits: int = 4
    group_size: int = 64
    recipe: str = "uniform"
    quantize_vision: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizationError(
                f"Unsupported quantization bits {self.bits!r}; expected one of {list(SUPPORTED_BITS)}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantizationError(
                f"Unsupported quantization group size {self.group_size!r}; expected one of "
                f"{sorted(SUPPORTED_GROUP_SIZES)}"
            )
        if self.recipe not in RECIPES:
            raise QuantizationError(
                f"Unknown quantization recipe {self.recipe!r}; expected one of {list(RECIPES)}"
            )


def _fitting_group_size(group_size: int, input_dims: int) -> int | None:
    """``group_size`` if it divides ``input_dims``, else the largest supported one that does."""
    if input_dims % group_size == 0:
        return group_size
    return next((g for g in SUPPORTED_GROUP_SIZES if input_dims % g == 0), None)


def is_sensitive(path: str) -> bool:
    """Whether the ``mixed`` recipe keeps this module at 8 bits.

    Args:
        path: The module's path in our ``Model``.
    """
    return path in SENSITIVE_MODULES or path.startswith(SENSITIVE_PREFIXES)


def layer_quantization(spec: QuantizationSpec, path: str, module: nn.Module) -> dict | None:
    """The ``{"group_size", "bits"}`` for one module under ``spec``, or None to keep it.

    Args:
        spec: The quantization settings.
        path: The module's path in our ``Model`` (``text_model.layers.0.self_attn.q_proj``).
        module: The module.
    """
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    if path in KEEP_MODULES:
        return None
    if not spec.quantize_vision and path.startswith("vision_model."):
        return None
    bits = spec.bits
    if spec.recipe == "mixed" and is_sensitive(path):
        bits = max(bits, HIGH_BITS)
    group_size = _fitting_group_size(spec.group_size, module.weight.shape[-1])
    if group_size is None:
        logger.info(
            "Keeping %s unquantized: no supported group size divides its %d inputs",
            path,
            module.weight.shape[-1],
        )
        return None
    return {"group_size": group_size, "bits": bits}


def quantize_model(model: nn.Module, spec: QuantizationSpec) -> dict[str, Any]:
    """Quantize ``model`` in place.

    Args:
        model: A full-precision ``Model``.
        spec: The quantization settings.

    Returns:
        The ``quantization`` block for ``config.json``: the defaults plus a per-layer entry,
        under its exported name, for every layer whose settings differ from them.
    """
    block: dict[str, Any] = {"group_size": spec.group_size, "bits": spec.bits, "mode": MODE}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        params = layer_quantization(spec, path, module)
        if params is None:
            return False
        if params != {"group_size": spec.group_size, "bits": spec.bits}:
            block[to_export_path(path)] = {**params, "mode": MODE}
        return {**params, "mode": MODE}

    nn.quantize(model, class_predicate=predicate)
    logger.info("Quantized %d layers (%s)", len(quantized_layers(model)), spec)
    return block


def _read_block(quantization: Any) -> tuple[dict, dict[str, dict]]:
    """Split and check a ``quantization`` block: defaults and per-layer entries."""
    if not isinstance(quantization, dict):
        raise QuantizationError(
            f"config.json 'quantization' must be an object, got {type(quantization).__name__}"
        )
    defaults, layers = {}, {}
    for key, value in quantization.items():
        if key in ("group_size", "bits", "mode"):
            defaults[key] = value
        elif isinstance(value, dict):
            layers[from_export_path(key)] = value
        elif value is False:
            layers[from_export_path(key)] = {}
        # Other keys (quant_method, linear_class, ...) are metadata that MLX Swift ignores too.
    for name, entry in [("quantization", defaults), *layers.items()]:
        if entry and not {"group_size", "bits"} <= entry.keys():
            raise QuantizationError(
                f"config.json quantization entry {name!r} needs 'group_size' and 'bits', "
                f"got {sorted(entry)}"
            )
    if not defaults:
        raise QuantizationError("config.json 'quantization' lacks 'group_size' and 'bits'")
    return defaults, layers


def apply_quantization(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]
) -> None:
    """Turn the modules that the checkpoint stores quantized into quantized modules.

    A module is quantized iff ``<path>.scales`` is in ``weights``, with the per-layer entry of
    the ``quantization`` block if it has one, else its defaults.

    Args:
        model: The freshly built ``Model``.
        quantization: The ``quantization`` block of ``config.json``.
        weights: Sanitized checkpoint tensors under our parameter names.

    Raises:
        QuantizationError: If the block is malformed, or a stored-quantized tensor belongs to
            no quantizable module.
    """
    defaults, layers = _read_block(quantization)
    quantized: set[str] = set()

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        entry = layers.get(path, defaults)
        if not entry:
            raise QuantizationError(
                f"config.json quantization marks {to_export_path(path)!r} as unquantized but "
                "the weights carry its scales"
            )
        quantized.add(path)
        return {
            "group_size": entry["group_size"],
            "bits": entry["bits"],
            "mode": entry.get("mode", defaults.get("mode", MODE)),
        }

    nn.quantize(model, class_predicate=predicate)
    stray = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")} - quantized
    if stray:
        raise QuantizationError(
            f"The weights carry scales for modules that cannot be quantized: {sorted(stray)[:10]}"
        )


def quantized_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (bits, group_size)}`` of the quantized modules of ``model``.

    Args:
        model: Any MLX module tree.
    """
    return {
        path: (module.bits, module.group_size)
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
