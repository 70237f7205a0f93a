"""The mlx-smolvlm command line: generate and chat on a generated checkpoint."""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest

from mlx_smolvlm.cli import main, print_stream

load_module = importlib.import_module("mlx_smolvlm.load")  # the package's `load` is the function
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
    # The bad image is refused when attached, so "What is this?" is answered too.
    assert err.count("[prompt: ") == 3
    assert "1 image(s) attached" in out
    assert out.count("image(s) attached") == 1


def test_chat_commands_are_handled_not_sent_to_the_model(checkpoint, capsys, monkeypatch):
    lines = iter(
        ["/help", "/image /nonexistent/photo.jpg", "Hello?", "/imagine a cat", "/image", "/exit"]
    )
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert main(["chat", "--model", checkpoint, "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "/image PATH_OR_URL" in out and "/quit" in out  # /help lists the commands
    assert "Image file not found: /nonexistent/photo.jpg" in err  # checked at once
    assert err.count("[prompt: ") == 1  # only "Hello?" reached the model, without an image
    assert "[prompt: " in err and "attached" not in out
    assert "unknown command /imagine (/help lists them)" in err
    assert "/image needs a path or URL" in err


def test_chat_ends_at_end_of_input_on_a_new_line(checkpoint, capsys, monkeypatch):
    def no_more(_prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_more)
    assert main(["chat", "--model", checkpoint]) == 0
    assert capsys.readouterr().out.endswith("\n")


def fake_responses(*pieces: str):
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1
        yield SimpleNamespace(
            text=text, prompt_tokens=3, cached_tokens=0, prompt_tps=1.0, generation_tokens=i + 1,
            generation_tps=1.0, peak_memory=0.1, finish_reason="stop" if last else None,
        )  # fmt: skip


@pytest.mark.parametrize(
    "pieces, printed",
    [(("Hello", " world", ""), "Hello world\n"), (("A line\n", ""), "A line\n"), (("",), "\n")],
)
def test_the_answer_ends_with_exactly_one_newline(capsys, pieces, printed):
    print_stream(fake_responses(*pieces))
    out, err = capsys.readouterr()
    assert out == printed
    assert err.startswith("[prompt: 3 tokens")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--temp", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "0"], "max_tokens must be >= 1"),
        (["--min-p", "1.5"], "min_p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--image", "/nonexistent/photo.jpg"], "Image file not found: /nonexistent/photo.jpg"),
        (["--video", "/nonexistent/clip.mp4"], "Video file not found: /nonexistent/clip.mp4"),
    ],
)
def test_arguments_are_checked_before_the_model_loads(capsys, monkeypatch, extra, message):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(load_module, "load", no_load)
    assert main(["generate", "--model", "org/model", "--prompt", "Hi", *extra]) == 1
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "path",
    ["/nonexistent/model", "./no-model-here", "../no-model-here", "~/no-model-here", "a/b/c"],
)
def test_a_missing_local_model_is_no_such_directory(capsys, path):
    assert main(["generate", "--model", path, "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "error: No such directory: " in err and Path(path).name in err
    assert "Hub" not in err


def test_offline_flag_keeps_a_hub_id_to_the_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test; --offline sets it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(load_module, "hub_reachable", lambda: pytest.fail("the Hub was asked"))
    assert main(["chat", "--offline", "--model", "org/not-cached"]) == 1
    assert "'org/not-cached' is not a local directory, and not in the Hugging Face cache" in (
        capsys.readouterr().err
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    "command, defaults",
    [
        ("generate", ["(default: 256)", "(default: 1.0)", "--offline"]),
        ("chat", ["(default: 256)", "/image PATH_OR_URL", "/help"]),
        ("convert", ["(default: 4)", "(default: 32)", "(default: calibrated)"]),
    ],
)
def test_help_is_plain_text_with_defaults(capsys, command, defaults):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "Args:" not in text and "`" not in text
    for expected in defaults:
        assert expected in text
