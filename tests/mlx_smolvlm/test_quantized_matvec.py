"""The C quantized matrix-vector kernel equals ``mx.quantized_matmul`` within float rounding,
and the decoder uses it on the CPU backend without changing its output."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_smolvlm import quantized_matvec
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
    # Prefill (4 rows: the kernel's too) and the step each: q/k/v, o, gate/up and down per decoder layer, and the
    # head; at 4 bits not down_proj, whose 96 inputs are not a multiple of the kernel's blocks
    # of 64 values (MLX's kernel takes it).
    per_layer = 4 if bits == 8 else 3
    assert quantized_matvec.calls() - calls == 2 * (per_layer * len(model.text_model.layers) + 1)
    np.testing.assert_allclose(fast, decode_step("off"), atol=1e-4)
