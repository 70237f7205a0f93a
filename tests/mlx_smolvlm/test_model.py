"""Parity of the MLX model with transformers on tiny random checkpoints, and the KV cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_smolvlm.load import load_model

ATOL = 1e-4
IMAGE_TOKEN_ID = 49190  # the real tokenizer's ids, as in conftest's checkpoints
FAKE_TOKEN_ID = 49189

# Tiny versions of the real geometries: 512/16 tiles (256M, 500M) and 384/14 tiles (2.2B).
CHECKPOINTS = {
    "gqa_p16_tile64_s2": dict(
        text_heads=4, kv_heads=2, patch_size=16, image_size=64, scale_factor=2
    ),
    "mha_p14_tile84_s3": dict(
        text_heads=4, kv_heads=4, patch_size=14, image_size=84, scale_factor=3
    ),
    "gqa_p14_tile56_s2_head_dim32": dict(
        text_heads=4, kv_heads=2, head_dim=32, patch_size=14, image_size=56, scale_factor=2
    ),
    "idefics3_mqa_p16_tile128_s4": dict(
        model_type="idefics3",
        text_heads=4,
        kv_heads=1,
        patch_size=16,
        image_size=128,
        scale_factor=4,
    ),
    # Full-size tiles at tiny widths: 32x32 patches -> 64 tokens, and 384 px / 14 = 27 patches
    # with 6 leftover pixels that the patch grid drops -> 81 tokens.
    "real_tile_p16_512_s4": dict(
        text_heads=4, kv_heads=2, patch_size=16, image_size=512, scale_factor=4
    ),
    "real_tile_p14_384_s3": dict(
        text_heads=4, kv_heads=4, patch_size=14, image_size=384, scale_factor=3
    ),
    "tied": dict(tie=True),
    "sharded": dict(sharded=True),
    "rope_parameters": dict(rope_in_parameters=True),
}


def image_seq_len(kwargs: dict) -> int:
    return (
        kwargs.get("image_size", 64)
        // kwargs.get("patch_size", 16)
        // kwargs.get("scale_factor", 2)
    ) ** 2


def make_prompt(
    rng: np.random.Generator, n_images: int, seq_len: int, n_text: int = 7
) -> list[int]:
    """Text tokens with ``n_images`` blocks ``<fake><image>*seq_len<fake>`` in between."""
    ids = list(rng.integers(3, 49152, n_text))
    for _ in range(n_images):
        ids += [FAKE_TOKEN_ID] + [IMAGE_TOKEN_ID] * seq_len + [FAKE_TOKEN_ID]
        ids += list(rng.integers(3, 49152, 3))
    return ids


def make_pixels(rng: np.random.Generator, batch: int, n_images: int, size: int) -> np.ndarray:
    return rng.uniform(-1, 1, (batch, n_images, 3, size, size)).astype(np.float32)


def hf_logits(ref, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None):
    kwargs = {"input_ids": torch.tensor(np.asarray(input_ids), dtype=torch.long)}
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixel_values)
    if pixel_attention_mask is not None:
        kwargs["pixel_attention_mask"] = torch.from_numpy(pixel_attention_mask)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(attention_mask)
    with torch.no_grad():
        return ref(**kwargs).logits.numpy()


def max_diff(ours: mx.array, theirs: np.ndarray) -> float:
    ours = np.array(ours)
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    print(f"max |logit diff| = {diff:.3g} (logit std {theirs.std():.3g})")
    return diff


@pytest.fixture(scope="module")
def loaded(hf_checkpoint, hf_reference):
    """``loaded(name) -> (mlx model, transformers model, build kwargs)``."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = hf_checkpoint(**CHECKPOINTS[name])
            model, _ = load_model(str(path))
            cache[name] = (model, hf_reference(path), CHECKPOINTS[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_text_only_parity(loaded, name):
    model, ref, _ = loaded(name)
    ids = np.random.default_rng(0).integers(0, 49280, (2, 11))
    assert max_diff(model(ids), hf_logits(ref, ids)) < ATOL


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_text_parity(loaded, name, n_images):
    model, ref, kwargs = loaded(name)
    rng = np.random.default_rng(n_images)
    ids = np.array([make_prompt(rng, n_images, image_seq_len(kwargs))])
    pixels = make_pixels(rng, 1, n_images, kwargs.get("image_size", 64))
    assert max_diff(model(ids, pixels), hf_logits(ref, ids, pixels)) < ATOL


def padded_batch(rng, size, patch, content):
    """Batch of 2 prompts: [full image, image padded from ``content`` (h, w)] and [full image,
    all-zero padding image], as the HF processor pads images of different sizes."""
    pixels = make_pixels(rng, 2, 2, size)
    mask = np.ones((2, 2, size, size), dtype=bool)
    h, w = content
    pixels[0, 1, :, h:, :] = 0
    pixels[0, 1, :, :, w:] = 0
    mask[0, 1, h:, :] = False
    mask[0, 1, :, w:] = False
    pixels[1, 1] = 0
    mask[1, 1] = False
    return pixels, mask


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("gqa_p16_tile64_s2", (64, 48)),  # non-square content, whole patches
        ("gqa_p16_tile64_s2", (40, 64)),  # a partly valid patch row counts as valid
        ("mha_p14_tile84_s3", (50, 29)),  # 6x6 grid, 1/6 buckets
        ("idefics3_mqa_p16_tile128_s4", (128, 80)),
        ("real_tile_p14_384_s3", (384, 250)),
    ],
)
def test_padded_images_parity(loaded, name, content):
    model, ref, kwargs = loaded(name)
    rng = np.random.default_rng(3)
    seq = image_seq_len(kwargs)
    size = kwargs.get("image_size", 64)
    pixels, mask = padded_batch(rng, size, kwargs.get("patch_size", 16), content)
    first = make_prompt(rng, 2, seq)
    second = make_prompt(rng, 1, seq, n_text=len(first) - seq - 5)
    ids = np.array([first, second])
    ours = model(ids, pixels, mask)
    assert max_diff(ours, hf_logits(ref, ids, pixels, mask)) < ATOL
    # Three real images: the padding image was dropped.
    assert model.encode_images(pixels, mask).shape[0] == 3


