"""Tokens-per-second benchmark: this port next to transformers and mlx-vlm on one checkpoint.

Every system runs the same checkpoint, the same prompt token ids and pixels (made once by this
package's processor, which the tests hold equal to transformers'), greedy, with EOS ignored, in
a subprocess of its own (a clean peak-memory figure, its own BLAS setup, and a time limit).

With ``--gguf FILE`` (a llama.cpp text GGUF of the checkpoint's decoder, such as the trained
SmolLM2-135M Q4_1 of ``benchmarks/trained_weights.py``: ``--trained`` picks both), the peer
``llama.cpp`` (``llama-cpp-python``) and our precision ``gguf`` (the GGUF loaded directly by
``mlx_smolvlm.gguf``) run the text workload on it, with the same prompt ids.

Workloads:
- ``a``: one 640x480 image with the checkpoint's full tiling and a 20-token question, 128 tokens.
- ``b``: text only, a 512-token prompt, 256 tokens.
- ``c``: a 10-second video (written with PyAV) at the checkpoint's frame sampling, 64 tokens.

Figures per system and workload: load time, preprocessing, vision encoding, time to first token
(preprocessing + vision + prefill), prefill and decode tokens per second, and peak resident
memory. The run also measures the machine's memory bandwidth (a 256 MB fp32 GEMV) and reports
decode speed as a fraction of the bandwidth limit (weight bytes read per token / bandwidth).

Workers of our port load OpenBLAS and the GEMV shim (the package defaults); mlx-vlm's default
runs with MLX's bundled BLAS, its fp32 configuration with plain OpenBLAS loaded first; the
transformers workers never import MLX (it slowed PyTorch's fp32 matmuls down).

Run it as ``python -m benchmarks.tokens_per_second`` from the repository root. The workloads and
their inputs are in ``workloads.py``, the peers' runners in ``peers.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import RESULTS
from benchmarks.charts import pyplot
from benchmarks.peers import gguf_prompt_ids, run_llama_cpp, run_mlx_vlm, run_transformers
from benchmarks.workloads import (
    WORKLOADS,
    RunResult,
    decode_timing,
    load_inputs,
    workload_prompt,
    write_inputs,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "8bit", "4bit", "gguf")
DEFAULT_PEERS = ("transformers", "mlx-vlm")
PEERS = (*DEFAULT_PEERS, "llama.cpp")
# llama.cpp's configurations: its thread counts (1 and all CPUs; the summary takes its best).
LLAMA_CPP_THREADS = tuple(sorted({1, os.cpu_count() or 1}))
RESULT_PREFIX = "BENCH_RESULT "
# The repository root: workers import `benchmarks`, which is not installed.
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class System:
    """One configuration of one implementation.

    ``name`` is ``mlx_smolvlm``, ``transformers`` or ``mlx-vlm``; ``config`` a precision
    (``fp32`` ... ``4bit``) or, for mlx-vlm, ``bf16`` (its default: bf16 weights, MLX's
    bundled BLAS) or ``fp32+openblas`` (fp32 weights, OpenBLAS loaded before MLX).
    """

    name: str
    config: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.config}"


@dataclass
class BenchConfig:
    """What to run.

    Args:
        model: A checkpoint directory; None with ``shape`` for a cached random checkpoint.
        shape: ``256m``, ``500m`` or ``2.2b``.
        precisions: Our port's precisions.
        peers: Peers to run next to it (``transformers``, ``mlx-vlm``).
        workloads: Workload names (``a``, ``b``, ``c``).
        gguf: A llama.cpp text GGUF of the decoder, for ``llama.cpp`` and precision ``gguf``.
        out: Output directory for the JSON, the chart and the generated inputs.
        timeout_s: Time limit of one system on one workload (load included).
        default_timeout_s: A lower limit for mlx-vlm's default configuration (bf16 weights,
            bundled BLAS), which takes minutes per image tile on the CPU backend; None for
            ``timeout_s``.
        max_tokens: Override every workload's token count (for smoke tests).
        repeats: Runs of each system and workload; the table shows the median run.
    """

    model: str | None = None
    shape: str | None = "256m"
    precisions: tuple[str, ...] = ("fp32",)
    peers: tuple[str, ...] = DEFAULT_PEERS
    workloads: tuple[str, ...] = ("a", "b", "c")
    gguf: str | None = None
    out: str = str(RESULTS)
    timeout_s: float = 600.0
    default_timeout_s: float | None = None
    max_tokens: int | None = None
    repeats: int = 1


# ---------------------------------------------------------------------------------------------
# Memory bandwidth


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth from a large fp32 GEMV and a large copy (NumPy, median of runs).

    Args:
        megabytes: Size of the matrix read by the GEMV.
        repeats: Timed runs of each.

    Returns:
        ``gemv_gbps`` (matrix bytes / time) and ``copy_gbps`` (bytes read + written / time).
    """
    n = int(math.sqrt(megabytes * 2**20 / 4))
    matrix = np.random.default_rng(0).random((n, n), dtype=np.float32)
    vector = np.ones(n, dtype=np.float32)
    target = np.empty_like(matrix)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return float(np.median(times))

    gemv = best(lambda: matrix @ vector)
    copy = best(lambda: np.copyto(target, matrix))
    return {"gemv_gbps": matrix.nbytes / gemv / 1e9, "copy_gbps": 2 * matrix.nbytes / copy / 1e9}


