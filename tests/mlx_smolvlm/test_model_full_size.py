"""Parity with transformers at the real 256M size (random weights from make_random_checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import SmolVLMForConditionalGeneration

from mlx_smolvlm.load import load_model
from mlx_smolvlm.random_weights import make_random_checkpoint


@pytest.mark.slow
def test_256m_random_checkpoint_parity(tmp_path):
    path = make_random_checkpoint("256m", tmp_path / "r256")
    ref, info = SmolVLMForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    # transformers finds exactly its own tensor names in the file hf_weights() wrote.
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model, _ = load_model(str(path))

    rng = np.random.default_rng(0)
    ids = (
        [1, 11126, 42] + [49189, 49152] + [49190] * 64 + [49189] + list(rng.integers(3, 49152, 20))
    )
    ids = np.array([ids])
    pixels = rng.uniform(-1, 1, (1, 1, 3, 512, 512)).astype(np.float32)
    with torch.no_grad():
        theirs = ref(
            input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)
        ).logits.numpy()
    ours = np.array(model(ids, pixels))
    diff = float(np.abs(ours - theirs).max())
    print(f"256M max |logit diff| = {diff:.3g} (logit std {theirs.std():.3g})")
    assert diff < 1e-4
