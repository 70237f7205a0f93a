"""SmolVLM2 on MLX: load Hugging Face checkpoints, quantize, export and generate."""

from .blas import load_optimized_blas

# Before anything imports mlx.core: see blas.py.
BLAS = load_optimized_blas()

from .chat import ChatSession  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .load import load, load_model  # noqa: E402
from .random_weights import make_random_checkpoint  # noqa: E402

__all__ = [
    "BLAS",
    "ChatSession",
    "GenerationResponse",
    "generate",
    "load",
    "load_model",
    "make_random_checkpoint",
    "stream_generate",
]
