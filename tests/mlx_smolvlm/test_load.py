"""Configs, strict loading, bad input, parameter counts and random checkpoints."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from mlx_smolvlm.config import ConfigError, ModelConfig, load_config
from mlx_smolvlm.load import WeightsError, load_model, load_weights
from mlx_smolvlm.model import Model
from mlx_smolvlm.random_weights import make_random_checkpoint, write_assets

ASSETS = Path(__file__).parents[2] / "mlx_smolvlm" / "assets"
FIXTURES = Path(__file__).parents[1] / "fixtures"
REAL_CONFIGS = {
    "256m": ASSETS / "shapes" / "256m" / "config.json",
    "500m": ASSETS / "shapes" / "500m" / "config.json",
    "2.2b": ASSETS / "shapes" / "2.2b" / "config.json",
    "v1-256m-idefics3": FIXTURES / "SmolVLM-256M-Instruct-config.json",
}


def hf_parameter_count(config_dict: dict) -> int:
    """Parameters of transformers' model for this config, built on the meta device."""
    if config_dict["model_type"] == "idefics3":
        config_cls, model_cls = Idefics3Config, Idefics3ForConditionalGeneration
    else:
        config_cls, model_cls = SmolVLMConfig, SmolVLMForConditionalGeneration
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict(config_dict))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_parameter_count_matches_transformers(name):
    config_dict = json.loads(REAL_CONFIGS[name].read_text())
    ours = Model(ModelConfig.from_dict(config_dict)).parameter_count()  # lazy, never evaluated
    assert ours == hf_parameter_count(config_dict)
    if name.endswith("256m"):
        assert ours == 256_484_928


def test_real_configs_read_like_transformers():
    c500 = load_config(REAL_CONFIGS["500m"].parent)
    assert c500.text_config.rope_theta == 100000
    assert (c500.text_config.num_attention_heads, c500.text_config.num_key_value_heads) == (15, 5)
    assert c500.vision_config.num_hidden_layers == 12  # omitted in the file: transformers' default
    assert c500.image_seq_len == 64 and not c500.tie_word_embeddings
    c22 = load_config(REAL_CONFIGS["2.2b"].parent)
    assert c22.text_config.rope_theta == 130000 and c22.image_seq_len == 81
    assert c22.text_config.num_key_value_heads == 32 and c22.scale_factor == 3
    v1 = ModelConfig.from_dict(json.loads(REAL_CONFIGS["v1-256m-idefics3"].read_text()))
    assert v1.model_type == "idefics3" and v1.text_config.hidden_size == 576


