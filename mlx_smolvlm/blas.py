"""Load an optimized BLAS into the process before MLX, on Linux.

The `mlx-cpu` wheel ships the reference BLAS, and `libmlx.so` resolves `cblas_sgemm` when it
loads. A BLAS loaded first with global symbol visibility takes its place, which makes fp32
matrix products about 30-100x faster on the CPU backend. This must run before `mlx.core` is
imported; `mlx_smolvlm/__init__.py` calls it first thing. macOS (Accelerate/Metal) needs nothing.

In front of that BLAS goes a small shim (`blas_shim.c`, compiled with the system C compiler on
first use and cached under `~/.cache/mlx_smolvlm/`): MLX computes the single-row products of
token-by-token decoding with `cblas_sgemm`, which OpenBLAS before 0.3.27 runs through its
packed matrix-matrix path, copying the whole weight on every call. The shim sends those
products to `cblas_sgemv` instead, which about doubles fp32 decoding speed. The 2-16-row
products of batched decoding, which OpenBLAS packs the same way, it computes itself (register
tiles over both cores; see the C source). Without a C compiler the shim is skipped with a log
message and everything still works.

MLX's CPU backend allocates every result afresh with `malloc`, and glibc serves allocations
over 128 KiB-32 MiB with new `mmap`s: each large intermediate (a 50 MB attention score matrix
of one image tile) then costs a page fault per 4 KiB page, which made a plain `x + 0` on it
40x slower than the arithmetic. `tune_malloc` raises glibc's mmap and trim thresholds so freed
buffers are reused from the heap; the process keeps its peak heap instead of returning it.

Overrides (environment variables):
- `MLX_SMOLVLM_BLAS`: a path to a BLAS shared library, or `off` to keep MLX's bundled one
  (and glibc's default malloc settings).
- `MLX_SMOLVLM_GEMV_SHIM=off`: do not put the shim in front of the BLAS.
- `MLX_SMOLVLM_MALLOC=off`: keep glibc's default malloc settings.
- `CC`: the C compiler for the shim (default `cc`).
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
SHIM_SOURCE = Path(__file__).with_name("blas_shim.c")
COMPILE_TIMEOUT_S = 120
# glibc mallopt parameters and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30

# The shim library once loaded (see `gemv_shim_calls`).
_shim: ctypes.CDLL | None = None


def cache_dir() -> Path:
    """Where mlx_smolvlm caches generated files: `$XDG_CACHE_HOME/mlx_smolvlm` or `~/.cache/...`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx_smolvlm"


def _cpu_flags() -> bytes:
    """The CPU's model and feature flags (Linux), for naming builds made for this CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)).encode()


def build_gemv_shim() -> Path | None:
    """Compile `blas_shim.c` into a shared library, or reuse the cached build.

    Returns:
        The library path, or None (logged) when the source or a working C compiler is missing.
    """
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not SHIM_SOURCE.is_file() or compiler is None:
        logger.info("GEMV shim skipped: no C compiler or no %s", SHIM_SOURCE.name)
        return None
    source = SHIM_SOURCE.read_bytes()
    # Built for this CPU (-march=native), so the cache key names the CPU too.
    digest = hashlib.sha256(source + compiler.encode() + _cpu_flags()).hexdigest()[:16]
    target = cache_dir() / f"blas_shim-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"]
        cmd += ["-o", str(built), str(SHIM_SOURCE), "-ldl", "-lpthread"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", b"") or b""
            logger.warning("GEMV shim not built (%s): %s", err, stderr.decode(errors="replace"))
            return None
        os.replace(built, target)  # atomic: concurrent processes never see half a file
    return target


def tune_malloc() -> bool:
    """Keep large allocations on glibc's heap (see the module docstring), on Linux with glibc.

    Returns:
        Whether the settings were applied.
    """
    if os.environ.get("MLX_SMOLVLM_MALLOC") == "off" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    applied &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        logger.info("glibc rejected the malloc thresholds; large MLX buffers stay mmap-backed")
    return applied


def load_optimized_blas() -> str | None:
    """Load the first optimized BLAS found, unless MLX is already loaded or this is not Linux.

    Also applies `tune_malloc` (Linux only) and the GEMV shim.

    Returns:
        The path of the library loaded, or None.
    """
    global _shim
    choice = os.environ.get("MLX_SMOLVLM_BLAS", "")
    if not sys.platform.startswith("linux") or choice == "off":
        return None
    tune_malloc()
    paths = [choice] if choice else [p for p in CANDIDATES if Path(p).exists()]
    if not paths:
        logger.debug("no optimized BLAS found; install libopenblas0-pthread for fast fp32 matmuls")
        return None
    if "mlx.core" in sys.modules:
        logger.info("mlx.core was imported before mlx_smolvlm, so the optimized BLAS is not used")
        return None
    shim_path = None if os.environ.get("MLX_SMOLVLM_GEMV_SHIM") == "off" else build_gemv_shim()
    # The shim first, so that libmlx.so's cblas_sgemm resolves to it; then the BLAS.
    shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL) if shim_path else None
    ctypes.CDLL(paths[0], mode=ctypes.RTLD_GLOBAL)
    if shim is not None:
        if shim.mlx_smolvlm_blas_shim_init(paths[0].encode()) != 0:
            logger.warning(
                "%s lacks cblas_sgemm/cblas_sgemv; the GEMV shim uses the next BLAS", paths[0]
            )
        _shim = shim
    return paths[0]


def gemv_shim_calls() -> int | None:
    """How many matrix products the shim has sent to `cblas_sgemv`, or None without the shim."""
    if _shim is None:
        return None
    _shim.mlx_smolvlm_blas_shim_gemv_calls.restype = ctypes.c_long
    return int(_shim.mlx_smolvlm_blas_shim_gemv_calls())
