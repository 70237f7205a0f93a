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

Every graph, fp32 ones included, is written by `save_graph`: a graph whose weights exceed
protobuf's 2 GiB limit keeps them in ``{name}.onnx_data`` beside ``{name}.onnx``, the layout
Hugging Face publishes for large graphs and ONNX Runtime and transformers.js load.
"""

from __future__ import annotations

import logging
import stat
import tempfile
from pathlib import Path

try:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16
except ImportError as err:  # `onnx_export.require_onnx_extra` names the extra
    IMPORT_ERROR: ImportError | None = err
else:
    IMPORT_ERROR = None

logger = logging.getLogger(__name__)
# The quantizer logs every node it visits at INFO, and warns that it raises the embeddings
# graph to opset 21 / IR 10 for int4 "but the generated model may not be valid": ONNX Runtime and
# transformers.js load and run it (tests/mlx_smolvlm/test_onnx.py).
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)

DTYPE_VARIANTS = ("fp16",)
QUANTIZATIONS = ("int8", "q4", "q4f16")
Q4_BLOCK_SIZE = 32
# One ONNX file holds at most 2 GiB (protobuf's limit): graphs whose tensors exceed this, less
# 64 MiB left for the nodes, keep them in an external data file (tests lower it to take that
# path on tiny checkpoints).
MAX_GRAPH_BYTES = 2**31 - 2**26
EXTERNAL_DATA_SUFFIX = "_data"


def external_data_path(path: Path) -> Path:
    """``{name}.onnx_data`` beside ``{name}.onnx``: where `save_graph` puts large weights."""
    return path.with_name(path.name + EXTERNAL_DATA_SUFFIX)


def graph_bytes(path: Path) -> int:
    """The size on disk of the graph at ``path`` with its external data file, if any."""
    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The serialized bytes of the graph's initializers and constant tensors."""
    constants = (a.t for node in model.graph.node for a in node.attribute if a.HasField("t"))
    return sum(t.ByteSize() for t in (*model.graph.initializer, *constants))


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path``, its tensors in `external_data_path` when they exceed
    `MAX_GRAPH_BYTES` (all in that one file, as Hugging Face lays them out).

    ``model`` must hold its tensors' data (``onnx.load`` loads external data by default).
    """
    data = external_data_path(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if tensor_bytes(model) <= MAX_GRAPH_BYTES:
        onnx.save_model(model, path)
        return
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        convert_attribute=True,
    )
    data.chmod(stat.S_IMODE(path.stat().st_mode))  # onnx makes it owner-only; serve it alike


def variant_path(onnx_dir: Path, graph: str, variant: str) -> Path:
    """``onnx_dir / f"{graph}_{variant}.onnx"``, or ``{graph}.onnx`` for ``fp32``."""
    return onnx_dir / (f"{graph}.onnx" if variant == "fp32" else f"{graph}_{variant}.onnx")


def to_fp16(source: Path) -> onnx.ModelProto:
    # From the path: ONNX Runtime then infers shapes with `infer_shapes_path`, which takes
    # graphs over 2 GiB (the in-memory `infer_shapes` cannot serialize them).
    return convert_float_to_float16(str(source), keep_io_types=True)


def to_int8(source: Path) -> onnx.ModelProto:
    """ONNX Runtime's dynamic quantization, which only writes files: into a scratch
    directory (external data always, so any size fits), read back for `save_graph`."""
    with tempfile.TemporaryDirectory(dir=source.parent) as scratch:
        target = Path(scratch) / source.name
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, use_external_data_format=True)
        return onnx.load(target)


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
        model = to_int8(source)
    elif variant in ("fp16", "q4f16"):
        model = to_fp16(source)
    else:
        model = onnx.load(source)
    if variant in ("q4", "q4f16"):
        model = to_q4(model, embeddings=graph == "embed_tokens")
    save_graph(model, target)
    return target
