"""Export sizes, peak load memory and 4-bit agreement on the real SmolVLM2 architectures.

Random weights from ``make_random_checkpoint`` (the 2.2B source in bfloat16 to save disk and
time; ``agreement`` reuses the cached 256M one of ``random_checkpoint``). Two measurements:

``sizes``: for each shape, convert to full precision, 8-bit, 4-bit and 4-bit ``mixed`` (vision
quantized in all), then measure the export's size on disk and ``mx.get_peak_memory()`` right after
``load_model`` in a fresh process.

``agreement``: on the 256M architecture, next-token predictions of the 4-bit model (default
recipe, ``mixed`` recipe, and one variant per layer group kept in full precision) against the
fp32 model, over 256 positions of which 64 are one 512x512 image tile: top-1 agreement and
mean KL(full || quantized). Activations and scales are fp32 (the fast path on the CPU).

Usage::

    python -m benchmarks.export_sizes sizes --json sizes.json [--shapes 256m 500m 2.2b]
        [--variants full 8bit 4bit 4bit-mixed] [--dtype bfloat16]
    python -m benchmarks.export_sizes agreement --json agreement.json
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_smolvlm  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mlx_smolvlm.convert import convert
from mlx_smolvlm.load import load_model
from mlx_smolvlm.quantize import QuantizationSpec, layer_quantization, quantize_model
from mlx_smolvlm.random_weights import ASSETS, SHAPES, make_random_checkpoint, random_checkpoint

# Round to nearest at group 64, not convert's default (GPTQ at group 32): GPTQ on the 2.2B
# would take far too long on a CPU for a size table (the default's 256M size is in
# benchmarks/quant_quality.py's table and test_quantize's budget).
VARIANTS = {
    "full": {},
    "8bit": {"quantize": True, "q_bits": 8, "q_group_size": 64, "recipe": "uniform"},
    "4bit": {"quantize": True, "q_group_size": 64, "recipe": "uniform"},
    "4bit-mixed": {"quantize": True, "q_group_size": 64, "recipe": "mixed"},
}
PEAK_SCRIPT = (
    "import sys, mlx_smolvlm, mlx.core as mx; from mlx_smolvlm.load import load_model; "
    "mx.reset_peak_memory(); load_model(sys.argv[1]); print(mx.get_peak_memory())"
)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure_sizes(shapes: list[str], variants: list[str], dtype: str, workdir: Path) -> list[dict]:
    rows = []
    for shape in shapes:
        src_dtype = "bfloat16" if shape == "2.2b" else "float32"
        src = workdir / f"{shape}-src"
        start = time.perf_counter()
        make_random_checkpoint(shape, src, dtype=src_dtype)
        print(f"{shape}: random {src_dtype} source in {time.perf_counter() - start:.1f} s")
        for name in variants:
            kwargs = VARIANTS[name]
            dst = workdir / f"{shape}-{name}"
            start = time.perf_counter()
            convert(str(src), dst, dtype=dtype, force=True, **kwargs)
            seconds = time.perf_counter() - start
            peak = int(
                subprocess.run(
                    [sys.executable, "-c", PEAK_SCRIPT, str(dst)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()[-1]
            )
            row = {
                "shape": shape,
                "variant": name,
                "dtype": dtype,
                "dir_bytes": dir_bytes(dst),
                "weight_bytes": weight_bytes(dst),
                "peak_load_bytes": peak,
                "convert_s": round(seconds, 1),
            }
            print(row)
            rows.append(row)
            # Only the size is kept: free the disk for the next shape.
            for f in dst.iterdir():
                f.unlink()
            dst.rmdir()
        for f in src.iterdir():
            f.unlink()
        src.rmdir()
    return rows


def agreement_inputs(model: nn.Module, n_positions: int = 256, seed: int = 0) -> tuple:
    """256 token ids with one image tile (64 image tokens) and the tile's pixels."""
    config = model.config
    side = config.vision_config.image_size
    image = Image.open(ASSETS / "example.jpg").convert("RGB").resize((side, side))
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5
    pixel_values = mx.array(pixels.transpose(2, 0, 1)[None, None])  # (1, 1, C, H, W)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 49152, size=n_positions)
    start = 8
    ids[start : start + config.image_seq_len] = config.image_token_id
    return mx.array(ids[None]), pixel_values


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def compare(ref: mx.array, logits: mx.array) -> dict:
    p_log, q_log = log_softmax(ref), log_softmax(logits)
    kl = (mx.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    top1 = (ref.argmax(axis=-1) == logits.argmax(axis=-1)).astype(mx.float32)
    return {"top1_agreement": float(top1.mean()), "mean_kl": float(kl.mean())}


def override(patterns: tuple[str, ...], bits: int | None, spec: QuantizationSpec) -> callable:
    """A predicate that quantizes like ``spec`` except modules whose path contains one of
    ``patterns``: those get ``bits``, or stay in full precision for None."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        params = layer_quantization(spec, path, module)
        if params is None:
            return False
        if any(p in path for p in patterns):
            return False if bits is None else {**params, "bits": bits}
        return params

    return predicate


GROUPS = {
    "connector": "connector.",
    "embed_tokens": "embed_tokens",
    "lm_head": "lm_head",
    "all v_proj (decoder)": "self_attn.v_proj",
    "all down_proj (decoder)": "mlp.down_proj",
    "decoder layer 0": "text_model.layers.0.",
    "decoder layer 29": "text_model.layers.29.",
}


def measure_agreement() -> list[dict]:
    src = random_checkpoint("256m", "float32")
    reference, _ = load_model(str(src))
    ids, pixel_values = agreement_inputs(reference)
    N, n, C, H, W = pixel_values.shape
    # The vision tower is the slow part with quantized weights: its output is computed once
    # per vision setting and shared by the variants that quantize it the same way.
    pixels = pixel_values.reshape(N * n, C, H, W).transpose(0, 2, 3, 1)
    patch_mask = mx.ones((N * n, H // 16, W // 16), dtype=mx.bool_)
    vision_cache: dict[str, mx.array] = {}

    def forward(model: nn.Module, vision_key: str) -> mx.array:
        if vision_key not in vision_cache:
            vision_cache[vision_key] = model.vision_model(pixels, patch_mask)
            mx.eval(vision_cache[vision_key])
        logits = model(ids, image_features=model.connector(vision_cache[vision_key]))
        mx.eval(logits)
        return logits

    start = time.perf_counter()
    ref = forward(reference, "full")
    print(f"fp32 forward: {time.perf_counter() - start:.1f} s")
    rows = []

    def run(name: str, vision_key: str, quantize: callable) -> None:
        model, _ = load_model(str(src))
        quantize(model)
        start = time.perf_counter()
        logits = forward(model, vision_key)
        row = {"variant": name, **compare(ref, logits), "s": round(time.perf_counter() - start)}
        print(row, flush=True)
        rows.append(row)

    def spec_run(name: str, vision_key: str, spec: QuantizationSpec) -> None:
        run(name, vision_key, lambda m: quantize_model(m, spec))

    uniform = QuantizationSpec(4, 64, "uniform")
    spec_run("4-bit uniform (default)", "4bit", uniform)
    spec_run("8-bit uniform", "8bit", QuantizationSpec(8, 64, "uniform"))
    # The mixed recipe's vision tower is 8-bit, group 64: the same as the 8-bit run's.
    spec_run("4-bit mixed", "8bit", QuantizationSpec(4, 64, "mixed"))
    spec_run("4-bit, vision tower not quantized", "full", QuantizationSpec(4, 64, "uniform", False))
    head = ("lm_head", "embed_tokens", "connector.")
    run(
        "4-bit, lm_head/embed_tokens/connector 8-bit",
        "4bit",
        lambda m: nn.quantize(m, class_predicate=override(head, 8, uniform)),
    )
    for name, pattern in GROUPS.items():
        run(
            f"4-bit uniform but {name} in fp32",
            "4bit",
            lambda m, p=pattern: nn.quantize(m, class_predicate=override((p,), None, uniform)),
        )
    return rows


def print_size_table(rows: list[dict]) -> None:
    print(
        f"{'shape':6} {'variant':10} {'dtype':9} {'export GB':>10} {'weights GB':>11} {'peak load GB':>13}"
    )
    for r in rows:
        print(
            f"{r['shape']:6} {r['variant']:10} {r['dtype']:9} {r['dir_bytes'] / 1e9:10.3f} "
            f"{r['weight_bytes'] / 1e9:11.3f} {r['peak_load_bytes'] / 1e9:13.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["sizes", "agreement"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dtype", default="bfloat16", help="export dtype (sizes)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.what == "sizes":
            rows = measure_sizes(args.shapes, args.variants, args.dtype, Path(tmp))
            print_size_table(rows)
        else:
            rows = measure_agreement()
            for r in rows:
                print(f"{r['variant']:45} top-1 {r['top1_agreement']:.3f}  KL {r['mean_kl']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
