"""Read llama.cpp GGUF files: a SmolLM2 / SmolVLM2 text model and, optionally, its vision ``mmproj``.

The layouts are ``convert_hf_to_gguf.py``'s: the text GGUF is a ``llama`` model (``blk.N.*``
tensors, Q and K rows permuted for ggml's RoPE, the tokenizer and chat template in its
metadata); the ``mmproj`` GGUF is a ``clip`` file with projector type ``idefics3`` (``v.*`` and
``mm.model.fc`` tensors, ``clip.vision.*`` metadata). Names map through ``weight_names``.

Tensors may be F32, F16, BF16, Q8_0, Q4_0 or Q4_1. The three block formats (32 weights per
block) map exactly onto MLX's affine quantization with group size 32, ``w = scale * q + bias``:

- Q4_1 stores ``d * q + m`` with ``q`` in 0..15: scale ``d``, bias ``m``.
- Q4_0 stores ``d * (q - 8)``: scale ``d``, bias ``-8 d``.
- Q8_0 stores ``d * q`` with signed ``q``: 8 bits holding ``q + 128``, scale ``d``, bias ``-128 d``.

``d`` and ``m`` are float16 and the biases are multiples of them by powers of two, so every
dequantized weight equals llama.cpp's. Linear and embedding weights stay quantized this way;
any other quantized tensor is dequantized.

Without an ``mmproj`` the model is text only: its config has no vision config, and the model
refuses images.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import tokenizers

from .config import ModelConfig, TextConfig, VisionConfig
from .image_processing import ImageProcessor, ImageProcessorConfig
from .processing import Processor
from .prompt import IMAGE_TOKEN
from .tokenizer import Tokenizer
from .weight_names import from_gguf_name, to_export_path

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# ggml-org names projector files `mmproj-<model>-<type>.gguf`.
MMPROJ_PREFIX = "mmproj"
TEXT_ARCHITECTURE = "llama"
MMPROJ_ARCHITECTURE = "clip"
PROJECTOR_TYPE = "idefics3"
GROUP_SIZE = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# type -> (bits, bytes per block)
BLOCK_TYPES = {Q.Q4_0: (4, 18), Q.Q4_1: (4, 20), Q.Q8_0: (8, 34)}
SUPPORTED_TYPES = [t.name for t in (*FLOAT_TYPES, *BLOCK_TYPES)]
# The only pre-tokenizer SmolLM2 / SmolVLM2 use: digits one by one, then GPT-2's byte level.
PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
}
BYTE_LEVEL_DECODER = {
    "type": "ByteLevel",
    "add_prefix_space": True,
    "trim_offsets": True,
    "use_regex": True,
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
PREPROCESSOR_ASSET = (
    Path(__file__).parent / "assets" / "shapes" / "256m" / "preprocessor_config.json"
)
# llama.cpp renders chat templates over string contents, ours over lists of parts. A template
# that never reads a part's type gets each message's parts joined into one string first.
_READS_PARTS = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b""")
_JOIN_PARTS = (
    "{%- set joined = namespace(messages=[]) -%}"
    "{%- for message in messages -%}{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
    "{%- else -%}{%- set text.value = text.value + '<' + part['type'] + '>' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set joined.messages = joined.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endfor -%}{%- set messages = joined.messages -%}"
)


class GGUFError(ValueError):
    """A GGUF file that this port cannot read or that does not fit its partner file."""