# ---------------------------------------------------------------------------------------------
# Workers (one system, one workload, in a subprocess)


def _peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def _run_ours(spec: dict, result: RunResult) -> None:
    import mlx.core as mx

    from mlx_smolvlm.device_ops import cpu_choices
    from mlx_smolvlm.generate import prepare_prompt
    from mlx_smolvlm.load import load_model
    from mlx_smolvlm.processing import Processor

    precision = spec["config"]
    if precision == "gguf":
        _run_ours_gguf(spec, result)
        return
    tic = time.perf_counter()
    # Quantized models keep fp32 activations and scales on the CPU backend (its fast path) and
    # bf16 ones on a GPU, as a Mac runs them.
    base = mx.float32 if cpu_choices() else mx.bfloat16
    dtype = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}.get(precision, base)
    model, model_dir = load_model(spec["model"], dtype=dtype)
    if precision in ("8bit", "4bit"):
        quantize(model, int(precision[0]))
    processor = Processor.from_pretrained(model_dir)
    result.load_s = time.perf_counter() - tic

    workload = WORKLOADS[spec["workload"]]
    inputs_dir = Path(spec["inputs_dir"])
    tic = time.perf_counter()
    messages, media = workload_prompt(processor, workload, inputs_dir)
    prepare_prompt(processor, messages, **media)
    result.preprocess_s = time.perf_counter() - tic

    inputs = load_inputs(inputs_dir, workload.name)
    ids = inputs["input_ids"][0]
    result.prompt_tokens = len(ids)
    features = None
    start = time.perf_counter()
    if "pixel_values" in inputs:
        features = model.encode_images(inputs["pixel_values"], inputs["pixel_attention_mask"])
        mx.eval(features)
        result.vision_s = time.perf_counter() - start
    first = time_generation(model, ids, features, spec["max_tokens"], result)
    result.ttft_s = result.preprocess_s + (first - start)
    result.weight_bytes_per_token = decode_weight_bytes(model)


