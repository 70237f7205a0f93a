"""Quantized decoding on MLX's CPU backend, through a compiled C kernel.

MLX's CPU kernel for ``mx.quantized_matmul`` is a scalar loop: a 4-bit 256M model decoded
about 2.5x slower than fp32, though it reads a sixth of the bytes. ``quantized_matvec.c`` is a
vectorized one (AVX2/FMA, checked at run time, else portable C) for the products of decoding,
1-8 rows against 4- or 8-bit affine weights (groups of 32, 64 or 128, fp32 scales: the CPU
path's ``load(dtype="float32")``), on both cores. It is compiled with the system C compiler on
first use and cached under ``~/.cache/mlx_smolvlm/`` like the BLAS shim (``blas.py``).

The kernel runs outside MLX's graph: its input must be evaluated first, which waits for MLX's
stream (about 50 us), and every MLX operation between two products costs a few microseconds
more. So a decoding step's layers run in one call (``decode_layers``): the C side does every
layer's norms, products, RoPE, attention over the key/value cache, SiLU and residuals, and
returns each layer's new keys and values, which MLX then appends to the caches (MLX owns them:
its in-place update, or its copy when a buffer is shared, stays MLX's decision). ``TextModel``
takes that path when ``layer_plans`` accepts the step: at most ``MAX_ROWS`` float32 rows, every
layer's linears quantized as the kernel takes them, a causal or boolean mask.

Elsewhere ``project`` applies single layers (the head; a decoder the kernel does not take),
every Linear that reads the same input in one call (q/k/v, gate/up). Products of more rows
(prefill: hundreds of prompt tokens) are computed from the dequantized weights by the fp32
BLAS instead (``x @ dequantize(W).T``, in MLX's graph): dequantizing costs one pass over the
weight, where MLX's quantized matrix-matrix kernel runs at about 1 GFLOP/s.

Used when the CPU backend's choices are made (``device_ops.cpu_choices``), unless
``MLX_SMOLVLM_QMV=off``; anything else (other bits, group sizes or dtypes, no C compiler) goes
to MLX's own ``QuantizedLinear``. ``calls()`` counts the kernel's calls (for tests and
benchmarks).
"""

from __future__ import annotations

import ctypes
import logging
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import build_c_library
from .cache import BatchKVCache, KVCache
from .config import TextConfig
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
    return (
        x.dtype == mx.float32
        and len(linears) <= MAX_MATRICES
        and _quantized_alike(linears, x.shape[-1])
    )


def _quantized_alike(linears: tuple[nn.Module, ...], K: int) -> bool:
    """Whether the layers are quantized alike in a way the kernel takes, with ``K`` inputs."""
    first = linears[0]
    if not isinstance(first, QUANTIZED):
        return False
    bits, group = first.bits, first.group_size
    return (
        bits in BITS
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


# ---- the decoder's layers in one call (``mlx_smolvlm_decode`` in the C source) ----------------

# The phases of a decoder layer that the kernel times, in its order (``N_PHASES`` in C).
PHASES = (
    "rms_norm",
    "qkv_proj",
    "rope",
    "attention",
    "o_proj",
    "residual_add",
    "gate_up_proj",
    "silu_mul",
    "down_proj",
)

# A decoder layer's linears: (module, attribute) in the C struct's order.
LAYER_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("biases", ctypes.c_void_p),
        ("rows", ctypes.c_int),
        ("bits", ctypes.c_int),
        ("group", ctypes.c_int),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Linear) for _, name in LAYER_LINEARS] + [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
    ]


class _Dims(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int),
        ("intermediate", ctypes.c_int),
        ("n_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("norm_eps", ctypes.c_float),
        ("rope_theta", ctypes.c_float),
    ]