@dataclass
class GGUFFile:
    """One GGUF file's metadata and tensors (memory-mapped)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, gguf.ReaderTensor]

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or ``default``."""
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value that must be present.

        Raises:
            GGUFError: Naming the file and the key.
        """
        if key not in self.metadata:
            raise GGUFError(f"{self.path} lacks the metadata key {key!r}")
        return self.metadata[key]


@dataclass
class GGUFCheckpoint:
    """What a text GGUF and its optional mmproj hold, in this port's terms.

    ``weights`` are under our parameter names; quantized modules carry ``.scales`` and
    ``.biases`` and appear in ``quantization`` (None when nothing is quantized).
    """

    config: ModelConfig
    weights: dict[str, mx.array]
    quantization: dict[str, Any] | None
    processor: Processor


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file, or a directory holding GGUF files and no config.json.

    Args:
        path: A local path or a Hub id.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    return (
        path.is_dir() and not (path / "config.json").is_file() and any(path.glob(f"*{GGUF_SUFFIX}"))
    )


def gguf_paths(path: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path | None]:
    """The text GGUF and the mmproj to load for ``path``.

    Args:
        path: A text GGUF file, or a directory with one text GGUF and at most one
            ``mmproj*.gguf``.
        mmproj: An explicit mmproj file (overrides the one in the directory).

    Raises:
        FileNotFoundError: If a named file is missing, or the directory has no text GGUF.
        GGUFError: If the directory holds several text GGUFs or several mmproj files.
    """
    path = Path(path).expanduser()
    found_mmproj = None
    if path.is_dir():
        files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        projectors = [f for f in files if f.name.lower().startswith(MMPROJ_PREFIX)]
        texts = [f for f in files if f not in projectors]
        if len(texts) != 1 or len(projectors) > 1:
            raise GGUFError(
                f"{path} must hold one text GGUF and at most one {MMPROJ_PREFIX}*.gguf, found "
                f"text {[f.name for f in texts]} and mmproj {[f.name for f in projectors]}"
            )
        path, found_mmproj = texts[0], (projectors[0] if projectors else None)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    mmproj = Path(mmproj).expanduser() if mmproj is not None else found_mmproj
    if mmproj is not None and not mmproj.is_file():
        raise FileNotFoundError(f"mmproj file {mmproj} does not exist")
    return path, mmproj


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (the data stays memory-mapped).

    Raises:
        GGUFError: If the file is not GGUF, is truncated, or is corrupt.
    """
    try:
        reader = gguf.GGUFReader(path)
        metadata = {
            key: field.contents()
            for key, field in reader.fields.items()
            if not key.startswith("GGUF.")
        }
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OSError) as err:
        raise GGUFError(f"Cannot read {path} as GGUF (truncated or corrupt?): {err}") from err
    return GGUFFile(path, metadata, {t.name: t for t in reader.tensors})


def _architecture(file: GGUFFile, expected: str, role: str) -> None:
    arch = file.require("general.architecture")
    if arch != expected:
        raise GGUFError(
            f"{file.path} has architecture {arch!r}; the {role} must be {expected!r} "
            "(a SmolLM2 / SmolVLM2 text GGUF, with its SmolVLM mmproj as the vision file)"
        )


