"""Loading a model to serve: a checkpoint directory, a Hub id (downloaded on first use, or the
cache offline), or cached random weights, said loudly."""

import importlib
import logging
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from mlx_smolvlm import random_weights
from mlx_smolvlm.serving import load_for_serving

load_module = importlib.import_module("mlx_smolvlm.load")  # the package's `load` is the function


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def unreachable_hub(monkeypatch, tmp_path):
    """A Hub that cannot be reached (a closed loopback port) and an empty Hugging Face cache:
    no test here leaves the machine."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def fake_random_checkpoints(hf_checkpoint, monkeypatch, tmp_path):
    """Random checkpoints made (once) by copying the tiny test checkpoint; the list of
    (shape, dtype) made."""
    made = []

    def fake_random_checkpoint(shape: str, path: str, dtype: str) -> Path:
        made.append((shape, dtype))
        shutil.copytree(hf_checkpoint(), path, dirs_exist_ok=True)
        return Path(path)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(random_weights, "make_random_checkpoint", fake_random_checkpoint)
    return made


def test_random_weights_fallback_is_cached_and_loud(
    hf_checkpoint, fake_random_checkpoints, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="mlx_smolvlm.serving"):
        served = load_for_serving("HuggingFaceTB/NotOnThisMachine", random_weights_fallback=True)
    assert served.random_weights
    assert served.path == tmp_path / "cache" / "mlx_smolvlm" / "random-256m-float32"
    assert "RANDOM-WEIGHT" in caplog.text
    again = load_for_serving("HuggingFaceTB/NotOnThisMachine", random_weights_fallback=True)
    assert again.random_weights and fake_random_checkpoints == [("256m", "float32")]
    real = load_for_serving(str(hf_checkpoint()), random_weights_fallback=True)
    assert not real.random_weights


def test_an_unreachable_hub_reaches_the_fallback_within_seconds(fake_random_checkpoints, caplog):
    """The real offline path: the Hub does not answer, nothing is cached, random weights."""
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        served = load_for_serving(
            "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", random_weights_fallback=True
        )
    assert time.monotonic() - start < 10
    assert served.random_weights
    assert "cannot be reached" in caplog.text
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "not in the Hugging Face cache while offline" in warning.getMessage()
    assert "RANDOM-WEIGHT" in warning.getMessage()


def test_a_slow_hub_is_offline_after_the_connect_timeout(monkeypatch):
    def hanging_connect(address, timeout):
        assert timeout == load_module.HUB_CONNECT_TIMEOUT_S
        raise TimeoutError("timed out")  # what a network that drops packets gives

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    assert not load_module.hub_reachable()


def test_with_network_the_hub_model_is_downloaded_with_the_loader_patterns(
    hf_checkpoint, monkeypatch, tmp_path, caplog
):
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        snapshot = tmp_path / "hub" / "snapshot"
        shutil.copytree(hf_checkpoint(), snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(load_module, "hub_reachable", lambda: True)
    monkeypatch.setattr(load_module, "snapshot_download", fake_snapshot_download)
    with caplog.at_level(logging.INFO, logger="mlx_smolvlm.load"):
        served = load_for_serving("org/model", random_weights_fallback=True)
    assert not served.random_weights and served.path == tmp_path / "hub" / "snapshot"
    kwargs = {"allow_patterns": load_module.HUB_PATTERNS, "local_files_only": False}
    assert calls == [("org/model", kwargs)]
    assert "Fetching org/model from the Hugging Face Hub" in caplog.text


@pytest.mark.parametrize("how", ["environment", "constant"])
def test_offline_mode_looks_in_the_cache_only(hf_checkpoint, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as --offline sets it
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls = []

    def cached_snapshot(repo_id: str, **kwargs: object) -> str:
        calls.append(kwargs["local_files_only"])
        return str(hf_checkpoint())

    monkeypatch.setattr(load_module, "hub_reachable", lambda: pytest.fail("the Hub was asked"))
    monkeypatch.setattr(load_module, "snapshot_download", cached_snapshot)
    served = load_for_serving("org/cached-model")
    assert calls == [True] and not served.random_weights


def test_without_the_fallback_a_missing_model_is_an_error():
    with pytest.raises(FileNotFoundError, match="No such directory: /nowhere/model"):
        load_for_serving("/nowhere/model")
    with pytest.raises(FileNotFoundError, match="'org/model' is not a local directory"):
        load_for_serving("org/model")
