"""SmolVLM2 video input: PyAV decoding and transformers' frame sampling.

Frames are sampled as `SmolVLMVideoProcessor.sample_frames` does: `min(round(fps * duration),
max_frames)` frames (at least one) spread by `linspace` over the video, skipping `skip_secs` at
each end when the video is longer than `2 * skip_secs + max_frames / fps` seconds. Each frame is
resized so its longest edge is `video_size.longest_edge`, then squared to the tile size, and is
one tile (videos are never split).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .config import BaseConfig, ConfigError
from .image_processing import ImageProcessor, get_resize_output_image_size

logger = logging.getLogger(__name__)

VideoInput = str | os.PathLike | bytes


class VideoLoadError(ValueError):
    """A video cannot be opened or decoded. The message names the source."""


@dataclass
class VideoSampling(BaseConfig):
    """`video_sampling` of `preprocessor_config.json`.

    fps: Target frames per second.
    max_frames: Most frames sampled.
    video_size: `{"longest_edge": int}` for the first frame resize.
    skip_secs: Seconds skipped at each end of a long video (transformers' default).
    """

    fps: float = 1.0
    max_frames: int = 64
    video_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 512})
    skip_secs: float = 1.0

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.max_frames < 1:
            raise ConfigError(f"video_sampling needs fps > 0 and max_frames >= 1, got {self}")
        edge = self.video_size.get("longest_edge") if isinstance(self.video_size, dict) else None
        if not isinstance(edge, int) or edge <= 0:
            raise ConfigError(
                f"video_sampling.video_size needs a positive 'longest_edge', got {self.video_size!r}"
            )


@dataclass
class VideoMetadata:
    """What the container says about the video stream, plus the sampled frame indices."""

    total_num_frames: int
    fps: float
    duration: float
    height: int
    width: int
    frame_indices: list[int] = field(default_factory=list)

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame."""
        return [i / self.fps for i in self.frame_indices]


def sample_frame_indices(
    total_num_frames: int, video_fps: float, duration: float, sampling: VideoSampling
) -> np.ndarray:
    """Indices of the frames to keep, as transformers' `SmolVLMVideoProcessor.sample_frames`.

    Args:
        total_num_frames: Frames in the video.
        video_fps: The video's frame rate.
        duration: The video's length in seconds.
        sampling: Target fps, frame cap and end skipping.
    """
    desired = max(min(int(round(sampling.fps * duration)), sampling.max_frames), 1)
    start, end = 0, total_num_frames - 1
    skip = sampling.skip_secs
    if skip > 0 and duration - 2 * skip > sampling.max_frames * sampling.fps:
        start = int(skip * video_fps)
        end = int(total_num_frames - skip * video_fps)
    start, end = max(0, start), min(end, total_num_frames - 1)
    if start >= end:
        start, end = 0, total_num_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def _describe(source: VideoInput) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)


def read_video(
    source: VideoInput, sampling: VideoSampling
) -> tuple[list[Image.Image], VideoMetadata]:
    """Decode the sampled frames of a video with PyAV.

    Args:
        source: A file path or the file's bytes.
        sampling: How to pick frames.

    Returns:
        The sampled frames as RGB images and the video's metadata.

    Raises:
        VideoLoadError: The file is missing, not a video, has no video stream, or is corrupt.
    """
    name = _describe(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise VideoLoadError(f"Video file not found: {name}")
    try:
        with av.open(
            io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        ) as container:
            if not container.streams.video:
                raise VideoLoadError(f"No video stream in {name}")
            stream = container.streams.video[0]
            if not stream.average_rate:
                raise VideoLoadError(f"Video {name} has no frame rate")
            fps = float(stream.average_rate)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total < 1:
                raise VideoLoadError(f"Video {name} has no frames")
            metadata = VideoMetadata(total, fps, total / fps, stream.height, stream.width)
            indices = sample_frame_indices(total, fps, metadata.duration, sampling)
            container.seek(0)
            wanted, frames = set(indices.tolist()), []
            for i, frame in enumerate(container.decode(stream)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_image())
                    metadata.frame_indices.append(i)
    except av.FFmpegError as err:
        raise VideoLoadError(f"Cannot decode video {name}: {err}") from err
    if not frames:
        raise VideoLoadError(f"No frame of video {name} could be decoded")
    if len(frames) < len(indices):
        logger.warning(
            "Video %s: the container announced %d frames but only %d of the %d sampled ones decoded",
            name,
            total,
            len(frames),
            len(indices),
        )
    return frames, metadata


class VideoProcessor:
    """Samples, decodes and resizes video frames to one `M x M` tile each.

    Args:
        image_processor: Gives the tile size, resize filter and normalization.
        sampling: The checkpoint's `video_sampling`.
    """

    def __init__(self, image_processor: ImageProcessor, sampling: VideoSampling):
        self.image_processor = image_processor
        self.sampling = sampling

    def __call__(self, source: VideoInput) -> tuple[np.ndarray, VideoMetadata]:
        """Read a video and return uint8 frames `[N, M, M, 3]` with the metadata.

        Raises:
            VideoLoadError: The video cannot be read.
        """
        frames, metadata = read_video(source, self.sampling)
        tile = self.image_processor.config.tile_size
        out = np.empty((len(frames), tile, tile, 3), dtype=np.uint8)
        for i, frame in enumerate(frames):
            height, width = get_resize_output_image_size(
                frame.height, frame.width, self.sampling.video_size["longest_edge"]
            )
            frame = self.image_processor.resize(frame, height, width)
            out[i] = np.asarray(self.image_processor.resize(frame, tile, tile))
        return out, metadata