def text_config(file: GGUFFile) -> TextConfig:
    """The decoder config from a ``llama`` GGUF's metadata.

    Raises:
        GGUFError: If the architecture is not ``llama`` or a key is missing.
    """
    _architecture(file, TEXT_ARCHITECTURE, "text model")
    p = TEXT_ARCHITECTURE + "."
    scaling = file.get(p + "rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{file.path}: RoPE scaling {scaling!r} is not supported")
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{file.path} has no token_embd.weight tensor")
    hidden = int(file.require(p + "embedding_length"))
    heads = int(file.require(p + "attention.head_count"))
    return TextConfig(
        vocab_size=int(file.tensors["token_embd.weight"].shape[-1]),  # ggml order: (in, out)
        hidden_size=hidden,
        intermediate_size=int(file.require(p + "feed_forward_length")),
        num_hidden_layers=int(file.require(p + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(file.get(p + "attention.head_count_kv", heads)),
        head_dim=int(file.get(p + "rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(file.require(p + "context_length")),
        rms_norm_eps=float(file.require(p + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(file.get(p + "rope.freq_base", 10000.0)),
    )


def vision_config(file: GGUFFile) -> tuple[VisionConfig, int]:
    """The vision config and the pixel-shuffle scale factor from an Idefics3 mmproj.

    Raises:
        GGUFError: If it is not a ``clip`` file with an ``idefics3`` projector.
    """
    _architecture(file, MMPROJ_ARCHITECTURE, "mmproj")
    projector = file.get("clip.projector_type", file.get("clip.vision.projector_type"))
    if projector != PROJECTOR_TYPE:
        raise GGUFError(
            f"{file.path} has projector type {projector!r}; SmolVLM's is {PROJECTOR_TYPE!r}"
        )
    v = "clip.vision."
    config = VisionConfig(
        model_type="smolvlm_vision",
        hidden_size=int(file.require(v + "embedding_length")),
        intermediate_size=int(file.require(v + "feed_forward_length")),
        num_hidden_layers=int(file.require(v + "block_count")),
        num_attention_heads=int(file.require(v + "attention.head_count")),
        image_size=int(file.require(v + "image_size")),
        patch_size=int(file.require(v + "patch_size")),
        layer_norm_eps=float(file.get(v + "attention.layer_norm_epsilon", 1e-6)),
    )
    return config, int(file.get(v + "projector.scale_factor", 2))


def model_config(text: GGUFFile, mmproj: GGUFFile | None) -> ModelConfig:
    """The whole model's config: text only (``vision_config`` None) without an mmproj.

    Raises:
        GGUFError: If a file is of the wrong kind, or the mmproj does not fit the text model.
    """
    text_cfg = text_config(text)
    tokens = text.require("tokenizer.ggml.tokens")
    tied = "output.weight" not in text.tensors
    if mmproj is None:
        return ModelConfig(
            model_type="smolvlm",
            text_config=text_cfg,
            vision_config=None,
            image_token_id=-1,
            tie_word_embeddings=tied,
        )
    vision_cfg, scale_factor = vision_config(mmproj)
    projection = int(mmproj.require("clip.vision.projection_dim"))
    if projection != text_cfg.hidden_size:
        raise GGUFError(
            f"The mmproj {mmproj.path} projects to width {projection} but the text model "
            f"{text.path} has hidden size {text_cfg.hidden_size}: they are not one model"
        )
    if IMAGE_TOKEN not in tokens:
        raise GGUFError(
            f"The text model {text.path} has no {IMAGE_TOKEN} token, so it cannot take the "
            f"images of {mmproj.path}: use the SmolVLM2 text GGUF that goes with it"
        )
    return ModelConfig(
        model_type="smolvlm",
        text_config=text_cfg,
        vision_config=vision_cfg,
        scale_factor=scale_factor,
        image_token_id=tokens.index(IMAGE_TOKEN),
        tie_word_embeddings=tied,
    )


def _unpermute_rows(rows: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K permutation of output rows (ggml's RoPE pairs adjacent values).

    ``convert_hf_to_gguf.py`` writes ``w.reshape(n_heads, 2, d / 2, ...).swapaxes(1, 2)``;
    this swaps back. Rows of packed blocks and their scales move the same way.
    """
    shape = rows.shape
    return (
        rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _affine_blocks(tensor: gguf.ReaderTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A Q4_0 / Q4_1 / Q8_0 matrix as MLX affine parts: packed uint32 weights, scales, biases.

    Returns:
        ``(weight (out, in * bits / 32) uint32, scales (out, in / 32), biases, bits)``.
    """
    bits, block_bytes = BLOCK_TYPES[tensor.tensor_type]
    rows = tensor.data.shape[0]
    blocks = np.asarray(tensor.data).reshape(rows, -1, block_bytes)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if tensor.tensor_type == Q.Q8_0:
        # Signed bytes -> q + 128 in 0..255; MLX packs four 8-bit values per uint32, low first.
        packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d * np.float16(-128)
    else:
        start = 4 if tensor.tensor_type == Q.Q4_1 else 2
        nibbles = blocks[..., start : start + 16]
        # Element j is the low nibble of byte j, element j + 16 the high nibble.
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
        # MLX packs eight 4-bit values per uint32, element i at bits 4 i (little endian).
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        if tensor.tensor_type == Q.Q4_1:
            bias = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            bias = d * np.float16(-8)
    weight = np.ascontiguousarray(packed.reshape(rows, -1)).view("<u4")
    return weight, d, bias, bits


def _float_array(tensor: gguf.ReaderTensor) -> mx.array:
    """An F32 / F16 / BF16 tensor in its own dtype, in numpy (torch) axis order."""
    data = np.asarray(tensor.data)
    if tensor.tensor_type == Q.BF16:
        # The reader hands BF16 over as raw bytes.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return mx.array(data.view(np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(data)


def _check_type(tensor: gguf.ReaderTensor, path: Path) -> None:
    if tensor.tensor_type not in FLOAT_TYPES and tensor.tensor_type not in BLOCK_TYPES:
        raise GGUFError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which is not "
            f"supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )


def read_weights(
    file: GGUFFile, config: ModelConfig, dequantize: bool = False
) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """One file's tensors under our names, Q/K rows un-permuted.

    Args:
        file: A text GGUF or an mmproj.
        config: The model config (for the head counts of the permutation).
        dequantize: Return every tensor as floats instead of MLX quantized parts.

    Returns:
        The weights and, per quantized module path, its ``{"group_size", "bits"}``.

    Raises:
        GGUFError: On a tensor name with no counterpart or an unsupported tensor type.
    """
    unknown = [name for name in file.tensors if from_gguf_name(name) is None]
    if unknown:
        raise GGUFError(f"{file.path} has tensors this model does not know: {sorted(unknown)[:10]}")
    text = config.text_config
    heads = {
        "text_model.self_attn.q_proj": text.num_attention_heads,
        "text_model.self_attn.k_proj": text.num_key_value_heads,
    }
    weights: dict[str, mx.array] = {}
    quantized: dict[str, dict] = {}
    for name, tensor in file.tensors.items():
        _check_type(tensor, file.path)
        ours = from_gguf_name(name)
        module = ours.rpartition(".")[0]
        is_block = tensor.tensor_type in BLOCK_TYPES
        if is_block and not dequantize and tensor.data.ndim == 2 and name.endswith(".weight"):
            weight, scales, biases, bits = _affine_blocks(tensor)
            parts = {ours: weight, f"{module}.scales": scales, f"{module}.biases": biases}
            quantized[module] = {"group_size": GROUP_SIZE, "bits": bits}
        elif is_block:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            parts = {ours: values.astype(np.float32)}
        else:
            parts = {ours: _float_array(tensor)}
        # text_model.layers.N.self_attn.q_proj -> text_model.self_attn.q_proj
        n_heads = heads.get(re.sub(r"\.layers\.\d+", "", module))
        for key, value in parts.items():
            value = mx.array(value)
            weights[key] = value if n_heads is None else _unpermute_rows(value, n_heads)
    return weights, quantized


def _quantization_block(quantized: dict[str, dict]) -> dict[str, Any] | None:
    """The ``quantization`` block (``quantize.apply_quantization``'s input) for these modules."""
    if not quantized:
        return None
    block: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": 4, "mode": "affine"}
    for module, params in quantized.items():
        block[to_export_path(module)] = {**params, "mode": "affine"}
    return block


def tokenizer_json(file: GGUFFile) -> str:
    """A ``tokenizers`` byte-level BPE ``tokenizer.json`` built from the GGUF's vocabulary.

    Control and user-defined tokens become added tokens (control ones special), as in the
    Hugging Face tokenizer that llama.cpp converted.

    Raises:
        GGUFError: If the tokenizer is not a GPT-2 style BPE with a supported pre-tokenizer.
    """
    model = file.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{file.path}: tokenizer model {model!r} is not supported (only 'gpt2' BPE)"
        )
    pre = file.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{file.path}: pre-tokenizer {pre!r} is not supported (SmolLM2 / SmolVLM2 use "
            f"{list(PRE_TOKENIZERS)})"
        )
    tokens = file.require("tokenizer.ggml.tokens")
    types = file.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [list(m.split(" ", 1)) for m in file.require("tokenizer.ggml.merges")]
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == TOKEN_CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": merges,
        },
    }
    return json.dumps(spec, ensure_ascii=False)


def chat_template(file: GGUFFile) -> str:
    """The GGUF's chat template, made to take our list-of-parts messages.

    Raises:
        GGUFError: If the file has no ``tokenizer.chat_template``.
    """
    template = file.require("tokenizer.chat_template")
    return template if _READS_PARTS.search(template) else _JOIN_PARTS + template


def _token(tokens: list[str], file: GGUFFile, key: str) -> str | None:
    index = file.get(f"tokenizer.ggml.{key}_token_id")
    return None if index is None else tokens[int(index)]


def build_processor(text: GGUFFile, mmproj: GGUFFile | None, config: ModelConfig) -> Processor:
    """The processor: tokenizer and chat template from the text GGUF, image settings from the
    mmproj (SmolVLM2-256M's otherwise; a text-only model refuses images anyway).

    Raises:
        GGUFError: If the tokenizer metadata is unsupported or incomplete.
    """
    tokens = text.require("tokenizer.ggml.tokens")
    template = chat_template(text)
    tokenizer_config = {
        "bos_token": _token(tokens, text, "bos"),
        "eos_token": _token(tokens, text, "eos"),
        "unk_token": _token(tokens, text, "unknown"),
        "pad_token": _token(tokens, text, "padding"),
        "chat_template": template,
        "model_max_length": config.text_config.max_position_embeddings,
    }
    eos_ids = [
        int(text.get(f"tokenizer.ggml.{key}_token_id"))
        for key in ("eos", "eot")
        if text.get(f"tokenizer.ggml.{key}_token_id") is not None
    ]
    if not eos_ids:
        raise GGUFError(f"{text.path} has no tokenizer.ggml.eos_token_id")
    eos_ids = list(dict.fromkeys(eos_ids))
    backend_json = tokenizer_json(text)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(backend_json), tokenizer_config, eos_ids)
    preprocessor = json.loads(PREPROCESSOR_ASSET.read_text(encoding="utf-8"))
    if mmproj is not None:
        v = "clip.vision."
        tile = config.vision_config.image_size
        preprocessor.update(
            image_mean=list(mmproj.get(v + "image_mean", preprocessor["image_mean"])),
            image_std=list(mmproj.get(v + "image_std", preprocessor["image_std"])),
            max_image_size={"longest_edge": tile},
            size={"longest_edge": int(mmproj.get(v + "preproc_image_size", 4 * tile))},
        )
        preprocessor["video_sampling"]["video_size"] = {"longest_edge": tile}
    generation = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    files = {
        "tokenizer.json": backend_json.encode("utf-8"),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode("utf-8"),
        "preprocessor_config.json": json.dumps(preprocessor, indent=2).encode("utf-8"),
        "generation_config.json": json.dumps(generation, indent=2).encode("utf-8"),
    }
    image_processor = ImageProcessor(ImageProcessorConfig.from_dict(preprocessor))
    return Processor(tokenizer, image_processor, config.image_seq_len, template, files)


def read_checkpoint(
    text_path: Path, mmproj_path: Path | None = None, dequantize: bool = False
) -> GGUFCheckpoint:
    """Read a text GGUF and its optional mmproj.

    Args:
        text_path: The ``llama`` text GGUF.
        mmproj_path: The ``clip`` / ``idefics3`` mmproj, or None for a text-only model.
        dequantize: Return float weights instead of MLX quantized ones.

    Raises:
        GGUFError: If a file is unreadable, of the wrong kind or unsupported, or the two do
            not fit each other.
    """
    text = read_gguf(text_path)
    mmproj = read_gguf(mmproj_path) if mmproj_path is not None else None
    config = model_config(text, mmproj)
    weights, quantized = read_weights(text, config, dequantize)
    if mmproj is not None:
        vision_weights, vision_quantized = read_weights(mmproj, config, dequantize)
        clash = weights.keys() & vision_weights.keys()
        if clash:
            raise GGUFError(f"{mmproj_path} repeats tensors of {text_path}: {sorted(clash)[:10]}")
        weights.update(vision_weights)
        quantized.update(vision_quantized)
    logger.info(
        "Read %s%s: %d tensors, %d quantized",
        text_path,
        f" and {mmproj_path}" if mmproj_path else " (text only)",
        len(weights),
        len(quantized),
    )
    processor = build_processor(text, mmproj, config)
    return GGUFCheckpoint(config, weights, _quantization_block(quantized), processor)
