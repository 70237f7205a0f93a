"""Per-device speed choices: the compute dtype, and attention, GELU and SiLU implementations.

``compute_dtype`` picks the dtype to compute in: float32 on MLX's CPU backend, where only
float32 matrix products reach the optimized BLAS (bfloat16 and float16 ones are scalar loops,
50x slower), and the checkpoint's own dtype on GPUs (Metal, CUDA), where bfloat16/float16 halve
the memory traffic. ``MLX_SMOLVLM_DTYPE`` (``float32``, ``bfloat16``, ``float16``) overrides it.

MLX's Linux CPU backend evaluates ``exp``, ``tanh``, ``sin`` and ``cos`` one value at a time
(about 10 ns per value on the project's machines, 15-25x NumPy's vectorized versions), which makes
the softmax of attention and the GELU of the vision tower most of the time to encode an image,
and has no kernels for ``mx.fast`` attention and RoPE (each call runs as a dozen small
operations). On that backend, therefore:

- float32 inputs of at least ``MIN_SIZE`` elements are evaluated, viewed by NumPy without a copy,
  transformed there, and copied back (attention one head at a time);
- smaller ones (every decode step) stay lazy in MLX, with attention and SiLU written out and
  ``exp(x)`` computed as ``2 ** (x log2 e)`` (``power`` is vectorized), and RoPE from cosine and
  sine tables made once per forward pass (`Rotary`), so the decode loop never waits on the host.

Every other device (Metal, CUDA) keeps MLX's own fused operations and GPU graphs stay lazy.

``MLX_SMOLVLM_DEVICE_CHOICES`` picks which device's choices are made, whatever device runs:
``auto`` (default: the default device's), ``cpu`` or ``gpu``. ``gpu`` on the CPU backend runs
the code path of a Mac or CUDA GPU (``mx.fast`` attention and RoPE, ``nn.silu``, the
checkpoint's dtype, MLX's quantized matmuls, no NumPy and no quantized matrix-vector shim), so
that path is tested on machines without a GPU (``tests/mlx_smolvlm/test_gpu_path.py``).

The choice is automatic; the environment variable ``MLX_SMOLVLM_KERNELS`` overrides it:
``auto`` (default: the choices above on the CPU device), ``mlx`` (always MLX's own operations) or
``numpy`` (NumPy for every float32 input of at least ``MIN_SIZE`` elements, on any device). The NumPy path cannot
run inside ``mx.compile``, ``mx.grad`` or ``mx.vmap`` transformations.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

MODES = ("auto", "mlx", "numpy")
DEVICE_CHOICES = ("auto", "cpu", "gpu")
MIN_SIZE = 1 << 16
# The NumPy attention path scores, softmaxes and applies this many values at a time: one
# 1024 x 1024 head of a SigLIP tile (4 MB) stays in cache through the three steps, where
# the whole batch's scores (650 MB for a 13-tile image) would go to memory and back at each.
CHUNK_VALUES = 1 << 20
GELU_C = 0.7978845608028654  # sqrt(2 / pi)
LOG2_E = 1.4426950408889634


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def compute_dtype(checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype to load floating-point weights in on the default device.

    Args:
        checkpoint_dtype: The dtype the checkpoint stores its weights in.

    Raises:
        ValueError: If ``MLX_SMOLVLM_DTYPE`` names an unsupported dtype.
    """
    choice = os.environ.get("MLX_SMOLVLM_DTYPE")
    if choice is not None:
        if choice not in DTYPES:
            raise ValueError(f"MLX_SMOLVLM_DTYPE={choice!r} is not one of {list(DTYPES)}")
        return DTYPES[choice]
    return mx.float32 if cpu_choices() else checkpoint_dtype


