"""Quantization rules, the config block, loading quantized weights, and 4-bit agreement."""

import functools
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_smolvlm.config import ModelConfig
from mlx_smolvlm.convert import convert, export_weights
from mlx_smolvlm.load import load_model
from mlx_smolvlm.model import Model
from mlx_smolvlm.quantize import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_RECIPE,
    QuantizationError,
    QuantizationSpec,
    apply_quantization,
    clipped_group_params,
    gptq_quantize,
    is_sensitive,
    layer_quantization,
    pack,
    quantize_model,
    quantized_layers,
)
from mlx_smolvlm.random_weights import ASSETS
from mlx_smolvlm.weight_names import from_export_path, to_export_path

IMAGE_TOKEN_ID = 49190  # conftest checkpoints use the real tokenizer ids


def shape_model(shape: str, dtype: mx.Dtype = mx.bfloat16) -> Model:
    """A real-architecture model with lazy (never evaluated) weights cast to ``dtype``."""
    config = json.loads((ASSETS / "shapes" / shape / "config.json").read_text())
    model = Model(ModelConfig.from_dict(config))
    model.set_dtype(dtype)
    return model


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"bits": 3}, "bits 3"), ({"group_size": 16}, "group size 16"), ({"recipe": "q4k"}, "'q4k'")],
)
def test_spec_rejects_unsupported_settings(kwargs, culprit):
    with pytest.raises(QuantizationError, match=culprit):
        QuantizationSpec(**kwargs)


def test_export_paths_round_trip():
    assert to_export_path("lm_head.weight") == "language_model.lm_head.weight"
    assert (
        to_export_path("text_model.layers.3.mlp.down_proj")
        == "language_model.layers.3.mlp.down_proj"
    )
    assert (
        to_export_path("vision_model.encoder.layers.0.mlp.fc1")
        == "vision_model.encoder.layers.0.mlp.fc1"
    )
    assert (
        to_export_path("connector.modality_projection.proj") == "connector.modality_projection.proj"
    )
    assert to_export_path("lm_headless") == "lm_headless"
    for path in ("lm_head", "text_model.embed_tokens.scales", "vision_model.post_layernorm.bias"):
        assert from_export_path(to_export_path(path)) == path


def test_layer_rules():
    spec = QuantizationSpec()
    linear = nn.Linear(128, 64)
    assert layer_quantization(spec, "text_model.layers.0.mlp.up_proj", linear) == {
        "group_size": 64,
        "bits": 4,
    }
    # Kept: convolution, norms, the vision position embedding.
    assert (
        layer_quantization(spec, "vision_model.embeddings.patch_embedding", nn.Conv2d(3, 64, 16))
        is None
    )
    assert layer_quantization(spec, "text_model.norm", nn.RMSNorm(64)) is None
    assert layer_quantization(spec, "vision_model.post_layernorm", nn.LayerNorm(64)) is None
    position = nn.Embedding(1024, 64)
    assert layer_quantization(spec, "vision_model.embeddings.position_embedding", position) is None
    assert layer_quantization(spec, "text_model.embed_tokens", nn.Embedding(100, 64)) is not None
    # Group fallback: 96 inputs take group 32; 4304 (2.2B vision fc2) fits no supported group.
    assert layer_quantization(spec, "text_model.layers.0.mlp.down_proj", nn.Linear(96, 64)) == {
        "group_size": 32,
        "bits": 4,
    }
    fc2 = nn.Linear(4304, 1152)
    assert layer_quantization(spec, "vision_model.encoder.layers.0.mlp.fc2", fc2) is None
    # skip_vision leaves the tower but not the connector.
    no_vision = QuantizationSpec(quantize_vision=False)
    assert layer_quantization(no_vision, "vision_model.encoder.layers.0.mlp.fc1", linear) is None
    assert layer_quantization(no_vision, "connector.modality_projection.proj", linear) is not None


def test_mixed_recipe_keeps_sensitive_layers_at_8_bits():
    for path in (
        "lm_head",
        "text_model.embed_tokens",
        "connector.modality_projection.proj",
        "vision_model.encoder.layers.3.mlp.fc1",
    ):
        assert is_sensitive(path), path
    assert not is_sensitive("text_model.layers.0.mlp.down_proj")
    mixed = QuantizationSpec(recipe="mixed")
    linear = nn.Linear(128, 64)
    assert layer_quantization(mixed, "lm_head", linear)["bits"] == 8
    assert (
        layer_quantization(mixed, "vision_model.encoder.layers.0.self_attn.q_proj", linear)["bits"]
        == 8
    )
    assert layer_quantization(mixed, "text_model.layers.15.mlp.down_proj", linear)["bits"] == 4
    position = nn.Embedding(1024, 64)
    assert layer_quantization(mixed, "vision_model.embeddings.position_embedding", position) is None


