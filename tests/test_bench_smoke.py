"""Smoke test of the tokens-per-second benchmark on a tiny checkpoint, its bad-input handling,
and the CPU speed-ups it measures (the GEMV shim and the NumPy kernels) against plain MLX."""

import importlib.util
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from benchmarks import tokens_per_second as bench
from benchmarks.workloads import TEXT_PROMPT_TOKENS, RunResult
from mlx_smolvlm import device_ops
from mlx_smolvlm.blas import gemv_shim_calls
from mlx_smolvlm.config import ModelConfig
from mlx_smolvlm.load import WEIGHTS_FILE
from mlx_smolvlm.model import Model
from mlx_smolvlm.random_weights import init_random, write_assets

METRICS = ("load_s", "preprocess_s", "ttft_s", "prefill_tps", "decode_tps", "peak_memory_gb")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The 256M files with 2-layer towers, 64x64 tiles and 4 tokens per tile."""
    path = tmp_path_factory.mktemp("tiny_bench")
    write_assets("256m", path)
    config = json.loads((path / "config.json").read_text())
    config["scale_factor"] = 2
    config["text_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    config["vision_config"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, max_image_size={"longest_edge": 64}, size={"longest_edge": 128},
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["max_image_size"] = {"longest_edge": 64}
    pre["size"] = {"longest_edge": 128}
    pre["video_sampling"]["video_size"] = {"longest_edge": 64}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    model = Model(ModelConfig.from_dict(config))
    init_random(model)
    mx.save_safetensors(str(path / WEIGHTS_FILE), model.hf_weights(), metadata={"format": "pt"})
    return path


def test_benchmark_runs_every_workload_and_writes_json(tiny_checkpoint, tmp_path):
    config = bench.BenchConfig(
        model=str(tiny_checkpoint),
        precisions=("fp32", "fp64"),
        peers=("no-such-peer",),
        out=str(tmp_path),
        max_tokens=3,
        timeout_s=300,
    )
    report = bench.run_benchmark(config)

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["results"] == report["results"]
    assert written["bandwidth"]["gemv_gbps"] > 0
    results = {(r["system"], r["workload"]): r for r in report["results"]}
    for workload in ("a", "b", "c"):
        ours = results[("mlx_smolvlm fp32", workload)]
        assert ours["status"] == "ok", ours
        for metric in METRICS:
            assert ours[metric] is not None and ours[metric] > 0, (workload, metric)
        assert ours["generated_tokens"] == 3
        assert 0 < ours["bandwidth_fraction"]
        assert (ours["vision_s"] is None) == (workload == "b")
        # Bad systems get a clear status and do not stop the others.
        assert "unknown precision 'fp64'" in results[("mlx_smolvlm fp64", workload)]["status"]
        assert "unknown peer 'no-such-peer'" in results[("no-such-peer", workload)]["status"]
    assert results[("mlx_smolvlm fp32", "b")]["prompt_tokens"] == TEXT_PROMPT_TOKENS
    table = bench.format_table([RunResult(**r) for r in report["results"]])
    assert "mlx_smolvlm fp32" in table and "decode tok/s" in table
    assert "ours_best_decode" in report["summary"]["a"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").stat().st_size > 0


def test_missing_model_unknown_shape_and_missing_peer_are_reported(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlx_vlm" else real_find_spec(name, *a),
    )
    config = bench.BenchConfig(
        model=str(tmp_path / "nowhere"), peers=("mlx-vlm",), workloads=("b",)
    )
    model_dir, systems, errors = bench.check_config(config)
    assert model_dir is None and systems == []
    statuses = {r.system: r.status for r in errors}
    assert statuses["mlx-vlm"] == "error: mlx-vlm is not installed (pip install mlx-vlm)"
    assert "nowhere is not a checkpoint directory" in statuses["mlx_smolvlm fp32"]

    _, _, errors = bench.check_config(bench.BenchConfig(shape="1b", peers=(), workloads=("b",)))
    assert "Unknown shape '1b'" in errors[0].status
    with pytest.raises(ValueError, match="Unknown workloads"):
        bench.check_config(bench.BenchConfig(workloads=("z",)))


def test_worker_time_limit_is_a_status(tiny_checkpoint, tmp_path):
    spec = {"system": "mlx_smolvlm", "config": "fp32", "model": str(tiny_checkpoint),
            "workload": "b", "inputs_dir": str(tmp_path), "max_tokens": 2}  # fmt: skip
    result = bench.run_isolated(bench.System("mlx_smolvlm", "fp32"), spec, timeout_s=0.2)
    assert result.status == "timed out after 0 s"


def test_chart_without_matplotlib_is_a_message(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not bench.draw_chart([RunResult("x", "a")], tmp_path / "c.png")
    assert "matplotlib is not installed" in caplog.text


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "transpose_a", "transpose_b"),
    [
        ((1, 96), (96, 80), False, False),
        ((1, 96), (80, 96), False, True),
        ((96, 1), (96, 80), True, False),
        ((80, 96), (96, 1), False, False),
        ((96, 80), (96, 1), True, False),
        ((80, 96), (1, 96), False, True),
        ((3, 1, 96), (3, 96, 80), False, False),
    ],
)
def test_gemv_shim_products_equal_numpy(a_shape, b_shape, transpose_a, transpose_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal(b_shape, dtype=np.float32)
    a_mx, b_mx = mx.array(a), mx.array(b)
    if transpose_a:
        a, a_mx = a.swapaxes(-1, -2), a_mx.swapaxes(-1, -2)
    if transpose_b:
        b, b_mx = b.swapaxes(-1, -2), b_mx.swapaxes(-1, -2)
    before = gemv_shim_calls()
    out = a_mx @ b_mx
    mx.eval(out)
    np.testing.assert_allclose(np.array(out), a @ b, rtol=1e-5, atol=1e-5)
    if before is not None:
        assert gemv_shim_calls() > before


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(2, 80, 96), (3, 10, 17), (4, 130, 131), (5, 576, 576), (7, 9, 64), (16, 333, 200)],
)
def test_small_m_products_equal_numpy_and_rows_do_not_depend_on_the_batch(m, n, k):
    # Batched decoding's (M <= 16) x Linear-weight products; (4, 130, 131) and larger are split
    # over the shim's helper thread; odd N and K exercise the tails.
    rng = np.random.default_rng(m)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    out = mx.array(a) @ mx.array(w).T
    mx.eval(out)
    np.testing.assert_allclose(np.array(out), a @ w.T, rtol=1e-4, atol=1e-4)
    if m > 2:
        pair = mx.array(a[1:3]) @ mx.array(w).T
        np.testing.assert_array_equal(np.array(pair), np.array(out)[1:3])


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "L", "S", "mask"),
    [(4, 4, 96, 96, None), (6, 2, 96, 96, "causal"), (6, 2, 40, 200, "causal"),
     (4, 4, 128, 128, "bool"), (4, 2, 96, 160, "additive")],
)  # fmt: skip
@pytest.mark.parametrize("chunk_values", [device_ops.CHUNK_VALUES, 4000])  # 4000: split rows
def test_numpy_attention_equals_mlx(monkeypatch, n_heads, n_kv, L, S, mask, chunk_values):
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "numpy")
    monkeypatch.setattr(device_ops, "CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((2, n_heads, L, 64), dtype=np.float32))
    k = mx.array(rng.standard_normal((2, n_kv, S, 64), dtype=np.float32))
    v = mx.array(rng.standard_normal((2, n_kv, S, 64), dtype=np.float32))
    if mask == "bool":
        mask = mx.array(rng.random((2, 1, 1, S)) > 0.3)
    elif mask == "additive":
        mask = mx.array(rng.standard_normal((1, 1, L, S), dtype=np.float32))
    assert device_ops.use_numpy(q, 2 * n_heads * L * S)
    out = device_ops.attention(q, k, v, 0.125, mask)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=2e-6)


def test_numpy_activations_equal_mlx(monkeypatch):
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "numpy")
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((64, 2048), dtype=np.float32) * 6)
    up = mx.array(rng.standard_normal((64, 2048), dtype=np.float32))
    np.testing.assert_allclose(
        np.array(device_ops.gelu_tanh(x)), np.array(nn.gelu_approx(x)), atol=2e-6
    )
    x = x * 20  # silu's exp(-x) overflows for x < -88
    np.testing.assert_allclose(
        np.array(device_ops.silu_mul(x, up)), np.array(nn.silu(x) * up), rtol=1e-5, atol=1e-5
    )


def test_decode_sized_silu_and_rope_equal_mlx(monkeypatch):
    # Below NumPy's threshold the CPU backend computes SiLU through `power` and RoPE from
    # cosine/sine tables; both must equal MLX's own operations.
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "auto")
    rng = np.random.default_rng(3)
    gate = mx.array(np.concatenate([rng.standard_normal(1530) * 8, [-200, -90, 0, 90, 200, 1]]))
    up = mx.array(rng.standard_normal(1536, dtype=np.float32))
    np.testing.assert_allclose(
        np.array(device_ops.silu_mul(gate, up)), np.array(nn.silu(gate) * up), rtol=1e-5, atol=1e-6
    )
    x = rng.standard_normal((3, 9, 5, 64), dtype=np.float32)
    for offset in (0, 37, [0, 4, 1000]):
        # transformers' Llama RoPE, in float32 as it computes it.
        inv_freq = 1.0 / (np.float32(1e5) ** (np.arange(0, 64, 2, dtype=np.float32) / 64))
        positions = np.asarray(offset, dtype=np.float32).reshape(-1, 1, 1) + np.arange(5)
        angles = (positions[..., None] * inv_freq).astype(np.float32)
        cos, sin = (
            np.cos(np.concatenate([angles] * 2, -1)),
            np.sin(np.concatenate([angles] * 2, -1)),
        )
        expected = x * cos + np.concatenate([-x[..., 32:], x[..., :32]], -1) * sin
        position = mx.array(offset, dtype=mx.int32) if isinstance(offset, list) else offset
        got = device_ops.Rotary(64, 1e5, position, 5)(mx.array(x))
        # A float32 angle near 1000 rad is only defined to 6e-5, whoever rounds it.
        np.testing.assert_allclose(np.array(got), expected, atol=2e-4 if offset else 1e-6)


def test_kernel_choice(monkeypatch):
    small, large = mx.zeros((4, 4)), mx.zeros((512, 512))
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "auto")
    assert not device_ops.use_numpy(small)
    assert device_ops.use_numpy(large) == (mx.default_device() == mx.cpu)
    assert not device_ops.use_numpy(large.astype(mx.bfloat16))
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "mlx")
    assert not device_ops.use_numpy(large)
    monkeypatch.setenv("MLX_SMOLVLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="MLX_SMOLVLM_KERNELS='fast'"):
        device_ops.use_numpy(large)


def test_compute_dtype(monkeypatch):
    monkeypatch.delenv("MLX_SMOLVLM_DTYPE", raising=False)
    on_cpu = mx.default_device() == mx.cpu
    assert device_ops.compute_dtype(mx.bfloat16) == (mx.float32 if on_cpu else mx.bfloat16)
    monkeypatch.setenv("MLX_SMOLVLM_DTYPE", "float16")
    assert device_ops.compute_dtype(mx.bfloat16) == mx.float16
    monkeypatch.setenv("MLX_SMOLVLM_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MLX_SMOLVLM_DTYPE='fp8'"):
        device_ops.compute_dtype(mx.float32)
