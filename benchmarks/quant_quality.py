"""Quantization quality on trained weights: every recipe against full precision.

The model is ``benchmarks/trained_weights.py``'s checkpoint (SmolVLM2-256M architecture with
the trained SmolLM2-135M-Instruct decoder), by default with its decoder channels permuted
(``--basis permuted``): the decoder was dequantized from Q4_1, so its weights lie on a 4-bit grid
per block of 32 inputs that group-32 quantization would find again; the permuted copy computes
the same function with that grid scattered over every group (``--basis source`` reads the
unpermuted one). Each recipe converts it to a bf16 export (ours with
``mlx_smolvlm.convert``, mlx-vlm's with ``mlx_vlm.convert``), loads it with fp32 activations and
scales (the fast path on the CPU; bf16 scales are exact in fp32), and reads the held-out text
``benchmarks/heldout_text.txt`` (English prose, not the calibration text of the ``calibrated``
recipe). Per recipe: perplexity of the text, top-1 agreement with the full-precision model's
next-token predictions and the mean KL(full || quantized) per position, and the export's weight
bytes (``benchmarks.export_sizes.weight_bytes``).

Usage::

    python -m benchmarks.quant_quality [--basis permuted|source] [--tokens 1024] [--recipes ...] [--json out.json]
        [--chart quant_quality.png]
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from benchmarks.export_sizes import weight_bytes
from benchmarks.trained_weights import permuted_trained_checkpoint, trained_checkpoint
from mlx_smolvlm.convert import convert
from mlx_smolvlm.load import load_model
from mlx_smolvlm.processing import Processor

BASES = {"permuted": permuted_trained_checkpoint, "source": trained_checkpoint}
HELDOUT_TEXT = Path(__file__).with_name("heldout_text.txt")
# name -> ("ours" | "mlx-vlm", convert keyword arguments)
RECIPES = {
    "full precision (bf16)": ("ours", {}),
    "8-bit": ("ours", {"quantize": True, "q_bits": 8, "recipe": "uniform", "q_group_size": 64}),
    "4-bit uniform g64": ("ours", {"quantize": True, "recipe": "uniform", "q_group_size": 64}),
    "4-bit uniform g32": ("ours", {"quantize": True, "recipe": "uniform", "q_group_size": 32}),
    "4-bit mixed g64": ("ours", {"quantize": True, "recipe": "mixed", "q_group_size": 64}),
    "4-bit calibrated g64": (
        "ours",
        {"quantize": True, "recipe": "calibrated", "q_group_size": 64},
    ),
    "4-bit calibrated g32 (default)": ("ours", {"quantize": True}),
    "mlx-vlm 4-bit": ("mlx-vlm", {"quantize": True}),
}


def heldout_ids(source: Path, n_tokens: int) -> mx.array:
    """The first ``n_tokens + 1`` tokens of the held-out text, ``(1, n_tokens + 1)``."""
    ids = Processor.from_pretrained(source).tokenizer.encode(HELDOUT_TEXT.read_text("utf-8"))
    if len(ids) < n_tokens + 1:
        raise ValueError(f"{HELDOUT_TEXT} has {len(ids)} tokens, fewer than {n_tokens + 1}")
    return mx.array([ids[: n_tokens + 1]])


def dequantize_model(model: nn.Module) -> None:
    """Replace quantized layers by dense fp32 ones holding the same (dequantized) weights.

    The products are the quantized model's up to summation order, and the dense fp32 matmul is
    about 100x faster than MLX's quantized one on the CPU.
    """
    dense = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            if isinstance(module, nn.QuantizedEmbedding):
                layer = nn.Embedding(*weight.shape)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    layer.bias = module.bias
            layer.weight = weight
            dense.append((path, layer))
    model.update_modules(tree_unflatten(dense))


def log_probs(model_dir: Path, ids: mx.array) -> mx.array:
    """Next-token log-probabilities ``(n_tokens, vocab)`` with fp32 activations."""
    model, _ = load_model(str(model_dir), dtype="float32")
    dequantize_model(model)
    logits = model(ids[:, :-1])[0].astype(mx.float32)
    out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(out)
    return out


def quality(reference: mx.array, candidate: mx.array, targets: mx.array) -> dict:
    """Perplexity of ``targets`` under ``candidate``, top-1 agreement and mean KL vs ``reference``."""
    nll = -mx.take_along_axis(candidate, targets[:, None], axis=-1).mean()
    kl = (mx.exp(reference) * (reference - candidate)).sum(axis=-1).mean()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).astype(mx.float32).mean()
    return {
        "perplexity": round(float(mx.exp(nll)), 3),
        "top1_agreement": round(float(top1), 4),
        "mean_kl": round(float(kl), 5),
    }


def export(source: Path, dst: Path, tool: str, kwargs: dict) -> None:
    if tool == "ours":
        convert(str(source), dst, dtype="bfloat16", **kwargs)
    else:
        from mlx_vlm.convert import convert as vlm_convert

        vlm_convert(str(source), str(dst), dtype="bfloat16", **kwargs)


def measure(
    recipes: list[str], n_tokens: int, workdir: Path, source: Path | None = None
) -> list[dict]:
    """Quality rows: the fp32 source first, then one per recipe.

    Args:
        recipes: Keys of ``RECIPES``.
        n_tokens: Held-out tokens to score.
        workdir: Where the exports go.
        source: A full-precision checkpoint; default the permuted trained-weights one.
    """
    source = source or permuted_trained_checkpoint()
    ids = heldout_ids(source, n_tokens)
    targets = ids[0, 1:]
    reference = log_probs(source, ids)
    rows = [{"recipe": "full precision (fp32 source)", **quality(reference, reference, targets)}]
    print(rows[0], flush=True)
    for name in recipes:
        tool, kwargs = RECIPES[name]
        dst = workdir / name.replace(" ", "_")
        start = time.perf_counter()
        export(source, dst, tool, kwargs)
        seconds = time.perf_counter() - start
        row = {
            "recipe": name,
            **quality(reference, log_probs(dst, ids), targets),
            "weight_gb": round(weight_bytes(dst) / 1e9, 3),
            "convert_s": round(seconds, 1),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def print_table(rows: list[dict], n_tokens: int) -> None:
    full = rows[0]["perplexity"]
    print(f"\nHeld-out text: {HELDOUT_TEXT.name}, {n_tokens} tokens")
    print("| recipe | perplexity | x full | top-1 agreement | mean KL | weights GB | convert s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['weight_gb']:.3f}" if "weight_gb" in r else "-"
        print(
            f"| {r['recipe']} | {r['perplexity']:.2f} | {r['perplexity'] / full:.3f} | "
            f"{r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {size} | {r.get('convert_s', '-')} |"
        )


def draw(rows: list[dict], path: Path) -> None:
    """Perplexity ratio and KL per recipe, as two bar panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["perplexity"]  # the fp32 source
    rows = rows[1:]
    names = [r["recipe"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].barh(names, [r["perplexity"] / base for r in rows], color="tab:blue")
    axes[0].axvline(1.10, color="tab:red", linestyle="--", label="1.10x target")
    axes[0].set_xlabel("perplexity / full precision (held-out text)")
    axes[0].legend()
    axes[1].barh(names, [r["mean_kl"] for r in rows], color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean KL(full || quantized) per token")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Quantization quality, SmolVLM2-256M with the trained SmolLM2-135M decoder")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens to score")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--chart", type=Path, default=Path("quant_quality.png"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--basis",
        choices=list(BASES),
        default="permuted",
        help="the trained checkpoint, with its decoder channels permuted (fair to group 32) or not",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="a full-precision checkpoint (overrides --basis)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = measure(args.recipes, args.tokens, Path(tmp), args.model or BASES[args.basis]())
    print_table(rows, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    try:
        draw(rows, args.chart)
        print(f"Chart: {args.chart}")
    except ImportError:
        print("No chart: matplotlib is missing (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
