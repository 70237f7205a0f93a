"""Convert a Hugging Face SmolVLM checkpoint into an MLX export for mlx-vlm and MLX Swift.

The export uses mlx-vlm's weight names (``vision_model.*``, ``connector.*``,
``language_model.*``, ``language_model.lm_head.weight``) and MLX's channels-last patch
convolution: both mlx-vlm's and MLX Swift's ``sanitize`` leave these names as they are, and
MLX Swift's top-level sanitize never transposes the convolution. ``config.json`` spells out
every key MLX Swift reads (its defaults differ from SmolVLM's) and the ``quantization`` block.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelConfig, load_config
from .device_ops import DTYPES
from .gguf import GGUFError, gguf_paths, is_gguf, read_checkpoint
from .load import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, load_model, resolve_model_path
from .model import Model
from .processing import Processor
from .prompt import image_prompt
from .quantize import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_RECIPE,
    Calibration,
    QuantizationSpec,
    quantize_model,
)
from .weight_names import to_export_names, to_hf_names

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
# The `calibrated` recipe's data: about 13 KB (2,800 tokens) of English prose, chat and a
# little code written for this repository, and tiles of the example photo (the global tile first).
CALIBRATION_TEXT = ASSETS / "calibration.txt"
CALIBRATION_IMAGE = ASSETS / "example.jpg"
CALIBRATION_CHUNK_TOKENS = 512
CALIBRATION_TILES = 4
MAX_SHARD_BYTES = 5 * 1024**3
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
# Text fields the export leaves as the source wrote them: MLX Swift reads none of them and the
# port supports only their defaults (`rope_parameters` is already folded into `rope_theta`).
SOURCE_ONLY_TEXT_FIELDS = ("rope_parameters", "attention_bias", "mlp_bias")


class ConvertError(ValueError):
    """Conversion settings or paths that cannot work."""


def export_weights(model: Model) -> dict[str, mx.array]:
    """The model's parameters under the exported (mlx-vlm / MLX Swift) names.

    Args:
        model: A loaded, possibly quantized, untied ``Model``.
    """
    return to_export_names(dict(tree_flatten(model.parameters())))


def save_weights(
    weights: dict[str, mx.array], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """Write safetensors shards of at most ``max_shard_bytes`` and their index.

    One shard is named ``model.safetensors``, several ``model-0000i-of-0000n.safetensors``;
    ``model.safetensors.index.json`` is written in both cases, as mlx-vlm does.

    Args:
        weights: Tensors by exported name.
        out_dir: An existing directory.
        max_shard_bytes: Shard size limit (a larger single tensor gets a shard of its own).

    Returns:
        The shard file names.
    """
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [SHARD_FILE.format(i + 1, len(shards)) for i in range(len(shards))]
    )
    weight_map = {}
    for shard, file_name in zip(shards, names, strict=True):
        mx.save_safetensors(str(out_dir / file_name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": weight_map,
    }
    (out_dir / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def export_config(
    source: dict[str, Any],
    config: ModelConfig,
    dtype: str,
    quantization: dict[str, Any] | None,
    skip_vision: bool,
) -> dict[str, Any]:
    """``config.json`` of the export: the source's keys overwritten by the config's fields
    (``ModelConfig.to_dict``, less ``SOURCE_ONLY_TEXT_FIELDS``) and the export's own keys.

    MLX Swift's defaults (``scale_factor`` 2, ``image_token_id`` 49153, ``vocab_size`` 128259,
    ``num_hidden_layers`` 32, ...) are not SmolVLM2's, so all are written explicitly. The export
    always carries ``lm_head``, so ``tie_word_embeddings`` is false at the root and in
    ``text_config`` (where MLX Swift reads it).

    Args:
        source: The source ``config.json``.
        config: The (untied) model config.
        dtype: The export dtype name.
        quantization: The ``quantization`` block, or None.
        skip_vision: Whether the vision tower was left unquantized on request.
    """
    out = copy.deepcopy(source)
    for key in ("_name_or_path", "quantization", "quantization_config", "dtype"):
        out.pop(key, None)
    fields = config.to_dict()
    text = fields.pop("text_config")
    for key in SOURCE_ONLY_TEXT_FIELDS:
        del text[key]
    out["text_config"] = {**(out.get("text_config") or {}), **text, "tie_word_embeddings": False}
    out["vision_config"] = {**(out.get("vision_config") or {}), **fields.pop("vision_config")}
    # MLX Swift reads vocab_size at the root too.
    out.update(fields, vocab_size=text["vocab_size"], tie_word_embeddings=False, torch_dtype=dtype)
    if quantization is not None:
        out["quantization"] = quantization
        # transformers-style readers (and mlx-vlm, as a fallback) look here; MLX Swift does not.
        out["quantization_config"] = copy.deepcopy(quantization)
        if skip_vision:
            out["vision_config"]["skip_vision"] = True  # mlx-vlm's legacy flag
    return dict(sorted(out.items()))


def save_processor(processor: Processor, out_dir: Path) -> None:
    """Write the tokenizer, chat template, processor and generation configs.

    ``Processor.save_pretrained`` writes what the source had (``image_seq_len`` goes into
    ``preprocessor_config.json`` too); a missing ``chat_template.json`` or
    ``generation_config.json`` is written from the loaded processor.

    Args:
        processor: The source's processor.
        out_dir: The export directory.
    """
    processor.save_pretrained(out_dir)
    if not {"chat_template.json", "chat_template.jinja"} & processor.files.keys():
        (out_dir / "chat_template.json").write_text(
            json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n",
            encoding="utf-8",
        )
    if "generation_config.json" not in processor.files:
        tokenizer = processor.tokenizer
        eos = tokenizer.eos_token_ids
        generation = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
        for key in ("bos_token", "pad_token"):
            token = tokenizer.special_tokens[key]
            if token is not None:
                generation[f"{key}_id"] = tokenizer.token_to_id(token)
        (out_dir / "generation_config.json").write_text(
            json.dumps(generation, indent=2) + "\n", encoding="utf-8"
        )


def calibration_data(
    processor: Processor,
    text_path: Path = CALIBRATION_TEXT,
    image_path: Path = CALIBRATION_IMAGE,
    with_images: bool = True,
) -> Calibration:
    """The ``calibrated`` recipe's inputs: the text in chunks of ``CALIBRATION_CHUNK_TOKENS``
    tokens, and up to ``CALIBRATION_TILES`` tiles of the image (its global tile first) with a
    prompt that shows the decoder the global tile's features.

    Args:
        processor: The checkpoint's processor.
        text_path: A UTF-8 text file.
        image_path: An image file.
        with_images: Include the image (False when the vision tower is not quantized and the
            connector alone needs no more than one tile).
    """
    ids = processor.tokenizer.encode(text_path.read_text(encoding="utf-8"))
    step = CALIBRATION_CHUNK_TOKENS
    texts = [mx.array([ids[i : i + step]]) for i in range(0, len(ids), step)]
    tiles = processor("<image>", images=[str(image_path)]).pixel_values
    # The global tile (the last one) first: the image prompt below shows it to the decoder.
    order = [len(tiles) - 1, *range(len(tiles) - 1)]
    tiles = tiles[order[: CALIBRATION_TILES if with_images else 1]]
    seq_len = processor.image_seq_len
    prompt = f"User:{image_prompt(0, 0, seq_len)}Describe this image.<end_of_utterance>\nAssistant:"
    return Calibration(
        texts=texts,
        pixel_values=mx.array(tiles[None]),
        image_prompt_ids=mx.array([processor.tokenizer.encode(prompt)]),
    )


def _untie(model: Model) -> Model:
    """A copy of a tied model with an explicit ``lm_head`` equal to the embeddings."""
    config = dataclasses.replace(model.config, tie_word_embeddings=False)
    untied = Model(config)
    params = dict(tree_flatten(model.parameters()))
    params["lm_head.weight"] = params["text_model.embed_tokens.weight"]
    untied.update(tree_unflatten(list(params.items())))
    untied.eval()
    return untied


def write_gguf_checkpoint(text_path: Path, mmproj_path: Path | None, out_dir: Path) -> Path:
    """Write a llama.cpp text GGUF and its mmproj as a Hugging Face style checkpoint.

    The weights are dequantized to float32 (``convert`` quantizes them again on request).

    Args:
        text_path: The text GGUF.
        mmproj_path: Its mmproj.
        out_dir: An existing, empty directory.

    Returns:
        ``out_dir``.

    Raises:
        GGUFError: As ``gguf.read_checkpoint``, or without an mmproj: the export is a SmolVLM
            checkpoint, which mlx-vlm and MLX Swift load only with its vision tower.
    """
    if mmproj_path is None:
        raise GGUFError(
            f"{text_path} alone is a text-only model, and the MLX export (for mlx-vlm and MLX "
            "Swift) needs the vision tower: pass its mmproj GGUF (--mmproj)"
        )
    checkpoint = read_checkpoint(text_path, mmproj_path, dequantize=True)
    # GGUF keeps the patch convolution in PyTorch's layout, as Hugging Face checkpoints do.
    mx.save_safetensors(str(out_dir / WEIGHTS_FILE), to_hf_names(checkpoint.weights))
    config = {**checkpoint.config.to_dict(), "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    checkpoint.processor.save_pretrained(out_dir)
    return out_dir


def _check_destination(mlx_path: Path, source: Path, force: bool) -> None:
    if mlx_path.exists() and not mlx_path.is_dir():
        raise ConvertError(f"Destination {mlx_path} exists and is not a directory")
    if mlx_path.resolve() == source.resolve():
        raise ConvertError(f"Destination {mlx_path} is the source checkpoint itself")
    if mlx_path.is_dir() and any(mlx_path.iterdir()) and not force:
        raise ConvertError(
            f"Destination {mlx_path} exists and is not empty; pass --force to replace it"
        )


def _replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``, removing what ``dst`` held."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dst)


def convert(
    hf_path: str,
    mlx_path: str | os.PathLike,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = DEFAULT_GROUP_SIZE,
    recipe: str = DEFAULT_RECIPE,
    skip_vision: bool = False,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    mmproj: str | None = None,
) -> Path:
    """Convert a checkpoint into an MLX export.

    The export is written into a temporary sibling directory and renamed into place only when
    complete, so an interrupted conversion never leaves a directory that loads.

    Args:
        hf_path: A local Hugging Face checkpoint directory, a Hub repo id, or a llama.cpp
            GGUF (with ``mmproj``).
        mlx_path: The export directory.
        quantize: Quantize the weights (affine).
        q_bits: Bits per weight (4 or 8).
        q_group_size: Quantization group size (32, 64 or 128).
        recipe: ``calibrated`` (GPTQ on the shipped calibration text and image, embeddings
            and ``lm_head`` at 8 bits; the default), ``uniform`` (round to nearest) or
            ``mixed`` (sensitive layers at 8 bits).
        skip_vision: Leave the vision tower unquantized (the connector is still quantized).
        dtype: ``float16``, ``bfloat16`` or ``float32`` for the unquantized tensors and the
            quantization scales; default the source's ``torch_dtype``, else its weights' dtype.
        force: Replace a non-empty ``mlx_path``.
        max_shard_bytes: Largest safetensors file.
        mmproj: For a GGUF ``hf_path``, its vision ``mmproj`` GGUF (required: the export
            needs the vision tower). The GGUF is dequantized first.

    Returns:
        ``mlx_path``.

    Raises:
        ConvertError: On a bad dtype, an existing destination without ``force``, or an
            already-quantized source.
        QuantizationError: On unsupported bits, group size or recipe.
        FileNotFoundError: If the source, its config, weights or tokenizer files are missing.
        ConfigError: If the source is not a SmolVLM / Idefics3 checkpoint.
        WeightsError: If its tensors do not fit its config.
        GGUFError: If a GGUF source is unreadable, unsupported or has no mmproj.
    """
    if is_gguf(hf_path):
        with tempfile.TemporaryDirectory() as tmp:
            source = write_gguf_checkpoint(*gguf_paths(hf_path, mmproj), Path(tmp))
            return convert(
                str(source),
                mlx_path,
                quantize=quantize,
                q_bits=q_bits,
                q_group_size=q_group_size,
                recipe=recipe,
                skip_vision=skip_vision,
                dtype=dtype,
                force=force,
                max_shard_bytes=max_shard_bytes,
            )
    if mmproj is not None:
        raise ConvertError(f"--mmproj is for GGUF sources; {hf_path} is not a GGUF")
    # Every check runs before any work.
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"Unsupported dtype {dtype!r}; expected one of {list(DTYPES)}")
    spec = QuantizationSpec(q_bits, q_group_size, recipe, quantize_vision=not skip_vision)
    dst = Path(mlx_path)
    src = resolve_model_path(hf_path)
    _check_destination(dst, src, force)
    config = load_config(src)
    source_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if "quantization" in source_config or "quantization_config" in source_config:
        raise ConvertError(
            f"{src} is already quantized; convert from the full-precision checkpoint"
        )
    if dtype is None:
        source_dtype = source_config.get("torch_dtype", source_config.get("dtype"))
        dtype = source_dtype if source_dtype in DTYPES else None
    processor = Processor.from_pretrained(src)

    start = time.perf_counter()
    logger.info("[1/3] Loading %s", src)
    model, _ = load_model(str(src), dtype=dtype)
    if config.tie_word_embeddings:
        model = _untie(model)
    dtype_name = str(model.text_model.embed_tokens.weight.dtype).removeprefix("mlx.core.")
    if dtype_name not in DTYPES:
        raise ConvertError(f"{src} has {dtype_name} weights; pass --dtype")
    if quantize:
        logger.info("[2/3] Quantizing to %d bits (%s recipe)", spec.bits, spec.recipe)
        calibration = None
        if spec.recipe == "calibrated":
            calibration = calibration_data(processor, with_images=not skip_vision)
        quantization = quantize_model(model, spec, calibration)
    else:
        logger.info("[2/3] Not quantizing (pass -q to quantize)")
        quantization = None

    logger.info("[3/3] Writing the export to %s", dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = save_weights(export_weights(model), tmp, max_shard_bytes)
        save_processor(processor, tmp)
        out_config = export_config(
            source_config, model.config, dtype_name, quantization, skip_vision
        )
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n", encoding="utf-8")
        _replace_directory(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info(
        "Wrote %s (%s, %s, %d shard(s)) in %.1f s",
        dst,
        dtype_name,
        f"{spec.bits}-bit {spec.recipe}" if quantize else "not quantized",
        len(shards),
        time.perf_counter() - start,
    )
    return dst
