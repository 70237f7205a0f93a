"""The C quantized matrix-vector kernel equals ``mx.quantized_matmul`` within float rounding,
and the decoder uses it on the CPU backend without changing its output."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from benchmarks.trained_weights import trained_checkpoint
from mlx_smolvlm import quantized_matvec
from mlx_smolvlm.cache import BatchKVCache
from mlx_smolvlm.generate import generate
from mlx_smolvlm.load import load
from mlx_smolvlm.quantize import QuantizationSpec, quantize_model

# Relative to the largest |output|: both sum about K products in float32, in different orders.
RTOL = 2e-6 * 32


@pytest.fixture(params=["avx2", "portable"])
def kernel(request):
    lib = quantized_matvec.library(force_portable=request.param == "portable")
    assert lib is not None, "the kernel must build here (a C compiler is part of the test setup)"
    yield request.param
    quantized_matvec.library()


def quantized_linear(rows: int, K: int, bits: int, group: int, seed: int) -> nn.QuantizedLinear:
    mx.random.seed(seed)
    linear = nn.Linear(K, rows, bias=False)
    linear.weight = mx.random.normal((rows, K)) * 0.05
    return nn.QuantizedLinear.from_linear(linear, group_size=group, bits=bits)


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= RTOL * scale, np.abs(got - expected).max() / scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_equals_mlx_quantized_matmul(kernel, bits, group):
    # K = 768 takes every group size; 200 + 72 rows are not a multiple of the threads' chunks.
    layers = (quantized_linear(200, 768, bits, group, 0), quantized_linear(72, 768, bits, group, 1))
    for M in range(1, quantized_matvec.MAX_ROWS + 1):
        x = mx.random.normal((M, 768))
        got = quantized_matvec.matvec(np.asarray(x), layers)
        expected = np.concatenate([np.array(layer(x)) for layer in layers], axis=1)
        assert got.shape == (M, 272)
        assert_close(got, expected)


def test_a_large_matrix_split_over_threads(kernel):
    head = quantized_linear(4099, 576, 4, 64, 2)  # rows in many chunks, the last one partial
    x = mx.random.normal((3, 576))
    assert_close(quantized_matvec.matvec(np.asarray(x), (head,)), np.array(head(x)))


def test_project_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    layer = quantized_linear(64, 768, 4, 64, 3)
    dense = nn.Linear(768, 64)
    calls = quantized_matvec.calls()
    for x, layers in [
        (mx.random.normal((1, 768)).astype(mx.bfloat16), (layer,)),  # not float32
        (mx.random.normal((1, 768)), (layer, dense)),  # not all quantized
    ]:
        got = quantized_matvec.project(x, *layers)
        for y, lin in zip(got, layers, strict=True):
            np.testing.assert_array_equal(np.array(y), np.array(lin(x)))
    assert quantized_matvec.calls() == calls
    monkeypatch.setenv("MLX_SMOLVLM_QMV", "off")
    x = mx.random.normal((1, 768))
    np.testing.assert_array_equal(np.array(quantized_matvec.project(x, layer)[0]), layer(x))
    assert quantized_matvec.calls() == calls
    monkeypatch.delenv("MLX_SMOLVLM_QMV")
    (y,) = quantized_matvec.project(x.reshape(1, 1, 768), layer)
    assert y.shape == (1, 1, 64) and quantized_matvec.calls() == calls + 1
    assert_close(np.array(y[0]), np.array(layer(x)))
    # More rows than the kernel takes (prefill): the fp32 product of the dequantized weight.
    x = mx.random.normal((2, 40, 768))
    (y,) = quantized_matvec.project(x, layer)
    assert y.shape == (2, 40, 64) and quantized_matvec.calls() == calls + 1
    assert_close(np.array(y), np.array(layer(x)))


@pytest.mark.parametrize("bits", [4, 8])
def test_decoder_uses_the_kernel_and_keeps_its_output(hf_checkpoint, monkeypatch, bits):
    model, _ = load(str(hf_checkpoint()))
    quantize_model(model, QuantizationSpec(bits=bits, group_size=32))
    ids = mx.array([[5, 6, 7, 8]])

    def decode_step(qmv: str) -> np.ndarray:
        monkeypatch.setenv("MLX_SMOLVLM_QMV", qmv)
        cache = model.make_cache()
        model(ids, cache=cache)
        return np.array(model(mx.array([[9]]), cache=cache)[0, -1])

    calls = quantized_matvec.calls()
    fast = decode_step("on")
    # Prefill (4 rows: the kernel's too) and the step each. At 8 bits the whole decoder is one
    # call, then the head; at 4 bits down_proj's 96 inputs are not a multiple of the kernel's
    # blocks of 64 values, so the layers run one by one: q/k/v, o and gate/up per layer (MLX's
    # kernel takes down_proj), and the head.
    per_pass = 2 if bits == 8 else 3 * len(model.text_model.layers) + 1
    assert quantized_matvec.calls() - calls == 2 * per_pass
    np.testing.assert_allclose(fast, decode_step("off"), atol=1e-4)


@pytest.fixture(params=[(4, 32), (8, 64)], ids=["4bit-g32", "8bit-g64"])
def quantized_decoder(request, hf_checkpoint):
    """A tiny model whose every decoder product the kernel takes (MLP width 128)."""
    bits, group = request.param
    model, _ = load(str(hf_checkpoint(intermediate_size=128)))
    quantize_model(model, QuantizationSpec(bits=bits, group_size=group))
    return model


def with_and_without_the_kernel(monkeypatch, run) -> tuple[list, list]:
    """``run()`` through the decoder kernel, then through MLX's own quantized products."""
    calls = quantized_matvec.calls()
    fused = run()
    assert quantized_matvec.calls() > calls
    monkeypatch.setenv("MLX_SMOLVLM_QMV", "off")
    reference = run()
    monkeypatch.delenv("MLX_SMOLVLM_QMV")
    return fused, reference


