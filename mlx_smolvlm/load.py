"""Load SmolVLM / Idefics3 checkpoints into the MLX model.

Reads Hugging Face checkpoints and MLX exports (ours and mlx-vlm's: ``language_model.*``
names, channels-last patch convolution, optionally quantized with a ``quantization`` block).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import huggingface_hub.constants
import mlx.core as mx
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from mlx.utils import tree_flatten, tree_unflatten

from .config import ConfigError, load_config
from .device_ops import compute_dtype
from .gguf import gguf_paths, is_gguf, read_checkpoint
from .model import Model
from .quantize import apply_quantization

if TYPE_CHECKING:
    from .processing import Processor

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# What the loader reads from a Hub repo: configs, weights, chat template, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
# Seconds to open a connection to the Hub before calling it unreachable (see `hub_reachable`).
HUB_CONNECT_TIMEOUT_S = 5.0
_TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # as huggingface_hub reads its boolean variables
_MAX_LISTED = 10


class WeightsError(ValueError):
    """Checkpoint tensors that do not fit the model built from its config."""


def _listing(names: list[str]) -> str:
    """A sorted, bounded listing of names for error messages."""
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is off limits: ``HF_HUB_OFFLINE`` as huggingface_hub read it
    at import, or as set since (``--offline`` sets it)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES
    return huggingface_hub.constants.HF_HUB_OFFLINE or env


def hub_reachable(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a connection to the Hugging Face Hub (or to the HTTPS proxy in front of it) opens
    within ``timeout_s``.

    huggingface_hub's first call has no timeout: on a network that drops packets it would wait
    minutes before using the cache. This check makes "offline" a matter of seconds.

    Args:
        timeout_s: Seconds allowed to connect.
    """
    target = urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout_s):
            return True
    except OSError as err:
        logger.info("The Hugging Face Hub (%s) cannot be reached: %s", target.hostname, err)
        return False


def looks_like_local_path(name: str) -> bool:
    """Whether a model name can only be a local path: absolute, starting with ``./``, ``../`` or
    ``~``, or not a Hub repo id (``owner/name``: one slash, letters, digits and ``-_.``).

    Args:
        name: A local directory or a Hub repo id, as the user wrote it.
    """
    if name.startswith(("./", "../", "~")) or Path(name).is_absolute():
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of a Hub repo: the files the loader reads (``HUB_PATTERNS``),
    downloaded once with huggingface_hub's progress bars and cached; offline, the cached ones.

    Offline is ``hub_offline()`` or a Hub that ``hub_reachable`` cannot reach.

    Args:
        repo_id: A Hub repo id such as ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``.

    Raises:
        LocalEntryNotFoundError: Offline and not in the cache.
        HfHubHTTPError, HFValidationError: As ``huggingface_hub.snapshot_download`` (no such
            repo, a gated one, an invalid id).
    """
    offline = hub_offline() or not hub_reachable()
    if not offline:
        logger.info("Fetching %s from the Hugging Face Hub (once; then from its cache)", repo_id)
    path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    return Path(path)


def resolve_model_path(path_or_hub_id: str) -> Path:
    """Return a local checkpoint directory, downloading from the Hugging Face Hub if needed.

    Args:
        path_or_hub_id: A local directory, or a Hub repo id such as
            ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct`` (see `download_from_hub`).

    Raises:
        FileNotFoundError: If it is a local path that is not a directory, or a Hub id that
            cannot be had (offline and not cached, unknown or gated repo).
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path_or_hub_id} is a file, expected a checkpoint directory")
    if looks_like_local_path(path_or_hub_id):
        raise FileNotFoundError(f"No such directory: {path}")
    try:
        return download_from_hub(path_or_hub_id)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{path_or_hub_id!r} is not a local directory, and not in the Hugging Face cache "
            "while offline (HF_HUB_OFFLINE or --offline, or the Hub cannot be reached)"
        ) from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise FileNotFoundError(
            f"{path_or_hub_id!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub: {err}"
        ) from err


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise FileNotFoundError(f"Weight file {path} does not exist")
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as err:
        raise WeightsError(f"Cannot read weight file {path}: {err}") from err


