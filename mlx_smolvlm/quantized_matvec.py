"""Quantized decode products on MLX's CPU backend, through a compiled C kernel.

MLX's CPU kernel for ``mx.quantized_matmul`` is a scalar loop: a 4-bit 256M model decoded
about 2.5x slower than fp32, though it reads a sixth of the bytes. ``quantized_matvec.c`` is a
vectorized one (AVX2/FMA, checked at run time, else portable C) for the products of decoding,
1-8 rows against 4- or 8-bit affine weights (groups of 32, 64 or 128, fp32 scales: the CPU
path's ``load(dtype="float32")``), on both cores. It is compiled with the system C compiler on
first use and cached under ``~/.cache/mlx_smolvlm/`` like the BLAS shim (``blas.py``).

The kernel runs outside MLX's graph: its input must be evaluated first, which waits for MLX's
stream. ``project`` therefore takes every Linear that reads the same input (q/k/v, gate/up)
in one call, so a decoder layer waits four times (q/k/v, o, gate/up, down) and the head once.

Products of more rows (prefill: hundreds of prompt tokens) are computed from the dequantized
weight by the fp32 BLAS instead (``x @ dequantize(W).T``, in MLX's graph): dequantizing costs
one pass over the weight, where MLX's quantized matrix-matrix kernel runs at about 1 GFLOP/s.

Used when the CPU backend's choices are made (``device_ops.cpu_choices``), unless
``MLX_SMOLVLM_QMV=off``; anything else (other bits, group sizes or dtypes, no C compiler) goes
to MLX's own ``QuantizedLinear``. ``calls()`` counts the kernel's
calls (for tests and benchmarks).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import build_c_library
from .device_ops import cpu_choices

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quantized_matvec.c")
MAX_ROWS = 8
MAX_MATRICES = 4
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
BLOCK_WORDS = 8  # the kernel's unit: K must be a multiple of 8 packed words

_state: dict[str, object] = {"library": None, "tried": False, "calls": 0}


def library(force_portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None without a C compiler.

    Args:
        force_portable: Use the portable C kernel even where AVX2/FMA exist (for tests).
    """
    if not _state["tried"]:
        _state["tried"] = True
        path = build_c_library(SOURCE, [])
        if path is None:
            logger.warning(
                "The quantized matrix-vector kernel did not build (no C compiler?): quantized "
                "decoding uses MLX's scalar kernel"
            )
        else:
            lib = ctypes.CDLL(str(path))
            lib.mlx_smolvlm_qmv.restype = ctypes.c_int
            _state["library"] = lib
    lib = _state["library"]
    if lib is not None:
        lib.mlx_smolvlm_qmv_init(int(force_portable))
    return lib


def enabled() -> bool:
    """Whether ``project`` uses the kernel (the CPU backend's choices, and not turned off)."""
    if os.environ.get("MLX_SMOLVLM_QMV") == "off" or not cpu_choices():
        return False
    return (_state["library"] if _state["tried"] else library()) is not None


def calls() -> int:
    """How many products the kernel has computed in this process."""
    return int(_state["calls"])


@dataclass(frozen=True)
class _Weights:
    """A QuantizedLinear's arrays (kept alive here) and their addresses."""

    arrays: tuple[mx.array, mx.array, mx.array]
    pointers: tuple[int, int, int]
    rows: int


def _weights(linear: nn.Module) -> _Weights:
    """The layer's arrays and addresses, cached on it until its weights change."""
    arrays = (linear.weight, linear.scales, linear.biases)
    cached = linear.__dict__.get("_qmv_weights")
    if cached is not None and all(a is b for a, b in zip(cached.arrays, arrays, strict=True)):
        return cached
    mx.eval(*arrays)
    views = [np.asarray(a) for a in arrays]  # zero-copy views of MLX's buffers
    if not all(v.flags.c_contiguous for v in views):
        views = [np.ascontiguousarray(v) for v in views]
        arrays = tuple(mx.array(v) for v in views)
        views = [np.asarray(a) for a in arrays]
    weights = _Weights(arrays, tuple(v.ctypes.data for v in views), linear.weight.shape[0])
    # A plain attribute, not a child: Module keeps it out of parameters() and update().
    object.__setattr__(linear, "_qmv_weights", weights)
    return weights


QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _apply(layer: nn.Module, x: mx.array) -> mx.array:
    """The layer's product with ``x``: an embedding's is with its transpose (a tied head)."""
    return (
        layer.as_linear(x) if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)) else layer(x)
    )


def _fits(x: mx.array, linears: tuple[nn.Module, ...]) -> bool:
    """Whether the kernel (or, past ``MAX_ROWS`` rows, the dequantized product) takes these
    layers on this input."""
    first = linears[0]
    if not isinstance(first, QUANTIZED) or len(linears) > MAX_MATRICES:
        return False
    K = x.shape[-1]
    bits, group = first.bits, first.group_size
    return (
        x.dtype == mx.float32
        and bits in BITS
        and group in GROUP_SIZES
        and K % (BLOCK_WORDS * 32 // bits) == 0
        and all(
            isinstance(lin, QUANTIZED)
            and lin.mode == "affine"
            and (lin.bits, lin.group_size) == (bits, group)
            and lin.scales.dtype == mx.float32
            and lin.biases.dtype == mx.float32
            and lin.weight.shape[1] * 32 // bits == K
            for lin in linears
        )
    )


def matvec(x: np.ndarray, linears: tuple[nn.Module, ...]) -> np.ndarray:
    """``x @ W_i.T`` for each layer, side by side: ``(M, sum of the layers' outputs)``.

    Args:
        x: ``(M, K)`` float32, C-contiguous, M <= 8.
        linears: Up to four QuantizedLinear (or QuantizedEmbedding, as a tied head) layers
            that ``_fits`` accepts with ``x`` (their biases are not added).

    Raises:
        RuntimeError: If the kernel is not built or rejects the arguments.
    """
    lib = _state["library"]
    if lib is None:
        raise RuntimeError("the quantized matrix-vector kernel is not built")
    M, K = x.shape
    weights = [_weights(lin) for lin in linears]
    n = len(weights)
    out = np.empty((M, sum(w.rows for w in weights)), np.float32)
    pointer_array = ctypes.c_void_p * n
    status = lib.mlx_smolvlm_qmv(
        M,
        K,
        linears[0].bits,
        linears[0].group_size,
        ctypes.c_void_p(x.ctypes.data),
        n,
        pointer_array(*(w.pointers[0] for w in weights)),
        pointer_array(*(w.pointers[1] for w in weights)),
        pointer_array(*(w.pointers[2] for w in weights)),
        (ctypes.c_int * n)(*(w.rows for w in weights)),
        ctypes.c_void_p(out.ctypes.data),
        out.shape[1],
    )
    if status != 0:
        raise RuntimeError(f"the quantized matrix-vector kernel rejected its arguments ({status})")
    _state["calls"] = calls() + 1
    return out


def _dequantized_product(x: mx.array, linear: nn.Module) -> mx.array:
    """``linear(x)`` through the fp32 BLAS on the dequantized weight."""
    w = mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    y = x @ w.T
    return y + linear.bias if "bias" in linear else y


def project(x: mx.array, *linears: nn.Module) -> list[mx.array]:
    """Apply each layer to ``x``: ``[linear(x) for linear in linears]``, through the kernel
    when it takes them (one wait for MLX's stream for all of them).

    Args:
        x: ``(..., K)`` input.
        *linears: Layers that read ``x``: Linear or QuantizedLinear, or an embedding, whose
            transpose is applied (``as_linear``: a tied head).
    """
    if not enabled() or not _fits(x, linears):
        return [_apply(linear, x) for linear in linears]
    if math.prod(x.shape[:-1]) > MAX_ROWS:
        return [_dequantized_product(x, linear) for linear in linears]
    *lead, K = x.shape
    rows = mx.contiguous(x.reshape(-1, K))
    mx.eval(rows)
    out = mx.array(matvec(np.asarray(rows), linears))
    results, start = [], 0
    for linear in linears:
        end = start + linear.weight.shape[0]
        y = out[:, start:end].reshape(*lead, end - start)
        results.append(y + linear.bias if "bias" in linear else y)
        start = end
    return results