def time_generation(
    model: Any, ids: Any, features: Any, max_tokens: int, result: RunResult
) -> float:
    """Prefill and decode greedily with our port, recording prefill and decode speed.

    Returns:
        When the first token was ready (``time.perf_counter``).
    """
    import mlx.core as mx

    from mlx_smolvlm.generate import generate_step
    from mlx_smolvlm.sample import make_sampler

    prefill_start = time.perf_counter()
    steps = generate_step(
        mx.array(ids, dtype=mx.int32),
        model,
        cache=model.make_cache(),
        image_features=features,
        sampler=make_sampler(0.0),
    )
    next(steps)
    first = time.perf_counter()
    result.prefill_tps = len(ids) / (first - prefill_start)
    for _ in range(max_tokens - 1):
        next(steps)
    decode_timing(result, first, max_tokens)
    steps.close()
    return first


def _run_ours_gguf(spec: dict, result: RunResult) -> None:
    """Our port on the GGUF itself (its quantized blocks as MLX affine weights, fp32
    activations), on the same prompt ids as llama.cpp; text workloads only."""
    from mlx_smolvlm.load import load

    inputs = load_inputs(Path(spec["inputs_dir"]), spec["workload"])
    if "pixel_values" in inputs:
        result.status = "n/a: text-only GGUF"
        return
    tic = time.perf_counter()
    model, processor = load(spec["gguf"], dtype="float32")
    result.load_s = time.perf_counter() - tic
    vocab, eos = model.config.text_config.vocab_size, processor.tokenizer.eos_token_ids[0]
    ids = gguf_prompt_ids(inputs["input_ids"][0], vocab, eos, result)
    result.prompt_tokens = len(ids)
    start = time.perf_counter()
    result.ttft_s = time_generation(model, ids, None, spec["max_tokens"], result) - start
    result.weight_bytes_per_token = decode_weight_bytes(model)


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: decoder layers, final norm, ``lm_head`` (or the
    tied embedding table), and one embedding row.

    Args:
        model: A loaded ``Model`` (quantized or not).
    """
    from mlx.utils import tree_flatten

    text = model.text_model
    parts = [*text.layers, text.norm, model.lm_head if "lm_head" in model else text.embed_tokens]
    total = sum(v.nbytes for part in parts for _, v in tree_flatten(part.parameters()))
    embed = text.embed_tokens.weight
    return total + embed.nbytes // embed.shape[0]


def quantize(model: Any, bits: int) -> None:
    """Quantize the decoder and connector of ``model`` in place (group 64, affine).

    The vision tower stays in full precision, as mlx-vlm leaves it: quantized matmuls run as
    scalar loops on MLX's Linux CPU backend, which would make image encoding far slower.

    Args:
        model: The loaded ``Model``.
        bits: 4 or 8.
    """
    from mlx_smolvlm.quantize import QuantizationSpec, quantize_model

    quantize_model(model, QuantizationSpec(bits=bits, quantize_vision=False))


RUNNERS = {
    "mlx_smolvlm": _run_ours,
    "transformers": run_transformers,
    "mlx-vlm": run_mlx_vlm,
    "llama.cpp": run_llama_cpp,
}


def run_worker(spec: dict) -> RunResult:
    """Run one system on one workload in this process.

    Args:
        spec: ``system``, ``config``, ``model``, ``workload``, ``inputs_dir``, ``max_tokens``.
    """
    if spec["system"] not in ("transformers", "llama.cpp"):
        # The package loads the BLAS that `worker_env` chose, before anything imports mlx.core.
        import mlx_smolvlm  # noqa: F401
    result = RunResult(system=f"{spec['system']} {spec['config']}", workload=spec["workload"])
    RUNNERS[spec["system"]](spec, result)
    result.peak_memory_gb = _peak_rss_gb()
    return result


def worker_env(system: System) -> dict[str, str]:
    """Environment of a worker: which BLAS it loads before MLX, and where `benchmarks` is.

    Our port gets OpenBLAS and the GEMV shim (its defaults); mlx-vlm ``fp32+openblas`` gets
    plain OpenBLAS; mlx-vlm ``bf16`` (its default) and transformers get no extra BLAS.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if system.name == "mlx-vlm" and system.config == "fp32+openblas":
        env["MLX_SMOLVLM_GEMV_SHIM"] = "off"
    elif system.name != "mlx_smolvlm":
        env["MLX_SMOLVLM_BLAS"] = "off"  # (llama.cpp brings its own kernels)
    return env


