"""Parity with transformers and greedy generation on a trained decoder.

The checkpoint is SmolVLM2-256M's architecture with SmolLM2-135M-Instruct as the decoder and a
random vision tower (``benchmarks/trained_weights.py``, built once per machine). Trained weights
have the outlier activations that random ones lack, so these bounds are the real numerical test.
Tiles are single 512x512 images (no splitting) to keep the vision tower's cost small; each
tile still costs seconds per framework, so the image tests are the bulk of this file's time.

Measured (fp32, 2-core x86 CPU): max |logit diff| 9.9e-5 text, 4.8e-4 one image, 4.0e-4 two
images, 1.6e-4 two video frames (3.0e-4 with three; logit std 5.6-8.4); top-1 agreement 100 %
everywhere. The video test uses two frames to keep the default suite's cost down.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.trained_weights import trained_checkpoint
from mlx_smolvlm.generate import generate
from mlx_smolvlm.load import load
from mlx_smolvlm.processing import PreparedPrompt
from mlx_smolvlm.prompt import image_prompt, video_prompt
from mlx_smolvlm.random_weights import ASSETS

ATOL = 2e-3
TILE = 512
# Crops of the example photo, as (left, top, right, bottom) fractions: distinct images.
CROPS = ((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.6), (0.4, 0.3, 1.0, 1.0))


@pytest.fixture(scope="module")
def models(hf_reference):
    path = trained_checkpoint()
    model, processor = load(str(path), dtype="float32")
    return model, processor, hf_reference(path)


def tiles(n: int) -> np.ndarray:
    """``(1, n, 3, 512, 512)`` pixels: ``n`` crops of the example photo, normalized as the
    processor does (mean and std 0.5)."""
    photo = Image.open(ASSETS / "example.jpg").convert("RGB")
    w, h = photo.size
    out = []
    for left, top, right, bottom in CROPS[:n]:
        crop = photo.crop((int(left * w), int(top * h), int(right * w), int(bottom * h)))
        pixels = np.asarray(crop.resize((TILE, TILE), Image.Resampling.LANCZOS), np.float32)
        out.append(((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)[None]


def prompt_ids(processor, media: str, question: str) -> np.ndarray:
    text = f"<|im_start|>User:{media}{question}<end_of_utterance>\nAssistant:"
    return np.array([processor.tokenizer.encode(text)])


def compare(model, ref, ids: np.ndarray, pixels: np.ndarray | None = None) -> float:
    """Max |logit diff| over every position; asserts top-1 agreement everywhere."""
    ours = np.array(model(mx.array(ids), None if pixels is None else mx.array(pixels)))
    kwargs = {"input_ids": torch.from_numpy(ids)}
    if pixels is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixels)
    with torch.no_grad():
        theirs = ref(**kwargs).logits.numpy()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    diff = float(np.abs(ours - theirs).max())
    print(f"max |logit diff| {diff:.2e} over {ids.shape[1]} positions (std {theirs.std():.2f})")
    return diff


def test_text_parity(models):
    model, processor, ref = models
    ids = np.array([processor.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert compare(model, ref, ids) < ATOL


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_parity(models, n_images):
    model, processor, ref = models
    media = "".join(image_prompt(0, 0, processor.image_seq_len) for _ in range(n_images))
    ids = prompt_ids(processor, media, "What do you see?")
    assert compare(model, ref, ids, tiles(n_images)) < ATOL


def test_video_frames_parity(models):
    model, processor, ref = models
    media = video_prompt([0.0, 1.5], 3.0, processor.image_seq_len)
    ids = prompt_ids(processor, media, "What happens in this video?")
    assert compare(model, ref, ids, tiles(2)) < ATOL


def greedy_reference(ref, ids: np.ndarray, n: int, pixels: np.ndarray | None = None) -> list:
    kwargs = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.ones(ids.shape, dtype=torch.long),
    }
    if pixels is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixels)
    with torch.no_grad():
        out = ref.generate(**kwargs, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_text_equals_transformers_and_knows_paris(models):
    model, processor, ref = models
    prompt = processor("The capital of France is")
    result = generate(model, processor, prompt, max_tokens=12)
    assert result.tokens == greedy_reference(ref, np.array([prompt.input_ids]), 12)
    assert "Paris" in result.text, result.text


@pytest.mark.slow  # a vision pass in each framework plus 8 decode steps: about 50 s on 2 cores
def test_greedy_with_an_image_equals_transformers(models):
    model, processor, ref = models
    ids = prompt_ids(processor, image_prompt(0, 0, processor.image_seq_len), "Describe the image.")
    pixels = tiles(1)
    prompt = PreparedPrompt(ids[0].tolist(), pixels[0], tile_hashes=["example/0"])
    result = generate(model, processor, prompt, max_tokens=8)
    assert result.tokens == greedy_reference(ref, ids, 8, pixels)
