"""Export a Hugging Face SmolVLM checkpoint to ONNX in the layout Hugging Face publishes.

Three graphs under ``onnx/``, as in ``HuggingFaceTB/SmolVLM2-*`` and as transformers.js and the
model cards' ONNX Runtime loop load them:

- ``vision_encoder.onnx``: ``pixel_values [batch, images, 3, H, W]`` (float) and
  ``pixel_attention_mask [batch, images, H, W]`` (bool) -> ``image_features [real images,
  image_seq_len, hidden]``. All-zero padding images are dropped, as transformers does.
- ``embed_tokens.onnx``: ``input_ids [batch, seq]`` -> ``inputs_embeds [batch, seq, hidden]``.
- ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask [batch, mask_len]``,
  ``position_ids [batch, seq]`` and ``past_key_values.{i}.key`` / ``.value`` ``[batch,
  kv_heads, past, head_dim]`` (past may be 0) -> ``logits [batch, seq, vocab]`` and
  ``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past + seq, head_dim]``.

The graphs are traced from transformers' own modules (its decoder layers, rotary embedding,
vision tower and connector) with the TorchScript exporter; only the glue that transformers
writes with Python control flow (dropping padding images, the attention masks, the cache) is
written here in traceable form. Quantized variants come from `onnx_quantize`, and every graph is
written by its `save_graph`: one over 2 GiB (SmolVLM2-2.2B's fp32 decoder) keeps its weights in
``{name}.onnx_data`` beside it, as Hugging Face's exports do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .convert import ConvertError, _check_destination, _replace_directory, save_processor
from .load import resolve_model_path
from .onnx_quantize import (
    DTYPE_VARIANTS,
    IMPORT_ERROR,
    QUANTIZATIONS,
    external_data_path,
    save_graph,
    write_variant,
)
from .processing import Processor

try:
    import onnx
    import torch
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration
except ImportError as err:
    _IMPORT_ERROR: ImportError | None = err
else:
    # The quantizers' imports (onnxruntime's, which need onnx_ir) are part of the extra too.
    _IMPORT_ERROR = IMPORT_ERROR
# The graphs' modules subclass torch's Module when torch is there (`require_onnx_extra` else).
_Module = torch.nn.Module if _IMPORT_ERROR is None else object

logger = logging.getLogger(__name__)

OPSET = 18
ONNX_DIR = "onnx"
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
SUPPORTED_MODEL_TYPES = ("smolvlm", "idefics3")
EXTRA_HINT = "pip install 'mlx-smolvlm[onnx]'"


class OnnxExportError(ConvertError):
    """Export settings, sources or environments that cannot work."""


def require_onnx_extra() -> None:
    """Raise `OnnxExportError` naming the ``onnx`` extra if torch, transformers, onnx or
    onnxruntime's quantizers cannot be imported."""
    if _IMPORT_ERROR is not None:
        raise OnnxExportError(
            f"The ONNX export needs the 'onnx' extra ({_IMPORT_ERROR.name} is missing): {EXTRA_HINT}"
        )


class VisionEncoder(_Module):
    """pixel_values, pixel_attention_mask -> image_features, as transformers'
    ``get_image_features`` computes them, without its data-dependent Python branches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.patch_size = model.config.vision_config.patch_size

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        B, N, C, H, W = pixel_values.shape
        pixels = pixel_values.reshape(B * N, C, H, W)
        masks = pixel_attention_mask.reshape(B * N, H, W)
        # Padding images are all zeros; if every image is, the first one is kept (transformers).
        real = (pixels != 0).flatten(1).any(dim=1)
        first = torch.arange(B * N) == 0
        real = real | (first & ~real.any())
        pixels, masks = pixels[real], masks[real]
        # A patch takes part if any of its pixels does: (n, H/p, p, W/p, p) -> (n, H/p, W/p).
        p = self.patch_size
        patch_mask = masks.reshape(-1, H // p, p, W // p, p).any(dim=4).any(dim=2)
        hidden = self.vision_model.embeddings(pixel_values=pixels, patch_attention_mask=patch_mask)
        keep = patch_mask.flatten(1)[:, None, None, :]  # (n, 1, 1, patches): keys to attend
        bias = torch.zeros(keep.shape, dtype=hidden.dtype).masked_fill(
            ~keep, torch.finfo(hidden.dtype).min
        )
        hidden = self.vision_model.encoder(inputs_embeds=hidden, attention_mask=bias)
        hidden = self.vision_model.post_layernorm(hidden.last_hidden_state)
        return self.connector(hidden)


class EmbedTokens(_Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.model.text_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _ConcatCache:
    """The cache interface transformers' attention calls: ``update`` appends the step's keys
    and values to the given past and keeps the result as the layer's present."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        past_keys, past_values = self.past[layer_idx]
        keys = torch.cat([past_keys, keys], dim=2)
        values = torch.cat([past_values, values], dim=2)
        self.present.append((keys, values))
        return keys, values


