"""Every weight-naming rule: Hugging Face <-> ours <-> the MLX export (mlx-vlm / MLX Swift).

- Ours are the `Model`'s attribute paths: ``vision_model.*``, ``connector.*``,
  ``text_model.*`` and ``lm_head.*``.
- Hugging Face puts everything but ``lm_head`` under ``model.``.
- The export (what mlx-vlm and MLX Swift load as is) renames ``text_model`` to
  ``language_model`` and puts ``lm_head`` inside it: ``language_model.lm_head``.

Only names live here; layouts (the patch convolution's channel order) and dropped buffers are
each tower's ``sanitize``.
"""

from __future__ import annotations

from typing import TypeVar

HF_PREFIX = "model."
# The one Hugging Face tensor outside `model.`.
HF_UNPREFIXED = "lm_head"
EXPORT_TEXT_MODEL = "language_model"
# Our module paths <-> the exported names, most specific first.
_TO_EXPORT = (("lm_head", "language_model.lm_head"), ("text_model", EXPORT_TEXT_MODEL))
_FROM_EXPORT = tuple((theirs, ours) for ours, theirs in _TO_EXPORT)

T = TypeVar("T")


def _rename_root(path: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``path`` with its leading module renamed by the first ``(old, new)`` pair that matches
    it, or unchanged if none does."""
    for old, new in renames:
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return path


def to_export_path(path: str) -> str:
    """Map one of our parameter or module paths to the exported name.

    Args:
        path: E.g. ``text_model.layers.0.mlp.down_proj`` or ``lm_head.weight``.
    """
    return _rename_root(path, _TO_EXPORT)


def from_export_path(path: str) -> str:
    """Inverse of ``to_export_path``.

    Args:
        path: An exported name such as ``language_model.lm_head``.
    """
    return _rename_root(path, _FROM_EXPORT)


def to_hf_path(path: str) -> str:
    """Map one of our parameter paths to the Hugging Face name.

    Args:
        path: E.g. ``text_model.norm.weight``.
    """
    return path if path.startswith(HF_UNPREFIXED + ".") else HF_PREFIX + path


def from_checkpoint_names(weights: dict[str, T]) -> dict[str, T]:
    """Rename the tensors of a Hugging Face checkpoint or an MLX export to our paths.

    A checkpoint is an export when any name starts with ``language_model.``.

    Args:
        weights: Checkpoint tensors by name.
    """
    if any(k.startswith(EXPORT_TEXT_MODEL + ".") for k in weights):
        weights = {from_export_path(k): v for k, v in weights.items()}
    return {k.removeprefix(HF_PREFIX): v for k, v in weights.items()}


def to_hf_names(weights: dict[str, T]) -> dict[str, T]:
    """Rename tensors from our paths to Hugging Face's (inverse of ``from_checkpoint_names``).

    Args:
        weights: Tensors by our parameter path.
    """
    return {to_hf_path(k): v for k, v in weights.items()}


def to_export_names(weights: dict[str, T]) -> dict[str, T]:
    """Rename tensors from our paths to the exported names.

    Args:
        weights: Tensors by our parameter path.
    """
    return {to_export_path(k): v for k, v in weights.items()}


# llama.cpp's GGUF names (``convert_hf_to_gguf.py``) -> our module paths. The text GGUF holds
# the decoder (``blk.N.*``); the ``mmproj`` GGUF holds the vision tower (``v.*``) and the
# connector (``mm.*``). Each maps a module; its ``.weight`` / ``.bias`` follow.
_GGUF_MODULES = {
    "token_embd": "text_model.embed_tokens",
    "output_norm": "text_model.norm",
    "output": "lm_head",
    "v.patch_embd": "vision_model.embeddings.patch_embedding",
    "v.position_embd": "vision_model.embeddings.position_embedding",
    "v.post_ln": "vision_model.post_layernorm",
    "mm.model.fc": "connector.modality_projection.proj",
}
_GGUF_TEXT_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp calls SigLIP's fc1 the FFN's "up" and fc2 its "down".
_GGUF_VISION_BLOCK = {
    "ln1": "layer_norm1",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_GGUF_BLOCKS = (
    ("blk.", "text_model.layers.", _GGUF_TEXT_BLOCK),
    ("v.blk.", "vision_model.encoder.layers.", _GGUF_VISION_BLOCK),
)


def from_gguf_name(name: str) -> str | None:
    """Our parameter path for a llama.cpp GGUF tensor name, or None if it has none.

    Args:
        name: E.g. ``blk.3.attn_q.weight``, ``v.blk.0.ln1.bias`` or ``mm.model.fc.weight``.
    """
    module, _, param = name.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _GGUF_MODULES:
        return f"{_GGUF_MODULES[module]}.{param}"
    for prefix, ours, table in _GGUF_BLOCKS:
        index, _, part = module.removeprefix(prefix).partition(".")
        if module.startswith(prefix) and index.isdigit() and part in table:
            return f"{ours}{index}.{table[part]}.{param}"
    return None
