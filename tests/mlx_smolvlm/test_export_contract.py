"""The export meets the MLX Swift loader's contract (mlx-swift-lm's Idefics3 / SmolVLM2).

A Python transcription of what MLX Swift does with an export directory:

- ``Libraries/MLXVLM/Models/Idefics3.swift`` at commit
  92fb10de59b40be8265c9d4a18d61d9120b8d799: ``Idefics3Configuration`` (required keys and
  defaults), ``Idefics3.sanitize`` (the only renaming: it does not call the vision tower's
  sanitize, so the patch convolution must already be channels-last), and the module tree
  (``vision_model``, ``language_model`` with an optional ``lm_head``, ``connector``).
- ``Libraries/MLXLMCommon/Load.swift`` at 837126dfde503ed69512c51b9b25acbdab4ecd3f: every
  ``*.safetensors`` file is read, ``sanitize`` runs, a module is quantized iff
  ``<path>.scales`` exists (bits and group size from the per-layer quantization), then
  ``model.update(parameters:, verify: [.all])`` needs exactly the module's keys and shapes.
- ``Libraries/MLXLMCommon/BaseConfiguration.swift`` at
  8647b842b4633daf8dac91c79b3ac0c3b6cbc5a9: the ``quantization`` block (``group_size`` and
  ``bits`` required, ``mode`` optional, per-layer objects or ``false``; ``quant_method``,
  ``linear_class``, ``quantization_mode`` ignored). ``quantization_config`` is not read.
- ``Idefics3ProcessorConfiguration`` / ``SmolVLMProcessorConfiguration``: ``image_seq_len``
  is read from ``preprocessor_config.json``, default 64.
"""

import json

import mlx.core as mx
import pytest

from mlx_smolvlm.config import ModelConfig
from mlx_smolvlm.convert import convert, export_config, export_weights, save_processor
from mlx_smolvlm.load import load_weights
from mlx_smolvlm.model import Model
from mlx_smolvlm.processing import Processor
from mlx_smolvlm.quantize import QuantizationSpec, quantize_model
from mlx_smolvlm.random_weights import ASSETS, write_assets

SWIFT_QUANTIZATION_METADATA = ("quant_method", "linear_class", "quantization_mode")
# Keys Swift decodes; those with a Swift default must still be written, since the defaults
# (32 layers, scale_factor 2, image token 49153, vocab 128259, ...) are not SmolVLM2's.
SWIFT_TEXT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "rms_norm_eps",
    "vocab_size",
    "num_key_value_heads",
    "rope_theta",
    "tie_word_embeddings",
)
SWIFT_VISION_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "patch_size",
    "image_size",
    "num_channels",
    "layer_norm_eps",
)
SWIFT_ROOT_KEYS = ("model_type", "vocab_size", "scale_factor", "image_token_id")
SWIFT_PROCESSOR_KEYS = ("image_mean", "image_std", "size", "max_image_size", "image_seq_len")


def swift_sanitize(weights: dict) -> dict:
    """``Idefics3.sanitize(weights:)``."""
    renamed = {}
    for k, v in weights.items():
        if k.startswith("model."):
            k = k.removeprefix("model.")
        elif k.startswith("lm_head."):
            k = "language_model." + k
        renamed[k] = v
    final = {
        ("language_model." + k.removeprefix("text_model.") if k.startswith("text_model.") else k): v
        for k, v in renamed.items()
    }
    return {k: v for k, v in final.items() if "self_attn.rotary_emb.inv_freq" not in k}


def swift_quantization(config: dict) -> tuple[tuple[int, int] | None, dict]:
    """``QuantizationContainer``: defaults and per-layer (None for ``false``) settings."""
    block = config.get("quantization")
    if block is None:
        return None, {}
    defaults = (int(block["group_size"]), int(block["bits"]))
    assert block.get("mode", "affine") == "affine"
    layers = {}
    for key, value in block.items():
        if key in ("group_size", "bits", "mode", *SWIFT_QUANTIZATION_METADATA):
            continue
        if isinstance(value, bool):
            if not value:
                layers[key] = None
            continue
        assert value.get("mode", "affine") == "affine", key
        layers[key] = (int(value["group_size"]), int(value["bits"]))
    return defaults, layers