def decoder_bias(
    attention_mask: torch.Tensor, past_len: torch.Tensor, seq_len: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The additive causal and padding mask ``(batch, 1, seq, past + seq)``.

    ``attention_mask`` covers the last ``mask_len`` keys: the whole sequence (transformers.js)
    or only the new tokens (the model cards' loop passes ones of the new tokens' length); keys
    before it count as attended.
    """
    total = past_len + seq_len
    mask = torch.nn.functional.pad(attention_mask, (total - attention_mask.shape[1], 0), value=1)
    queries = torch.arange(seq_len) + past_len
    causal = torch.arange(total)[None, :] <= queries[:, None]  # (seq, total)
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class Decoder(_Module):
    """inputs_embeds, attention_mask, position_ids, past keys/values -> logits, presents."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        text = model.model.text_model
        self.layers, self.norm, self.rotary_emb = text.layers, text.norm, text.rotary_emb
        self.lm_head = model.lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = _ConcatCache(list(zip(past_flat[0::2], past_flat[1::2], strict=True)))
        past_len = past_flat[0].shape[2]
        bias = decoder_bias(attention_mask, past_len, inputs_embeds.shape[1], inputs_embeds.dtype)
        rotary = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=bias, cache=cache, position_embeddings=rotary)
        logits = self.lm_head(self.norm(hidden))
        return (logits, *(t for pair in cache.present for t in pair))


def load_source(src: Path, model_type: str) -> torch.nn.Module:
    """transformers' fp32 model of a SmolVLM / Idefics3 checkpoint, with eager attention."""
    model_cls = {
        "smolvlm": SmolVLMForConditionalGeneration,
        "idefics3": Idefics3ForConditionalGeneration,
    }[model_type]
    model = model_cls.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def cast_position_ids(path: Path) -> None:
    """Cast the vision position ids back to int64 before their embedding lookup.

    transformers fills the ids of padding patches with ``torch.full(..., fill_value=0)``,
    which the TorchScript exporter writes as a float ``ConstantOfShape``; the ``Where`` that
    merges it with the bucketized ids then promotes every id to float, which ``Gather``
    refuses. The ids are small integers, so the cast is exact.
    """
    model = onnx.load(str(path))
    (gather,) = [n for n in model.graph.node if n.name.endswith("position_embedding/Gather")]
    cast_out = f"{gather.input[1]}_int64"
    cast = onnx.helper.make_node(
        "Cast", [gather.input[1]], [cast_out], to=onnx.TensorProto.INT64, name=f"{gather.name}_ids"
    )
    gather.input[1] = cast_out
    nodes = list(model.graph.node)
    nodes.insert(nodes.index(gather), cast)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_graph(model, path)