def test_rope_parameters_take_priority():
    text = {"rope_theta": 7.0, "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}}
    config = ModelConfig.from_dict({"model_type": "smolvlm", "text_config": text})
    assert config.text_config.rope_theta == 5000.0
    with pytest.raises(ConfigError, match="rope_type 'llama3'"):
        ModelConfig.from_dict(
            {"model_type": "smolvlm", "text_config": {"rope_parameters": {"rope_type": "llama3"}}}
        )


def test_tie_is_read_from_the_root_like_transformers():
    text = {"tie_word_embeddings": True}
    assert not ModelConfig.from_dict(
        {"model_type": "smolvlm", "text_config": text}
    ).tie_word_embeddings
    hf = SmolVLMConfig.from_dict({"model_type": "smolvlm", "text_config": text})
    assert not hf.tie_word_embeddings
    tied = Model(ModelConfig.from_dict({"model_type": "smolvlm", "tie_word_embeddings": True}))
    assert "lm_head" not in tied


@pytest.fixture
def checkpoint_copy(hf_checkpoint, tmp_path):
    """A writable copy of the default tiny checkpoint."""

    def get(**kwargs) -> Path:
        dst = tmp_path / "ckpt"
        shutil.copytree(hf_checkpoint(**kwargs), dst)
        return dst

    return get


def rewrite_weights(path: Path, edit) -> None:
    weights = dict(mx.load(str(path / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})


def test_missing_config(checkpoint_copy):
    path = checkpoint_copy()
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(path))


def test_corrupt_config(checkpoint_copy):
    path = checkpoint_copy()
    (path / "config.json").write_text('{"model_type": "smolvlm",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        load_model(str(path))


def test_unknown_model_type(checkpoint_copy):
    path = checkpoint_copy()
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json.*model_type 'llava'"):
        load_model(str(path))


def test_missing_weights(checkpoint_copy):
    path = checkpoint_copy()
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(str(path))


@pytest.mark.parametrize("content", [b"garbage!" * 4, b""])
def test_corrupt_weights(checkpoint_copy, content):
    path = checkpoint_copy()
    (path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_model(str(path))


def test_truncated_weights(checkpoint_copy):
    path = checkpoint_copy()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_model(str(path))


def test_missing_tensor(checkpoint_copy):
    path = checkpoint_copy()
    rewrite_weights(path, lambda w: w.pop("model.text_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        WeightsError, match=r"missing tensors: text_model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_model(str(path))


def test_extra_tensor(checkpoint_copy):
    path = checkpoint_copy()
    rewrite_weights(path, lambda w: w.update({"model.text_model.extra.weight": mx.zeros((2,))}))
    with pytest.raises(WeightsError, match=r"unexpected tensors: text_model\.extra\.weight"):
        load_model(str(path))


def test_wrong_shape(checkpoint_copy):
    path = checkpoint_copy()
    key = "model.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    rewrite_weights(path, lambda w: w.update({key: mx.zeros((32, 31))}))
    with pytest.raises(
        WeightsError, match=r"q_proj\.weight has shape \(32, 31\), expected \(32, 32\)"
    ):
        load_model(str(path))


def test_untied_config_without_lm_head(checkpoint_copy):
    path = checkpoint_copy()
    rewrite_weights(path, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors: lm_head\.weight"):
        load_model(str(path))


def test_tied_checkpoint_with_a_different_lm_head(checkpoint_copy):
    path = checkpoint_copy(tie=True)
    rewrite_weights(path, lambda w: w.update({"lm_head.weight": mx.zeros((49280, 64))}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_model(str(path))


def test_tied_checkpoint_with_an_equal_lm_head_copy(checkpoint_copy):
    path = checkpoint_copy(tie=True)
    rewrite_weights(
        path, lambda w: w.update({"lm_head.weight": w["model.text_model.embed_tokens.weight"]})
    )
    model, _ = load_model(str(path))
    assert "lm_head" not in model


def test_sharded_missing_shard(checkpoint_copy):
    path = checkpoint_copy(sharded=True)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        load_model(str(path))


def test_sharded_index_lists_absent_tensor(checkpoint_copy):
    path = checkpoint_copy(sharded=True)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.text_model.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="ghost"):
        load_weights(path)


def test_missing_directory_offline_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="not-a-real-org/no-such-model.*offline"):
        load_model("not-a-real-org/no-such-model")
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_model(str(tmp_path / "no" / "such" / "dir"))


def test_dtype_option(hf_checkpoint, tmp_path, monkeypatch):
    path = hf_checkpoint()
    model, resolved = load_model(str(path))
    assert resolved == path
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    bf16, _ = load_model(str(path), dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(bf16.parameters())} == {mx.bfloat16}
    # A bf16 checkpoint stays bf16 by default; "auto" is the device's compute dtype (fp32 on
    # the CPU backend) unless MLX_SMOLVLM_DTYPE says otherwise. Pixels are cast to the model's.
    dst = tmp_path / "bf16"
    shutil.copytree(path, dst)
    rewrite_weights(dst, lambda w: w.update({k: v.astype(mx.bfloat16) for k, v in w.items()}))
    auto, _ = load_model(str(dst), dtype="auto")
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert {v.dtype for _, v in tree_flatten(auto.parameters())} == {expected}
    monkeypatch.setenv("MLX_SMOLVLM_DTYPE", "bfloat16")
    assert load_model(str(dst), dtype="auto")[0].text_model.norm.weight.dtype == mx.bfloat16
    model16, _ = load_model(str(dst))
    assert {v.dtype for _, v in tree_flatten(model16.parameters())} == {mx.bfloat16}
    ids = np.array([[5] + [49189] + [49190] * 4 + [49189]])
    out = model16(ids, np.zeros((1, 1, 3, 64, 64), np.float32) + 0.5)
    assert out.dtype == mx.bfloat16 and out.shape == (1, 7, 49280)
    with pytest.raises(ValueError, match="floating-point"):
        load_model(str(path), dtype="int32")


@pytest.mark.parametrize(("n_tokens", "n_images"), [(3, 1), (5, 1), (4, 2)])
def test_image_token_count_mismatch(hf_checkpoint, n_tokens, n_images):
    """4 features per image; any other number of <image> tokens is an error naming both."""
    model, _ = load_model(str(hf_checkpoint()))
    ids = np.array([[5, 49189] + [49190] * n_tokens + [49189, 6]])
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, n_images, 3, 64, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{n_tokens} <image> tokens.*{4 * n_images} feature rows"):
        model(ids, pixels)
    features = model.encode_images(pixels)
    with pytest.raises(ValueError, match=f"{n_tokens} <image> tokens"):
        model(ids, image_features=features)


def test_bad_pixel_shapes(hf_checkpoint):
    model, _ = load_model(str(hf_checkpoint()))
    ids = np.array([[5, 49190, 6]])
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(ids, np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="pixel_attention_mask has shape"):
        model(ids, np.ones((1, 1, 3, 64, 64), np.float32), np.ones((1, 64, 64), bool))
    with pytest.raises(ValueError, match="square patch grid"):
        model(ids, np.ones((1, 1, 3, 64, 48), np.float32))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(np.array([5, 6]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(np.array([[5.0, 6.0]]))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 49280\)"):
        model(np.array([[5, 49280]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[-1, 6]]))


def test_random_checkpoint_256m(tmp_path):
    start = time.monotonic()
    path = make_random_checkpoint("256m", tmp_path / "r256")
    elapsed = time.monotonic() - start
    print(f"make_random_checkpoint('256m') took {elapsed:.1f} s")
    expected_files = {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected_files <= {p.name for p in path.iterdir()}
    model, _ = load_model(str(path))
    assert model.parameter_count() == 256_484_928
    cache = model.make_cache()
    logits = model(np.array([[1, 2, 3, 4]]), cache=cache)
    tokens = []
    for _ in range(8):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache=cache)
    assert np.isfinite(np.array(logits)).all()
    assert len(set(tokens)) > 1


def test_write_assets_2_2b(tmp_path):
    config = write_assets("2.2b", tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 16384
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_seq_len"] == 81
    assert config.image_seq_len == 81
    with pytest.raises(ValueError, match="Unknown shape"):
        write_assets("7b", tmp_path)


def test_random_checkpoint_sanitize_round_trip(hf_checkpoint):
    """hf_weights() inverts sanitize: the names and layouts of a transformers checkpoint."""
    path = hf_checkpoint()
    model, _ = load_model(str(path))
    saved = load_weights(path)
    ours = model.hf_weights()
    assert ours.keys() == saved.keys()
    for k, v in saved.items():
        assert mx.array_equal(ours[k], v).item(), k


def test_load_with_processor_end_to_end(hf_checkpoint, hf_reference):
    """``load`` pairs the model with the checkpoint's processor; its output runs through both
    our model and transformers' with equal logits."""
    from mlx_smolvlm.load import load

    path = hf_checkpoint()
    model, processor = load(str(path))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(prompt, images=[ASSETS / "example.jpg"])
    # One prompt: the batch axis is added for both models.
    input_ids = np.array([inputs.input_ids], dtype=np.int32)
    pixel_values, pixel_mask = inputs.pixel_values[None], inputs.pixel_attention_mask[None]
    ours = np.array(model(input_ids, pixel_values, pixel_mask))
    with torch.no_grad():
        theirs = hf_reference(path)(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            pixel_values=torch.from_numpy(pixel_values),
            pixel_attention_mask=torch.from_numpy(pixel_mask),
        ).logits.numpy()
    assert inputs.pixel_values.shape[0] > 1  # split into tiles plus the global image
    assert np.abs(ours - theirs).max() < 1e-4


def test_unknown_keys_ignored_and_null_subconfigs_default():
    config = ModelConfig.from_dict(
        {"model_type": "idefics3", "text_config": None, "vision_config": {"foo": 1}, "bar": 2}
    )
    assert config.text_config.hidden_size == 4096 and config.vision_config.hidden_size == 1152
    with pytest.raises(ConfigError, match="missing required key"):
        ModelConfig.from_dict({"text_config": {}})
    with pytest.raises(ConfigError, match="text_config.model_type 'mistral'"):
        ModelConfig.from_dict({"model_type": "smolvlm", "text_config": {"model_type": "mistral"}})
