"""The mlx-smolvlm command line: generate and chat on a generated checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest

from mlx_smolvlm.cli import main

IMAGE = str(Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "example.jpg")


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    return str(hf_checkpoint())


def test_generate_streams_text_then_one_stats_line(checkpoint):
    args = ["generate", "--model", checkpoint, "--image", IMAGE, "--prompt", "What is this?"]
    run = subprocess.run(
        [sys.executable, "-m", "mlx_smolvlm.cli", *args, "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    stats = run.stderr.strip().splitlines()[-1]
    assert stats.startswith("[prompt: ") and "generation: " in stats and "tok/s" in stats


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/nonexistent/photo.jpg"], "photo.jpg"),
        (["--video", "/nonexistent/clip.mp4"], "clip.mp4"),
        (["--temp", "-1"], "temperature"),
    ],
)
def test_generate_reports_bad_input_without_a_traceback(checkpoint, capsys, extra, message):
    code = main(["generate", "--model", checkpoint, "--prompt", "Hi", *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err


def test_generate_reports_a_missing_model(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "Hi"]) == 1
    assert "nothing" in capsys.readouterr().err


def test_chat_attaches_images_and_survives_errors(checkpoint, capsys, monkeypatch, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    lines = iter(
        [f"/image {broken}", "What is this?", f"/image {IMAGE}", "And this?", "More?", "/quit"]
    )
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert main(["chat", "--model", checkpoint, "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "broken.jpg" in err  # the bad image is reported, and the session goes on
    assert err.count("[prompt: ") == 2
    assert "1 image(s) attached" in out