def _export(module: torch.nn.Module, args: tuple, path: Path, names: dict, axes: dict) -> None:
    """Trace ``module`` to ``path`` through a scratch directory: for a graph over 2 GiB torch
    writes one external file per tensor beside the graph, which `save_graph` gathers into
    Hugging Face's single ``{name}.onnx_data``."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        traced = Path(scratch) / path.name
        _trace(module, args, traced, names, axes)
        save_graph(onnx.load(traced), path)
    onnx.checker.check_model(str(path))  # from the path: the checker then takes any size


def _trace(module: torch.nn.Module, args: tuple, path: Path, names: dict, axes: dict) -> None:
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_graphs(model: torch.nn.Module, onnx_dir: Path) -> None:
    """Write the three fp32 graphs of ``model`` into ``onnx_dir``.

    Args:
        model: transformers' SmolVLM / Idefics3 model (fp32, eager attention, eval).
        onnx_dir: An existing directory.
    """
    config = model.config
    vision, text = config.vision_config, config.text_config
    size = vision.image_size
    pixels = torch.rand(1, 2, 3, size, size) + 0.1  # two real images
    pixel_mask = torch.ones(1, 2, size, size, dtype=torch.bool)
    _export(
        VisionEncoder(model),
        (pixels, pixel_mask),
        onnx_dir / "vision_encoder.onnx",
        {"inputs": ["pixel_values", "pixel_attention_mask"], "outputs": ["image_features"]},
        {
            "pixel_values": {0: "batch_size", 1: "num_images", 3: "height", 4: "width"},
            "pixel_attention_mask": {0: "batch_size", 1: "num_images", 2: "height", 3: "width"},
            "image_features": {0: "num_real_images"},
        },
    )
    cast_position_ids(onnx_dir / "vision_encoder.onnx")
    input_ids = torch.tensor([[1, 2, 3]])
    _export(
        EmbedTokens(model),
        (input_ids,),
        onnx_dir / "embed_tokens.onnx",
        {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]},
        {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        },
    )
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = text.head_dim
    past_len, seq_len = 2, 3
    past = [torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "attention_mask_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    _export(
        Decoder(model),
        (
            torch.randn(1, seq_len, text.hidden_size),
            torch.ones(1, past_len + seq_len, dtype=torch.int64),
            torch.arange(past_len, past_len + seq_len)[None],
            *past,
        ),
        onnx_dir / "decoder_model_merged.onnx",
        {
            "inputs": ["inputs_embeds", "attention_mask", "position_ids", *past_names],
            "outputs": ["logits", *present_names],
        },
        axes,
    )


def _check_source(src: Path) -> dict:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {src}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OnnxExportError(
            f"{src} is a {model_type!r} model; the ONNX export supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolVLM2 and SmolVLM)"
        )
    if "quantization" in config or "quantization_config" in config:
        raise OnnxExportError(
            f"{src} is already quantized; export from the full-precision checkpoint"
        )
    return config


def write_config(src: Path, export: Path) -> None:
    """Copy ``config.json``, listing the graphs with external data where transformers.js looks
    for them (``transformers.js_config.use_external_data_format``, as Hugging Face's exports
    do): it fetches ``{name}.onnx_data`` only for the graphs named there."""
    external = {
        path.name: 1
        for path in sorted((export / ONNX_DIR).glob("*.onnx"))
        if external_data_path(path).is_file()
    }
    if not external:
        shutil.copyfile(src / "config.json", export / "config.json")
        return
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.setdefault("transformers.js_config", {})["use_external_data_format"] = external
    (export / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_onnx(
    hf_path: str,
    onnx_path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    quantize: list[str] | tuple[str, ...] = (),
    force: bool = False,
) -> Path:
    """Export a checkpoint to ONNX (fp32 graphs, plus the requested variants).

    The export is written into a temporary sibling directory and renamed into place only when
    complete, so an interrupted export never leaves a directory that loads.

    Args:
        hf_path: A local Hugging Face SmolVLM / Idefics3 checkpoint or a Hub repo id.
        onnx_path: The export directory.
        dtype: ``fp32``, or ``fp16`` to add the ``*_fp16.onnx`` graphs.
        quantize: Variants to add: ``int8``, ``q4``, ``q4f16`` (`onnx_quantize.QUANTIZATIONS`).
        force: Replace a non-empty ``onnx_path``.

    Returns:
        ``onnx_path``.

    Raises:
        OnnxExportError: Missing extra, unsupported model type or options, an existing
            destination without ``force``.
        FileNotFoundError: If the source or its files are missing.
    """
    # Every check runs before any work.
    if dtype not in ("fp32", *DTYPE_VARIANTS):
        raise OnnxExportError(f"Unsupported --dtype {dtype!r}; expected fp32 or fp16")
    unknown = [q for q in quantize if q not in QUANTIZATIONS]
    if unknown:
        raise OnnxExportError(
            f"Unknown --quantize {unknown[0]!r}; expected one of {', '.join(QUANTIZATIONS)}"
        )
    require_onnx_extra()
    dst = Path(onnx_path)
    src = resolve_model_path(hf_path)
    model_type = _check_source(src)["model_type"]
    _check_destination(dst, src, force)
    processor = Processor.from_pretrained(src)

    start = time.perf_counter()
    variants = ([dtype] if dtype != "fp32" else []) + list(dict.fromkeys(quantize))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / ONNX_DIR).mkdir(parents=True)
    try:
        logger.info("[1/3] Tracing %s to ONNX (opset %d)", src, OPSET)
        export_graphs(load_source(src, model_type), tmp / ONNX_DIR)
        logger.info("[2/3] Variants: %s", ", ".join(variants) or "none")
        for variant in variants:
            for graph in GRAPHS:
                write_variant(tmp / ONNX_DIR, graph, variant)
        logger.info("[3/3] Writing configs and processor files to %s", dst)
        write_config(src, tmp)
        save_processor(processor, tmp)
        _replace_directory(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("Wrote %s in %.1f s", dst, time.perf_counter() - start)
    return dst
