"""Where one decode step of mlx_smolvlm spends its time, per operation, measured.

Runs the decoder token by token on a cached prefix, evaluating after every operation so that
each one's time is its own, and prints the total per operation kind over all layers, next to
the time of the same step without the extra synchronisations and a NumPy (BLAS) version of the
step that bounds what the matrix-vector products alone cost.

    python -m benchmarks.profile_decode --shape 256m --prefix 104 --steps 20 [--bits 4]

With ``--bits``, the decoder and head are quantized (group 64, fp32 scales). On the CPU backend
the decoder's layers then run in one call of the C kernel (``quantized_matvec.decode_layers``),
which times its own phases (norms, products, RoPE, attention, SiLU, residuals); "kernel glue" is
the rest of that call (copies in and out, appending to the caches). Elsewhere, and unquantized,
the layers run operation by operation as ``TextModel`` writes them.
"""

# ruff: noqa: I001 (mlx_smolvlm must be imported before mlx.core: it loads the BLAS first)
import argparse
import logging
import time
from collections import defaultdict

from mlx_smolvlm.blas import gemv_shim_calls
from mlx_smolvlm.device_ops import Rotary, log_softmax
from mlx_smolvlm.load import load_model
from mlx_smolvlm.quantize import QuantizationSpec, quantize_model
from mlx_smolvlm.quantized_matvec import (
    PHASES,
    calls as qmv_calls,
    decode_layers,
    layer_plans,
    project,
)
from mlx_smolvlm.random_weights import random_checkpoint

import mlx.core as mx
import mlx.nn as nn
import numpy as np

logger = logging.getLogger(__name__)


class OpTimer:
    """Evaluates each recorded operation and adds its time to a per-name total."""

    def __init__(self):
        self.totals = defaultdict(float)
        self.tic = 0.0

    def start(self):
        self.tic = time.perf_counter()

    def __call__(self, name, x):
        mx.eval(x)
        now = time.perf_counter()
        self.totals[name] += now - self.tic
        self.tic = now
        return x


def profiled_step(model, token, cache, t):
    """One decode step, timed per operation (the model's own step, in the same order)."""
    text = model.text_model
    t.start()
    h = t("embed", text.embed_tokens(token))
    plans = layer_plans(text.layers, h, None, cache)
    h = (
        layer_by_layer(text, h, cache, t)
        if plans is None
        else kernel_layers(plans, text, h, cache, t)
    )
    h = t("rms_norm", text.norm(h))
    logits = t("lm_head", project(h, model.lm_head if "lm_head" in model else text.embed_tokens)[0])
    logits = logits[:, -1, :]
    logprobs = t("log_softmax", log_softmax(logits))
    return t("argmax", mx.argmax(logprobs, axis=-1, keepdims=True).astype(mx.int32))


def kernel_layers(plans, text, h, cache, t):
    """The decoder's layers in one call of the C kernel, which times its phases."""
    phase_ns = np.zeros(len(PHASES), np.int64)
    h = t(
        "kernel glue", decode_layers(plans, text.config, h, None, cache, cache[0].offset, phase_ns)
    )
    for name, ns in zip(PHASES, phase_ns.tolist(), strict=True):
        t.totals[name] += ns / 1e9
        t.totals["kernel glue"] -= ns / 1e9
    return h


def layer_by_layer(text, h, cache, t):
    """The decoder's layers written out operation by operation (as ``TextModel`` runs them)."""
    cfg = text.config
    B, L, _ = h.shape
    rotary = Rotary(cfg.head_dim, cfg.rope_theta, cache[0].offset, L)
    for layer, c in zip(text.layers, cache, strict=True):
        attn = layer.self_attn
        x = t("rms_norm", layer.input_layernorm(h))
        q, k, v = t("qkv_proj", project(x, attn.q_proj, attn.k_proj, attn.v_proj))
        q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = t("rope", rotary(q))
        k = t("rope", rotary(k))
        k, v = c.update_and_fetch(k, v)
        t("kv_cache_update", (k, v))
        o = t("attention", mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale))
        o = t("o_proj", project(o.transpose(0, 2, 1, 3).reshape(B, L, -1), attn.o_proj)[0])
        h = t("residual_add", h + o)
        x = t("rms_norm", layer.post_attention_layernorm(h))
        g, u = t("gate_up_proj", project(x, layer.mlp.gate_proj, layer.mlp.up_proj))
        a = t("silu_mul", nn.silu(g) * u)
        d = t("down_proj", project(a, layer.mlp.down_proj)[0])
        h = t("residual_add", h + d)
    return h


