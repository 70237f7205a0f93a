"""Image processor parity with transformers' SmolVLMImageProcessorPil, loading and bad input.

Parity is exact: every case asserts max |ours - transformers| == 0.0 on pixel_values.
"""

import base64
import io
import json
import logging
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.smolvlm import image_processing_pil_smolvlm as hf_pil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from mlx_smolvlm.image_processing import (
    ImageLoadError,
    ImageProcessor,
    ImageProcessorConfig,
    convert_to_rgb,
    get_resize_output_image_size,
    load_image,
)

SHAPES = Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "shapes"
CONFIG_256M = json.loads((SHAPES / "256m" / "preprocessor_config.json").read_text())
CONFIG_2B = json.loads((SHAPES / "2.2b" / "preprocessor_config.json").read_text())
# The real configs scaled down (longest edge 384, 128 px tiles) so most cases run fast.
CONFIG_SMALL = {
    **CONFIG_256M,
    "size": {"longest_edge": 384},
    "max_image_size": {"longest_edge": 128},
}

logger = logging.getLogger(__name__)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    # A smooth gradient on top of the noise so resampling sees real structure.
    pixels[..., 0] = (np.arange(width)[None, :] * 255 // max(width - 1, 1)).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale for 2-D input, RGB for 3-D); Pillow cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def palette_image() -> Image.Image:
    image = random_image(90, 70).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return Image.open(io.BytesIO(encoded(image)))


def assert_parity(config: dict, batch: list[list]) -> None:
    """Our output equals transformers' on a batch of samples (lists of PIL images)."""
    theirs = SmolVLMImageProcessorPil(**config)(images=batch, return_row_col_info=True)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))(batch)
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == theirs["pixel_values"].shape
    diff = float(np.abs(ours.pixel_values - theirs["pixel_values"]).max())
    assert diff == 0.0, f"max abs diff {diff}"
    np.testing.assert_array_equal(
        ours.pixel_attention_mask, theirs["pixel_attention_mask"].astype(bool)
    )
    assert ours.rows == theirs["rows"] and ours.cols == theirs["cols"]


