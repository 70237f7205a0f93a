"""Video: frame sampling, PyAV decoding and the video prompt against transformers.

transformers' `SmolVLMVideoProcessor` cannot be instantiated without torchvision, so its
`sample_frames` is called unbound, and its `read_video_pyav` decodes the same files. Frame
*pixels* after resizing are not compared: transformers resizes video frames with torchvision.
Test videos are made with PyAV: each second has its own colour, and a strip of 8 black/white
blocks at the bottom spells the frame index in binary, so the decoded frames tell which ones
were sampled.
"""

import types
from functools import partial

import av
import numpy as np
import pytest
from test_prompt import (
    CONVERSATIONS,
    SMALL,
    StandInVideoProcessor,
    image_hashes,
    make_checkpoint,
    make_hf_processor,
    tiles_per_image,
)
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_utils import VideoMetadata as HFVideoMetadata
from transformers.video_utils import read_video_pyav

from mlx_smolvlm.processing import Processor
from mlx_smolvlm.video import VideoLoadError, VideoSampling, read_video, sample_frame_indices

COLOURS = np.array(
    [[220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30], [30, 220, 220], [220, 30, 220]]
)
WIDTH, HEIGHT = 64, 48  # the bottom 16 rows hold the 8 index blocks of 8x16 px


def write_video(path, seconds: int, fps: int, codec: str = "mpeg4"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(seconds * fps):
            pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
            pixels[:32] = COLOURS[(i // fps) % len(COLOURS)]
            for bit in range(8):
                pixels[32:, bit * 8 : bit * 8 + 8] = 255 if (i >> bit) & 1 else 0
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index(pixels: np.ndarray) -> int:
    strip = pixels[32:].mean(axis=(0, 2))
    return sum(1 << bit for bit in range(8) if strip[bit * 8 : bit * 8 + 8].mean() > 128)


def frame_colour(pixels: np.ndarray) -> int:
    return int(np.argmin(np.abs(COLOURS - pixels[4:28].reshape(-1, 3).mean(axis=0)).sum(axis=1)))


def hf_sample(sampling: VideoSampling):
    """transformers' SmolVLMVideoProcessor.sample_frames with our settings."""
    owner = types.SimpleNamespace(num_frames=sampling.max_frames, fps=sampling.fps)
    return partial(
        SmolVLMVideoProcessor.sample_frames,
        owner,
        num_frames=sampling.max_frames,
        fps=sampling.fps,
        skip_secs=1,
    )


CHECKPOINT = VideoSampling(fps=1, max_frames=64)  # the 256M/500M/2.2B video_sampling
SAMPLINGS = [CHECKPOINT, VideoSampling(fps=2, max_frames=4), VideoSampling(fps=1, max_frames=4)]


def test_sample_frame_indices_match_transformers():
    for sampling in [
        *SAMPLINGS,
        VideoSampling(fps=0.5, max_frames=8),
        VideoSampling(fps=3, max_frames=20),
    ]:
        for video_fps in (1.0, 4.0, 23.976, 30.0):
            for total in (1, 2, 7, 24, 100, 361, 3001):
                metadata = HFVideoMetadata(
                    total_num_frames=total, fps=video_fps, duration=total / video_fps
                )
                expected = hf_sample(sampling)(metadata)
                ours = sample_frame_indices(total, video_fps, total / video_fps, sampling)
                np.testing.assert_array_equal(
                    ours, expected, err_msg=f"{sampling} {video_fps} fps {total} frames"
                )


VIDEOS = {"3s_at_4fps": (3, 4), "12s_at_5fps": (12, 5), "7s_at_3fps": (7, 3)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {name: write_video(root / f"{name}.mp4", *spec) for name, spec in VIDEOS.items()}


@pytest.mark.parametrize("name", sorted(VIDEOS))
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["checkpoint", "fps2_max4", "fps1_max4"])
def test_decoded_frames_match_transformers(videos, name, sampling):
    seconds, fps = VIDEOS[name]
    frames, metadata = read_video(videos[name], sampling)
    expected_frames, expected = read_video_pyav(
        str(videos[name]), sample_indices_fn=hf_sample(sampling)
    )
    assert metadata.frame_indices == list(expected.frames_indices)
    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (
        expected.total_num_frames,
        expected.fps,
        expected.duration,
    )
    assert metadata.timestamps == expected.timestamps
    for frame, expected_frame, index in zip(
        frames, expected_frames, metadata.frame_indices, strict=True
    ):
        pixels = np.asarray(frame)
        np.testing.assert_array_equal(pixels, expected_frame)
        assert frame_index(pixels) == index
        assert frame_colour(pixels) == (index // fps) % len(COLOURS)


def test_long_video_skips_the_ends(tmp_path):
    # 12 s at 5 fps with 4 frames at 1 fps: 12 - 2 > 4, so the first and last second are skipped.
    frames, metadata = read_video(
        write_video(tmp_path / "v.mp4", 12, 5), VideoSampling(fps=1, max_frames=4)
    )
    assert metadata.frame_indices == [5, 21, 38, 55]
    assert [frame_colour(np.asarray(f)) for f in frames] == [1, 4, 1, 5]


def test_container_without_frame_count(tmp_path):
    # Matroska stores no frame count (PyAV reports 0, where transformers' reader would then
    # sample nothing); the frames are counted from the packets instead.
    path = write_video(tmp_path / "clip.mkv", 5, 4)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    frames, metadata = read_video(path, CHECKPOINT)
    assert metadata.total_num_frames == 20 and metadata.duration == 5.0
    assert metadata.frame_indices == [0, 4, 9, 14, 19]
    assert [frame_index(np.asarray(f)) for f in frames] == metadata.frame_indices


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("video_ckpt"), **SMALL)


def expected_ids(checkpoint, text, path, sampling):
    """transformers' SmolVLMProcessor expansion of `<video>` for the frames it would sample."""
    _, metadata = read_video_pyav(str(path), sample_indices_fn=hf_sample(sampling))
    video_processor = StandInVideoProcessor(len(metadata.frames_indices), metadata)
    return list(
        make_hf_processor(checkpoint, video_processor)(text=[text], videos=[str(path)])[
            "input_ids"
        ][0]
    )


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_video_prompt_ids_match_transformers(checkpoint, videos, name):
    processor = Processor.from_pretrained(checkpoint)
    text = processor.apply_chat_template(CONVERSATIONS["video"])
    out = processor(text, video=videos[name])
    assert out.input_ids == expected_ids(checkpoint, text, videos[name], CHECKPOINT)
    seconds, _ = VIDEOS[name]
    assert out.pixel_values.shape == (seconds, 3, 128, 128)
    assert out.pixel_attention_mask.all()
    assert tiles_per_image(out) == [1] * seconds and len(image_hashes(out)) == seconds


def test_video_prompt_text_and_timestamps(checkpoint, tmp_path):
    # 70 s at 1 fps, 4 frames: ends skipped, frames 1, 23, 46, 69 -> minutes:seconds stamps.
    path = write_video(tmp_path / "long.mp4", 70, 1)
    root = make_checkpoint(
        tmp_path / "ckpt",
        **SMALL,
        video_sampling={"fps": 1, "max_frames": 4, "video_size": {"longest_edge": 128}},
    )
    processor = Processor.from_pretrained(root)
    text = processor.apply_chat_template(CONVERSATIONS["video"])
    out = processor(text, video=path)
    decoded = processor.tokenizer.decode(out.input_ids)
    block = "<fake_token_around_image><global-img>" + "<image>" * 64 + "<fake_token_around_image>"
    assert decoded == (
        "<|im_start|>User: You are provided the following series of four frames from a 0:01:10 [H:MM:SS] video.\n"
        + "".join(f"\nFrame from {stamp}:{block}" for stamp in ("00:01", "00:23", "00:46", "01:09"))
        + "\n\nSummarize.<end_of_utterance>\nAssistant:"
    )
    sampling = VideoSampling(fps=1, max_frames=4)
    assert out.input_ids == expected_ids(root, text, path, sampling)


def test_video_from_bytes_equals_path(checkpoint, videos):
    processor = Processor.from_pretrained(checkpoint)
    path = videos["3s_at_4fps"]
    from_path = processor("<video>", video=path)
    from_bytes = processor("<video>", video=path.read_bytes())
    np.testing.assert_array_equal(from_path.pixel_values, from_bytes.pixel_values)
    np.testing.assert_array_equal(from_path.input_ids, from_bytes.input_ids)


def test_bad_videos_name_the_culprit(tmp_path, videos):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a video at all")
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(videos["12s_at_5fps"].read_bytes()[:2000])
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    cases = {
        tmp_path / "missing.mp4": "not found: .*missing.mp4",
        text_file: "notes.txt",
        truncated: "cut.mp4",
        audio: "No video stream in .*tone.wav",
        b"\x00" * 100: "100 bytes",
    }
    for source, match in cases.items():
        with pytest.raises(VideoLoadError, match=match):
            read_video(source, CHECKPOINT)


def test_checkpoint_without_video_sampling(tmp_path, videos):
    root = make_checkpoint(tmp_path, **SMALL, video_sampling=None)
    with pytest.raises(ValueError, match="no video_sampling"):
        Processor.from_pretrained(root)("<video>", video=videos["3s_at_4fps"])


def test_bad_sampling_configs():
    with pytest.raises(ValueError, match="fps > 0"):
        VideoSampling.from_dict({"fps": 0, "max_frames": 4})
    with pytest.raises(ValueError, match="video_size"):
        VideoSampling.from_dict({"fps": 1, "max_frames": 4, "video_size": {"height": 3}})