def test_left_padded_batch_with_mask(loaded):
    """An explicit boolean mask hides left padding like transformers' ``attention_mask``."""
    model, ref, _ = loaded("gqa_p16_tile64_s2")
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 49152, (2, 9))
    pad = np.ones((2, 9), dtype=np.int64)
    pad[1, :3] = 0
    ids[1, :3] = 2
    theirs = hf_logits(ref, ids, attention_mask=pad)
    causal = np.tril(np.ones((9, 9), dtype=bool))
    mask = mx.array(causal[None, None] & pad[:, None, None, :].astype(bool))
    ours = np.array(model(ids, mask=mask))
    # Padded query rows attend to nothing in transformers; compare the real positions.
    assert np.abs(ours[0] - theirs[0]).max() < ATOL
    assert np.abs(ours[1, 3:] - theirs[1, 3:]).max() < ATOL
    additive = mx.where(mask, 0.0, -1e9).astype(mx.float32)
    assert np.abs(np.array(model(ids, mask=additive))[1, 3:] - theirs[1, 3:]).max() < ATOL


def test_image_features_argument(loaded):
    model, _, kwargs = loaded("gqa_p16_tile64_s2")
    rng = np.random.default_rng(5)
    ids = np.array([make_prompt(rng, 2, image_seq_len(kwargs))])
    pixels = make_pixels(rng, 1, 2, 64)
    features = model.encode_images(pixels)
    assert features.shape == (2, image_seq_len(kwargs), 64)
    assert np.array_equal(
        np.array(model(ids, image_features=features)), np.array(model(ids, pixels))
    )


def test_pixel_inputs_any_dtype(loaded):
    """MLX or NumPy pixels of any float dtype are cast to the model dtype."""
    model, _, kwargs = loaded("gqa_p16_tile64_s2")
    rng = np.random.default_rng(6)
    ids = np.array([make_prompt(rng, 1, image_seq_len(kwargs))])
    pixels = make_pixels(rng, 1, 1, 64).astype(np.float16)
    a = model(ids, pixels)
    b = model(mx.array(ids), mx.array(pixels.astype(np.float32)))
    assert a.dtype == mx.float32
    assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("name", ["gqa_p16_tile64_s2", "mha_p14_tile84_s3"])
def test_kv_cache_matches_full_forward(loaded, name):
    model, _, kwargs = loaded(name)
    rng = np.random.default_rng(7)
    ids = np.array([make_prompt(rng, 1, image_seq_len(kwargs)) + list(rng.integers(3, 49152, 6))])
    pixels = make_pixels(rng, 1, 1, kwargs.get("image_size", 64))
    full = np.array(model(ids, pixels))
    L = ids.shape[1]
    prefill = L - 6

    cache = model.make_cache()
    steps = [np.array(model(ids[:, :prefill], pixels, cache=cache))]
    for t in range(prefill, L):
        steps.append(np.array(model(ids[:, t : t + 1], cache=cache)))
    incremental = np.concatenate(steps, axis=1)
    assert all(c.offset == L for c in cache)
    assert np.abs(incremental - full).max() < ATOL

    # Drop the last 4 positions and recompute them as one chunk.
    assert all(c.trim(4) == 4 for c in cache)
    assert all(c.offset == L - 4 for c in cache)
    again = np.array(model(ids[:, L - 4 :], cache=cache))
    assert np.abs(again - full[:, L - 4 :]).max() < ATOL


def test_kv_cache_grows_past_step():
    """Appends that cross the 256-position growth step keep every earlier entry."""
    from mlx_smolvlm.cache import KVCache

    cache = KVCache()
    k = mx.random.normal((1, 2, 300, 4))
    v = mx.random.normal((1, 2, 300, 4))
    cache.update_and_fetch(k[:, :, :200], v[:, :, :200])
    keys, values = cache.update_and_fetch(k[:, :, 200:], v[:, :, 200:])
    assert cache.offset == 300
    assert mx.array_equal(keys, k).item() and mx.array_equal(values, v).item()
    assert cache.trim(500) == 300 and cache.offset == 0
    with pytest.raises(ValueError, match="negative"):
        cache.trim(-1)


def test_only_padding_images_smolvlm(loaded):
    """SmolVLM keeps the first image when all are all-zero padding, as transformers does."""
    model, ref, kwargs = loaded("gqa_p16_tile64_s2")
    ids = np.array([make_prompt(np.random.default_rng(8), 1, image_seq_len(kwargs))])
    pixels = np.zeros((1, 2, 3, 64, 64), np.float32)
    assert max_diff(model(ids, pixels), hf_logits(ref, ids, pixels)) < ATOL
