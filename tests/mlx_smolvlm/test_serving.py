"""Loading a model to serve: a checkpoint directory, or cached random weights, said loudly."""

import logging
import shutil
from pathlib import Path

from mlx_smolvlm import random_weights
from mlx_smolvlm.serving import load_for_serving


def test_random_weights_fallback_is_cached_and_loud(hf_checkpoint, monkeypatch, tmp_path, caplog):
    made = []

    def fake_random_checkpoint(shape: str, path: str, dtype: str) -> Path:
        made.append((shape, dtype))
        shutil.copytree(hf_checkpoint(), path, dirs_exist_ok=True)
        return Path(path)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(random_weights, "make_random_checkpoint", fake_random_checkpoint)
    with caplog.at_level(logging.WARNING, logger="mlx_smolvlm.serving"):
        served = load_for_serving("HuggingFaceTB/NotOnThisMachine", random_weights_fallback=True)
    assert served.random_weights
    assert served.path == tmp_path / "cache" / "mlx_smolvlm" / "random-256m-float32"
    assert "RANDOM-WEIGHT" in caplog.text
    again = load_for_serving("HuggingFaceTB/NotOnThisMachine", random_weights_fallback=True)
    assert again.random_weights and made == [("256m", "float32")]
    real = load_for_serving(str(hf_checkpoint()), random_weights_fallback=True)
    assert not real.random_weights
