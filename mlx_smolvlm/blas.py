"""Load an optimized BLAS into the process before MLX, on Linux.

The `mlx-cpu` wheel ships the reference BLAS, and `libmlx.so` resolves `cblas_sgemm` when it
loads. A BLAS loaded first with global symbol visibility takes its place, which makes fp32
matrix products about 30-100x faster on the CPU backend. This must run before `mlx.core` is
imported; `mlx_smolvlm/__init__.py` calls it first thing. macOS (Accelerate/Metal) needs nothing.

Where the BLAS comes from, first found wins:
1. `MLX_SMOLVLM_BLAS`: a path to a BLAS shared library, `scipy-openblas` for the PyPI wheel
   below, or `off` to keep MLX's bundled one (and glibc's default malloc settings).
2. Debian's OpenBLAS (`apt-get install libopenblas0-pthread`) or another system OpenBLAS.
3. The `scipy-openblas32` wheel, a dependency on Linux: the OpenBLAS build NumPy and SciPy use.
   It names its functions with a `scipy_` prefix (`scipy_cblas_sgemm`), so MLX reaches it only
   through the shim below.

In front of that BLAS goes a small shim (`blas_shim.c`, compiled with the system C compiler on
first use and cached under `~/.cache/mlx_smolvlm/`): MLX computes the single-row products of
token-by-token decoding with `cblas_sgemm`, which OpenBLAS before 0.3.27 runs through its
packed matrix-matrix path, copying the whole weight on every call. The shim sends those
products to `cblas_sgemv` instead, which about doubles fp32 decoding speed. The 2-16-row
products of batched decoding, which OpenBLAS packs the same way, it computes itself (register
tiles over both cores; see the C source). It also forwards MLX's unprefixed BLAS calls to a
prefixed BLAS. Without a C compiler there is no shim: one WARNING says so and names the fix;
everything still works, on the slower path. `active_blas()` says which path is in use.

MLX's CPU backend allocates every result afresh with `malloc`, and glibc serves allocations
over 128 KiB-32 MiB with new `mmap`s: each large intermediate (a 50 MB attention score matrix
of one image tile) then costs a page fault per 4 KiB page, which made a plain `x + 0` on it
40x slower than the arithmetic. `tune_malloc` raises glibc's mmap and trim thresholds so freed
buffers are reused from the heap; the process keeps its peak heap instead of returning it.

Other overrides (environment variables):
- `MLX_SMOLVLM_GEMV_SHIM=off`: do not put the shim in front of the BLAS.
- `MLX_SMOLVLM_MALLOC=off`: keep glibc's default malloc settings.
- `CC`: the C compiler for the shim (default `cc`).
"""

import ctypes
import hashlib
import importlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
# The `MLX_SMOLVLM_BLAS` value that picks the scipy-openblas32 wheel.
WHEEL_CHOICE = "scipy-openblas"
# How BLAS builds name `cblas_sgemm`: plain, or scipy-openblas32's prefix.
SYMBOL_PREFIXES = ("", "scipy_")
SHIM_SOURCE = Path(__file__).with_name("blas_shim.c")
COMPILE_TIMEOUT_S = 120
# glibc mallopt parameters and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30

SLOW = "MLX's matrix products run on its bundled reference BLAS, the slow path (fp32 decoding about 5x slower)"
NO_BLAS_FIX = (
    "pip install scipy-openblas32 (and a C compiler), or apt-get install libopenblas0-pthread"
)
NO_SHIM_FIX = "install a C compiler (apt-get install gcc) or point CC at one"


@dataclass(frozen=True)
class BlasPath:
    """The BLAS that MLX's matrix products run on in this process."""

    library: str | None  # None: MLX's bundled reference BLAS
    shim: bool  # whether `blas_shim.c` sits in front of the library
    reason: str = ""  # why there is no library, or no shim

    def describe(self) -> str:
        """One line for start-up logs."""
        if self.library is None:
            return f"BLAS: MLX's bundled reference BLAS, the slow path ({self.reason})"
        shim = "on" if self.shim else f"off ({self.reason})"
        return f"BLAS: {self.library}, GEMV shim {shim}"