def swift_linears(config: dict) -> dict[str, tuple[int, int, bool]]:
    """Linear modules of Swift's ``Idefics3``: path -> (out, in, has bias), Swift defaults."""
    text, vision = config["text_config"], config["vision_config"]
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = hidden // heads  # Swift derives it; it ignores head_dim
    kv = text["num_key_value_heads"]
    inter = text["intermediate_size"]
    out = {}
    for i in range(text.get("num_hidden_layers", 32)):
        p = f"language_model.layers.{i}"
        out[f"{p}.self_attn.q_proj"] = (heads * head_dim, hidden, False)
        out[f"{p}.self_attn.k_proj"] = (kv * head_dim, hidden, False)
        out[f"{p}.self_attn.v_proj"] = (kv * head_dim, hidden, False)
        out[f"{p}.self_attn.o_proj"] = (hidden, heads * head_dim, False)
        out[f"{p}.mlp.gate_proj"] = (inter, hidden, False)
        out[f"{p}.mlp.up_proj"] = (inter, hidden, False)
        out[f"{p}.mlp.down_proj"] = (hidden, inter, False)
    if not text.get("tie_word_embeddings", False):
        out["language_model.lm_head"] = (text["vocab_size"], hidden, False)
    vh = vision["hidden_size"]
    vi = vision.get("intermediate_size", 3072)
    for i in range(vision.get("num_hidden_layers", 12)):
        p = f"vision_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{name}"] = (vh, vh, True)
        out[f"{p}.mlp.fc1"] = (vi, vh, True)
        out[f"{p}.mlp.fc2"] = (vh, vi, True)
    sf = config.get("scale_factor", 2)
    out["connector.modality_projection.proj"] = (hidden, vh * sf * sf, False)
    return out


