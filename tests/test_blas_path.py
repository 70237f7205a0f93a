"""Which BLAS MLX runs on (mlx_smolvlm/blas.py): in CI the fast path and the GEMV shim must be
active, so that CI never goes green on MLX's bundled reference BLAS (a missing compiler or
OpenBLAS is only a WARNING for users). Each source is also checked in a fresh process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_smolvlm.blas import WHEEL_CHOICE, active_blas, find_blas, wheel_openblas

IN_CI = os.environ.get("CI", "").lower() == "true"
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
ON_LINUX = sys.platform.startswith("linux")

# Run in a fresh process: the BLAS is chosen once, before mlx.core is imported.
PROBE = """
import json
import mlx_smolvlm
import mlx.core as mx
import numpy as np
from mlx_smolvlm.blas import active_blas, gemv_shim_calls

rng = np.random.default_rng(0)
a, b = rng.standard_normal((1, 96), dtype=np.float32), rng.standard_normal((96, 80), dtype=np.float32)
before = gemv_shim_calls()
out = mx.array(a) @ mx.array(b)
mx.eval(out)
after = gemv_shim_calls()
equal = np.allclose(np.array(out), a @ b, rtol=1e-5, atol=1e-5)
# The other products libmlx.so imports (cblas_dgemm, cblas_cgemm) also reach a prefixed BLAS.
for dtype in (np.float64, np.complex64):
    x, y = (rng.standard_normal(s).astype(dtype) * (1 + 1j if dtype == np.complex64 else 1)
            for s in ((20, 30), (30, 10)))
    got = np.array(mx.matmul(mx.array(x), mx.array(y), stream=mx.cpu))
    equal = equal and np.allclose(got, x @ y, rtol=1e-4, atol=1e-4)
blas = active_blas()
print(json.dumps({
    "library": blas.library, "shim": blas.shim, "equal": bool(equal),
    "shim_used": before is not None and after > before,
}))
"""


def probe(**env: str) -> tuple[dict, str]:
    """The BLAS path and a checked 1-row product in a fresh process with `env`; and its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def fast_path_possible() -> bool:
    """Linux, a C compiler, an OpenBLAS to load, and no override that turns either off."""
    overridden = os.environ.get("MLX_SMOLVLM_BLAS") == "off"
    overridden |= os.environ.get("MLX_SMOLVLM_GEMV_SHIM") == "off"
    found = find_blas(os.environ.get("MLX_SMOLVLM_BLAS", "")) is not None
    return ON_LINUX and HAS_COMPILER and found and not overridden


def test_fast_blas_path_and_shim_are_active():
    if not (IN_CI or fast_path_possible()):
        pytest.skip("no C compiler or OpenBLAS here (blas.py warned at start); CI requires them")
    blas = active_blas()
    assert blas.library is not None, blas.describe()
    assert blas.shim, blas.describe()


def test_the_pip_only_path_uses_the_wheel_through_the_shim():
    """scipy-openblas32 (what a fresh `pip install` gets on Linux), Debian's OpenBLAS hidden."""
    if not (IN_CI or (ON_LINUX and HAS_COMPILER and wheel_openblas() is not None)):
        pytest.skip("needs Linux, a C compiler and the scipy-openblas32 wheel; CI requires them")
    result, _ = probe(MLX_SMOLVLM_BLAS=WHEEL_CHOICE)
    assert result["library"] == wheel_openblas()
    assert result["shim"] and result["shim_used"] and result["equal"]


def test_without_a_compiler_the_wheel_is_one_warning_naming_the_fix():
    if not (IN_CI or (ON_LINUX and wheel_openblas() is not None)):
        pytest.skip("needs Linux and the scipy-openblas32 wheel; CI requires them")
    result, stderr = probe(MLX_SMOLVLM_BLAS=WHEEL_CHOICE, CC="/nonexistent/cc")
    assert result == {"library": None, "shim": False, "equal": True, "shim_used": False}
    warnings = [line for line in stderr.splitlines() if "C compiler" in line]
    assert len(warnings) == 1, stderr
    assert "slow path" in warnings[0] and "apt-get install gcc" in warnings[0]