def numpy_step(weights, x, x_mlp):
    """The decoder's matrix-vector products and the head in NumPy, for a BLAS-only bound."""
    for wq, wk, wv, wo, wg, wu, wd in weights["layers"]:
        wq @ x, wk @ x, wv @ x, wo @ x, wg @ x, wu @ x, wd @ x_mlp
    return weights["head"] @ x


def dense_weight(layer):
    """A layer's weight as a float32 NumPy matrix (dequantized if quantized)."""
    if "scales" not in layer:
        return np.array(layer.weight.astype(mx.float32))
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return np.array(w.astype(mx.float32))


def median_ms(fn, n):
    fn()
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: random --shape)")
    parser.add_argument("--shape", default="256m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefix", type=int, default=104, help="tokens already in the cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, default=None, help="quantize the decoder: 4 or 8")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, _ = load_model(args.model or str(random_checkpoint(args.shape)), dtype=args.dtype)
    if args.bits is not None:
        quantize_model(model, QuantizationSpec(bits=args.bits, quantize_vision=False))
    cache = model.make_cache()
    prompt = mx.array(np.random.default_rng(0).integers(0, 49000, (1, args.prefix)), dtype=mx.int32)
    mx.eval(model(prompt, cache=cache))
    token = mx.array([[5]], dtype=mx.int32)

    def plain_step():
        nonlocal token
        logits = model(token, cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = mx.argmax(logprobs, axis=-1, keepdims=True).astype(mx.int32)
        mx.eval(token)

    plain = median_ms(plain_step, args.steps)
    timer = OpTimer()
    for _ in range(args.steps):
        token = profiled_step(model, token, cache, timer)
    profiled = sum(timer.totals.values()) / args.steps * 1e3

    layers = []
    for layer in model.text_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        mats = [
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ]
        layers.append([dense_weight(m) for m in mats])
    head = model.lm_head if "lm_head" in model else model.text_model.embed_tokens
    weights = {"layers": layers, "head": dense_weight(head)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(model.config.text_config.hidden_size, dtype=np.float32)
    x_mlp = rng.standard_normal(model.config.text_config.intermediate_size, dtype=np.float32)
    numpy_ms = median_ms(lambda: numpy_step(weights, x, x_mlp), args.steps)

    weights_desc = f"{args.bits}-bit weights" if args.bits else "unquantized"
    logger.info(
        "decode step at %d cached tokens, %s, %s, median of %d",
        args.prefix,
        args.dtype,
        weights_desc,
        args.steps,
    )
    logger.info("GEMV shim calls so far: %s (None: shim not loaded)", gemv_shim_calls())
    logger.info("quantized matrix-vector kernel calls so far: %d", qmv_calls())
    logger.info("%-16s %9s %7s", "operation", "ms/token", "share")
    for name, total in sorted(timer.totals.items(), key=lambda kv: -kv[1]):
        ms = total / args.steps * 1e3
        logger.info("%-16s %9.2f %6.1f%%", name, ms, 100 * ms / profiled)
    logger.info("%-16s %9.2f   (each op evaluated on its own)", "sum", profiled)
    logger.info("%-16s %9.2f   (%.1f tok/s)", "plain MLX step", plain, 1e3 / plain)
    logger.info(
        "%-16s %9.2f   (the same matrix-vector products and head in NumPy)", "NumPy GEMVs", numpy_ms
    )


if __name__ == "__main__":
    main()
