"""`convert`: exports that load in our loader and in mlx-vlm, mlx-vlm conversions that load in
ours, tied and sharded checkpoints, atomic writes, bad input and the CLI."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_vlm import load as vlm_load
from mlx_vlm.convert import convert as vlm_convert

import mlx_smolvlm.convert as convert_module
from mlx_smolvlm.cli import main
from mlx_smolvlm.config import ConfigError
from mlx_smolvlm.convert import ConvertError, convert
from mlx_smolvlm.load import load_model, load_weights
from mlx_smolvlm.quantize import QuantizationError, quantized_layers

IMAGE_TOKEN_ID = 49190  # conftest checkpoints use the real tokenizer ids
FAKE_TOKEN_ID = 49189


def inputs(n_image_tokens: int = 4) -> tuple[mx.array, mx.array]:
    """Text plus one 64x64 image (4 image tokens in the default tiny checkpoint)."""
    ids = [1, FAKE_TOKEN_ID] + [IMAGE_TOKEN_ID] * n_image_tokens + [FAKE_TOKEN_ID]
    ids += list(range(100, 120))
    pixels = mx.random.uniform(-1, 1, (1, 1, 3, 64, 64), key=mx.random.key(1))
    return mx.array([ids]), pixels


def our_logits(path: Path, dtype: str | None = None) -> np.ndarray:
    model, _ = load_model(str(path), dtype=dtype)
    return np.array(model(*inputs()).astype(mx.float32))


def vlm_logits(path: Path) -> np.ndarray:
    model, processor = vlm_load(str(path))
    assert type(processor).__name__ == "SmolVLMProcessor"
    ids, pixels = inputs()
    return np.array(model(ids, pixels.astype(mx.float32)).logits.astype(mx.float32))


@pytest.fixture(scope="module")
def source(hf_checkpoint) -> Path:
    return hf_checkpoint()


@pytest.fixture(scope="module")
def export_4bit(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "q4"
    return convert(str(source), out, quantize=True, q_group_size=32, dtype="float32")


def test_full_precision_export_equals_source(source, tmp_path):
    out = convert(str(source), tmp_path / "fp32", dtype="float32")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "generation_config.json",
        "processor_config.json",
        "preprocessor_config.json",
    } <= names
    assert not any(n.startswith(".") for n in names)
    weights = load_weights(out)
    assert "language_model.lm_head.weight" in weights
    assert weights["vision_model.embeddings.patch_embedding.weight"].shape == (32, 16, 16, 3)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    np.testing.assert_allclose(our_logits(out), our_logits(source), atol=1e-5)


def test_4bit_export_loads_in_mlx_vlm_with_our_logits(export_4bit):
    """The default recipe (calibrated): vision tower quantized too, embeddings and lm_head at
    8 bits; mlx-vlm needs no extra files."""
    config = json.loads((export_4bit / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["bits"] == 4
    model, _ = load_model(str(export_4bit))
    layers = quantized_layers(model)
    assert layers["vision_model.encoder.layers.0.self_attn.q_proj"] == (4, 32)
    assert layers["text_model.layers.0.mlp.down_proj"] == (4, 32)
    assert layers["lm_head"] == (8, 32) and layers["text_model.embed_tokens"] == (8, 32)
    ours = our_logits(export_4bit)
    np.testing.assert_allclose(vlm_logits(export_4bit), ours, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{"quantize": True, "q_bits": 4}, {"dtype": "bfloat16"}], ids=["4bit", "bf16"]
)
def test_mlx_vlm_conversion_loads_in_ours(source, tmp_path, kwargs):
    out = tmp_path / "vlm"
    vlm_convert(str(source), str(out), **kwargs)
    config = json.loads((out / "config.json").read_text())
    assert ("quantization" in config) == ("quantize" in kwargs)
    # mlx-vlm leaves the vision tower in full precision and skips layers group 64 misses.
    model, _ = load_model(str(out))
    layers = quantized_layers(model)
    assert not any(p.startswith("vision_model") for p in layers)
    assert ("text_model.layers.0.self_attn.q_proj" in layers) == ("quantize" in kwargs)
    expected = vlm_logits(out)
    atol = 1e-4 if "quantize" in kwargs else 0.1  # bf16 activations in both
    np.testing.assert_allclose(our_logits(out), expected, atol=atol)


def test_skip_vision_legacy_flag(source, tmp_path):
    out = convert(
        str(source),
        tmp_path / "sv",
        quantize=True,
        q_group_size=32,
        skip_vision=True,
        dtype="float32",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["skip_vision"] is True
    model, _ = load_model(str(out))
    layers = quantized_layers(model)
    assert not any(p.startswith("vision_model") for p in layers)
    assert "connector.modality_projection.proj" in layers
    np.testing.assert_allclose(vlm_logits(out), our_logits(out), atol=1e-4)


def test_tied_checkpoint_gets_explicit_lm_head(hf_checkpoint, tmp_path):
    source = hf_checkpoint(tie=True)
    out = convert(str(source), tmp_path / "tied", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["text_config"]["tie_word_embeddings"] is False
    weights = load_weights(out)
    assert mx.array_equal(
        weights["language_model.lm_head.weight"], weights["language_model.embed_tokens.weight"]
    )
    np.testing.assert_allclose(our_logits(out), our_logits(source), atol=1e-5)


def test_sharded_export(source, tmp_path):
    out = convert(str(source), tmp_path / "sharded", dtype="float32", max_shard_bytes=4 * 2**20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    np.testing.assert_allclose(our_logits(out), our_logits(source), atol=1e-5)


def no_partial_dirs(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "error", "culprit"),
    [
        ({"quantize": True, "q_bits": 3}, QuantizationError, "bits 3"),
        ({"quantize": True, "q_group_size": 16}, QuantizationError, "group size 16"),
        ({"quantize": True, "recipe": "awq"}, QuantizationError, "'awq'"),
        ({"dtype": "int8"}, ConvertError, "'int8'"),
    ],
)
def test_bad_settings_fail_before_any_work(source, tmp_path, kwargs, error, culprit):
    with pytest.raises(error, match=culprit):
        convert(str(source), tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty; pass --force"):
        convert(str(source), dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert(str(source), dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert no_partial_dirs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert(str(source), empty) / "config.json").is_file()


def test_bad_destinations(source, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConvertError, match="not a directory"):
        convert(str(source), file)
    with pytest.raises(ConvertError, match="is the source checkpoint"):
        convert(str(source), source, force=True)
    assert (source / "model.safetensors").is_file()


def test_bad_sources(source, tmp_path, export_4bit):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        convert(str(tmp_path / "no-such-dir"), tmp_path / "out")
    llama = tmp_path / "llama"
    shutil.copytree(source, llama)
    config = json.loads((llama / "config.json").read_text())
    config["model_type"] = "llama"
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        convert(str(llama), tmp_path / "out")
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(export_4bit), tmp_path / "out")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(source, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        convert(str(no_tokenizer), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing_that_loads(source, tmp_path, monkeypatch, existing):
    dst = tmp_path / "out"
    if existing:
        convert(str(source), dst)
    before = sorted(p.name for p in dst.iterdir()) if existing else None

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_processor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(str(source), dst, quantize=True, q_group_size=32, force=True)
    assert no_partial_dirs(tmp_path)
    if existing:
        assert sorted(p.name for p in dst.iterdir()) == before
        assert "quantization" not in json.loads((dst / "config.json").read_text())
    else:
        assert not dst.exists()


def test_cli_convert(source, tmp_path, capsys):
    dst = tmp_path / "cli"
    args = ["convert", "--hf-path", str(source), "--mlx-path", str(dst)]
    assert main([*args, "-q", "--q-group-size", "32", "--recipe", "mixed"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["language_model.lm_head"]["bits"] == 8
    assert main([*args, "-q", "--q-bits", "5", "--force"]) == 1
    assert "error: Unsupported quantization bits 5" in capsys.readouterr().err
    assert main(args) == 1
    assert "pass --force" in capsys.readouterr().err
