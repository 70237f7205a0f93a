"""Load mlx_smolvlm (and with it the optimized BLAS) before any test module imports mlx.core."""

import mlx_smolvlm  # noqa: F401
