"""SmolVLM2 image preprocessing in NumPy and Pillow.

The default output equals transformers' `SmolVLMImageProcessorPil` for the checkpoint's
`preprocessor_config.json`:

1. Resize so the longest edge equals `size.longest_edge` (small images are upscaled, odd sides
   are evened, 4096 is the cap).
2. Resize again so each side is a multiple of `max_image_size.longest_edge` (the tile size `M`),
   then crop `rows x cols` tiles row-major and append a global image resized to `M x M`.
   An image that fits in one tile is not split: it yields only the global image, rows = cols = 0.
3. Rescale and normalize, then pad every sample to the same number of images.

All resizes go through Pillow with the checkpoint's filter (LANCZOS), on uint8 RGB, exactly as
transformers does, so the pixels match bit for bit. The speed comes from working on PIL images and
one uint8 array per image instead of per-tile float64 copies, and from a 256-entry lookup table
that does rescale and normalize in one pass.

`upscale_small_images=False` skips the upscale in step 1 for images whose longest edge is
already at most `size.longest_edge`, as MLX Swift does (mlx-swift-lm PR #255): a 512x384 image
with the 512 config becomes one tile instead of 13.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .config import BaseConfig, ConfigError

logger = logging.getLogger(__name__)

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized longest edge
URL_TIMEOUT_S = 10.0
URL_MAX_BYTES = 64 * 1024 * 1024

# Pillow opens 16-bit grayscale PNGs in these modes.
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

ImageInput = str | os.PathLike | bytes | Image.Image


class ImageLoadError(ValueError):
    """An image source cannot be fetched, read or decoded. The message names the source."""


@dataclass
class ImageProcessorConfig(BaseConfig):
    """Image settings, with the key names of `preprocessor_config.json`.

    `upscale_small_images` is ours: `True` resizes every image so its longest edge equals
    `size.longest_edge` (transformers); `False` only shrinks larger images (MLX Swift).
    """

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 2048})
    max_image_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 512})
    resample: int = Image.Resampling.LANCZOS.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_image_splitting: bool = True
    video_sampling: dict[str, Any] | None = None
    upscale_small_images: bool = True

    def __post_init__(self) -> None:
        for name in ("size", "max_image_size"):
            value = getattr(self, name)
            edge = value.get("longest_edge") if isinstance(value, dict) else None
            if not isinstance(edge, int) or edge <= 0:
                raise ConfigError(
                    f"Image config field {name!r} needs a positive 'longest_edge', got {value!r}"
                )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(
                    f"Image config field {name!r} needs 3 values, got {getattr(self, name)!r}"
                )
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"Image config field 'image_std' has a zero: {self.image_std!r}")
        try:
            Image.Resampling(self.resample)
        except ValueError as err:
            raise ConfigError(
                f"Image config field 'resample' is not a Pillow filter: {self.resample!r}"
            ) from err

    @property
    def longest_edge(self) -> int:
        return self.size["longest_edge"]

    @property
    def tile_size(self) -> int:
        return self.max_image_size["longest_edge"]


@dataclass
class ImageBatch:
    """Preprocessed images.

    pixel_values: `[batch, images, 3, H, W]` float32, zero-padded.
    pixel_attention_mask: `[batch, images, H, W]` bool, True on real pixels.
    rows, cols: per sample and image, the tile grid (0, 0 when only the global image exists).
    """

    pixel_values: np.ndarray
    pixel_attention_mask: np.ndarray
    rows: list[list[int]]
    cols: list[list[int]]


def _describe(source: object) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    text = str(source)
    return text if len(text) <= 120 else text[:117] + "..."


def _decode(opener: Any, name: str) -> Image.Image:
    """Open and fully decode an encoded image, applying its EXIF orientation like transformers."""
    try:
        image = Image.open(opener)
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"Cannot decode image {name}: {err}") from err


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """Download `url` with a timeout and a size limit.

    Args:
        url: An http(s) URL.
        timeout: Seconds for the whole download (and for each network operation).
        max_bytes: Largest accepted body.

    Raises:
        ImageLoadError: The request fails, times out or the body exceeds `max_bytes`.
    """
    logger.debug("Fetching image %s", url)
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageLoadError(
                        f"Image {_describe(url)} is larger than the {max_bytes} byte limit"
                    )
                if time.monotonic() > deadline:
                    raise ImageLoadError(
                        f"Image {_describe(url)} took longer than {timeout} s to download"
                    )
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise ImageLoadError(f"Cannot fetch image {_describe(url)}: {err}") from err
    return b"".join(chunks)


def load_image(
    source: ImageInput, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES
) -> Image.Image:
    """Load an image from a path, an http(s) URL, a base64 data URL, encoded bytes or a PIL image.

    Args:
        source: The image or where to find it. A `PIL.Image` is returned as is.
        timeout: Seconds allowed for a URL download.
        max_bytes: Largest accepted URL download.

    Raises:
        ImageLoadError: The source is missing, unreachable, not an image, or truncated.
        TypeError: The source has an unsupported type.
    """
    if isinstance(source, Image.Image):
        try:
            source.load()  # a lazily opened file may turn out truncated here
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"Cannot decode the given PIL image {source!r}: {err}") from err
        return source
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(bytes(source)), _describe(bytes(source)))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            f"Unsupported image type {type(source).__name__}: expected a path, URL, data URL, bytes or PIL.Image"
        )
    if source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(fetch_url(source, timeout, max_bytes)), _describe(source))
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageLoadError(f"Data URL {_describe(source)} is not base64 encoded")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise ImageLoadError(f"Data URL {_describe(source)} has invalid base64: {err}") from err
        return _decode(io.BytesIO(data), _describe(source))
    if not Path(source).is_file():
        raise ImageLoadError(f"Image file not found: {_describe(source)}")
    return _decode(source, _describe(source))


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit RGB, compositing transparency onto white as transformers does.

    16-bit grayscale keeps its high byte. Pillow's own conversion (and so transformers')
    saturates every value above 255, which turns a normal 16-bit image white; Pillow already
    keeps the high byte for 16-bit RGB(A) PNGs.
    """
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        high = np.asarray(image).astype(np.uint16) >> 8
        image = Image.fromarray(high.astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def get_resize_output_image_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Size after resizing the longest edge to `longest_edge` (transformers' rounding).

    The short side is truncated, then made even; the result is capped at `MAX_IMAGE_SIZE`.
    """
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)

    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def get_tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Size rounded up to multiples of `tile`, keeping the aspect ratio as transformers does."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


class ImageProcessor:
    """SmolVLM2 image processor (see the module docstring for the algorithm).

    Args:
        config: The checkpoint's image settings.
    """

    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        self.resample = Image.Resampling(config.resample)
        # uint8 -> float32 lookup per channel: x * rescale_factor in float64, cast to float32,
        # then (x - mean) / std in float32, the same operations (and roundings) as transformers.
        values = np.arange(256, dtype=np.float64)
        if config.do_rescale:
            values = values * config.rescale_factor
        values = values.astype(np.float32)
        if config.do_normalize:
            mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(config.image_std, dtype=np.float32)[:, None]
            self.lut = (values[None, :] - mean) / std
        else:
            self.lut = np.repeat(values[None, :], 3, axis=0)

    def resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        """Resize with the checkpoint's filter (a no-op copy when the size already matches)."""
        return image.resize((width, height), resample=self.resample)

    def normalize(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """Rescale and normalize uint8 `[..., H, W, 3]` into float32 `out` `[..., 3, H, W]`."""
        for c in range(3):
            # uint8 indices are always in range; mode="clip" lets take write straight into `out`.
            np.take(self.lut[c], pixels[..., c], out=out[..., c, :, :], mode="clip")

    def split(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        """Resize and tile one RGB image.

        Returns:
            The uint8 tiles `[tiles, M, M, 3]`, global image last, and the grid rows and cols.
        """
        cfg = self.config
        tile = cfg.tile_size
        width, height = image.size
        if cfg.do_resize and (cfg.upscale_small_images or max(height, width) > cfg.longest_edge):
            height, width = get_resize_output_image_size(height, width, cfg.longest_edge)
            image = self.resize(image, height, width)
        if not cfg.do_image_splitting:
            return np.asarray(self.resize(image, tile, tile))[None], 0, 0

        height, width = get_tiled_size(height, width, tile)
        image = self.resize(image, height, width)
        if height <= tile and width <= tile:
            return np.asarray(image)[None], 0, 0
        rows, cols = height // tile, width // tile
        pixels = np.asarray(image)
        tiles = np.empty((rows * cols + 1, tile, tile, 3), dtype=np.uint8)
        # (rows*M, cols*M, 3) -> (rows, cols, M, M, 3): tiles in row-major order.
        tiles[:-1] = (
            pixels.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)
        )
        tiles[-1] = np.asarray(self.resize(image, tile, tile))
        return tiles, rows, cols

    def preprocess(
        self, images: Sequence[ImageInput] | Sequence[Sequence[ImageInput]]
    ) -> ImageBatch:
        """Preprocess one sample (a list of images) or a batch (a list of lists).

        Args:
            images: Image inputs accepted by `load_image`.

        Raises:
            ImageLoadError: An image cannot be loaded.
            ValueError: No image was given, or a sample of the batch is empty.
        """
        nested = bool(images) and all(isinstance(s, (list, tuple)) for s in images)
        batch = [list(s) for s in images] if nested else [list(images)]
        if not all(batch):
            raise ValueError("No images to preprocess (an empty sample or image list)")
        split = [[self.split(convert_to_rgb(load_image(x))) for x in sample] for sample in batch]
        samples = [self.stack([t for t, _, _ in sample]) for sample in split]
        # Pad the samples to the most images and the largest H and W, as transformers does.
        count = max(len(p) for p, _ in samples)
        height = max(p.shape[2] for p, _ in samples)
        width = max(p.shape[3] for p, _ in samples)
        pixel_values = np.zeros((len(samples), count, 3, height, width), dtype=np.float32)
        mask = np.zeros((len(samples), count, height, width), dtype=bool)
        for b, (sample_pixels, sample_mask) in enumerate(samples):
            n, _, h, w = sample_pixels.shape
            pixel_values[b, :n, :, :h, :w] = sample_pixels
            mask[b, :n, :h, :w] = sample_mask
        rows = [[r for _, r, _ in sample] for sample in split]
        cols = [[c for _, _, c in sample] for sample in split]
        return ImageBatch(pixel_values, mask, rows, cols)

    __call__ = preprocess

    def stack(self, tiles: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Normalize one prompt's uint8 tiles into zero-padded arrays.

        Args:
            tiles: Per image, uint8 `[n, H, W, 3]`.

        Returns:
            `pixel_values` `[tiles, 3, H, W]` float32 and `pixel_attention_mask`
            `[tiles, H, W]` bool, padded to the largest H and W.
        """
        count = sum(len(t) for t in tiles)
        height = max(t.shape[1] for t in tiles)
        width = max(t.shape[2] for t in tiles)
        pixel_values = np.zeros((count, 3, height, width), dtype=np.float32)
        mask = np.zeros((count, height, width), dtype=bool)
        start = 0
        for t in tiles:
            n, h, w = t.shape[:3]
            self.normalize(t, pixel_values[start : start + n, :, :h, :w])
            mask[start : start + n, :h, :w] = True
            start += n
        return pixel_values, mask
