"""The workloads of the tokens-per-second benchmark, their shared inputs and a run's figures.

Every system reads the same prompt token ids and pixels from ``<workload>.npz`` files, made
once by this port's processor (which the tests hold equal to transformers').
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE = (640, 480)
VIDEO_SECONDS = 10
VIDEO_FPS = 24
QUESTION_TOKENS = 20
TEXT_PROMPT_TOKENS = 512
TEXT = (
    "Describe this picture in detail: the main objects, their colors, shapes and positions, any "
    "text you can read, the light, the setting, and what might have happened just before it was "
    "taken."
)
WORDS = (
    "river mountain window library engine garden signal harbor lantern orbit meadow pencil "
    "bridge thunder violin canyon marble forest compass ladder museum saddle glacier"
).split()


@dataclass(frozen=True)
class Workload:
    """One benchmark task: what the prompt holds and how many tokens to generate."""

    name: str
    media: str  # "image", "text" or "video"
    max_tokens: int
    description: str


WORKLOADS = {
    "a": Workload("a", "image", 128, "one 640x480 image, full tiling, 20-token question"),
    "b": Workload("b", "text", 256, "text only, 512-token prompt"),
    "c": Workload("c", "video", 64, "10-second video at the checkpoint's sampling"),
}


@dataclass
class RunResult:
    """Figures of one system on one workload (None where not measured or not applicable)."""

    system: str
    workload: str
    status: str = "ok"
    load_s: float | None = None
    preprocess_s: float | None = None
    vision_s: float | None = None
    ttft_s: float | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    peak_memory_gb: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    weight_bytes_per_token: int | None = None
    bandwidth_fraction: float | None = None
    notes: str = ""


def write_image(path: Path) -> None:
    """A deterministic 640x480 RGB test picture (gradients, shapes and noise) as PNG."""
    from PIL import Image, ImageDraw

    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 260, 260), fill=(220, 40, 40))
    draw.rectangle((360, 200, 600, 420), fill=(40, 40, 200))
    draw.text((300, 40), "SmolVLM2 benchmark", fill=(255, 255, 255))
    image.save(path)


def write_video(path: Path) -> None:
    """A deterministic 10-second 640x480 MPEG-4 video of a moving square, written with PyAV."""
    import av

    w, h = IMAGE_SIZE
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(VIDEO_SECONDS * VIDEO_FPS):
            frame = np.full((h, w, 3), (30, 90, 30), dtype=np.uint8)
            left = i * (w - 120) // (VIDEO_SECONDS * VIDEO_FPS)
            frame[180:300, left : left + 120] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _text_of_tokens(tokenizer: Any, text: str, n: int) -> str:
    """A prefix of ``text`` that the tokenizer encodes to ``n`` tokens (``text`` repeated)."""
    ids = tokenizer.encode(" ".join([text] * (n // 8 + 2)))
    for size in range(n, n - 8, -1):
        candidate = tokenizer.decode(ids[:size])
        if len(tokenizer.encode(candidate)) == n:
            return candidate
    raise ValueError(f"cannot cut the benchmark text to exactly {n} tokens")


def _messages(media: str, text: str) -> list[dict[str, Any]]:
    content = [] if media == "text" else [{"type": media}]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def workload_prompt(processor: Any, workload: Workload, inputs_dir: Path) -> tuple[Any, dict]:
    """The chat messages and media keyword arguments of a workload for ``prepare_prompt``.

    Args:
        processor: This package's ``Processor``.
        workload: The workload.
        inputs_dir: Holds ``image.png`` and ``video.mp4`` (see ``write_inputs``).
    """
    tokenizer = processor.tokenizer
    if workload.media == "text":
        # Fill the chat template up to exactly TEXT_PROMPT_TOKENS tokens.
        overhead = len(tokenizer.encode(processor.apply_chat_template(_messages("text", "x"))))
        body_tokens = TEXT_PROMPT_TOKENS - overhead + 1
        rng = np.random.default_rng(0)
        body = " ".join(rng.choice(WORDS, size=TEXT_PROMPT_TOKENS))
        for _ in range(4):
            text = _text_of_tokens(tokenizer, body, body_tokens)
            n = len(tokenizer.encode(processor.apply_chat_template(_messages("text", text))))
            if n == TEXT_PROMPT_TOKENS:
                break
            body_tokens += TEXT_PROMPT_TOKENS - n
        return _messages("text", text), {}
    question = _text_of_tokens(tokenizer, TEXT, QUESTION_TOKENS)
    if workload.media == "image":
        return _messages("image", question), {"images": [str(inputs_dir / "image.png")]}
    return _messages("video", question), {"video": str(inputs_dir / "video.mp4")}


def write_inputs(model_dir: Path, inputs_dir: Path, workloads: tuple[str, ...]) -> None:
    """Write the image, the video and each workload's model inputs as ``<name>.npz``.

    Every system reads its token ids and pixels from these files, so all run the same prompt.

    Args:
        model_dir: The checkpoint (its processor files decide tiling and frame sampling).
        inputs_dir: Output directory.
        workloads: Workload names.
    """
    from mlx_smolvlm.generate import prepare_prompt
    from mlx_smolvlm.processing import Processor

    inputs_dir.mkdir(parents=True, exist_ok=True)
    write_image(inputs_dir / "image.png")
    write_video(inputs_dir / "video.mp4")
    processor = Processor.from_pretrained(model_dir)
    for name in workloads:
        messages, media = workload_prompt(processor, WORKLOADS[name], inputs_dir)
        prompt = prepare_prompt(processor, messages, **media)
        arrays = {"input_ids": np.array([prompt.input_ids], dtype=np.int64)}
        if prompt.pixel_values is not None:
            arrays["pixel_values"] = prompt.pixel_values[None].astype(np.float32)
            mask = prompt.pixel_attention_mask
            if mask is None:
                mask = np.ones(prompt.pixel_values.shape[:1] + prompt.pixel_values.shape[2:])
            arrays["pixel_attention_mask"] = mask[None].astype(bool)
        np.savez(inputs_dir / f"{name}.npz", **arrays)


def load_inputs(inputs_dir: Path, workload: str) -> dict[str, np.ndarray]:
    """The arrays of a workload's ``<name>.npz`` (see ``write_inputs``)."""
    with np.load(inputs_dir / f"{workload}.npz") as data:
        return {k: data[k] for k in data.files}


def decode_timing(result: RunResult, first_token_time: float, tokens: int) -> None:
    """Record ``tokens`` generated and the decode speed after the first token, timed from now."""
    elapsed = time.perf_counter() - first_token_time
    result.generated_tokens = tokens
    result.decode_tps = (tokens - 1) / elapsed if tokens > 1 else None
