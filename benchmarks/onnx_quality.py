"""Size and quality of the ONNX export's variants on trained weights.

The model is ``benchmarks/trained_weights.py``'s checkpoint (SmolVLM2-256M architecture with
the trained SmolLM2-135M-Instruct decoder), exported by ``mlx_smolvlm.onnx_export`` with every
variant (fp32, fp16, int8, q4, q4f16). Each variant's ``embed_tokens`` and
``decoder_model_merged`` read the held-out text ``benchmarks/heldout_text.txt`` in ONNX Runtime
(one pass, empty cache). Per variant: perplexity, top-1 agreement with the fp32 graph's
next-token predictions, mean KL(fp32 || variant) per position, and the bytes of its three
graphs (and of its decoder alone).

Usage::

    python -m benchmarks.onnx_quality [--tokens 1024] [--export DIR] [--json out.json]
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import json
import logging
import tempfile
from pathlib import Path

import mlx_smolvlm  # noqa: F401
import mlx.core as mx
import numpy as np
import onnxruntime

from benchmarks.quant_quality import heldout_ids, quality
from benchmarks.trained_weights import trained_checkpoint
from mlx_smolvlm.onnx_export import GRAPHS, ONNX_DIR, export_onnx
from mlx_smolvlm.onnx_quantize import QUANTIZATIONS, variant_path

VARIANTS = ("fp32", "fp16", *QUANTIZATIONS)


def log_probs(export: Path, variant: str, ids: np.ndarray) -> mx.array:
    """Next-token log-probabilities ``(n_tokens, vocab)`` of one variant, in ONNX Runtime."""
    onnx_dir = export / ONNX_DIR
    embed = onnxruntime.InferenceSession(str(variant_path(onnx_dir, "embed_tokens", variant)))
    decoder_path = variant_path(onnx_dir, "decoder_model_merged", variant)
    decoder = onnxruntime.InferenceSession(str(decoder_path))
    text = json.loads((export / "config.json").read_text(encoding="utf-8"))["text_config"]
    inputs = ids[:, :-1]
    past = {
        f"past_key_values.{i}.{kv}": np.zeros(
            (1, text["num_key_value_heads"], 0, text["head_dim"]), np.float32
        )
        for i in range(text["num_hidden_layers"])
        for kv in ("key", "value")
    }
    feed = {
        "inputs_embeds": embed.run(None, {"input_ids": inputs})[0],
        "attention_mask": np.ones_like(inputs),
        "position_ids": np.arange(inputs.shape[1])[None],
        **past,
    }
    logits = mx.array(decoder.run(["logits"], feed)[0][0])
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def variant_bytes(export: Path, variant: str) -> dict:
    sizes = {g: variant_path(export / ONNX_DIR, g, variant).stat().st_size for g in GRAPHS}
    return {
        "total_mb": round(sum(sizes.values()) / 1e6),
        "decoder_mb": round(sizes[GRAPHS[2]] / 1e6),
    }


def measure(
    export: Path, source: Path, n_tokens: int, variants: tuple[str, ...] = VARIANTS
) -> list:
    """One row per variant (fp32 first: the reference of agreement and KL)."""
    ids = np.array(heldout_ids(source, n_tokens), dtype=np.int64)
    targets = mx.array(ids[0, 1:])
    reference = log_probs(export, "fp32", ids)
    rows = []
    for variant in variants:
        candidate = reference if variant == "fp32" else log_probs(export, variant, ids)
        row = {"variant": variant, **quality(reference, candidate, targets)}
        row.update(variant_bytes(export, variant))
        print(row, flush=True)
        rows.append(row)
    return rows


def print_table(rows: list[dict], n_tokens: int) -> None:
    full = rows[0]["perplexity"]
    print(f"\nHeld-out text: {n_tokens} tokens")
    print(
        "| variant | perplexity | x fp32 | top-1 agreement | mean KL | three graphs MB | decoder MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['perplexity']:.2f} | {r['perplexity'] / full:.3f} | "
            f"{r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {r['total_mb']} | {r['decoder_mb']} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens to score")
    parser.add_argument(
        "--export", type=Path, default=None, help="an existing export with every variant"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    source = trained_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export
        if export is None:
            export = export_onnx(
                str(source), Path(tmp) / "onnx", dtype="fp16", quantize=QUANTIZATIONS
            )
        rows = measure(export, source, args.tokens)
    print_table(rows, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
