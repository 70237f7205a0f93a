"""The SmolVLM2 `Processor`: chat template, tokenizer, images and video to a `PreparedPrompt`.

No torch or transformers at runtime: the tokenizer runs on `tokenizers`, the chat template on
jinja2, images on Pillow/NumPy and video on PyAV.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from PIL import Image

from .config import TEXT_ONLY_ERROR, load_config
from .image_processing import (
    ImageInput,
    ImageProcessor,
    ImageProcessorConfig,
    convert_to_rgb,
    load_image,
)
from .prompt import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    expand_media_tokens,
    image_prompt,
    render_chat_template,
    video_prompt,
)
from .tokenizer import Tokenizer
from .video import VideoInput, VideoProcessor, VideoSampling

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
# Written back by `save_pretrained` when present.
PROCESSOR_FILES = REQUIRED_FILES + (
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "generation_config.json",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


@dataclass
class PreparedPrompt:
    """A tokenized prompt and its image tiles, ready for the model.

    `pixel_values` `[tiles, 3, H, W]` and `pixel_attention_mask` `[tiles, H, W]` hold one entry
    per run of `<image>` tokens in `input_ids`, in order; `tile_hashes` names each tile's pixels
    (`<image hash>/<tile index in that image>`).
    """

    input_ids: list[int]
    pixel_values: np.ndarray | None = None
    pixel_attention_mask: np.ndarray | None = None
    tile_hashes: list[str] = field(default_factory=list)

    def __add__(self, other: PreparedPrompt) -> PreparedPrompt:
        """This prompt followed by ``other`` (a conversation's next turn), tiles padded alike."""
        tiles = [p for p in (self, other) if p.pixel_values is not None]
        pixel_values = mask = None
        if tiles:
            height = max(p.pixel_values.shape[-2] for p in tiles)
            width = max(p.pixel_values.shape[-1] for p in tiles)
            pixel_values = np.concatenate([_pad(p.pixel_values, height, width) for p in tiles])
            mask = np.concatenate([_pad(_mask_of(p), height, width) for p in tiles])
        return PreparedPrompt(
            self.input_ids + other.input_ids,
            pixel_values,
            mask,
            self.tile_hashes + other.tile_hashes,
        )


def _mask_of(prompt: PreparedPrompt) -> np.ndarray:
    if prompt.pixel_attention_mask is not None:
        return prompt.pixel_attention_mask
    return np.ones(prompt.pixel_values.shape[:1] + prompt.pixel_values.shape[2:], dtype=bool)


def _pad(array: np.ndarray, height: int, width: int) -> np.ndarray:
    pad = [(0, 0)] * (array.ndim - 2) + [
        (0, height - array.shape[-2]),
        (0, width - array.shape[-1]),
    ]
    return np.pad(array, pad)


class Processor:
    """Turns chat messages, images and a video into a SmolVLM2 `PreparedPrompt`.

    Args:
        tokenizer: The text tokenizer.
        image_processor: Tiles and normalizes images (video frames too).
        image_seq_len: `<image>` tokens per tile.
        chat_template: The checkpoint's jinja chat template.
        files: Raw processor files by name, written back by `save_pretrained`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        image_seq_len: int,
        chat_template: str,
        files: dict[str, bytes],
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.chat_template = chat_template
        self.files = files
        sampling = image_processor.config.video_sampling
        self.video_processor = (
            VideoProcessor(image_processor, VideoSampling.from_dict(sampling)) if sampling else None
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, upscale_small_images: bool | None = None
    ) -> Processor:
        """Load from a local checkpoint directory.

        Args:
            path: Directory with `tokenizer.json`, `tokenizer_config.json`,
                `preprocessor_config.json`, and a chat template (`chat_template.json`,
                `chat_template.jinja` or inside `tokenizer_config.json`). `image_seq_len` comes
                from `processor_config.json`, else `preprocessor_config.json`, else is derived
                from `config.json`. `generation_config.json` gives the EOS ids when present.
            upscale_small_images: False keeps small images at their own size (MLX Swift's tiling)
                instead of upscaling them to `size.longest_edge` (transformers); None takes
                the value in `preprocessor_config.json`, True when absent.

        Raises:
            FileNotFoundError: The directory, a required file, or any source of
                `image_seq_len` is missing.
            ValueError: A file is malformed (`ConfigError` for `config.json`).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"Processor directory not found: {root}")
        missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"Missing processor file(s) in {root}: {', '.join(missing)}")
        files = {
            name: (root / name).read_bytes() for name in PROCESSOR_FILES if (root / name).is_file()
        }

        tokenizer_config = _read_json(root / "tokenizer_config.json")
        preprocessor = _read_json(root / "preprocessor_config.json")
        processor = (
            _read_json(root / "processor_config.json") if "processor_config.json" in files else {}
        )
        generation = (
            _read_json(root / "generation_config.json") if "generation_config.json" in files else {}
        )

        if "chat_template.jinja" in files:
            chat_template = files["chat_template.jinja"].decode("utf-8")
        elif "chat_template.json" in files:
            chat_template = _read_json(root / "chat_template.json").get("chat_template")
        else:
            chat_template = tokenizer_config.get("chat_template")
        if not isinstance(chat_template, str):
            raise FileNotFoundError(
                f"No chat template in {root}: expected chat_template.jinja, chat_template.json "
                "or a 'chat_template' string in tokenizer_config.json"
            )

        _read_json(root / "tokenizer.json")  # a clear error for malformed JSON
        backend = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        eos = generation.get("eos_token_id")
        eos_token_ids = None if eos is None else list(eos) if isinstance(eos, list) else [eos]
        tokenizer = Tokenizer(backend, tokenizer_config, eos_token_ids)

        if upscale_small_images is not None:
            preprocessor = {**preprocessor, "upscale_small_images": upscale_small_images}
        image_config = ImageProcessorConfig.from_dict(preprocessor)
        image_seq_len = processor.get("image_seq_len", preprocessor.get("image_seq_len"))
        if image_seq_len is None:
            if not (root / "config.json").is_file():
                raise FileNotFoundError(
                    f"image_seq_len is in neither processor_config.json nor preprocessor_config.json, "
                    f"and {root} has no config.json to derive it from"
                )
            image_seq_len = load_config(root).image_seq_len
        logger.debug("Loaded the processor from %s, image_seq_len %s", root, image_seq_len)
        return cls(
            tokenizer, ImageProcessor(image_config), int(image_seq_len), chat_template, files
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer and processor files to `path`.

        `image_seq_len` goes into both `processor_config.json` (transformers) and
        `preprocessor_config.json` (MLX Swift reads it only there), and
        `upscale_small_images` into `preprocessor_config.json` (other readers ignore it).

        Args:
            path: Output directory, created if needed.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (root / name).write_bytes(data)
        for name in ("processor_config.json", "preprocessor_config.json"):
            config = (
                json.loads(self.files[name])
                if name in self.files
                else {"processor_class": "SmolVLMProcessor"}
            )
            config["image_seq_len"] = self.image_seq_len
            if name == "preprocessor_config.json":
                config["upscale_small_images"] = self.image_processor.config.upscale_small_images
            (root / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render HF-style messages to the prompt text, with one `<image>`/`<video>` per media part.

        Args:
            messages: `[{"role", "content": str | [{"type": "text"|"image"|"video", ...}]}]`.
            add_generation_prompt: End with `Assistant:`.

        Raises:
            ValueError: The messages are malformed.
        """
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens,
        )

    def __call__(
        self, text: str, images: Sequence[ImageInput] | None = None, video: VideoInput | None = None
    ) -> PreparedPrompt:
        """Tokenize a prompt and preprocess its media.

        Args:
            text: The prompt with one `<image>` per image or one `<video>`.
            images: Image sources in prompt order (see `load_image`); a single source is
                taken as a list of one.
            video: A video file path or its bytes.

        Returns:
            The token ids, the tiles (None without media) and each tile's hash: the sha256 of
            its image's decoded RGB pixels (or of its video frame) and its place among that
            image's tiles.

        Raises:
            ValueError: Placeholders and media disagree, both images and a video are given, or
                the model is text only (`image_seq_len` 0) and media are given.
            ImageLoadError: An image cannot be read.
            VideoLoadError: The video cannot be read.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
            images = [images]
        images = list(images or [])
        if (images or video is not None) and not self.image_seq_len:
            raise ValueError(TEXT_ONLY_ERROR)
        if images and video is not None:
            raise ValueError("Pass either images or one video per prompt, not both")
        n_images, n_videos = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
        if n_images != len(images) or n_videos != (video is not None):
            raise ValueError(
                f"The prompt has {n_images} {IMAGE_TOKEN} and {n_videos} {VIDEO_TOKEN} placeholders but "
                f"{len(images)} images and {int(video is not None)} videos were given"
            )

        tiles, tile_hashes, image_prompts, video_prompts = [], [], [], []
        for source in images:
            rgb = convert_to_rgb(load_image(source))
            image_hash = self._hash_pixels(np.asarray(rgb))
            image_tiles, rows, cols = self.image_processor.split(rgb)
            tiles.append(image_tiles)
            tile_hashes += [f"{image_hash}/{tile}" for tile in range(len(image_tiles))]
            image_prompts.append(image_prompt(rows, cols, self.image_seq_len))
        if video is not None:
            if self.video_processor is None:
                raise ValueError("This checkpoint's preprocessor_config.json has no video_sampling")
            frames, metadata = self.video_processor(video)
            tiles.extend(frame[None] for frame in frames)
            tile_hashes += [f"{self._hash_pixels(frame)}/0" for frame in frames]
            video_prompts.append(
                video_prompt(metadata.timestamps, metadata.duration, self.image_seq_len)
            )

        input_ids = self.tokenizer.encode(expand_media_tokens(text, image_prompts, video_prompts))
        if not tiles:
            return PreparedPrompt(input_ids)
        pixel_values, mask = self.image_processor.stack(tiles)
        return PreparedPrompt(input_ids, pixel_values, mask, tile_hashes)

    def _hash_pixels(self, pixels: np.ndarray) -> str:
        """sha256 of uint8 HWC pixels, their shape, and the settings that change the tiles."""
        digest = hashlib.sha256(repr((pixels.shape, self.image_processor.config)).encode())
        digest.update(np.ascontiguousarray(pixels).data)
        return digest.hexdigest()