# What `load_optimized_blas` did (see `active_blas`), and the shim library once loaded.
_active = BlasPath(None, False, "mlx_smolvlm.blas.load_optimized_blas has not run")
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
        The library path, or None when the source or a working C compiler is missing (a
        failed compilation is logged; the caller warns about the consequence).
    """
    # Built for this CPU (-march=native), so the cache key names the CPU too.
    return build_c_library(SHIM_SOURCE, ["-march=native", "-fopenmp-simd"])


def build_c_library(source_path: Path, flags: list[str]) -> Path | None:
    """Compile a C source of this package into a shared library (with `-O3` and `flags`), or
    reuse the cached build, named by the source, the package's C headers (which it may
    include), compiler, flags and CPU.

    Args:
        source_path: The C file.
        flags: Extra compiler flags.

    Returns:
        The library path, or None when the source or a working C compiler is missing (a
        failed compilation is logged).
    """
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not source_path.is_file() or compiler is None:
        return None
    source = source_path.read_bytes()
    headers = b"".join(path.read_bytes() for path in sorted(source_path.parent.glob("*.h")))
    key = source + headers + compiler.encode() + " ".join(flags).encode() + _cpu_flags()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = cache_dir() / f"{source_path.stem}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", *flags, "-shared", "-fPIC"]
        cmd += ["-o", str(built), str(source_path), "-ldl", "-lpthread", "-lm"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", b"") or b""
            logger.warning(
                "%s not built (%s): %s", source_path.name, err, stderr.decode(errors="replace")
            )
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


def system_openblas() -> str | None:
    """The first system OpenBLAS found (Debian's `libopenblas0-pthread` and the like), or None."""
    return next((path for path in CANDIDATES if Path(path).exists()), None)


def wheel_openblas() -> str | None:
    """The library of the `scipy-openblas32` wheel, or None when it is not installed."""
    try:
        # Importing it loads the library (with its prefixed names only: nothing changes for MLX).
        wheel = importlib.import_module("scipy_openblas32")
    except ImportError:
        return None
    return str(Path(wheel.get_lib_dir()) / wheel.get_library(fullname=True))


def find_blas(choice: str) -> str | None:
    """The BLAS library to load for `MLX_SMOLVLM_BLAS=choice` (see the module docstring)."""
    if choice == WHEEL_CHOICE:
        return wheel_openblas()
    if choice:
        return choice
    return system_openblas() or wheel_openblas()


def symbol_prefix(library: ctypes.CDLL) -> str | None:
    """The prefix of the library's CBLAS names (one of `SYMBOL_PREFIXES`), or None if it has none."""
    for prefix in SYMBOL_PREFIXES:
        if all(hasattr(library, f"{prefix}cblas_{name}") for name in ("sgemm", "sgemv")):
            return prefix
    return None


def load_optimized_blas() -> str | None:
    """Load the optimized BLAS and the GEMV shim, on Linux, unless MLX is already loaded.

    Also applies `tune_malloc`. A missing BLAS or shim is one WARNING naming the fix.

    Returns:
        The path of the BLAS that MLX now uses, or None (see `active_blas` for why).
    """
    global _active
    _active = _load()
    return _active.library


def active_blas() -> BlasPath:
    """Which BLAS MLX's matrix products use in this process, and whether the shim is on."""
    return _active


def _load() -> BlasPath:
    choice = os.environ.get("MLX_SMOLVLM_BLAS", "")
    if not sys.platform.startswith("linux"):
        return BlasPath(None, False, "not Linux: MLX uses the platform's own BLAS")
    if choice == "off":
        return BlasPath(None, False, "MLX_SMOLVLM_BLAS=off")
    tune_malloc()
    if "mlx.core" in sys.modules:
        reason = "mlx.core was imported before mlx_smolvlm"
        logger.warning("%s, so %s. Fix: import mlx_smolvlm first", reason, SLOW)
        return BlasPath(None, False, reason)
    path = find_blas(choice)
    if path is None:
        reason = f"MLX_SMOLVLM_BLAS={choice}: not installed" if choice else "no BLAS found"
        logger.warning("%s: %s. Fix: %s", reason, SLOW, NO_BLAS_FIX)
        return BlasPath(None, False, reason)
    # Loaded privately first, to read its names: the shim must join the global scope before it.
    try:
        prefix = symbol_prefix(ctypes.CDLL(path))
    except OSError as err:
        prefix, reason = None, f"{path} does not load: {err}"
    else:
        reason = f"{path} has no cblas_sgemm/cblas_sgemv"
    if prefix is None:
        logger.warning("%s: %s. Fix: %s", reason, SLOW, NO_BLAS_FIX)
        return BlasPath(None, False, reason)
    return _load_with_shim(path, prefix)


def _load_with_shim(path: str, prefix: str) -> BlasPath:
    """Load the shim (when possible) and then the BLAS, both with global symbol visibility."""
    global _shim
    shim_path, reason = _shim_library()
    if shim_path is None:
        if prefix:  # only the shim can send MLX's calls to prefixed names
            fix = f"{NO_SHIM_FIX}, or apt-get install libopenblas0-pthread"
            logger.warning("%s, and %s needs it: %s. Fix: %s", reason, path, SLOW, fix)
            return BlasPath(None, False, f"{reason}, and {path} needs it")
        # Not warned when asked for: it is the fast BLAS, only decoding about 2x slower.
        if reason != "MLX_SMOLVLM_GEMV_SHIM=off":
            logger.warning(
                "%s: fp32 decoding on %s runs about 2x slower. Fix: %s", reason, path, NO_SHIM_FIX
            )
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return BlasPath(path, False, reason)
    # The shim first, so that libmlx.so's cblas_sgemm resolves to it; then the BLAS.
    shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _shim = shim
    if shim.mlx_smolvlm_blas_shim_init(path.encode(), prefix.encode()) != 0:
        # Not expected (`symbol_prefix` found the names): unbound, the shim uses the next BLAS
        # in the process, which is this one only if its names are plain.
        reason = f"the GEMV shim could not bind to {path}"
        logger.warning("%s%s", reason, f": {SLOW}" if prefix else "")
        return BlasPath(None if prefix else path, True, reason)
    return BlasPath(path, True)


def _shim_library() -> tuple[Path | None, str]:
    """The shim's library, built if needed, or None and why not."""
    if os.environ.get("MLX_SMOLVLM_GEMV_SHIM") == "off":
        return None, "MLX_SMOLVLM_GEMV_SHIM=off"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler}) to build the GEMV shim"
    built = build_gemv_shim()
    return built, "" if built else "the GEMV shim did not compile"


def gemv_shim_calls() -> int | None:
    """How many matrix products the shim has sent to `cblas_sgemv`, or None without the shim."""
    if _shim is None:
        return None
    _shim.mlx_smolvlm_blas_shim_gemv_calls.restype = ctypes.c_long
    return int(_shim.mlx_smolvlm_blas_shim_gemv_calls())