def test_quantize_model_block_lists_only_overrides_under_export_names():
    model = shape_model("256m")
    block = quantize_model(model, QuantizationSpec(recipe="mixed"))
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    overrides = {k for k in block if k not in ("group_size", "bits", "mode")}
    assert {
        "language_model.lm_head",
        "language_model.embed_tokens",
        "connector.modality_projection.proj",
        "vision_model.encoder.layers.11.mlp.fc2",
    } <= overrides
    assert not any(k.startswith("language_model.layers.") for k in overrides)
    assert all(block[k] == {"group_size": 64, "bits": 8, "mode": "affine"} for k in overrides)
    layers = quantized_layers(model)
    assert layers["text_model.layers.29.mlp.down_proj"] == (4, 64)
    assert layers["vision_model.encoder.layers.11.mlp.fc2"] == (8, 64)
    assert "vision_model.embeddings.position_embedding" not in layers
    # Every Linear and the token embedding are quantized; nothing else is.
    assert not any(type(m) is nn.Linear for _, m in model.named_modules())
    assert isinstance(model.vision_model.embeddings.position_embedding, nn.Embedding)


def test_2_2b_vision_fc2_stays_in_export_dtype():
    model = shape_model("2.2b")
    block = quantize_model(model, QuantizationSpec())
    layers = quantized_layers(model)
    assert not any(p.endswith("mlp.fc2") and p.startswith("vision_model") for p in layers)
    assert isinstance(model.vision_model.encoder.layers[0].mlp.fc2, nn.Linear)
    assert model.vision_model.encoder.layers[0].mlp.fc2.weight.dtype == mx.bfloat16
    assert layers["vision_model.encoder.layers.0.mlp.fc1"] == (4, 64)
    assert set(block) == {"group_size", "bits", "mode"}


def export_bytes(spec: QuantizationSpec, dtype: mx.Dtype) -> int:
    """The 256M export's weight bytes under ``spec``, from the lazy arrays' shapes and dtypes
    (nothing is evaluated; GPTQ changes the values, not the layout)."""
    model = shape_model("256m", dtype)
    plan = functools.partial(layer_quantization, spec)
    nn.quantize(model, class_predicate=lambda p, m: plan(p, m) or False)
    return sum(v.nbytes for v in export_weights(model).values())


def test_256m_4bit_export_size_budget():
    """The 256M default 4-bit export (calibrated recipe, group 32, vision quantized) in bf16
    stays at or below 0.2 GB (measured 0.191); plain rounding at group 64 at or below 0.18 GB
    in bf16 and fp32. The benchmarks measure the files themselves."""
    default = QuantizationSpec(group_size=DEFAULT_GROUP_SIZE, recipe=DEFAULT_RECIPE)
    assert 0.15e9 < export_bytes(default, mx.bfloat16) <= 0.2e9
    for dtype in (mx.bfloat16, mx.float32):
        # fp32 scales: about 5 bits per weight over 256M weights
        assert 0.14e9 < export_bytes(QuantizationSpec(), dtype) <= 0.18e9, dtype


def test_apply_quantization_rejects_bad_blocks(hf_checkpoint, tmp_path):
    export = convert(
        str(hf_checkpoint()), tmp_path / "q", quantize=True, q_group_size=32, dtype="float32"
    )
    config_path = export / "config.json"
    config = json.loads(config_path.read_text())

    def load_with(quantization) -> None:
        config["quantization"] = quantization
        config_path.write_text(json.dumps(config))
        load_model(str(export))

    with pytest.raises(QuantizationError, match="needs 'group_size' and 'bits'"):
        load_with({"bits": 4, "mode": "affine"})
    with pytest.raises(QuantizationError, match="must be an object"):
        load_with(4)
    with pytest.raises(QuantizationError, match="'language_model.lm_head' as unquantized"):
        load_with({"group_size": 32, "bits": 4, "language_model.lm_head": False})
    with pytest.raises(QuantizationError, match="lacks 'group_size' and 'bits'"):
        load_with({"language_model.lm_head": {"group_size": 32, "bits": 4}})


