"""The permuted trained checkpoint: the fair basis for judging quantization.

The fixture's decoder was dequantized from a Q4_1 GGUF, so each block of 32 inputs holds at
most 16 distinct values: quantization at group 32 can find that grid again. The permuted copy
(``benchmarks/trained_weights.py``'s ``permuted_trained_checkpoint``) must compute the same
function with the grid gone from every MLX group.

Measured (fp32, 2-core x86 CPU): max |logit diff| 7.9e-5 on text, 5.7e-4 with one image (logit
std 6.2-6.6); a decoder ``down_proj`` group of 32 holds at most 16 distinct values in the source,
31 after the permutation
(19 in o_proj, whose inputs are permuted only within each head).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.trained_weights import permuted_trained_checkpoint, trained_checkpoint
from mlx_smolvlm.load import load
from mlx_smolvlm.prompt import image_prompt
from tests.mlx_smolvlm.test_trained_weights import prompt_ids, tiles

ATOL = 1e-3


@pytest.fixture(scope="module")
def pair():
    source, _ = load(str(trained_checkpoint()), dtype="float32")
    permuted, processor = load(str(permuted_trained_checkpoint()), dtype="float32")
    return source, permuted, processor


def max_diff(a, b, ids: np.ndarray, pixels: np.ndarray | None = None) -> float:
    args = (mx.array(ids), None if pixels is None else mx.array(pixels))
    x, y = np.array(a(*args)), np.array(b(*args))
    assert (x.argmax(-1) == y.argmax(-1)).all()
    diff = float(np.abs(x - y).max())
    print(f"max |logit diff| {diff:.1e} (std {x.std():.2f})")
    return diff


def test_same_function_on_text(pair):
    source, permuted, processor = pair
    text = "The librarian remembered every book that had ever been borrowed, and by whom."
    ids = np.array([processor.tokenizer.encode(text)])
    assert max_diff(source, permuted, ids) < ATOL


def test_same_function_with_an_image(pair):
    source, permuted, processor = pair
    ids = prompt_ids(processor, image_prompt(0, 0, processor.image_seq_len), "What is this?")
    assert max_diff(source, permuted, ids, tiles(1)) < ATOL


def distinct_per_group(weight: mx.array, group: int = 32) -> np.ndarray:
    """Distinct values in each group of ``group`` inputs of every 7th row."""
    groups = np.array(weight)[::7].reshape(-1, group)
    return np.array([len(np.unique(g)) for g in groups])


# o_proj's inputs are only permuted within each head (two Q4_1 blocks of 32): its groups of 32
# mix two source blocks instead of 16 or more.
MEDIAN_AFTER = {"mlp.down_proj": 28, "self_attn.q_proj": 28, "self_attn.o_proj": 18}


@pytest.mark.parametrize("module", list(MEDIAN_AFTER))
def test_the_q4_grid_no_longer_lines_up_with_groups(pair, module):
    source, permuted, _ = pair
    a, b = source.text_model.layers[10], permuted.text_model.layers[10]
    for name in module.split("."):
        a, b = getattr(a, name), getattr(b, name)
    before, after = distinct_per_group(a.weight), distinct_per_group(b.weight)
    print(f"{module}: distinct values per group of 32 {before.max()} -> {np.median(after)}")
    assert before.max() <= 16
    assert np.median(after) >= MEDIAN_AFTER[module]