def run_isolated(system: System, spec: dict, timeout_s: float) -> RunResult:
    """Run one worker in a subprocess with a time limit; failures become a status, not a crash.

    Args:
        system: The system and configuration.
        spec: The worker spec (see ``run_worker``).
        timeout_s: Seconds before the worker is killed.
    """
    # This module imports no MLX: the transformers worker must not (importing mlx.core into a
    # PyTorch process made its fp32 matmuls 2-10x slower); `run_worker` loads it for the others.
    cmd = [sys.executable, "-m", "benchmarks.tokens_per_second", "--worker", json.dumps(spec)]
    result = RunResult(system=system.label, workload=spec["workload"])
    try:
        proc = subprocess.run(
            cmd, env=worker_env(system), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        result.status = f"timed out after {timeout_s:.0f} s"
        return result
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result.status = f"error: {tail[:300]}"
        return result
    return RunResult(**json.loads(lines[-1].removeprefix(RESULT_PREFIX)))


# ---------------------------------------------------------------------------------------------
# The whole run


def check_config(config: BenchConfig) -> tuple[Path | None, list[System], list[RunResult]]:
    """Validate a config; problems with one system become its error result, not an exception.

    Returns:
        The checkpoint (None if unusable), the systems to run, and the error results.

    Raises:
        ValueError: On an unknown workload or a repeat count below 1 (nothing could run).
    """
    unknown = [w for w in config.workloads if w not in WORKLOADS]
    if unknown or not config.workloads:
        raise ValueError(f"Unknown workloads {unknown}; expected some of {list(WORKLOADS)}")
    if config.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {config.repeats}")
    from mlx_smolvlm.random_weights import random_checkpoint

    errors: list[RunResult] = []

    def fail(label: str, status: str) -> None:
        errors.extend(RunResult(system=label, workload=w, status=status) for w in config.workloads)

    systems = []
    for precision in config.precisions:
        if precision in PRECISIONS:
            systems.append(System("mlx_smolvlm", precision))
        else:
            fail(
                f"mlx_smolvlm {precision}",
                f"error: unknown precision {precision!r}; expected one of {list(PRECISIONS)}",
            )
    modules = {"transformers": "transformers", "mlx-vlm": "mlx_vlm", "llama.cpp": "llama_cpp"}
    packages = {"llama.cpp": "llama-cpp-python"}
    for peer in config.peers:
        if peer not in modules:
            fail(peer, f"error: unknown peer {peer!r}; expected some of {list(PEERS)}")
        elif importlib.util.find_spec(modules[peer]) is None:
            fail(peer, f"error: {peer} is not installed (pip install {packages.get(peer, peer)})")
        elif peer == "transformers":
            systems += [System(peer, "fp32"), System(peer, "bf16")]
        elif peer == "llama.cpp":
            systems += [System(peer, f"{n}t") for n in LLAMA_CPP_THREADS]
        else:
            systems += [System(peer, "bf16"), System(peer, "fp32+openblas")]
    if config.gguf is None or not Path(config.gguf).expanduser().is_file():
        problem = "needs --gguf FILE" if config.gguf is None else f"{config.gguf} is not a file"
        for system in [s for s in systems if s.config == "gguf" or s.name == "llama.cpp"]:
            fail(system.label, f"error: {problem}")
            systems.remove(system)

    model_dir = None
    try:
        if config.model is not None:
            model_dir = Path(config.model).expanduser()
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"{config.model} is not a checkpoint directory")
        else:
            model_dir = random_checkpoint(config.shape)
    except (ValueError, OSError) as err:
        for system in systems:
            fail(system.label, f"error: {err}")
        return None, [], errors
    return model_dir, systems, errors