def _layer_arrays(layer: nn.Module) -> tuple[mx.array, ...] | None:
    """The arrays the kernel reads of a decoder layer, or None when a linear is not quantized
    (items, not attributes: this runs per layer and step)."""
    linears = [layer[module][name] for module, name in LAYER_LINEARS]
    if not all("scales" in linear for linear in linears):
        return None
    return (
        *[linear[key] for linear in linears for key in ("weight", "scales", "biases")],
        layer["input_layernorm"]["weight"],
        layer["post_attention_layernorm"]["weight"],
    )


def _layer_fits(layer: nn.Module) -> bool:
    """Whether the kernel takes the layer: quantized linears without biases, q/k/v alike and
    gate/up alike, fp32 norms."""
    attn, mlp = layer.self_attn, layer.mlp
    jobs = (
        (attn.q_proj, attn.k_proj, attn.v_proj),
        (attn.o_proj,),
        (mlp.gate_proj, mlp.up_proj),
        (mlp.down_proj,),
    )
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return all(
        all(isinstance(lin, nn.QuantizedLinear) and "bias" not in lin for lin in linears)
        and _quantized_alike(linears, linears[0].weight.shape[1] * 32 // linears[0].bits)
        for linears in jobs
    ) and all(norm.weight.dtype == mx.float32 for norm in norms)


def _layer_plan(layer: nn.Module) -> _Layer | None:
    """The layer's C struct (cached on it until its arrays change), or None if the kernel
    does not take the layer."""
    arrays = _layer_arrays(layer)
    if arrays is None:
        return None
    cached = layer.__dict__.get("_qmv_layer")
    if cached is not None and all(map(operator.is_, cached[0], arrays)):
        return cached[1]
    plan = None
    if _layer_fits(layer):
        linears = [_weights(layer[module][name]) for module, name in LAYER_LINEARS]
        norms = [np.ascontiguousarray(np.asarray(a)) for a in arrays[-2:]]
        plan = _Layer(
            *(
                _Linear(
                    *w.pointers, w.rows, layer[module][name].bits, layer[module][name].group_size
                )
                for w, (module, name) in zip(linears, LAYER_LINEARS, strict=True)
            ),
            *(norm.ctypes.data for norm in norms),
        )
        plan._keep = (linears, norms)  # the buffers its pointers point into
    object.__setattr__(layer, "_qmv_layer", (arrays, plan))
    return plan


def layer_plans(
    layers: list[nn.Module],
    h: mx.array,
    mask: mx.array | str | None,
    caches: list[KVCache | BatchKVCache],
) -> list[_Layer] | None:
    """The decoder layers' C structs when ``decode_layers`` takes this step, else None: a few
    float32 rows, every layer quantized as the kernel takes it, float32 caches alike, and a
    causal or boolean mask shared by the heads.

    Args:
        layers: The decoder's layers.
        h: ``(B, L, hidden)`` input embeddings.
        mask: The attention mask, as ``TextModel`` takes it.
        caches: Each layer's cache.
    """
    if h.dtype != mx.float32 or h.shape[0] * h.shape[1] > MAX_ROWS or not enabled():
        return None
    if isinstance(mask, mx.array) and (
        mask.dtype != mx.bool_ or mask.ndim != 4 or mask.shape[1] != 1
    ):
        return None
    first = caches[0].keys
    shape = None if first is None else first.shape
    for cache in caches:
        keys, values = cache.keys, cache.values
        if cache.columns != caches[0].columns or (keys is None) != (first is None):
            return None
        if keys is not None and not (
            keys.shape == values.shape == shape
            and keys.dtype == values.dtype == mx.float32
            and shape[0] == h.shape[0]
        ):
            return None
    plans = [_layer_plan(layer) for layer in layers]
    return None if any(plan is None for plan in plans) else plans


def decode_layers(
    plans: list[_Layer],
    config: TextConfig,
    h: mx.array,
    mask: mx.array | str | None,
    caches: list[KVCache | BatchKVCache],
    offset: int | mx.array,
    phase_ns: np.ndarray | None = None,
) -> mx.array:
    """Run the decoder layers on a few new rows in one call of the kernel (products, norms,
    SiLU, RoPE, attention over the cache), then append their keys and values to the caches.

    Args:
        plans: ``layer_plans(...)`` of this step.
        config: The decoder's config.
        h: ``(B, L, hidden)`` input embeddings.
        mask: ``None`` or ``"causal"`` (row ``l`` sees the cached columns and new rows up to
            ``l``), or a boolean ``(B, 1, L, columns + L)`` mask (True attends).
        caches: Each layer's cache.
        offset: The first new position: an int, or ``[B]`` per-row positions.
        phase_ns: ``len(PHASES)`` int64 counters that the kernel adds each phase's
            nanoseconds to (``benchmarks/profile_decode.py``), or None.

    Returns:
        ``(B, L, hidden)``: the last layer's output (before the final norm).

    Raises:
        RuntimeError: If the kernel rejects its arguments.
    """
    B, L, D = h.shape
    M, hd, n_kv = B * L, config.head_dim, config.num_key_value_heads
    start = np.asarray(offset).reshape(-1, 1) if isinstance(offset, mx.array) else offset
    positions = np.ascontiguousarray(np.broadcast_to(start + np.arange(L), (B, L)), np.int32)
    cached = caches[0].columns
    if isinstance(mask, mx.array):
        mask = np.ascontiguousarray(np.broadcast_to(np.asarray(mask), (B, 1, L, cached + L)))
    hidden = np.array(h.reshape(M, D), dtype=np.float32)  # the residual stream, updated in C
    new_kv = np.empty((len(plans), 2, B, n_kv, L, hd), np.float32)
    _run_decode(plans, config, hidden, positions, caches, mask, new_kv, phase_ns)
    for cache, (keys, values) in zip(caches, new_kv, strict=True):
        cache.append(mx.array(keys), mx.array(values))  # copies: no slicing in MLX's graph
    # Written now, in place where MLX can: nothing else holds the caches' buffers.
    mx.eval([(cache.keys, cache.values) for cache in caches])
    return mx.array(hidden).reshape(B, L, D)


def _run_decode(
    plans: list[_Layer],
    config: TextConfig,
    hidden: np.ndarray,
    positions: np.ndarray,
    caches: list[KVCache | BatchKVCache],
    mask: np.ndarray | None,
    new_kv: np.ndarray,
    phase_ns: np.ndarray | None,
) -> None:
    """Call the kernel; the NumPy views of the caches end with this function."""
    n = len(plans)
    cached = caches[0].columns
    if cached:
        mx.eval([(cache.keys, cache.values) for cache in caches])
        views = [np.asarray(a) for cache in caches for a in (cache.keys, cache.values)]
        views = [v if v.flags.c_contiguous else np.ascontiguousarray(v) for v in views]
        keys = (ctypes.c_void_p * n)(*(v.ctypes.data for v in views[0::2]))
        values = (ctypes.c_void_p * n)(*(v.ctypes.data for v in views[1::2]))
        capacity = views[0].shape[2]
    else:
        keys = values = None
        capacity = 0
    dims = _Dims(
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.rms_norm_eps,
        config.rope_theta,
    )
    status = _state["library"].mlx_smolvlm_decode(
        ctypes.byref(dims),
        (_Layer * n)(*plans),
        n,
        hidden.shape[0],
        positions.shape[1],
        ctypes.c_void_p(hidden.ctypes.data),
        ctypes.c_void_p(positions.ctypes.data),
        keys,
        values,
        cached,
        capacity,
        None if isinstance(mask, str) or mask is None else ctypes.c_void_p(mask.ctypes.data),
        ctypes.c_void_p(new_kv.ctypes.data),
        None if phase_ns is None else ctypes.c_void_p(phase_ns.ctypes.data),
    )
    if status != 0:
        raise RuntimeError(f"the decoder kernel rejected its arguments ({status})")
    _state["calls"] = calls() + 1
