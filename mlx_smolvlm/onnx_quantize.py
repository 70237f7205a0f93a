"""fp16 and quantized variants of the exported ONNX graphs, named as Hugging Face names them.

``{graph}.onnx`` (fp32) gives ``{graph}_fp16.onnx``, ``{graph}_int8.onnx``, ``{graph}_q4.onnx``
and ``{graph}_q4f16.onnx``: the suffixes transformers.js picks with its ``dtype`` option.

- ``fp16``: every float tensor in float16 (ONNX Runtime's converter); inputs and outputs stay
  float32, so the same loop (and fp32 past keys/values) runs every variant.
- ``int8``: ONNX Runtime's dynamic quantization (int8 weights, activations quantized per call).
- ``q4``: ONNX Runtime's ``MatMulNBits`` (4-bit weights in symmetric blocks of 32 along the
  input axis, fp32 scales), and in ``embed_tokens`` its ``GatherBlockQuantized`` (blocks of 32
  along the hidden axis); other ops stay fp32.
- ``q4f16``: ``q4`` on the fp16 graph (fp16 scales and activations).
"""

from __future__ import annotations

import logging
from pathlib import Path

try:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16
except ImportError:  # `onnx_export.require_onnx_extra` names the extra
    pass

logger = logging.getLogger(__name__)
# The quantizer logs every node it visits at INFO, and warns that it raises the embeddings
# graph to opset 21 / IR 10 for int4 "but the generated model may not be valid": ONNX Runtime and
# transformers.js load and run it (tests/mlx_smolvlm/test_onnx.py).
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)

DTYPE_VARIANTS = ("fp16",)
QUANTIZATIONS = ("int8", "q4", "q4f16")
Q4_BLOCK_SIZE = 32


def variant_path(onnx_dir: Path, graph: str, variant: str) -> Path:
    """``onnx_dir / f"{graph}_{variant}.onnx"``, or ``{graph}.onnx`` for ``fp32``."""
    return onnx_dir / (f"{graph}.onnx" if variant == "fp32" else f"{graph}_{variant}.onnx")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    return convert_float_to_float16(model, keep_io_types=True)


def to_q4(model: onnx.ModelProto, embeddings: bool) -> onnx.ModelProto:
    """4-bit MatMul weights, and the embedding table too when ``embeddings`` (the token
    embeddings; the vision position embeddings are added with no norm after them and stay)."""
    op_types = ("MatMul", "Gather") if embeddings else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=Q4_BLOCK_SIZE,
        is_symmetric=True,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


def write_variant(onnx_dir: Path, graph: str, variant: str) -> Path:
    """Write one variant of ``onnx_dir/{graph}.onnx`` beside it.

    Args:
        onnx_dir: The export's ``onnx`` directory holding the fp32 graph.
        graph: ``vision_encoder``, ``embed_tokens`` or ``decoder_model_merged``.
        variant: ``fp16``, ``int8``, ``q4`` or ``q4f16``.

    Returns:
        The written file.
    """
    source, target = variant_path(onnx_dir, graph, "fp32"), variant_path(onnx_dir, graph, variant)
    logger.info("Writing %s", target.name)
    if variant == "int8":
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        return target
    model = onnx.load(source)
    if variant in ("fp16", "q4f16"):
        model = to_fp16(model)
    if variant in ("q4", "q4f16"):
        model = to_q4(model, embeddings=graph == "embed_tokens")
    onnx.save(model, target)
    return target