def swift_expected_parameters(config: dict, stored: set[str]) -> dict[str, tuple]:
    """Parameter name -> shape after Swift quantizes the modules whose scales are stored."""
    text, vision = config["text_config"], config["vision_config"]
    defaults, layers = swift_quantization(config)
    hidden = text["hidden_size"]
    vh, patch, channels = vision["hidden_size"], vision["patch_size"], vision.get("num_channels", 3)
    n_patches = (vision["image_size"] // patch) ** 2
    shapes: dict[str, tuple] = {}

    def add(path: str, out_dims: int, in_dims: int, bias: bool) -> None:
        settings = layers.get(path, defaults) if f"{path}.scales" in stored else None
        if settings is None:
            shapes[f"{path}.weight"] = (out_dims, in_dims)
        else:
            group_size, bits = settings
            shapes[f"{path}.weight"] = (out_dims, in_dims * bits // 32)
            shapes[f"{path}.scales"] = (out_dims, in_dims // group_size)
            shapes[f"{path}.biases"] = (out_dims, in_dims // group_size)
        if bias:
            shapes[f"{path}.bias"] = (out_dims,)

    for path, (o, i, bias) in swift_linears(config).items():
        add(path, o, i, bias)
    add("language_model.embed_tokens", text["vocab_size"], hidden, False)
    add("vision_model.embeddings.position_embedding", n_patches, vh, False)
    for i in range(text.get("num_hidden_layers", 32)):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"language_model.layers.{i}.{norm}.weight"] = (hidden,)
    shapes["language_model.norm.weight"] = (hidden,)
    for i in range(vision.get("num_hidden_layers", 12)):
        for norm in ("layer_norm1", "layer_norm2"):
            for p in ("weight", "bias"):
                shapes[f"vision_model.encoder.layers.{i}.{norm}.{p}"] = (vh,)
    for p in ("weight", "bias"):
        shapes[f"vision_model.post_layernorm.{p}"] = (vh,)
    # Swift's VisionModel.checkArrayShape layout: channels-last (out, kH, kW, in).
    shapes["vision_model.embeddings.patch_embedding.weight"] = (vh, patch, patch, channels)
    shapes["vision_model.embeddings.patch_embedding.bias"] = (vh,)
    return shapes


def check_swift_contract(config: dict, weights: dict[str, mx.array]) -> None:
    for key in SWIFT_ROOT_KEYS:
        assert key in config, key
    for key in SWIFT_TEXT_KEYS:
        assert key in config["text_config"], f"text_config.{key}"
    for key in SWIFT_VISION_KEYS:
        assert key in config["vision_config"], f"vision_config.{key}"
    text = config["text_config"]
    assert text["tie_word_embeddings"] is False and config["vocab_size"] == text["vocab_size"]
    assert text["head_dim"] == text["hidden_size"] // text["num_attention_heads"]
    sanitized = swift_sanitize(weights)
    assert sanitized.keys() == weights.keys()  # the export's names survive Swift's sanitize
    expected = swift_expected_parameters(config, set(sanitized))
    assert sorted(set(sanitized) - set(expected)) == []
    assert sorted(set(expected) - set(sanitized)) == []
    wrong = {
        k: (tuple(v.shape), expected[k])
        for k, v in sanitized.items()
        if tuple(v.shape) != expected[k]
    }
    assert wrong == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"quantize": True, "q_group_size": 32},
        {"quantize": True, "q_group_size": 32, "recipe": "mixed", "q_bits": 4},
        {"quantize": True, "q_group_size": 32, "skip_vision": True},
        {"quantize": True, "q_group_size": 32, "tie": True},
    ],
    ids=["full", "4bit", "mixed", "skip-vision", "tied"],
)
def test_export_directory_meets_swift_contract(hf_checkpoint, tmp_path, kwargs):
    source = hf_checkpoint(tie=kwargs.pop("tie", False))
    out = convert(str(source), tmp_path / "out", dtype="float32", **kwargs)
    config = json.loads((out / "config.json").read_text())
    check_swift_contract(config, load_weights(out))
    vision_quantized = "vision_model.encoder.layers.0.mlp.fc1.scales" in load_weights(out)
    assert vision_quantized == (kwargs.get("quantize", False) and not kwargs.get("skip_vision"))
    # image_seq_len where Swift reads it (its default of 64 is wrong for other geometries).
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    for key in SWIFT_PROCESSOR_KEYS:
        assert key in preprocessor, key
    assert preprocessor["image_seq_len"] == 4  # (64 / 16 / 2) ** 2
    assert json.loads((out / "processor_config.json").read_text())["image_seq_len"] == 4
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize("shape", ["256m", "500m", "2.2b"])
@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
def test_real_shapes_meet_swift_contract(shape, recipe):
    """The real architectures' exports, from lazy weights (nothing is evaluated or written)."""
    source = json.loads((ASSETS / "shapes" / shape / "config.json").read_text())
    model = Model(ModelConfig.from_dict(source))
    model.set_dtype(mx.bfloat16)
    block = quantize_model(model, QuantizationSpec(recipe=recipe))
    config = json.loads(json.dumps(export_config(source, model.config, "bfloat16", block, False)))
    weights = export_weights(model)
    check_swift_contract(config, weights)
    # 2.2B: the vision fc2 (4304 inputs) stays unquantized; everything else that Swift can
    # quantize is.
    fc2_scales = "vision_model.encoder.layers.0.mlp.fc2.scales" in weights
    assert fc2_scales == (shape != "2.2b")
    assert "vision_model.embeddings.position_embedding.scales" not in weights
    preprocessor = json.loads((ASSETS / "shapes" / shape / "preprocessor_config.json").read_text())
    assert model.config.image_seq_len == {"256m": 64, "500m": 64, "2.2b": 81}[shape]
    assert preprocessor["max_image_size"]["longest_edge"] == source["vision_config"]["image_size"]


def test_2_2b_preprocessor_config_gets_image_seq_len_81(tmp_path):
    """Swift reads image_seq_len only from preprocessor_config.json (default 64)."""
    write_assets("2.2b", tmp_path / "src")
    save_processor(Processor.from_pretrained(tmp_path / "src"), tmp_path / "out")
    preprocessor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert preprocessor["image_seq_len"] == 81