def _median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median decode speed, noting the spread of the others."""
    ok = [r for r in runs if r.status == "ok" and r.decode_tps is not None]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r.decode_tps)
    chosen = ok[len(ok) // 2]
    if len(ok) > 1:
        chosen.notes = (
            f"{chosen.notes} median of {len(ok)}: decode {ok[0].decode_tps:.1f}-"
            f"{ok[-1].decode_tps:.1f} tok/s, TTFT {min(r.ttft_s for r in ok):.2f}-"
            f"{max(r.ttft_s for r in ok):.2f} s"
        ).strip()
    return chosen


def weight_bytes_per_token(model_dir: Path, bytes_per_param: int) -> int:
    """Bytes of weights that one decode step reads (see ``decode_weight_bytes``) at a dtype size.

    Args:
        model_dir: The checkpoint (only ``config.json`` is read; no weights are loaded).
        bytes_per_param: 4 for fp32, 2 for bf16/fp16.
    """
    import mlx.core as mx

    from mlx_smolvlm.config import load_config
    from mlx_smolvlm.model import Model

    model = Model(load_config(model_dir))  # parameters stay lazy: only shapes are read
    dtype = {4: mx.float32, 2: mx.bfloat16}[bytes_per_param]
    model.set_dtype(dtype)
    return decode_weight_bytes(model)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run every system on every workload, then write ``results.json`` and ``results.png``.

    Args:
        config: What to run.

    Returns:
        The report: machine, bandwidth, results and summary ratios.

    Raises:
        ValueError: On an unknown workload (see ``check_config``).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, systems, results = check_config(config)
    bandwidth = measure_bandwidth()
    logger.info("Memory bandwidth: %.1f GB/s (GEMV)", bandwidth["gemv_gbps"])
    if model_dir is not None:
        inputs_dir = out / "inputs"
        write_inputs(model_dir, inputs_dir, config.workloads)
        for name in config.workloads:
            tokens = config.max_tokens or WORKLOADS[name].max_tokens
            runs: dict[System, list[RunResult]] = {system: [] for system in systems}
            # Repeats go round all systems, so load from other jobs hits them alike.
            for _ in range(config.repeats):
                for system in systems:
                    spec = {
                        "system": system.name,
                        "config": system.config,
                        "model": str(model_dir),
                        "workload": name,
                        "inputs_dir": str(inputs_dir),
                        "max_tokens": tokens,
                        "gguf": config.gguf and str(Path(config.gguf).expanduser()),
                    }
                    limit = config.timeout_s
                    if system == System("mlx-vlm", "bf16") and config.default_timeout_s:
                        limit = min(limit, config.default_timeout_s)
                    logger.info(
                        "%s, workload %s: running (at most %.0f s)", system.label, name, limit
                    )
                    start = time.perf_counter()
                    runs[system].append(run_isolated(system, spec, limit))
                    logger.info(
                        "%s, workload %s: %s after %.1f s",
                        system.label,
                        name,
                        runs[system][-1].status,
                        time.perf_counter() - start,
                    )
            results.extend(_median_run(system_runs) for system_runs in runs.values())
    for result in results:
        if result.decode_tps is None or model_dir is None:
            continue
        if result.weight_bytes_per_token is None:
            size = 2 if "bf16" in result.system else 4
            result.weight_bytes_per_token = weight_bytes_per_token(model_dir, size)
        limit = bandwidth["gemv_gbps"] * 1e9 / result.weight_bytes_per_token
        result.bandwidth_fraction = result.decode_tps / limit
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # Forcing an older OpenBLAS kernel (this variable) changes fp32 GEMM speed ~2x.
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        },
        "checkpoint": str(model_dir) if model_dir else config.model,
        "shape": None if config.model else config.shape,
        "bandwidth": bandwidth,
        "results": [asdict(r) for r in results],
        "summary": summarize(results),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    draw_chart(results, out / "results.png")
    return report


def _best(results: list[RunResult], prefix: str, workload: str, key: str) -> RunResult | None:
    """The best ok run of systems starting with ``prefix`` on a workload (max tok/s, min time)."""
    runs = [
        r
        for r in results
        if r.system.startswith(prefix) and r.workload == workload and getattr(r, key) is not None
    ]
    if not runs:
        return None
    return (min if key.endswith("_s") else max)(runs, key=lambda r: getattr(r, key))


# Decode ratios the README reports, between two systems (prefixes of their labels).
DECODE_RATIOS = {
    "decode_4bit_over_fp32": ("mlx_smolvlm 4bit", "mlx_smolvlm fp32"),
    "decode_4bit_over_llama.cpp": ("mlx_smolvlm 4bit", "llama.cpp"),
    "decode_gguf_over_llama.cpp": ("mlx_smolvlm gguf", "llama.cpp"),
}


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """Ratios measured in the same run: our best against each peer's best and defaults.

    Args:
        results: All results.
    """
    summary: dict[str, Any] = {}
    for workload in sorted({r.workload for r in results}):
        ours = _best(results, "mlx_smolvlm", workload, "decode_tps")
        entry: dict[str, Any] = {}
        if ours is not None:
            entry["ours_best_decode"] = f"{ours.system}: {ours.decode_tps:.1f} tok/s"
            for peer in PEERS:
                theirs = _best(results, peer, workload, "decode_tps")
                if theirs is not None:
                    entry[f"decode_vs_{peer}_best"] = round(ours.decode_tps / theirs.decode_tps, 2)
            for name, (mine, other) in DECODE_RATIOS.items():
                a, b = (_best(results, s, workload, "decode_tps") for s in (mine, other))
                if a is not None and b is not None:
                    entry[name] = round(a.decode_tps / b.decode_tps, 2)
            if ours.bandwidth_fraction is not None:
                entry["decode_fraction_of_bandwidth_limit"] = round(ours.bandwidth_fraction, 2)
        ttft = _best(results, "mlx_smolvlm", workload, "ttft_s")
        hf32 = _best(results, "transformers fp32", workload, "ttft_s")
        vlm_default = next(
            (r for r in results if r.system == "mlx-vlm bf16" and r.workload == workload), None
        )
        if ttft is not None and hf32 is not None:
            entry["ttft_ours_over_transformers_fp32"] = round(ttft.ttft_s / hf32.ttft_s, 2)
        if ttft is not None and vlm_default is not None:
            if vlm_default.ttft_s is not None:
                entry["ttft_mlx_vlm_default_over_ours"] = round(vlm_default.ttft_s / ttft.ttft_s, 1)
            else:
                entry["ttft_mlx_vlm_default_over_ours"] = (
                    f"{vlm_default.status} (ours {ttft.ttft_s:.1f} s)"
                )
        summary[workload] = entry
    return summary


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    ("system", "system", "{}"),
    ("wl", "workload", "{}"),
    ("load s", "load_s", "{:.1f}"),
    ("preproc s", "preprocess_s", "{:.2f}"),
    ("vision s", "vision_s", "{:.2f}"),
    ("TTFT s", "ttft_s", "{:.2f}"),
    ("prefill tok/s", "prefill_tps", "{:.0f}"),
    ("decode tok/s", "decode_tps", "{:.1f}"),
    ("% BW limit", "bandwidth_fraction", "{:.0%}"),
    ("peak GB", "peak_memory_gb", "{:.2f}"),
    ("status", "status", "{}"),
)


def format_table(results: list[RunResult]) -> str:
    """The results as a fixed-width text table.

    Args:
        results: Results to show, in order.
    """
    rows = [[title for title, _, _ in COLUMNS]]
    for r in results:
        values = (getattr(r, attr) for _, attr, _ in COLUMNS)
        rows.append(
            [
                "-" if v is None else fmt.format(v)
                for v, (_, _, fmt) in zip(values, COLUMNS, strict=True)
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def draw_chart(results: list[RunResult], path: Path) -> bool:
    """Bar charts of decode tok/s and time to first token per workload, as a PNG.

    Args:
        results: Results to draw.
        path: Output PNG path.

    Returns:
        Whether the chart was written (False, with a logged message, without matplotlib).
    """
    plt = pyplot()
    if plt is None:
        return False
    workloads = sorted({r.workload for r in results})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 8), squeeze=False)
    for col, workload in enumerate(workloads):
        runs = [r for r in results if r.workload == workload]
        labels = [r.system for r in runs]
        for row, (attr, title) in enumerate(
            (("decode_tps", "decode tok/s"), ("ttft_s", "time to first token (s)"))
        ):
            ax = axes[row][col]
            values = [getattr(r, attr) or 0.0 for r in runs]
            bars = ax.barh(labels, values, color=["C0" if "smolvlm" in s else "C7" for s in labels])
            for bar, r in zip(bars, runs, strict=True):
                if r.status != "ok":
                    ax.text(
                        0,
                        bar.get_y() + bar.get_height() / 2,
                        f" {r.status}",
                        va="center",
                        fontsize=7,
                    )
            ax.set_title(f"workload {workload}: {title}")
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options."""
    from mlx_smolvlm.random_weights import SHAPES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tokens_per_second", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a checkpoint directory")
    source.add_argument(
        "--shape", default="256m", help=f"random weights of a real architecture: {'|'.join(SHAPES)}"
    )
    parser.add_argument(
        "--precision", default="fp32", help=f"ours, comma-separated: {'|'.join(PRECISIONS)}"
    )
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma-separated, of {'|'.join(PEERS)}; '' for none",
    )
    parser.add_argument("--gguf", default=None, help="a text GGUF for llama.cpp and 'gguf'")
    parser.add_argument(
        "--trained",
        action="store_true",
        help="the trained-decoder checkpoint and its SmolLM2 Q4_1 GGUF (benchmarks/trained_weights.py)",
    )
    parser.add_argument("--workloads", default="a,b,c", help="comma-separated: a, b, c")
    parser.add_argument("--out", default=str(RESULTS), help="output directory")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per system and workload"
    )
    parser.add_argument(
        "--default-timeout",
        type=float,
        default=None,
        help="a lower limit for mlx-vlm's default (bf16) configuration",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="override every workload's")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median is shown")
    return parser


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` of parsed command-line options.

    Args:
        args: From ``build_parser``.
    """
    model, gguf = args.model, args.gguf
    if args.trained:
        from benchmarks.trained_weights import smollm2_gguf, trained_checkpoint

        model, gguf = str(trained_checkpoint()), gguf or str(smollm2_gguf())
    return BenchConfig(
        model=model,
        gguf=gguf,
        shape=None if model else args.shape,
        precisions=_split(args.precision),
        peers=_split(args.peers),
        workloads=_split(args.workloads),
        out=args.out,
        timeout_s=args.timeout,
        default_timeout_s=args.default_timeout,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table and summary; the exit status is 1 on bad options.

    Args:
        args: From ``build_parser``.
    """
    try:
        report = run_benchmark(config_from_args(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = [RunResult(**r) for r in report["results"]]
    print(format_table(results))
    print(
        f"\nmemory bandwidth: {report['bandwidth']['gemv_gbps']:.1f} GB/s (fp32 GEMV), "
        f"{report['bandwidth']['copy_gbps']:.1f} GB/s (copy)"
    )
    print(json.dumps(report["summary"], indent=2))
    print(f"\nwritten: {Path(args.out) / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.tokens_per_second`` (and of the benchmark's workers).

    Args:
        argv: Arguments without the program name.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["--worker"]:
        result = run_worker(json.loads(argv[1]))
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
        return 0
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
