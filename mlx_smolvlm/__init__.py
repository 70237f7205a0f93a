"""SmolVLM2 on MLX: load Hugging Face checkpoints, quantize, export and generate."""

from .blas import load_optimized_blas

# Before anything imports mlx.core: see blas.py.
BLAS = load_optimized_blas()
