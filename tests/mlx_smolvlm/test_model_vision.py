"""Vision-tower details checked directly against transformers' modules."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

from mlx_smolvlm.config import VisionConfig
from mlx_smolvlm.vision import VisionEmbeddings, torch_arange_f32


@pytest.mark.parametrize("n", range(1, 130))
def test_torch_arange_f32_is_bit_exact(n):
    assert np.array_equal(
        torch_arange_f32(1 / n, 1.0, 1 / n), torch.arange(1 / n, 1.0, 1 / n).numpy()
    )


def hf_position_ids(side: int, patch_mask: np.ndarray) -> np.ndarray:
    """transformers' position ids, read out through a 1-wide embedding holding its own index."""
    config = SmolVLMVisionConfig(hidden_size=1, image_size=side, patch_size=1, num_channels=1)
    emb = SmolVLMVisionEmbeddings(config)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
        N, H, W = patch_mask.shape
        out = emb(torch.zeros(N, 1, H, W), torch.from_numpy(patch_mask))
    return out[..., 0].numpy().astype(np.int64)


# 32 and 27 are the real grids (512/16, 384/14); at 19, 25, 29 and 50 a plain float formula
# for the bucket boundaries puts some patches one position off from transformers.
@pytest.mark.parametrize("side", [32, 27, 19, 25, 29, 50, 6])
def test_bucketed_position_ids_match_transformers(side):
    rng = np.random.default_rng(side)
    sizes = [(side, side), (side, side // 2), (1, side), (side - 1, 3)]
    sizes += [tuple(rng.integers(1, side + 1, 2)) for _ in range(12)]
    mask = np.zeros((len(sizes), side, side), dtype=bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = True
    emb = VisionEmbeddings(
        VisionConfig(hidden_size=16, num_attention_heads=1, image_size=side, patch_size=1)
    )
    ours = np.array(emb.position_ids(mx.array(mask)))
    assert np.array_equal(ours, hf_position_ids(side, mask))
