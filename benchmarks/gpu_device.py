"""The GPU code path on a machine with an NVIDIA GPU: parity checks, then decode speed against
transformers on the same GPU.

MLX's CUDA backend (``pip install "mlx[cuda12]"`` or ``mlx[cuda13]``, and a CUDA build of
torch) is the nearest thing to Metal that runs off a Mac: our code takes the same path there
(``mx.fast`` attention and RoPE, the checkpoint's bf16, MLX's quantized kernels). The script

1. runs ``tests/mlx_smolvlm/test_gpu_path.py`` (with its ``slow`` bf16 4-bit check): parity
   with transformers and greedy equality on the trained-weights fixture, and engine batching;
2. times greedy decoding of the text workload (``b``: a 512-token prompt) on the trained
   checkpoint (``benchmarks/trained_weights.py``): ours in bf16, 4-bit and 8-bit (bf16
   activations) against transformers bf16 and fp32 on ``cuda``, each in its own process
   through ``tokens_per_second``'s workers;
3. prints a table and the ratios, and writes ``results.json`` under ``--out``.

    python -m benchmarks.gpu_device [--max-tokens 256] [--out benchmarks/results/gpu]

``--dry-run`` checks the script on a machine without a GPU: the CPU backend with the GPU
choices forced (``MLX_SMOLVLM_DEVICE_CHOICES=gpu``), transformers on the CPU, the fast parity
checks only, a few tokens and ``DRY_RUN_TIMEOUT_S`` per system (bf16 and quantized bf16 prefill
of the 512-token prompt are scalar loops there: a timeout is a status, not a failure). Its
figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.tokens_per_second import ROOT, System, format_table, run_isolated
from benchmarks.trained_weights import trained_checkpoint
from benchmarks.workloads import RunResult, write_inputs

logger = logging.getLogger(__name__)

WORKLOAD = "b"
OURS = ("bf16", "4bit", "8bit")
THEIRS = ("bf16", "fp32")
TEST_FILE = "tests/mlx_smolvlm/test_gpu_path.py"
TIMEOUT_S = 900
DRY_RUN_TIMEOUT_S = 240


def gpu_available() -> tuple[bool, str]:
    """Whether MLX's default device and torch both reach a GPU, and what each has."""
    mlx_device = subprocess.run(
        [sys.executable, "-c", "import mlx.core as mx; print(mx.default_device())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    torch_device = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    found = "gpu" in mlx_device and torch_device == "True"
    return found, f"MLX default device {mlx_device or '?'}, torch CUDA {torch_device or '?'}"


def run_parity(dry_run: bool) -> tuple[bool, str]:
    """Run the GPU-path tests; returns whether they passed and pytest's summary line."""
    selection = ["-k", "device_choices or low_precision"] if dry_run else ["-m", ""]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE, *selection]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines() or ["no output"]
    return done.returncode == 0, lines[-1]


def time_systems(
    model_dir: Path, out: Path, max_tokens: int, device: str, timeout_s: float
) -> list[RunResult]:
    """Decode speed of our precisions and transformers' on the text workload."""
    inputs_dir = out / "inputs"
    write_inputs(model_dir, inputs_dir, (WORKLOAD,))
    systems = [System("mlx_smolvlm", p) for p in OURS]
    systems += [System("transformers", p) for p in THEIRS]
    results = []
    for system in systems:
        spec = {
            "system": system.name,
            "config": system.config,
            "model": str(model_dir),
            "workload": WORKLOAD,
            "inputs_dir": str(inputs_dir),
            "max_tokens": max_tokens,
            "device": device,
        }
        tic = time.perf_counter()
        results.append(run_isolated(system, spec, timeout_s))
        logger.info("%s: %s in %.0f s", system.label, results[-1].status, time.perf_counter() - tic)
    return results


def ratios(results: list[RunResult]) -> dict[str, float]:
    """Our best decode against transformers' best, and 4-bit against bf16."""
    decode = {r.system: r.decode_tps for r in results if r.decode_tps}
    ours = max((v for k, v in decode.items() if k.startswith("mlx_smolvlm")), default=None)
    theirs = max((v for k, v in decode.items() if k.startswith("transformers")), default=None)
    out = {}
    if ours and theirs:
        out["ours_best_over_transformers_best"] = round(ours / theirs, 2)
    if decode.get("mlx_smolvlm 4bit") and decode.get("mlx_smolvlm bf16"):
        out["ours_4bit_over_bf16"] = round(
            decode["mlx_smolvlm 4bit"] / decode["mlx_smolvlm bf16"], 2
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.gpu_device``.

    Args:
        argv: Arguments without the program name.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "gpu"))
    parser.add_argument("--model", default=None, help="default: the trained-weights checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="check the script on a CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    found, devices = gpu_available()
    if not found and not args.dry_run:
        print(f"error: no GPU for both MLX and torch ({devices}); --dry-run checks the script")
        return 1
    if args.dry_run:
        os.environ["MLX_SMOLVLM_DEVICE_CHOICES"] = "gpu"  # inherited by every worker
    device = "cuda" if found else "cpu"
    max_tokens = 4 if args.dry_run else args.max_tokens
    model_dir = Path(args.model) if args.model else trained_checkpoint()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    passed, summary = run_parity(args.dry_run)
    timeout_s = DRY_RUN_TIMEOUT_S if args.dry_run else TIMEOUT_S
    results = time_systems(model_dir, out, max_tokens, device, timeout_s)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "devices": devices,
        "dry_run": args.dry_run,
        "parity": {"passed": passed, "pytest": summary},
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{devices}{' (dry run: CPU backend with the GPU choices)' if args.dry_run else ''}")
    print(f"parity ({TEST_FILE}): {'passed' if passed else 'FAILED'}: {summary}")
    print(format_table(results))
    print(json.dumps(report["ratios"], indent=2))
    print(f"\nwritten: {out / 'results.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