CASES = {
    "tiny_20x30": lambda: random_image(20, 30),
    "square_512": lambda: random_image(512, 512),
    "photo_640x480": lambda: random_image(640, 480),
    "panorama_4000x300": lambda: random_image(4000, 300),
    "portrait_300x4000": lambda: random_image(300, 4000),
    "odd_333x251": lambda: random_image(333, 251),
    "grayscale": lambda: random_image(200, 150, "L"),
    "rgba": lambda: random_image(160, 120, "RGBA"),
    "palette_with_transparency": palette_image,
    "cmyk_jpeg": lambda: Image.open(io.BytesIO(encoded(random_image(150, 100, "CMYK"), "JPEG"))),
    "png_16bit_rgb": lambda: Image.open(
        io.BytesIO(png16(np.random.default_rng(1).integers(0, 65536, (60, 80, 3), dtype=np.uint16)))
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_small_config(name):
    assert_parity(CONFIG_SMALL, [[CASES[name]()]])


def test_parity_no_splitting():
    assert_parity(
        {**CONFIG_SMALL, "do_image_splitting": False},
        [[random_image(640, 480), random_image(30, 20)]],
    )


def test_parity_two_images_of_different_sizes_in_one_prompt():
    assert_parity(CONFIG_SMALL, [[random_image(640, 480), random_image(300, 4000, seed=1)]])


def test_parity_batch_pads_samples_with_fewer_images():
    # 256 px longest edge, 128 px tiles: 640x480 gives 2x2 tiles + global = 5 entries; the other
    # sample has 3 + 1 entries and is padded with a zero image and a zero mask.
    config = {**CONFIG_SMALL, "size": {"longest_edge": 256}}
    assert_parity(
        config, [[random_image(640, 480)], [random_image(20, 40), random_image(40, 20, seed=2)]]
    )


@pytest.mark.parametrize("size", [(640, 480), (20, 30)])
def test_parity_real_256m_config(size):
    assert_parity(CONFIG_256M, [[random_image(*size)]])


def test_parity_real_2b_config():
    assert_parity(CONFIG_2B, [[random_image(640, 480)]])


def test_resize_sizes_match_transformers():
    # Includes a 5000 px target, where transformers caps the longest edge at 4096.
    for longest in (128, 384, 1536, 2048, 5000):
        for height, width in [
            (1, 1),
            (1, 9000),
            (9000, 1),
            (30, 20),
            (480, 640),
            (301, 4001),
            (777, 777),
        ]:
            shape_only = np.broadcast_to(np.uint8(0), (3, height, width))
            expected = hf_pil.get_resize_output_image_size(shape_only, resolution_max_side=longest)
            assert get_resize_output_image_size(height, width, longest) == expected, (
                height,
                width,
                longest,
            )


def test_real_256m_640x480_is_13_tiles():
    out = ImageProcessor(ImageProcessorConfig.from_dict(CONFIG_256M))([random_image(640, 480)])
    assert out.pixel_values.shape == (1, 13, 3, 512, 512)
    assert (out.rows, out.cols) == ([[3]], [[4]])


def test_no_upscale_keeps_512x384_in_one_tile():
    image = random_image(512, 384)
    theirs = SmolVLMImageProcessorPil(**CONFIG_256M)(images=[[image]], return_row_col_info=True)
    assert theirs["pixel_values"].shape[1] == 13
    config = ImageProcessorConfig.from_dict({**CONFIG_256M, "upscale_small_images": False})
    ours = ImageProcessor(config)([image])
    assert ours.pixel_values.shape == (1, 1, 3, 512, 512)
    assert (ours.rows, ours.cols) == ([[0]], [[0]])


def test_no_upscale_still_shrinks_large_images_like_transformers():
    config = {**CONFIG_SMALL, "upscale_small_images": False}
    assert_parity(config, [[random_image(1000, 700)]])
    out = ImageProcessor(ImageProcessorConfig.from_dict(config))([random_image(300, 100)])
    # 300x100 stays native: 3x1 tiles of 128 (rounded up to 384x128) plus the global image.
    assert (out.rows, out.cols, out.pixel_values.shape[1]) == ([[1]], [[3]], 4)


def test_16bit_grayscale_keeps_high_byte():
    values = np.linspace(0, 65535, 70 * 90).reshape(70, 90).astype(np.uint16)
    image = Image.open(io.BytesIO(png16(values)))
    assert image.mode == "I;16"
    rgb = np.asarray(convert_to_rgb(image))
    np.testing.assert_array_equal(rgb[..., 0], (values >> 8).astype(np.uint8))
    # Same result as transformers on the equivalent 8-bit image...
    eight_bit = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    theirs = SmolVLMImageProcessorPil(**CONFIG_SMALL)(images=[[eight_bit]])["pixel_values"]
    ours = ImageProcessor(ImageProcessorConfig.from_dict(CONFIG_SMALL))([image]).pixel_values
    assert float(np.abs(ours - theirs).max()) == 0.0
    # ...where transformers on the 16-bit file saturates (Pillow clips I;16 -> RGB at 255).
    saturated = SmolVLMImageProcessorPil(**CONFIG_SMALL)(images=[[image]])["pixel_values"]
    assert (saturated == 1.0).mean() > 0.9


def test_sources_give_the_same_pixels(tmp_path, http_server):
    image = random_image(90, 60)
    data = encoded(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(image)
    for source in (path, str(path), data, data_url, f"{http_server}/ok.png", image):
        np.testing.assert_array_equal(np.asarray(convert_to_rgb(load_image(source))), expected)


def test_exif_orientation_is_applied():
    image = random_image(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (40, 80)


def test_bad_local_inputs_name_the_culprit(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(encoded(random_image(200, 200))[:500])
    cases = {
        str(tmp_path / "missing.png"): "missing.png",
        str(text_file): "notes.txt",
        str(truncated): "cut.png",
        b"": "0 bytes",
        b"GIF89a garbage": "14 bytes",
        "data:image/png;base64,@@@": "invalid base64",
        "data:image/png,rawdata": "not base64",
        "data:image/png;base64," + base64.b64encode(b"nope").decode(): "Cannot decode",
    }
    for source, culprit in cases.items():
        with pytest.raises(ImageLoadError, match=culprit):
            load_image(source)
    with pytest.raises(ImageLoadError, match="PIL image .*image file is truncated"):
        load_image(Image.open(truncated))
    with pytest.raises(TypeError, match="int"):
        load_image(42)
    processor = ImageProcessor(ImageProcessorConfig.from_dict(CONFIG_SMALL))
    with pytest.raises(ValueError, match="No images"):
        processor([])


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="max_image_size"):
        ImageProcessorConfig.from_dict({**CONFIG_SMALL, "max_image_size": {"height": 3}})
    with pytest.raises(ValueError, match="image_std"):
        ImageProcessorConfig.from_dict({**CONFIG_SMALL, "image_std": [0.5, 0, 0.5]})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessorConfig.from_dict({**CONFIG_SMALL, "resample": 42})


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's hook name
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path == "/drip.png":  # a trickle that never trips the per-read timeout
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 10)
                self.wfile.flush()
                time.sleep(0.05)
            return
        if self.path == "/missing.png":
            self.send_error(404)
            return
        body = encoded(random_image(90, 60)) if self.path != "/big.png" else b"\0" * 5000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bad_urls_name_the_culprit(http_server):
    with pytest.raises(ImageLoadError, match="missing.png.*404"):
        load_image(f"{http_server}/missing.png")
    with pytest.raises(ImageLoadError, match="big.png is larger than the 1000 byte limit"):
        load_image(f"{http_server}/big.png", max_bytes=1000)
    with pytest.raises(ImageLoadError, match="slow.png.*timed out"):
        load_image(f"{http_server}/slow.png", timeout=0.2)
    with pytest.raises(ImageLoadError, match="drip.png took longer than 0.5 s"):
        load_image(f"{http_server}/drip.png", timeout=0.5)
    with pytest.raises(ImageLoadError, match="127.0.0.1:9/x.png"):
        load_image("http://127.0.0.1:9/x.png", timeout=1)


@pytest.mark.slow
def test_faster_than_transformers():
    """Speed vs SmolVLMImageProcessorPil on the same images, real 256M config (13 tiles each)."""
    images = [random_image(640, 480, seed=s) for s in range(5)]
    theirs = SmolVLMImageProcessorPil(**CONFIG_256M)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(CONFIG_256M))

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for image in images:
                fn(image)
            times.append((time.perf_counter() - start) / len(images))
        return min(times)

    t_theirs = best_of(lambda im: theirs(images=[[im]], return_row_col_info=True))
    t_ours = best_of(lambda im: ours([im]))
    logger.warning(
        "640x480 -> 13 tiles: transformers %.1f ms, ours %.1f ms, %.2fx",
        1e3 * t_theirs,
        1e3 * t_ours,
        t_theirs / t_ours,
    )
    assert t_ours < t_theirs