def test_apply_quantization_rejects_scales_of_unquantizable_modules():
    model = shape_model("256m")
    weights = {"text_model.norm.scales": mx.zeros((1,))}
    with pytest.raises(QuantizationError, match="text_model.norm"):
        apply_quantization(model, {"group_size": 64, "bits": 4}, weights)


def _agreement(reference: mx.array, logits: mx.array) -> tuple[float, float]:
    p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = float((mx.exp(p) * (p - q)).sum(axis=-1).mean())
    top1 = float((reference.argmax(-1) == logits.argmax(-1)).astype(mx.float32).mean())
    return top1, kl


def test_4bit_predictions_agree_with_full_precision(hf_checkpoint, tmp_path):
    """Tiny checkpoint (std 0.1 weights), text plus one image, 64 positions.

    Random logits over 49280 tokens are flat, so top-1 is fragile here (measured: 4-bit 0.48,
    mixed 0.53, 8-bit 0.95; KL 0.026 / 0.018 / 0.0001); the bounds leave room for platform
    differences but fail on wrong scales, group sizes or layer mapping (top-1 near 0).
    """
    source = hf_checkpoint()
    full, _ = load_model(str(source))
    ids = mx.array([[1, 49189] + [IMAGE_TOKEN_ID] * 4 + [49189] + list(range(100, 157))])
    pixels = mx.random.uniform(-1, 1, (1, 1, 3, 64, 64), key=mx.random.key(0))
    reference = full(ids, pixels)
    results = {}
    for name, kwargs in {
        "4bit": {"q_bits": 4, "recipe": "uniform"},
        "mixed": {"q_bits": 4, "recipe": "mixed"},
        "8bit": {"q_bits": 8, "recipe": "uniform"},
    }.items():
        export = convert(
            str(source), tmp_path / name, quantize=True, q_group_size=32, dtype="float32", **kwargs
        )
        model, _ = load_model(str(export))
        results[name] = _agreement(reference, model(ids, pixels))
    top1, kl = results["4bit"]
    assert top1 >= 0.35 and kl < 0.05, results
    assert results["mixed"][1] < kl, results
    assert results["8bit"][0] >= 0.9 and results["8bit"][1] < 1e-3, results


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 2**bits, (8, 64)).astype(np.uint8)
    scales = rng.uniform(0.1, 1, (8, 2)).astype(np.float32)
    biases = rng.normal(size=(8, 2)).astype(np.float32)
    packed = mx.array(pack(levels, bits))
    ours = mx.dequantize(packed, mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    expected = np.repeat(scales, 32, axis=1) * levels + np.repeat(biases, 32, axis=1)
    np.testing.assert_array_equal(np.array(ours), expected)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gptq_halves_the_output_error_of_rounding_on_correlated_inputs(dtype):
    """Correlated inputs are where error compensation pays (measured: 2.2x lower in fp32)."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(128, 128)).astype(np.float32)
    inputs = rng.normal(size=(2000, 128)).astype(np.float32) @ mixing * 0.3
    weight = rng.normal(size=(64, 128)).astype(np.float32)
    hessian = 2 * inputs.T.astype(np.float64) @ inputs / len(inputs)
    packed, scales, biases = gptq_quantize(weight, hessian, 4, 32, dtype)
    assert scales.dtype == dtype and biases.dtype == dtype and packed.shape == (64, 16)
    gptq = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=4).astype(mx.float32))
    w = mx.array(weight).astype(dtype)
    rtn = np.array(
        mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4).astype(
            mx.float32
        )
    )
    error = np.mean((inputs @ (gptq - weight).T) ** 2)
    assert error < 0.6 * np.mean((inputs @ (rtn - weight).T) ** 2)


def test_calibrated_recipe_needs_calibration_data():
    with pytest.raises(QuantizationError, match="needs calibration data"):
        quantize_model(shape_model("256m"), QuantizationSpec(recipe="calibrated"))


def test_calibrated_export_is_plain_affine_and_beats_rounding(hf_checkpoint, tmp_path):
    """Embeddings and lm_head at 8 bits, the rest GPTQ at 4; mlx-vlm reads it as it is."""
    from mlx_vlm import load as vlm_load

    source = hf_checkpoint()
    full, _ = load_model(str(source))
    ids = mx.array([[1, 49189] + [IMAGE_TOKEN_ID] * 4 + [49189] + list(range(100, 157))])
    pixels = mx.random.uniform(-1, 1, (1, 1, 3, 64, 64), key=mx.random.key(0))
    reference = full(ids, pixels)
    kl = {}
    for recipe in ("uniform", "calibrated"):
        export = convert(
            str(source), tmp_path / recipe, quantize=True, q_group_size=32, dtype="float32",
            recipe=recipe,
        )  # fmt: skip
        model, _ = load_model(str(export))
        kl[recipe] = _agreement(reference, model(ids, pixels))[1]
    config = json.loads((export / "config.json").read_text())
    assert config["quantization"]["language_model.lm_head"]["bits"] == 8
    assert config["quantization"]["language_model.embed_tokens"]["bits"] == 8
    layers = quantized_layers(model)
    assert layers["text_model.layers.0.mlp.down_proj"] == (4, 32)
    assert layers["vision_model.encoder.layers.0.self_attn.q_proj"] == (4, 32)
    vlm_model, _ = vlm_load(str(export))
    theirs = vlm_model(ids, pixels).logits
    np.testing.assert_allclose(np.array(theirs), np.array(model(ids, pixels)), atol=1e-4)
    assert kl["calibrated"] < kl["uniform"], kl


def test_quant_quality_benchmark_smoke(hf_checkpoint, tmp_path, capsys, monkeypatch):
    """Two recipes and mlx-vlm's on the tiny checkpoint, 32 tokens; no matplotlib: a message."""
    import builtins

    from benchmarks import quant_quality

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    argv = ["--model", str(hf_checkpoint()), "--tokens", "32", "--json", str(tmp_path / "q.json")]
    recipes = ["4-bit uniform g64", "4-bit calibrated g32 (default)", "mlx-vlm 4-bit"]
    assert quant_quality.main([*argv, "--recipes", *recipes]) == 0
    rows = json.loads((tmp_path / "q.json").read_text())
    assert [r["recipe"] for r in rows] == ["full precision (fp32 source)", *recipes]
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["mean_kl"] == 0.0
    assert all(r["perplexity"] > 1 and r["weight_gb"] > 0 for r in rows[1:])
    out = capsys.readouterr().out
    assert "| 4-bit calibrated g32 (default) |" in out and "matplotlib is missing" in out


def test_clipped_group_params_never_round_worse_than_the_full_range():
    """Ratio 1 (the plain min/max range) is among the candidates: the chosen range's weighted
    rounding error is at most the full range's, and lower for heavy-tailed (Student t) weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, size=(64, 128)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, size=128)

    def weighted_error(scales, biases):
        s, b = np.repeat(scales, 32, axis=1), np.repeat(biases, 32, axis=1)
        q = np.clip(np.round((weight - b) / s), 0, 15)
        return ((q * s + b - weight) ** 2 * importance).sum()

    scales, biases = clipped_group_params(weight, importance, 4, 32, mx.float32)
    groups = weight.reshape(64, 4, 32)
    low, high = groups.min(-1), groups.max(-1)
    full = weighted_error((high - low) / 15, low)
    assert weighted_error(scales, biases) < 0.97 * full  # measured 0.961


def test_gptq_act_order_helps_when_a_few_inputs_carry_most_energy():
    """Trained decoders have outlier input channels; visiting them first lowers the error."""
    rng = np.random.default_rng(1)
    energy = np.where(rng.uniform(size=128) < 0.05, 20.0, 1.0).astype(np.float32)
    mixing = rng.normal(size=(128, 128)).astype(np.float32) * 0.1 + np.eye(128, dtype=np.float32)
    inputs = rng.normal(size=(4000, 128)).astype(np.float32) @ mixing * energy
    weight = rng.normal(size=(64, 128)).astype(np.float32)
    hessian = 2 * inputs.T.astype(np.float64) @ inputs / len(inputs)
    errors = {}
    for act_order in (False, True):
        q = gptq_quantize(weight, hessian, 4, 32, mx.float32, act_order=act_order)
        w = np.array(mx.dequantize(*q, group_size=32, bits=4))
        errors[act_order] = np.mean((inputs @ (w - weight).T) ** 2)
    assert errors[True] < 0.9 * errors[False], errors
