"""Tiny random SmolVLM / Idefics3 checkpoints written by transformers itself.

``build_hf_checkpoint`` makes a checkpoint directory with the real file layout (config.json,
safetensors, tokenizer and processor files); the ``hf_checkpoint`` fixture caches them per
session and ``hf_reference`` loads transformers' model from such a directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

ASSETS = Path(__file__).parents[2] / "mlx_smolvlm" / "assets"
VOCAB_SIZE = 49280  # the real tokenizer's, so the processor and generation tests can use it
IMAGE_TOKEN_ID = 49190
FAKE_TOKEN_ID = 49189
ROPE_THETA = 50000.0
HF_CLASSES = {
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
}


def hf_config(
    *,
    model_type: str = "smolvlm",
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    scale_factor: int = 2,
    patch_size: int = 16,
    image_size: int = 64,
    tie: bool = False,
    intermediate_size: int = 96,
) -> SmolVLMConfig | Idefics3Config:
    """A tiny transformers config (hidden sizes 64 text / 32 vision, 2 layers each).

    Args:
        model_type: ``smolvlm`` or ``idefics3`` (picks the transformers classes).
        text_heads: Decoder attention heads.
        kv_heads: Decoder key/value heads (equal to ``text_heads`` for MHA).
        head_dim: Explicit decoder head size (default 64 // text_heads).
        scale_factor: Pixel-shuffle factor; must divide ``image_size // patch_size``.
        patch_size: Vision patch size.
        image_size: Vision tile size.
        tie: Root ``tie_word_embeddings`` (no ``lm_head.weight`` is saved).
        intermediate_size: The decoder's MLP width.
    """
    config_cls, _ = HF_CLASSES[model_type]
    text = dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else 64 // text_heads,
        rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA,
        max_position_embeddings=8192,
        pad_token_id=2,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return config_cls(
        text_config=text,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=tie,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention patterns and norms matter (std 0.1, norms ~1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn(param.shape, generator=gen)
            is_norm_scale = "norm" in name and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_scale else noise)


def _write_processor_files(path: Path, image_size: int, image_seq_len: int) -> None:
    """Tokenizer files plus processor configs scaled down to ``image_size`` tiles."""
    for src in (ASSETS / "tokenizer").iterdir():
        shutil.copyfile(src, path / src.name)
    pre = json.loads((ASSETS / "shapes" / "500m" / "preprocessor_config.json").read_text())
    pre["max_image_size"] = {"longest_edge": image_size}
    pre["size"] = {"longest_edge": 4 * image_size}
    pre["video_sampling"]["video_size"] = {"longest_edge": image_size}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = {"image_seq_len": image_seq_len, "processor_class": "SmolVLMProcessor"}
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2))


def build_hf_checkpoint(
    path: Path,
    *,
    sharded: bool = False,
    rope_in_parameters: bool = False,
    seed: int = 0,
    **config_options: object,
) -> Path:
    """Write a tiny random fp32 checkpoint with transformers' ``save_pretrained``.

    Args:
        path: Output directory.
        sharded: Save several safetensors shards plus ``model.safetensors.index.json``.
        rope_in_parameters: Keep transformers 5's ``text_config.rope_parameters``; otherwise
            rewrite config.json with a top-level ``rope_theta`` like the released checkpoints.
        seed: Weight seed.
        **config_options: The model's shape, as `hf_config` takes it.

    Returns:
        ``path``.
    """
    config = hf_config(**config_options)
    _, model_cls = HF_CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="4MB" if sharded else "10GB")

    config_path = path / "config.json"
    saved = json.loads(config_path.read_text())
    if not rope_in_parameters:
        rope = saved["text_config"].pop("rope_parameters")
        saved["text_config"]["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(saved, indent=2))
    image_size, patch_size = config.vision_config.image_size, config.vision_config.patch_size
    image_seq_len = (image_size // patch_size // config.scale_factor) ** 2
    _write_processor_files(path, image_size, image_seq_len)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``hf_checkpoint(**build_hf_checkpoint_kwargs) -> Path``, built once per session."""
    built: dict[tuple, Path] = {}

    def get(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = build_hf_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_reference():
    """``hf_reference(path) -> transformers model`` (fp32, eval), loaded once per path."""
    loaded: dict[Path, torch.nn.Module] = {}

    def get(path: Path) -> torch.nn.Module:
        if path not in loaded:
            model_type = json.loads((path / "config.json").read_text())["model_type"]
            _, model_cls = HF_CLASSES[model_type]
            loaded[path] = model_cls.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return get