def assert_all_close(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_decoder_kernel_keeps_the_decoders_output_and_cache(kernel, quantized_decoder, monkeypatch):
    model = quantized_decoder
    layers = len(model.text_model.layers)

    def run() -> list[np.ndarray]:
        cache = model.make_cache()
        calls = quantized_matvec.calls()
        outputs = [
            model(mx.array([[5, 6, 7, 8, 9]]), cache=cache),  # an empty cache, causal rows
            model(mx.array([[10]]), cache=cache),
            model(mx.array([[11, 12, 13]]), cache=cache),  # causal after the cached columns
        ]
        if os.environ.get("MLX_SMOLVLM_QMV") != "off":
            assert quantized_matvec.calls() - calls == 3 * 2  # the decoder and the head each
        keys, values = zip(*(c.state for c in cache), strict=True)
        assert all(c.offset == 9 for c in cache) and len(keys) == layers
        return [np.array(a) for a in (*outputs, *keys, *values)]

    assert_all_close(*with_and_without_the_kernel(monkeypatch, run))


def test_decoder_kernel_past_the_caches_first_allocation(quantized_decoder, monkeypatch):
    model = quantized_decoder
    prompt = mx.array(np.random.default_rng(0).integers(3, 200, (1, 250)))

    def run() -> list[np.ndarray]:
        cache = model.make_cache()
        outputs = [model(prompt, cache=cache)]  # 250 rows: MLX on the dequantized weights
        for token in range(10):  # the cache grows past its 256 columns on the way
            outputs.append(model(mx.array([[token + 3]]), cache=cache))
        return [np.array(a) for a in outputs]

    assert_all_close(*with_and_without_the_kernel(monkeypatch, run))


def test_decoder_kernel_on_a_padded_batch(kernel, quantized_decoder, monkeypatch):
    model = quantized_decoder
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    ids = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])

    def run() -> list[np.ndarray]:
        cache = [BatchKVCache(padding) for _ in model.text_model.layers]
        outputs = [model(ids, cache=cache, mask=cache[0].make_mask(width))]
        for step in range(3):  # one new row per sequence, then two
            new = mx.array([[20 + step], [30 + step]])
            if step == 2:
                new = mx.concatenate([new, new + 1], axis=1)
            calls = quantized_matvec.calls()
            outputs.append(model(new, cache=cache, mask=cache[0].make_mask(new.shape[1])))
            if os.environ.get("MLX_SMOLVLM_QMV") != "off":
                assert quantized_matvec.calls() - calls == 2  # the decoder and the head
        return [np.array(a) for a in outputs]

    assert_all_close(*with_and_without_the_kernel(monkeypatch, run))


def test_4bit_greedy_on_trained_weights_is_unchanged_by_the_kernels(monkeypatch):
    model, processor = load(str(trained_checkpoint()), dtype="float32")
    quantize_model(model, QuantizationSpec(bits=4, quantize_vision=False))
    prompt = processor("The capital of France is")
    one_row = mx.zeros((1, 1, model.config.text_config.hidden_size))
    layers = model.text_model.layers
    assert quantized_matvec.layer_plans(layers, one_row, None, model.make_cache()) is not None

    def run() -> list[list[int]]:
        return [generate(model, processor, prompt, max_tokens=16).tokens]

    fused, reference = with_and_without_the_kernel(monkeypatch, run)
    assert fused == reference