def cpu_choices() -> bool:
    """Whether to make the CPU backend's choices (``MLX_SMOLVLM_DEVICE_CHOICES``, else the
    default device).

    Raises:
        ValueError: If the variable holds an unknown value.
    """
    choice = os.environ.get("MLX_SMOLVLM_DEVICE_CHOICES", "auto")
    if choice not in DEVICE_CHOICES:
        raise ValueError(
            f"MLX_SMOLVLM_DEVICE_CHOICES={choice!r} is not one of {list(DEVICE_CHOICES)}"
        )
    return mx.default_device() == mx.cpu if choice == "auto" else choice == "cpu"


def kernel_mode() -> str:
    """The ``MLX_SMOLVLM_KERNELS`` setting.

    Raises:
        ValueError: If the variable holds an unknown mode.
    """
    mode = os.environ.get("MLX_SMOLVLM_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MLX_SMOLVLM_KERNELS={mode!r} is not one of {list(MODES)}")
    return mode


def use_numpy(x: mx.array, size: int | None = None) -> bool:
    """Whether an operation on ``x`` (or producing ``size`` elements) runs in NumPy.

    Args:
        x: The input; only float32 goes to NumPy (it has no bfloat16).
        size: Elements of the largest intermediate, when larger than ``x``.
    """
    mode = kernel_mode()
    if mode == "mlx" or x.dtype != mx.float32 or max(x.size, size or 0) < MIN_SIZE:
        return False
    return mode == "numpy" or cpu_choices()


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis into a new array (``scores`` may be a read-only view)."""
    out = scores - scores.max(axis=-1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``, written out on the CPU backend where that is
    faster: large softmaxes in NumPy, a head at a time; small ones (decode steps) with ``exp``
    as ``power`` (MLX's CPU ``fast`` attention is unfused and its ``exp`` scalar).

    Args:
        q: ``(B, n_heads, L, head_dim)`` queries.
        k: ``(B, n_kv_heads, S, head_dim)`` keys; ``n_heads`` is a multiple of ``n_kv_heads``.
        v: ``(B, n_kv_heads, S, head_dim)`` values.
        scale: Multiplies the scores.
        mask: None, ``"causal"`` (aligned lower-right, as MLX does), or an array broadcastable
            to ``(B, n_heads, L, S)``: boolean (True attends) or additive.

    Returns:
        ``(B, n_heads, L, head_dim)``.
    """
    B, n_heads, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    large = use_numpy(q, B * n_heads * L * S)
    if not large and (not cpu_choices() or kernel_mode() != "auto"):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    rep = n_heads // n_kv
    # Grouped heads share their key/value head: each of the B * n_kv groups is one
    # (rep * L, D) @ (D, S) product.
    groups, rows = B * n_kv, rep * L
    q = (q * scale).reshape(groups, rows, D)
    k, v = k.reshape(groups, S, D), v.reshape(groups, S, D)
    if isinstance(mask, str):
        # Query i sees keys up to i + S - L.
        mask = mx.arange(S)[None] <= mx.arange(L)[:, None] + (S - L)
    if mask is not None:
        mask = mx.broadcast_to(mask, (B, n_heads, L, S)).reshape(groups, rows, S)
    if not large:
        scores = _masked(q @ k.swapaxes(-1, -2), mask)
        probs = mx.power(2.0, (scores - scores.max(axis=-1, keepdims=True)) * LOG2_E)
        return (probs / probs.sum(axis=-1, keepdims=True) @ v).reshape(B, n_heads, L, D)
    step = max(1, CHUNK_VALUES // S)  # query rows per chunk
    out = []
    for g in range(groups):
        keys = k[g].T
        for r in range(0, rows, step):
            scores = _masked(
                q[g, r : r + step] @ keys, None if mask is None else mask[g, r : r + step]
            )
            out.append(mx.array(_softmax(np.asarray(scores))) @ v[g])
            mx.eval(out[-1])  # this chunk's scores are freed before the next is made
    return mx.concatenate(out).reshape(B, n_heads, L, D)


def _masked(scores: mx.array, mask: mx.array | None) -> mx.array:
    """Scores with a boolean (True attends) or additive mask applied.

    Masked scores become the lowest finite value, not -inf: a query that sees no key (a padding
    position) then gets finite weights, where -inf would make NaNs that reach the real rows
    through the padding's keys and values (0 * NaN).
    """
    if mask is None:
        return scores
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask.astype(scores.dtype)


class Rotary:
    """Llama's RoPE (rotating the two halves of each head) for one forward pass, at positions
    ``offset + 0 .. L - 1``.

    On MLX's CPU backend ``mx.fast.rope`` has no kernel: each call runs about fifteen
    operations, including the angles' cosines and sines one value at a time, twice per layer
    (some 20% of a 256M decode step). There the cosine and sine tables are made once per pass
    and each rotation is four operations. Other devices keep ``mx.fast.rope``.

    Args:
        head_dim: The rotated dimensions (the whole head).
        base: ``rope_theta``.
        offset: The first position: an int, or ``[B]`` int32 for per-row positions.
        L: The number of positions in the pass.
    """

    def __init__(self, head_dim: int, base: float, offset: int | mx.array, L: int) -> None:
        self.head_dim, self.base, self.offset = head_dim, base, offset
        self.cos = self.sin = None
        if not cpu_choices() or kernel_mode() == "mlx":
            return
        # As transformers computes them: inverse frequencies and angles in float32.
        inv_freq = 1.0 / (base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        positions = (offset[:, None] if isinstance(offset, mx.array) else offset) + mx.arange(L)
        angles = positions.astype(mx.float32)[..., None] * inv_freq  # ([B,] L, head_dim / 2)
        cos, sin = mx.cos(angles), mx.sin(angles)
        # (1 or B, 1, L, head_dim), for q and k of shape (B, heads, L, head_dim).
        shape = (-1, 1, L, head_dim)
        self.cos = mx.concatenate([cos, cos], axis=-1).reshape(shape)
        self.sin = mx.concatenate([-sin, sin], axis=-1).reshape(shape)

    def __call__(self, x: mx.array) -> mx.array:
        """Rotate ``(B, heads, L, head_dim)`` queries or keys.

        Args:
            x: The queries or keys.
        """
        if self.cos is None:
            return mx.fast.rope(
                x, self.head_dim, traditional=False, base=self.base, scale=1.0, offset=self.offset
            )
        half = self.head_dim // 2
        swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
        return x * self.cos.astype(x.dtype) + swapped * self.sin.astype(x.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (``gelu_pytorch_tanh``, ``nn.gelu_approx``).

    Args:
        x: Any shape.
    """
    if not use_numpy(x):
        return nn.gelu_approx(x)
    a = np.asarray(x)
    y = a * a
    y *= 0.044715 * GELU_C
    y += GELU_C
    y *= a
    np.tanh(y, out=y)
    y += 1.0
    y *= a
    y *= 0.5
    return mx.array(y)


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the SwiGLU activation.

    Args:
        gate: Any shape.
        up: The same shape as ``gate``.
    """
    if not use_numpy(gate):
        if cpu_choices() and kernel_mode() == "auto":
            # exp(-g) as 2 ** (-g log2 e): MLX's CPU backend vectorizes `power`, not `exp`
            # (3 against 9-13 ns a value), which halves the activation of a 4-row decode step.
            return gate * up / (1.0 + mx.power(2.0, gate * -LOG2_E))
        return nn.silu(gate) * up
    g = np.asarray(gate)
    y = np.negative(g)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88 gives silu = -0, as it should
        np.exp(y, out=y)
    y += 1.0
    np.divide(g, y, out=y)
    y *= np.asarray(up)
    return mx.array(y)


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis: ``logits - logsumexp(logits)``.

    On the CPU backend the exponentials are ``2 ** (x log2 e)`` (``power`` is vectorized there,
    ``exp`` is not): a third of the time over a 49k vocabulary, every decode step.

    Args:
        logits: ``(..., vocab)``.
    """
    if not cpu_choices() or kernel_mode() != "auto":
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    top = logits.max(axis=-1, keepdims=True)
    total = mx.power(2.0, (logits - top) * LOG2_E).sum(axis=-1, keepdims=True)
    return logits - top - mx.log(total)
