"""Load mlx_smolvlm (and with it the optimized BLAS) before any test module imports mlx.core;
keep the routers' spend files out of the user's state folder."""

import pytest

import mlx_smolvlm  # noqa: F401


@pytest.fixture(autouse=True)
def spend_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's routers (and router processes) keep their spend (router/spend_store.py) in
    a folder of their own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