def load_weights(model_dir: Path) -> dict[str, mx.array]:
    """Read all checkpoint tensors (lazily) from ``model.safetensors`` or its sharded index.

    Args:
        model_dir: The checkpoint directory.

    Raises:
        FileNotFoundError: If no weights, or a shard named by the index, are missing.
        WeightsError: If a file is corrupt, the index is malformed, or a tensor appears twice.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise WeightsError(f"{index_path} is not a valid safetensors index: {err}") from err
        weights: dict[str, mx.array] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = _read_safetensors(model_dir / shard)
            duplicated = tensors.keys() & weights.keys()
            if duplicated:
                raise WeightsError(f"{model_dir / shard} repeats tensors {_listing(duplicated)}")
            weights.update(tensors)
        unlisted = weight_map.keys() - weights.keys()
        if unlisted:
            raise WeightsError(
                f"{index_path} lists tensors that its shards lack: {_listing(unlisted)}"
            )
        return weights
    if (model_dir / WEIGHTS_FILE).is_file():
        return _read_safetensors(model_dir / WEIGHTS_FILE)
    raise FileNotFoundError(f"No {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {model_dir}")


def read_quantization(model_dir: Path) -> dict | None:
    """The MLX ``quantization`` block of ``config.json``, or None for full precision.

    Args:
        model_dir: The checkpoint directory (its ``config.json`` already validated).

    Raises:
        ConfigError: If ``config.json`` names a quantization method other than MLX's.
    """
    path = model_dir / "config.json"
    params = json.loads(path.read_text(encoding="utf-8"))
    if "quantization" in params:
        return params["quantization"]
    hf_block = params.get("quantization_config")
    if hf_block is None:
        return None
    if isinstance(hf_block, dict) and "quant_method" not in hf_block:
        return hf_block  # an MLX export that only kept the copy
    method = hf_block.get("quant_method") if isinstance(hf_block, dict) else hf_block
    raise ConfigError(f"{path}: quantization_config {method!r} is not supported (only MLX's)")


def check_weights(model: Model, weights: dict[str, mx.array], source: Path) -> None:
    """Require exactly the model's parameter names and shapes.

    Args:
        model: The freshly built model.
        weights: Sanitized checkpoint tensors.
        source: The checkpoint directory, for error messages.

    Raises:
        WeightsError: Naming the missing, unexpected, or wrongly shaped tensors.
    """
    expected = dict(tree_flatten(model.parameters()))
    problems = []
    missing = expected.keys() - weights.keys()
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    extra = weights.keys() - expected.keys()
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    wrong = [
        f"{k} has shape {tuple(weights[k].shape)}, expected {tuple(v.shape)}"
        for k, v in sorted(expected.items())
        if k in weights and weights[k].shape != v.shape
    ]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:_MAX_LISTED]))
    if problems:
        raise WeightsError(
            f"Checkpoint {source} does not match its config.json "
            f"(names after sanitize, without the 'model.' prefix): " + " | ".join(problems)
        )


def _resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | str | None:
    """``dtype`` as an MLX dtype, ``"auto"`` or None.

    Raises:
        ValueError: If it is not a floating-point dtype (or its name).
    """
    if isinstance(dtype, str) and dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        if not isinstance(getattr(mx, dtype, None), mx.Dtype):
            raise ValueError(f"Unknown dtype {dtype!r}")
        dtype = getattr(mx, dtype)
    if dtype is not None and not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    return dtype


def _finish_loading(
    model: Model, weights: dict[str, mx.array], dtype: mx.Dtype | str | None, source: Path
) -> None:
    """Check the weights strictly, cast them, put them into ``model`` and evaluate it."""
    check_weights(model, weights, source)
    if dtype == "auto":
        stored = next(v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating))
        dtype = compute_dtype(stored)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
            for k, v in weights.items()
        }
    model.update(tree_unflatten(list(weights.items())))
    try:
        mx.eval(model.parameters())  # reads the tensor data: truncated files fail here
    except RuntimeError as err:
        raise WeightsError(f"Cannot read the weights in {source}: {err}") from err
    model.eval()
    logger.info(
        "Loaded %s (%d parameters%s) from %s",
        model.config.model_type,
        model.parameter_count(),
        "" if model.config.vision_config is not None else ", text only",
        source,
    )


def _load_gguf(
    path: str, dtype: mx.Dtype | str | None, mmproj: str | None
) -> tuple[Model, Path, Processor]:
    """Load a llama.cpp text GGUF (and its mmproj) as ``load_model`` loads a checkpoint."""
    text_path, mmproj_path = gguf_paths(path, mmproj)
    checkpoint = read_checkpoint(text_path, mmproj_path)
    model = Model(checkpoint.config)
    weights = model.sanitize(checkpoint.weights)  # GGUF keeps PyTorch's convolution layout
    if checkpoint.quantization is not None:
        apply_quantization(model, checkpoint.quantization, weights)
    _finish_loading(model, weights, dtype, text_path)
    return model, text_path, checkpoint.processor


def load_model(
    path_or_hub_id: str, dtype: mx.Dtype | str | None = None, mmproj: str | None = None
) -> tuple[Model, Path]:
    """Build the model from a checkpoint's ``config.json`` and load its weights strictly.

    A llama.cpp GGUF (a ``.gguf`` file, or a directory of GGUF files) loads through
    ``mlx_smolvlm.gguf``: text only, unless an mmproj is given or lies beside it.

    Args:
        path_or_hub_id: A local checkpoint directory, a Hugging Face Hub repo id, or a GGUF.
        dtype: Cast floating-point weights to this dtype (``mx.float32`` or a name such as
            ``"bfloat16"``); ``"auto"`` is the device's compute dtype
            (``device_ops.compute_dtype``: float32 on the CPU backend, where bf16/fp16 matmuls
            are scalar loops, and the checkpoint's dtype on GPUs; ``MLX_SMOLVLM_DTYPE``
            overrides it); None keeps the checkpoint's dtype.
        mmproj: For a GGUF, its vision ``mmproj`` GGUF.

    Returns:
        The evaluated model and the resolved local directory (for a GGUF, the text GGUF file).

    Raises:
        FileNotFoundError: If the directory, ``config.json`` or weight files are missing.
        ConfigError: If ``config.json`` is invalid or describes an unsupported model.
        WeightsError: If tensors are missing, unexpected, wrongly shaped or unreadable.
        QuantizationError: If the ``quantization`` block is malformed or does not fit.
        GGUFError: If a GGUF is unreadable or unsupported, or its mmproj does not fit it.
        ValueError: If ``dtype`` is not a floating-point dtype, or ``mmproj`` is given for a
            checkpoint that is not a GGUF.
    """
    dtype = _resolve_dtype(dtype)
    if is_gguf(path_or_hub_id):
        model, path, _ = _load_gguf(path_or_hub_id, dtype, mmproj)
        return model, path
    if mmproj is not None:
        raise ValueError(f"mmproj is for GGUF models; {path_or_hub_id} is not a GGUF")
    model_dir = resolve_model_path(path_or_hub_id)
    config = load_config(model_dir)
    model = Model(config)
    weights = model.sanitize(load_weights(model_dir))
    quantization = read_quantization(model_dir)
    if quantization is not None:
        apply_quantization(model, quantization, weights)
    elif any(k.endswith(".scales") for k in weights):
        raise WeightsError(
            f"{model_dir} has quantized weights (.scales tensors) but its config.json has no "
            "'quantization' block"
        )
    _finish_loading(model, weights, dtype, model_dir)
    return model, model_dir


def load(
    path_or_hub_id: str, dtype: mx.Dtype | str | None = "auto", mmproj: str | None = None
) -> tuple[Model, Processor]:
    """Load the model, in the device's compute dtype unless told otherwise, and its processor.

    Args:
        path_or_hub_id: A local checkpoint directory, a Hugging Face Hub repo id, or a GGUF
            (whose tokenizer and chat template come from its metadata).
        dtype: As ``load_model``; by default the device's (float32 on the Linux CPU backend).
        mmproj: For a GGUF, its vision ``mmproj`` GGUF.

    Raises:
        FileNotFoundError, ConfigError, WeightsError, GGUFError: As ``load_model``.
    """
    from .processing import Processor

    if is_gguf(path_or_hub_id):
        model, _, processor = _load_gguf(path_or_hub_id, _resolve_dtype(dtype), mmproj)
        return model, processor
    model, model_dir = load_model(path_or_hub_id, dtype, mmproj)
    return model, Processor.from_pretrained(model_dir)
