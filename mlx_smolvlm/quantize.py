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
- Recipe ``calibrated`` (``convert``'s default, at group 32): the token embeddings and
  ``lm_head`` at 8 bits (round to nearest); every other Linear at ``bits`` with GPTQ's error
  compensation (``gptq_quantize``) on group ranges chosen by a clipping search
  (``clipped_group_params``), from Hessians of its inputs on a small calibration set of text
  and image tiles (``Calibration``). Chosen by measurement on the trained SmolLM2 decoder
  with its channels permuted (``benchmarks/quant_quality.py``): see the README.

On load, a module is quantized iff ``<path>.scales`` is among the weights (as in mlx-vlm and
MLX Swift), with its bits and group size from the config's ``quantization`` block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .weight_names import from_export_path, to_export_path

logger = logging.getLogger(__name__)

MODE = "affine"
SUPPORTED_BITS = (4, 8)
# Largest first: the fallback for layers the requested size does not divide.
SUPPORTED_GROUP_SIZES = (128, 64, 32)
RECIPES = ("uniform", "mixed", "calibrated")
# What `convert -q` does unless told otherwise: the recipe and group size that kept the trained
# decoder within 1.10x of full-precision perplexity on held-out text (README).
DEFAULT_RECIPE = "calibrated"
DEFAULT_GROUP_SIZE = 32
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
# The `calibrated` recipe's 8-bit layers: on the trained decoder they carry much of the 4-bit
# loss, and at 8 bits they cost 28 MB of the 256M export; GPTQ does not apply to an embedding.
CALIBRATED_HIGH_BITS_MODULES = ("lm_head", "text_model.embed_tokens")
# GPTQ: dampening (a fraction of the mean Hessian diagonal) and columns per lazy update.
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128
# Range shrink factors that ``clipped_group_params`` tries per group.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# Linears that read the same input share one Hessian and one GPTQ pass (rows are independent).
SHARED_INPUT = {
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "mlp.up_proj": "mlp.gate_proj",
}


class QuantizationError(ValueError):
    """Unsupported quantization settings, or a quantization block that does not fit a model."""


@dataclass(frozen=True)
class QuantizationSpec:
    """What to quantize and how.

    Args:
        bits: Bits per weight (4 or 8).
        group_size: Weights sharing one scale and bias (32, 64 or 128).
        recipe: ``uniform``, ``mixed`` or ``calibrated``.
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
    if spec.recipe == "calibrated" and path in CALIBRATED_HIGH_BITS_MODULES:
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


@dataclass
class Calibration:
    """Inputs that the ``calibrated`` recipe runs through the model to collect Hessians.

    Args:
        texts: ``(1, L)`` token id arrays, run through the decoder one by one.
        pixel_values: ``(1, tiles, C, H, W)`` image tiles for the vision tower and connector.
        image_prompt_ids: ``(1, L)`` ids holding one tile's ``<image>`` tokens: the decoder
            then also sees the first tile's features.
    """

    texts: list[mx.array] = field(default_factory=list)
    pixel_values: mx.array | None = None
    image_prompt_ids: mx.array | None = None


class _HessianRecorder(nn.Module):
    """Wraps a Linear and accumulates ``X^T X`` of its inputs (in NumPy, so it is no parameter)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.total = np.zeros((linear.weight.shape[1],) * 2)
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.total += np.array(rows.T @ rows, dtype=np.float64)
        self.count += rows.shape[0]
        return self.linear(x)

    def hessian(self) -> np.ndarray:
        """``2 X^T X / n`` as GPTQ defines it."""
        if self.count == 0:
            raise QuantizationError("The calibration data never reached this layer")
        return self.total * (2.0 / self.count)


def _module_at(model: nn.Module, path: str) -> tuple[Any, str]:
    """The parent of the module at ``path`` and the last name (an int for list items)."""
    *parents, last = path.split(".")
    node: Any = model
    for name in parents:
        node = node[int(name)] if isinstance(node, list) else getattr(node, name)
    return node, last


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, last = _module_at(model, path)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def _get_module(model: nn.Module, path: str) -> nn.Module:
    parent, last = _module_at(model, path)
    return parent[int(last)] if isinstance(parent, list) else getattr(parent, last)


def shared_input_leader(path: str) -> str:
    """The module whose input ``path`` shares (``k_proj`` -> ``q_proj``), else ``path``."""
    for follower, leader in SHARED_INPUT.items():
        if path.endswith("." + follower):
            return path[: -len(follower)] + leader
    return path


def collect_hessians(
    model: nn.Module, calibration: Calibration, paths: Sequence[str]
) -> dict[str, np.ndarray]:
    """Run ``calibration`` through ``model`` and return each Linear's input Hessian.

    Args:
        model: The full-precision ``Model``.
        calibration: The calibration inputs.
        paths: Linear module paths; modules that share an input share one Hessian, keyed by
            ``shared_input_leader``.

    Returns:
        ``{leader path: (in, in) float64 Hessian}``.
    """
    leaders = sorted({shared_input_leader(p) for p in paths})
    recorders = {p: _HessianRecorder(_get_module(model, p)) for p in leaders}
    for path, recorder in recorders.items():
        _set_module(model, path, recorder)
    # fp32 is the fast path on the CPU, and a bf16 -> fp32 -> bf16 round trip is exact.
    dtype = model.text_model.embed_tokens.weight.dtype
    model.set_dtype(mx.float32)
    try:
        for ids in calibration.texts:
            mx.eval(model(ids, logits_to_keep=1))
        if calibration.pixel_values is not None:
            features = model.encode_images(calibration.pixel_values)
            if calibration.image_prompt_ids is not None:
                mx.eval(model(calibration.image_prompt_ids, image_features=features[:1]))
            mx.eval(features)
    finally:
        model.set_dtype(dtype)
        for path, recorder in recorders.items():
            _set_module(model, path, recorder.linear)
    return {path: recorder.hessian() for path, recorder in recorders.items()}


def _round_to_dtype(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` (the scales' storage type) and back to float32."""
    return np.array(mx.array(x.astype(np.float32)).astype(dtype).astype(mx.float32))


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels ``(out, in)`` packed into MLX's ``uint32`` layout ``(out, in * bits / 32)``."""
    per_word = 32 // bits
    words = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    return np.bitwise_or.reduce(words << shifts, axis=-1)


def _affine_params(
    low: np.ndarray, high: np.ndarray, levels: int, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and biases (rounded to ``dtype``) of groups spanning ``[low, high]``."""
    scale = _round_to_dtype(np.maximum((high - low) / levels, 1e-8), dtype)
    return np.where(scale == 0, 1e-8, scale), _round_to_dtype(low, dtype)


def clipped_group_params(
    weight: np.ndarray, importance: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scales and biases ``(out, in / group_size)`` whose range is the group's
    ``[min, max]`` shrunk by the factor of ``CLIP_RATIOS`` that minimizes the group's rounding
    error weighted by ``importance`` (per input: the Hessian's diagonal, the mean squared
    input). Clipping a rare extreme weight buys a finer grid for all the others.
    """
    levels = 2**bits - 1
    groups = weight.reshape(weight.shape[0], -1, group_size)
    weights = importance.reshape(1, -1, group_size)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    best_error = np.full(low.shape, np.inf)
    best_scale, best_bias = np.empty_like(low), np.empty_like(low)
    for ratio in CLIP_RATIOS:
        scale, bias = _affine_params(low * ratio, high * ratio, levels, dtype)
        q = np.clip(np.round((groups - bias[..., None]) / scale[..., None]), 0, levels)
        error = (((q * scale[..., None] + bias[..., None]) - groups) ** 2 * weights).sum(-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        best_bias = np.where(better, bias, best_bias)
    return best_scale, best_bias


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    dtype: mx.Dtype,
    act_order: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """GPTQ (Frantar et al., 2022) into MLX's affine format: ``w ~ scale * q + bias`` per group.

    Columns are quantized one by one; each column's rounding error is spread over the columns
    not yet quantized, weighted by the inverse Hessian of the layer's inputs, so the layer's
    output on the calibration inputs changes as little as possible. The groups' scales and
    biases are fixed first, from the original weights (``clipped_group_params``), so that the
    columns can be visited in any order: with ``act_order``, in decreasing Hessian diagonal
    (the inputs with the most energy first, while the most columns remain to absorb their
    error), as GPTQ's ``act_order`` with static groups does; the stored layout is unchanged.
    The ``calibrated`` recipe leaves it off: on the trained decoder it raised the KL to full
    precision from 0.066 to 0.072 (README).

    Args:
        weight: ``(out, in)`` weights.
        hessian: ``(in, in)`` input Hessian (``collect_hessians``).
        bits: 4 or 8.
        group_size: Columns per scale; divides ``in``.
        dtype: The scales' and biases' dtype.
        act_order: Visit the columns in decreasing Hessian diagonal.

    Returns:
        ``(packed weight, scales, biases)`` for ``nn.QuantizedLinear``.
    """
    W = weight.astype(np.float32).copy()
    rows, cols = W.shape
    H = hessian.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += GPTQ_DAMP * np.mean(np.diag(H))
    scales, biases = clipped_group_params(W, np.diag(H), bits, group_size, dtype)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    H = H[np.ix_(order, order)]
    # Columns as rows (C order): each step reads and updates contiguous memory.
    WT = np.ascontiguousarray(W.T[order])
    col_scale = np.repeat(scales, group_size, axis=1).T[order]
    col_bias = np.repeat(biases, group_size, axis=1).T[order]
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
    U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)
    levels = 2**bits - 1
    QT = np.empty((cols, rows), dtype=np.uint8)
    for start in range(0, cols, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, cols)
        block = WT[start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            col = start + i
            w, scale, bias = block[i], col_scale[col], col_bias[col]
            q = np.clip(np.round((w - bias) / scale), 0, levels)
            QT[col] = q
            error = (w - (scale * q + bias)) / U[col, col]
            block[i:] -= U[col, col:end, None] * error
            errors[i] = error
        WT[end:] -= U[start:end, end:].T @ errors
    levels_in_place = np.empty((rows, cols), dtype=np.uint8)
    levels_in_place[:, order] = QT.T
    return (
        mx.array(pack(levels_in_place, bits)),
        mx.array(scales).astype(dtype),
        mx.array(biases).astype(dtype),
    )


def _gptq_layers(
    model: nn.Module, plan: dict[str, dict], calibration: Calibration
) -> dict[str, tuple[mx.array, mx.array, mx.array]]:
    """GPTQ results for every Linear of ``plan`` below ``HIGH_BITS``, by module path."""
    targets = {
        path: params
        for path, params in plan.items()
        if params["bits"] < HIGH_BITS and isinstance(_get_module(model, path), nn.Linear)
    }
    if not targets:
        return {}
    hessians = collect_hessians(model, calibration, list(targets))
    # Modules with one input and the same settings are quantized as one stacked matrix.
    stacks: dict[tuple, list[str]] = {}
    for path, params in targets.items():
        key = (shared_input_leader(path), params["bits"], params["group_size"])
        stacks.setdefault(key, []).append(path)
    results = {}
    for (leader, bits, group_size), paths in stacks.items():
        modules = [_get_module(model, p) for p in paths]
        stacked = np.concatenate([np.array(m.weight.astype(mx.float32)) for m in modules])
        wq, scales, biases = gptq_quantize(
            stacked, hessians[leader], bits, group_size, modules[0].weight.dtype
        )
        offset = 0
        for path, module in zip(paths, modules, strict=True):
            rows = slice(offset, offset + module.weight.shape[0])
            results[path] = (wq[rows], scales[rows], biases[rows])
            offset = rows.stop
    logger.info("GPTQ quantized %d layers from %d Hessians", len(results), len(hessians))
    return results


def quantize_model(
    model: nn.Module, spec: QuantizationSpec, calibration: Calibration | None = None
) -> dict[str, Any]:
    """Quantize ``model`` in place.

    Args:
        model: A full-precision ``Model``.
        spec: The quantization settings.
        calibration: The inputs of the ``calibrated`` recipe (required for it, else unused).

    Returns:
        The ``quantization`` block for ``config.json``: the defaults plus a per-layer entry,
        under its exported name, for every layer whose settings differ from them.

    Raises:
        QuantizationError: If the ``calibrated`` recipe gets no calibration data.
    """
    plan = {}
    for path, module in model.named_modules():
        params = layer_quantization(spec, path, module)
        if params is not None:
            plan[path] = params
    compensated = {}
    if spec.recipe == "calibrated":
        if calibration is None:
            raise QuantizationError("The 'calibrated' recipe needs calibration data")
        compensated = _gptq_layers(model, plan, calibration)

    block: dict[str, Any] = {"group_size": spec.group_size, "bits": spec.bits, "mode": MODE}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        params = plan.get(path)
        if params is None:
            return False
        if params != {"group_size": spec.group_size, "bits": spec.bits}:
            block[to_export_path(path)] = {**params, "mode": MODE}
        return {**params, "mode": MODE}

    nn.quantize(model, class_predicate=predicate)
    for path, (weight, scales, biases) in compensated.items():
        module = _get_module(model, path)
        module.weight, module.scales, module.biases = weight, scales, biases
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
